"""Transformer families written from first principles: one self-contained file each."""
