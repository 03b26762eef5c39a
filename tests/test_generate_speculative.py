"""Speculative and prompt-lookup decoding: greedy output identical to plain greedy; sampling keeps p."""

import pytest
import torch

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.generate.speculative import lookup_draft, rejection_step, speculative_generate
from corelm.models import build_model
from tests.helpers import greedy_by_full_forward


def _tiny(seed: int, vocab: int = 64, n_layer: int = 2, d: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ModelConfig(family="llama", vocab_size=vocab, n_layer=n_layer, n_head=4, n_kv_head=2, d_model=d,
                         d_ff=64, max_seq_len=128)
    model = build_model(config).eval()
    with torch.no_grad():  # sharper distributions than the 0.02 init, so greedy paths are not all ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20)
    return model



def test_speculative_greedy_is_token_identical():
    target, draft = _tiny(0), _tiny(1, n_layer=1)
    prompt = [3, 17, 5, 9, 22]
    ref = greedy_by_full_forward(target, prompt, 24)
    for k in (1, 3, 5):
        out, stats = speculative_generate(target, prompt, 24, draft=draft, k=k)
        assert out == ref, k
        assert stats.emitted == 24 and 0 <= stats.accepted <= stats.drafted
    # the target as its own draft accepts everything: one target call per k+1 tokens
    out, stats = speculative_generate(target, prompt, 24, draft=target, k=3)
    assert out == ref and stats.acceptance_rate == 1.0 and stats.target_calls == 6


def test_prompt_lookup_greedy_is_token_identical():
    target = _tiny(2)
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23, 42, 4, 8]
    ref = greedy_by_full_forward(target, prompt, 20)
    out, stats = speculative_generate(target, prompt, 20, lookup=3, k=4)
    assert out == ref
    assert stats.drafted > 0


def test_lookup_draft_finds_latest_match():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 7, 5, 1, 2], ngram=2, k=2) == [7, 5]
    assert lookup_draft([1, 2, 3], ngram=2, k=2) == []


def test_rejection_step_keeps_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.1, 0.6, 0.1, 0.2])
    counts = torch.zeros(4)
    n = 6000
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        keep, other = rejection_step(p, q, x, g)
        counts[x if keep else other] += 1
    assert (counts / n - p).abs().max() < 0.025, counts / n
    # a deterministic proposal (prompt lookup) too
    counts.zero_()
    for _ in range(n):
        keep, other = rejection_step(p, None, 1, g)
        counts[1 if keep else other] += 1
    assert (counts / n - p).abs().max() < 0.025, counts / n


def test_speculative_sampling_runs_and_vocab_mismatch_is_refused():
    target, draft = _tiny(0), _tiny(1, n_layer=1)
    g = torch.Generator().manual_seed(0)
    out, _ = speculative_generate(target, [1, 2, 3], 10, draft=draft, temperature=1.0, generator=g)
    assert len(out) == 10 and all(0 <= t < 64 for t in out)
    with pytest.raises(CorelmError, match="vocabulary"):
        speculative_generate(target, [1, 2], 4, draft=_tiny(3, vocab=80))
    with pytest.raises(CorelmError, match="exactly one proposer"):
        speculative_generate(target, [1, 2], 4)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_speculative_on_the_kernel_step_is_token_identical_to_its_greedy(method):
    from corelm import kernels
    from corelm.generate.engine import SamplingParams, stream
    from corelm.generate.step import KernelStep, step_for
    from corelm.loading import quantize_model

    assert kernels.load(), kernels.load_error()
    target = quantize_model(_tiny(0), method)
    draft = quantize_model(_tiny(1, n_layer=1), method)
    assert isinstance(step_for(target), KernelStep)  # the verify passes run on the C++ kernels
    prompt = [4, 8, 15, 16, 23, 42, 4, 8, 15, 16, 23, 42, 4, 8]
    ref = list(stream(target, prompt, SamplingParams(max_new_tokens=24, ignore_eos=True)))
    out, stats = speculative_generate(target, prompt, 24, lookup=3, k=4)
    assert out == ref and stats.drafted > 0
    for k in (1, 4):
        out, stats = speculative_generate(target, prompt, 24, draft=draft, k=k)
        assert out == ref, k
