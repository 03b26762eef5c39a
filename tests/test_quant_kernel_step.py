"""The C++ step's storage and prefill choices on the embedded SmolLM2 (Q4_1, int4 kernels): a bf16 KV
cache gives the fp32 cache's logits within a stated tolerance and the same greedy text; a prefill on
dequantized panels (fp32 or bf16 GEMM) gives the integer kernels' logits within a stated tolerance;
every GEMM panel equals dequantize-then-matmul."""

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
        ref, got = _prompt_logits(fp32, ids), _prompt_logits(bf16, ids)
        # keys/values rounded to 8 significant bits move SmolLM2's logits (|logit| up to ~30) by < 0.25
        torch.testing.assert_close(got, ref, rtol=0, atol=0.25)
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        assert agree >= 0.99, agree
        assert _greedy(bf16, ids[:40], 64) == _greedy(fp32, ids[:40], 64)


@pytest.mark.slow
def test_gemm_prefill_agrees_with_the_integer_kernels(smollm2, monkeypatch):
    """A prompt of 64 tokens or more is prefilled on dequantized panels (bf16 on CPUs with AVX512_BF16):
    the next token's logits agree with an all-integer prefill (the cache it leaves included)."""
    fp32, _, ids = smollm2
    lengths = range(64, 200, 27)

    def next_logits(gemm_rows, dtype="fp32"):
        monkeypatch.setenv("CORELM_GEMM_ROWS", gemm_rows)
        monkeypatch.setenv("CORELM_GEMM_DTYPE", dtype)
        out = []
        for n in lengths:  # the prompt through the GEMM path, then one decode step on the integer kernels
            cache = fp32.new_cache(1, n + 1)
            fp32.prefill(cache, [ids[:n]])
            out.append(fp32.decode(cache, torch.tensor([ids[n]]), torch.tensor([n]))[0])
        return torch.stack(out)

    with torch.inference_mode():
        ref = next_logits("100000")
        for dtype in ("fp32", "bf16"):
            got = next_logits("64", dtype)
            assert not torch.equal(got, ref)  # the switch took effect: another arithmetic
            agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
            kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1).mean().item()
            print(f"GEMM {dtype} prefill vs integer kernels: top-1 agreement {agree:.4f}, mean KL {kl:.5f} nats")
            assert agree == 1.0
            assert kl < (1e-4 if dtype == "fp32" else 2e-3)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gemm_panels_equal_dequantize_then_matmul(monkeypatch, dtype):
    assert kernels.load(), kernels.load_error()
    torch.manual_seed(0)
    n, k, t = 96, 128, 40
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    sz = torch.stack([torch.rand(n, k // 32) * 0.1, torch.randn(n, k // 32) * 0.1], -1).bfloat16()
    packed = kernels.pack_blocks(q)
    x = torch.randn(t, k)
    w = kernels.dequantize(packed, sz, k)
    monkeypatch.setenv("CORELM_GEMM_ROWS", "1")
    monkeypatch.setenv("CORELM_GEMM_DTYPE", dtype)
    y = torch.ops.corelm.qlinear(x, packed, sz)
    if dtype == "fp32":
        torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)
    else:  # inputs rounded to bf16, fp32 sums, the output rounded to bf16
        want = (x.bfloat16().float() @ w.bfloat16().float().T).bfloat16().float()
        torch.testing.assert_close(y, want, rtol=2**-7, atol=1e-4)
        assert (y - x @ w.T).abs().max() < 0.02 * (x @ w.T).abs().max()
