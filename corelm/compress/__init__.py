"""Compression and fast inference: weight-only quantization, pruning, distillation, speculative decoding."""
