"""Sampling is total: every accepted parameter value turns finite logits into a distribution.

Values whose arithmetic leaves fp32's range (temperature 1e-300 or 1e-40, top_p 5e-324, repetition
penalty 1e-300 or 1e300) once made NaN probabilities, and ``torch.multinomial`` raised in the server's
batcher step. These tests hold the one sampler in ``corelm.ops.sampling`` (which the engine, the fast
path and speculative decoding all call) to the rule.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from corelm.generate.speculative import rejection_step
from corelm.ops.sampling import (
    apply_repetition_penalty,
    sample_from_logits,
    scale_by_temperature,
    temperature_probs,
)

EXTREMES = [5e-324, 1e-300, 1e-45, 1e-40, 1e-38, 1e-7, 1e300, 1.7e308]
positive = (st.floats(min_value=5e-324, max_value=1.7e308, allow_nan=False, allow_infinity=False)
            | st.sampled_from(EXTREMES))
logits_rows = st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)
                       | st.sampled_from([0.0, 1.0]),
                       min_size=2, max_size=12)


@settings(max_examples=300, deadline=None)
@given(row=logits_rows, temperature=positive | st.just(0.0), top_k=st.integers(0, 14),
       top_p=st.floats(min_value=5e-324, max_value=1.0) | st.sampled_from([5e-324, 1e-300, 1e-40, 1.0]),
       penalty=positive, seed=st.integers(0, 2**32))
def test_any_accepted_values_sample_a_valid_token(row, temperature, top_k, top_p, penalty, seed) -> None:
    logits = torch.tensor([row, row[::-1]])  # (2, V)
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[:, ::2] = True
    for p in (penalty, torch.tensor([[penalty], [penalty]])):  # the server's float, the engine's (B, 1) tensor
        penalized = apply_repetition_penalty(logits, seen, p)
        assert torch.isfinite(penalized).all()
        generator = torch.Generator().manual_seed(seed)
        tokens = sample_from_logits(penalized, temperature, top_k, top_p, [generator, None])
        assert tokens.shape == (2,) and ((0 <= tokens) & (tokens < len(row))).all()
    if temperature:
        probs = temperature_probs(logits, temperature)
        assert torch.isfinite(probs).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_a_vanishing_temperature_is_greedy_and_a_huge_one_uniform() -> None:
    logits = torch.tensor([[1.0, 1.0 + 2**-20, -3.0, 0.0]])
    for t in (5e-324, 1e-300, 1e-40):
        assert scale_by_temperature(logits, t)[0, 1] == 0  # the best token, finite
        torch.testing.assert_close(temperature_probs(logits, t), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
        generator = torch.Generator().manual_seed(0)
        assert [int(sample_from_logits(logits, t, 0, 1.0, generator)) for _ in range(20)] == [1] * 20
    torch.testing.assert_close(temperature_probs(logits, 1e300), torch.full((1, 4), 0.25))
    # an ordinary temperature is untouched by the max shift: softmax(logits / t)
    torch.testing.assert_close(temperature_probs(logits, 0.7), torch.softmax(logits / 0.7, dim=-1))


def test_a_top_p_below_fp32_range_keeps_the_most_likely_token() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0]])
    generator = torch.Generator().manual_seed(0)
    for p in (5e-324, 1e-300, 1e-50):
        assert int(sample_from_logits(logits, 1.0, 0, p, generator)) == 1


def test_a_tiny_or_huge_repetition_penalty_only_reorders() -> None:
    logits = torch.tensor([[1.5, 0.0, -2.0, 0.7]])
    seen = torch.tensor([[True, True, True, False]])
    tiny = apply_repetition_penalty(logits, seen, 1e-300)  # seen positives soar, seen negatives go to 0
    assert int(tiny.argmax()) == 0 and tiny[0, 1] == 0 and tiny[0, 2] == 0 and tiny[0, 3] == 0.7
    huge = apply_repetition_penalty(logits, seen, 1e300)  # 0 * 1e300 would be NaN in fp32: it stays 0
    assert torch.isfinite(huge).all() and int(huge.argmax()) == 3 and huge[0, 1] == 0


def test_speculative_rejection_when_the_residual_rounds_to_nothing() -> None:
    """p <= q everywhere (q off by rounding): the residual max(0, p - q) is all zeros; the replacement
    is drawn from p instead of from 0/0."""
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.6])
    rejected = 0
    for seed in range(60):  # p(x)/q(x) = 5/6: about one draw in six is rejected
        keep, replacement = rejection_step(p, q, 1, torch.Generator().manual_seed(seed))
        if not keep:
            rejected += 1
            assert replacement in (0, 1)
    assert rejected > 0
