"""The decode steps: the model's own forward and corelm's C++ step give the model's logits; the C++
step's tokens do not depend on the other tokens of a call (prefill chunks, verify passes, batch rows);
every decode path (engine, beam, speculative, server) runs on the step ``step_for`` picks."""

import itertools

import pytest
import torch

from corelm import kernels
from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.generate import engine
from corelm.generate.engine import SamplingParams
from corelm.generate.step import KernelStep, ModelStep, require_kernel_step, step_for, weight_bytes
from corelm.loading import quantize_model
from corelm.models import build_model
from tests.helpers import greedy_by_full_forward


def _tiny(method=None, seed=0, max_seq_len=160, sharpen=True, **extra):
    torch.manual_seed(seed)
    config = ModelConfig(family="llama", vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                         max_seq_len=max_seq_len, rope_theta=10000.0, **extra)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and sharpen:
                p.mul_(10)  # sharper distributions: greedy ties are unlikely
            elif p.dim() == 1 and extra.get("bias"):
                p.normal_(0, 0.5)
    return quantize_model(model, method) if method else model


@pytest.fixture(autouse=True)
def _exact_arithmetic(monkeypatch):
    """These tests hold the C++ step to the model's logits at 1e-4 and to bit-equality across calls: an
    fp32 cache and the integer kernels for every token count. Its defaults (an fp16 cache, fp32 GEMM
    panels from 64 tokens on) are held to stated tolerances in tests/test_quant_kernel_step.py."""
    monkeypatch.setenv("CORELM_KV_DTYPE", "fp32")
    monkeypatch.setenv("CORELM_GEMM_ROWS", "100000")


@pytest.fixture
def _built():
    assert kernels.load(), kernels.load_error()  # `make test` builds them; a failure is a failure


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_kernel_step_equals_the_model_and_itself_in_any_company(_built, method):
    model = _tiny(method, sharpen=False)
    step = step_for(model)
    assert isinstance(step, KernelStep)
    ids = torch.randint(0, 96, (150,)).tolist()  # past the length where attention goes parallel over heads
    with torch.inference_mode():
        one = step.new_cache(1, 160)
        steps = torch.cat([step.extend(one, 0, [t], i) for i, t in enumerate(ids)])  # one token per call
        full = model(torch.tensor([ids]))[0].float()
        cuts = [0, 5, 31, 60, 89, 120, 150]  # a prefill in chunks, as speculative verify passes feed it
        chunked = step.new_cache(1, 160)
        parts = torch.cat([step.extend(chunked, 0, ids[a:b], a) for a, b in itertools.pairwise(cuts)])
        whole = step.extend(step.new_cache(1, 160), 0, ids, 0)
    assert torch.equal(parts, steps)
    assert torch.equal(whole, steps)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)  # the layer-by-layer forward


def test_kernel_step_batch_rows_equal_each_row_alone(_built):
    """A decode step of several rows (the server's batch) gives each row exactly its logits alone."""
    model = _tiny("int4", seed=1)
    step = step_for(model)
    prompts = [[5, 17, 3, 88, 41, 9, 2], [7, 7, 1], [60, 61, 62, 63, 64]]
    with torch.inference_mode():
        together = step.new_cache(4, 32)
        first = step.prefill(together, prompts, rows=[3, 0, 2])  # any rows, one call
        tokens = torch.tensor([11, 12, 13])
        pos = torch.tensor([len(p) for p in prompts])
        batched = step.decode(together, tokens, pos, rows=[3, 0, 2])
        for b, p in enumerate(prompts):
            alone = step.new_cache(1, 32)
            assert torch.equal(step.prefill(alone, [p])[0], first[b])
            assert torch.equal(step.decode(alone, tokens[b:b + 1], pos[b:b + 1])[0], batched[b])


@pytest.mark.parametrize("method", [None, "int8", "int4", "pytorch"])
def test_engine_greedy_equals_full_forward_on_the_step_it_picks(method, monkeypatch):
    """Float (fp32 weights) and quantized models on the C++ step; CORELM_STEP=pytorch: the model's forward."""
    if method == "pytorch":
        monkeypatch.setenv("CORELM_STEP", "pytorch")
    model = _tiny(method if method != "pytorch" else None, max_seq_len=96)
    assert isinstance(step_for(model), KernelStep if method != "pytorch" and kernels.load() else ModelStep)
    prompt = [5, 17, 3, 88, 41, 9]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    assert list(engine.stream(model, prompt, params)) == greedy_by_full_forward(model, prompt, 20)
    beams = engine.beam_search(model, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True), num_beams=1)
    assert beams == greedy_by_full_forward(model, prompt, 12)


def test_engine_batches_on_the_kernel_step(_built):
    model = _tiny("int8", seed=1, max_seq_len=96)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    batched = engine.generate(model, prompts, params)
    assert batched == [greedy_by_full_forward(model, p, 10) for p in prompts]
    sampled = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, seed=7)
    assert list(engine.stream(model, prompts[0], sampled)) == list(engine.stream(model, prompts[0], sampled))
    first = next(iter(engine.stream(model, prompts[0], params)))
    assert list(engine.stream(model, prompts[0], SamplingParams(max_new_tokens=5, stop_token_ids=[first]))) == []


def test_kernel_step_with_biases(_built):
    """Biases (Qwen2's q/k/v; here every projection) ride along in the C++ step."""
    model = _tiny("int8", seed=2, sharpen=False, bias=True)
    step = step_for(model)
    assert isinstance(step, KernelStep)
    ids = [4, 8, 15, 16, 23, 42]
    with torch.inference_mode():
        logits = step.extend(step.new_cache(1, 16), 0, ids, 0)
        full = model(torch.tensor([ids]))[0].float()
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)


def test_step_choice_and_errors(_built, monkeypatch):
    assert isinstance(step_for(_tiny()), KernelStep)  # fp32 weights, read in place
    assert isinstance(step_for(_tiny().to(torch.bfloat16)), KernelStep)
    assert isinstance(step_for(_tiny().half()), ModelStep)
    with pytest.raises(CorelmError, match="not torch.float16"):
        require_kernel_step(_tiny().half())
    monkeypatch.setenv("CORELM_STEP", "pytorch")
    assert isinstance(step_for(_tiny()), ModelStep)
    with pytest.raises(CorelmError, match="CORELM_STEP=pytorch"):
        require_kernel_step(_tiny())
    monkeypatch.setenv("CORELM_STEP", "Auto")
    assert isinstance(step_for(_tiny()), KernelStep)
    monkeypatch.setenv("CORELM_STEP", "pytroch")  # a typo is an error, not a silent default
    with pytest.raises(CorelmError, match="CORELM_STEP='pytroch': set it to pytorch"):
        step_for(_tiny())
    monkeypatch.delenv("CORELM_STEP")
    model = _tiny("int8")
    step = step_for(model)
    assert step is step_for(model)  # built once per model
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside the cache"):
        step.extend(step.new_cache(1, 4), 0, [1, 2, 3, 4, 5], 0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="row"):
        step.decode(step.new_cache(2, 8), torch.tensor([1]), torch.tensor([0]), rows=[2])
    # the bytes a step reads: every matrix once; an untied input embedding is not read whole
    float_bytes = weight_bytes(_tiny())
    assert weight_bytes(model) < float_bytes / 3


def test_kernel_step_sliding_window_equals_the_model(_built):
    """Mistral's window in the C++ step: a 40-token sequence through an 8-token window, one call and
    token by token, equals the model's own windowed forward."""
    model = _tiny("int8", seed=3, sharpen=False, sliding_window=8)
    step = step_for(model)
    assert isinstance(step, KernelStep)
    ids = torch.randint(0, 96, (40,)).tolist()
    with torch.inference_mode():
        whole = step.extend(step.new_cache(1, 48), 0, ids, 0)
        cache = step.new_cache(1, 48)
        one = torch.cat([step.extend(cache, 0, [t], i) for i, t in enumerate(ids)])
        full = model(torch.tensor([ids]))[0].float()
    assert torch.equal(whole, one)
    torch.testing.assert_close(whole, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("extra", [{"qkv_bias": True}, {"qk_norm": True, "head_dim": 32}],
                         ids=["qwen2-qkv-bias", "qwen3-qk-norm"])
def test_kernel_step_runs_the_llama_derived_families(_built, extra):
    """Qwen2's q/k/v biases and Qwen3's per-head QK norms (with a decoupled head_dim) on the C++ step."""
    model = _tiny("int8", seed=4, sharpen=False, **extra)
    with torch.no_grad():  # non-trivial biases and norm weights
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("bias" in name or "q_norm" in name or "k_norm" in name):
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
    step = step_for(model)
    assert isinstance(step, KernelStep)
    ids = torch.randint(0, 96, (24,)).tolist()
    with torch.inference_mode():
        logits = step.extend(step.new_cache(1, 32), 0, ids, 0)
        full = model(torch.tensor([ids]))[0].float()
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
