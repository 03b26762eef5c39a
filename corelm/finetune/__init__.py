"""Fine-tuning: methods as model transforms (LoRA, AdaLoRA, adapters), task heads, and runs.

``apply_lora(model, targets)`` / ``apply_adalora`` / ``apply_adapters`` swap ``nn.Linear`` children; the
base model never knows. :func:`corelm.finetune.run.finetune` sets up a task and trains it with the one
training loop; :func:`corelm.finetune.run.load_run` loads a run directory back.
"""

from corelm.finetune.adalora import RankAllocator, apply_adalora
from corelm.finetune.adapters import apply_adapters
from corelm.finetune.heads import SequenceClassifier, TokenClassifier
from corelm.finetune.lora import apply_lora, merge_lora, set_merged

__all__ = ["RankAllocator", "SequenceClassifier", "TokenClassifier", "apply_adalora", "apply_adapters",
           "apply_lora", "merge_lora", "set_merged"]
