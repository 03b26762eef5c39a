"""Compression by changing the weights: pruning and distillation (weight-only quantization is :mod:`corelm.quant`)."""
