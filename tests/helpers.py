"""Small references shared by the tests."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_by_full_forward(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens, each from a full forward over the whole sequence (no KV cache): the reference."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]
