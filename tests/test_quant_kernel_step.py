"""The C++ step's storage and prefill choices on the embedded SmolLM2 (Q4_1, int4 kernels): a bf16 KV
cache gives the fp32 cache's logits within a stated tolerance and the same greedy text; a prefill on
dequantized panels (the fp32 panel GEMM) leaves the integer kernels' next token."""

import pytest
import torch

from corelm import kernels
from tests.test_quant_gguf_blocks import HELD_OUT


@pytest.fixture(scope="module")
def smollm2():
    assert kernels.load(), kernels.load_error()  # make test builds them: never silently skipped
    from corelm.generate.step import KernelStep
    from corelm.loading import load_parts
    from corelm.presets import embedded_path

    loaded = load_parts(embedded_path("smollm2-135m-instruct"))
    ids = loaded.tokenizer.encode(HELD_OUT)
    assert len(ids) > 200
    return (KernelStep(loaded.model, kv_dtype=torch.float32), KernelStep(loaded.model), ids[:200])


def _prompt_logits(step, ids):
    return step.extend(step.new_cache(1, len(ids) + 8), 0, ids, 0)  # (T, V): every position's logits


def _greedy(step, ids, n):
    cache = step.new_cache(1, len(ids) + n)
    tok = int(step.prefill(cache, [ids])[0].argmax())
    out = [tok]
    for i in range(n - 1):
        tok = int(step.decode(cache, torch.tensor([tok]), torch.tensor([len(ids) + i]))[0].argmax())
        out.append(tok)
    return out


@pytest.mark.slow
def test_bf16_kv_cache_keeps_logits_and_greedy_text(smollm2, monkeypatch):
    fp32, bf16, ids = smollm2
    monkeypatch.setenv("CORELM_GEMM_ROWS", "100000")  # the integer kernels for every token: only the cache differs
    assert bf16.new_cache(1, 8).k.dtype == torch.bfloat16
    assert bf16.new_cache(2, 8).k.nbytes * 2 == fp32.new_cache(2, 8).k.nbytes  # half the memory
    with torch.inference_mode():
        ref, got = _prompt_logits(fp32, ids[:120]), _prompt_logits(bf16, ids[:120])
        # keys/values rounded to 8 significant bits move SmolLM2's logits (|logit| up to ~30) by < 0.25
        torch.testing.assert_close(got, ref, rtol=0, atol=0.25)
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"bf16 KV cache vs fp32: max |logit diff| {(got - ref).abs().max():.4f}, top-1 agreement {agree:.4f}")
        assert agree >= 0.99, agree
        assert _greedy(bf16, ids[:40], 64) == _greedy(fp32, ids[:40], 64)


@pytest.mark.slow
def test_gemm_prefill_agrees_with_the_integer_kernels(smollm2, monkeypatch):
    """A prompt of 64 tokens or more is prefilled on dequantized fp32 panels: the next token's logits
    agree with an all-integer prefill (the cache it leaves included)."""
    fp32, _, ids = smollm2
    lengths = (64, 130, 199)

    def next_logits(gemm_rows):
        monkeypatch.setenv("CORELM_GEMM_ROWS", gemm_rows)
        out = []
        for n in lengths:  # the prompt through the GEMM path, then one decode step on the integer kernels
            cache = fp32.new_cache(1, n + 1)
            fp32.prefill(cache, [ids[:n]])
            out.append(fp32.decode(cache, torch.tensor([ids[n]]), torch.tensor([n]))[0])
        return torch.stack(out)

    with torch.inference_mode():
        ref, got = next_logits("100000"), next_logits("64")
    assert not torch.equal(got, ref)  # the switch took effect: another arithmetic
    # fp32 weights and activations against 15-bit activations: ~1e-4 relative
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
