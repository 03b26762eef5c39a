"""Checkpoint formats: Hugging Face directories (hf.py), GGUF read (gguf.py) and write (gguf_export.py)."""
