"""Float decoders (fp32 and bf16 ``nn.Linear`` weights) on corelm's C++ step (``KernelStep``, fgemv.h),
every family the step runs (llama, Mistral, Qwen2, Gemma 1/2/3, OLMo 2, Phi-3, the MoEs, GPT-2).

Each family is a tiny random checkpoint written by transformers and loaded unquantized. The step reads
the model's own weight tensors in place, in the model's dtype, and computes in fp32: with fp32 weights
its logits are the model's PyTorch forward's to fp32 rounding; with bf16 weights they are an fp32
forward's of the same bf16 weights (the PyTorch bf16 forward rounds every activation, the step none). A
row of a batched decode step equals the same row alone, bit for bit. The kernels themselves, on every
build this CPU runs: tests/test_kernels.py.
"""

from __future__ import annotations

import copy

import pytest
import torch

import corelm
from tests import test_family_capabilities as capabilities
from tests import test_kernel_step_families as families

# qwen2: q/k/v biases; mistral: a window in every layer; gpt2 (in families.CASES): a fused c_attn, LayerNorms
CASES = ["llama", "mistral", "qwen2", *families.CASES]
LONG, SHORT = families.LONG, families.SHORT


def _write_checkpoint(case: str, path) -> None:
    if case in ("llama", "mistral"):
        capabilities._write_checkpoint(case, path)
    else:
        families._write_checkpoint(case, path)


@pytest.fixture(scope="module", params=CASES)
def checkpoint(request, tmp_path_factory):
    from corelm import kernels

    assert kernels.load(), kernels.load_error()  # make test builds them: never silently skipped
    path = tmp_path_factory.mktemp(request.param)
    _write_checkpoint(request.param, path)
    return request.param, path


@pytest.fixture(scope="module")
def models(checkpoint):
    """(case, the fp32 model, the bf16 model)."""
    return checkpoint[0], corelm.load(checkpoint[1], dtype="fp32").model, corelm.load(checkpoint[1], dtype="bf16").model


_greedy = families._greedy  # n greedy tokens after a prompt (prefill, then one decode call each) and their logits


def test_fp32_step_computes_the_models_logits(models, monkeypatch):
    """The default path of an fp32 model: every position of a prompt longer than each window, in one call
    (the few-row kernel) and through the many-row panels, then greedy decoding from a long and a short
    prompt (LongRoPE's switch): the forward's logits to 1e-4 and its tokens."""
    from corelm.commands.decoding import describe_decoder
    from corelm.generate.step import KernelStep, ModelStep, step_for

    case, model, _ = models
    step = step_for(model)
    assert isinstance(step, KernelStep)
    assert describe_decoder(model) == "float32, C++ step"
    assert step.kv_dtype == torch.float32  # a float model's cache: its own dtype
    python = ModelStep(model)
    with torch.inference_mode():
        full = model(torch.tensor([LONG]))[0].float()
        torch.testing.assert_close(step.extend(step.new_cache(1, 32), 0, LONG, 0), full, atol=1e-4, rtol=0)
        monkeypatch.setenv("CORELM_GEMM_ROWS", "8")  # 20 tokens on the fp32 panels (gemm.h)
        torch.testing.assert_close(step.extend(step.new_cache(1, 32), 0, LONG, 0), full, atol=1e-4, rtol=0)
        monkeypatch.delenv("CORELM_GEMM_ROWS")
        for prompt in (LONG, SHORT):
            (tokens, got), (ref_tokens, ref) = _greedy(step, prompt, 8), _greedy(python, prompt, 8)
            assert tokens == ref_tokens, case
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_bf16_step_computes_the_fp32_forward_of_its_weights(models):
    """A bf16 model stays bf16 in the step (half the bytes a decode step reads) and is computed in fp32:
    its logits are those of the same bf16 weights converted to fp32 and run by the PyTorch forward."""
    from corelm.commands.decoding import describe_decoder
    from corelm.generate.step import KernelStep, step_for

    _, _, model = models
    assert isinstance(step_for(model), KernelStep)
    assert describe_decoder(model) == "bfloat16, C++ step"
    step = KernelStep(model, kv_dtype=torch.float32)  # the reference keeps an fp32 cache
    wide = copy.deepcopy(model).float()
    scale = getattr(wide, "embed_scale", None)
    if scale is not None:  # Gemma scales its embeddings in the model's dtype: the bf16 product, as the step has it
        wide.embed_scale = 1.0
        wide.model.embed_tokens.register_forward_hook(
            lambda module, args, out: (out.bfloat16() * torch.tensor(scale, dtype=torch.bfloat16)).float())
    if hasattr(wide, "transformer"):  # GPT-2 adds token and position embeddings in the model's dtype, as the step
        wide.transformer.h[0].register_forward_pre_hook(lambda module, args: (args[0].bfloat16().float(), *args[1:]))
    with torch.inference_mode():
        ref = wide(torch.tensor([LONG]))[0].float()
        torch.testing.assert_close(step.extend(step.new_cache(1, 32), 0, LONG, 0), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_batched_rows_equal_lone_rows(models, dtype):
    """Two rows of different lengths prefilled and decoded together: each row's logits are exactly those
    it has alone (the float kernels' sums do not depend on the other tokens of the call)."""
    from corelm.generate.step import step_for

    _, fp32, bf16 = models
    step = step_for(fp32 if dtype == "fp32" else bf16)
    with torch.inference_mode():
        cache = step.new_cache(3, 32)
        together = [step.prefill(cache, [LONG, SHORT], rows=[2, 0])]
        toks = together[0].argmax(-1)
        for i in range(3):
            pos = torch.tensor([len(LONG) + i, len(SHORT) + i])
            together.append(step.decode(cache, toks, pos, rows=[2, 0]))
            toks = together[-1].argmax(-1)
        for row, prompt in enumerate((LONG, SHORT)):
            _, alone = _greedy(step, prompt, 4)
            assert torch.equal(torch.stack([t[row] for t in together]), alone)


def test_the_step_reads_the_models_weights_in_place(tmp_path, monkeypatch):
    """No copies: a weight changed in place after the step was built changes the step's logits as it
    changes the forward's (fp32 and bf16)."""
    from corelm.generate.step import step_for

    monkeypatch.setenv("CORELM_KV_DTYPE", "fp32")
    _write_checkpoint("llama", tmp_path)
    for dtype in ("fp32", "bf16"):
        model = corelm.load(tmp_path, dtype=dtype).model
        step = step_for(model)
        with torch.inference_mode():
            before = step.extend(step.new_cache(1, 32), 0, SHORT, 0)
            model.model.layers[0].mlp.down_proj.weight.mul_(3)
            model.lm_head.weight[:, :4] = 0.5
            after = step.extend(step.new_cache(1, 32), 0, SHORT, 0)
            full = copy.deepcopy(model).float()(torch.tensor([SHORT]))[0]
        assert (after - before).abs().max() > 0.1
        torch.testing.assert_close(after, full, atol=1e-4, rtol=0)
        assert step_for(model) is not step  # rebuilt: the step copies some norms (bf16: all) to fp32
        with torch.inference_mode():
            model.model.norm.weight.mul_(2)
            rebuilt = step_for(model)
            assert step_for(model) is rebuilt
            got = rebuilt.extend(rebuilt.new_cache(1, 32), 0, SHORT, 0)
            full = copy.deepcopy(model).float()(torch.tensor([SHORT]))[0]
        torch.testing.assert_close(got, full, atol=1e-4, rtol=0)
