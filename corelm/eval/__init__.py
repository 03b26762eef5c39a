"""Evaluation: classification and entity metrics, BLEU/ROUGE, sliding-window perplexity."""

from corelm.eval.bleu_rouge import bleu, generation_report, rouge
from corelm.eval.metrics import accuracy, classification_report, confusion_matrix
from corelm.eval.ner import entity_report
from corelm.eval.perplexity import perplexity

__all__ = ["accuracy", "bleu", "classification_report", "confusion_matrix", "entity_report",
           "generation_report", "perplexity", "rouge"]
