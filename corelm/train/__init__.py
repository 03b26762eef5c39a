"""Training: one loop (``loop.train``) and the pieces it is made of."""

from corelm.train.loader import ResumableLoader
from corelm.train.loop import TrainConfig, TrainResult, evaluate_loss, train

__all__ = ["ResumableLoader", "TrainConfig", "TrainResult", "evaluate_loss", "train"]
