"""The C++ decoder step on the families beyond Llama: Gemma 1/2/3, OLMo 2, Phi-3 with LongRoPE, the
sparse MoEs (Mixtral, Qwen2-MoE, Qwen3-MoE) and GPT-2 (LayerNorms with biases, a plain GELU MLP, a fused
c_attn split by rows, learned positions instead of RoPE).

Each case is a tiny random checkpoint written by transformers, loaded with ``quantize="int8"`` or
``"int4"``: the C++ ``KernelStep`` must compute what the same quantized model's PyTorch forward
(``ModelStep``) computes -- same weights, same math, so a tight tolerance -- give the same greedy
tokens, and give a row in a batch the logits it has alone. Prompts are longer than every sliding
window and than LongRoPE's original context; Gemma 2's soft-caps are small enough to bind.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import corelm
from corelm.tokenizer import Tokenizer
from tests.test_family_capabilities import COMMON, _word_backend

transformers.logging.set_verbosity_error()

WINDOW = 4
CASES = {
    "gemma": ("gemma", {"head_dim": 8}),
    # caps of 0.1 and 0.5 bind on these logits (test_soft_caps_bind); a query scale other than head_dim
    "gemma2": ("gemma2", {"head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 12,
                          "attn_logit_softcapping": 0.1, "final_logit_softcapping": 0.5}),
    # local layers rotate with base 100, the global one with 1e6; QK norms
    "gemma3_text": ("gemma3_text", {"head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 12,
                                    "num_hidden_layers": 3,
                                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                                    "rope_parameters": {
                                        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}}),
    "olmo2": ("olmo2", {}),
    # LongRoPE with partial rotary: the long factors from position 8 on
    "phi3-longrope": ("phi3", {"tie_word_embeddings": False, "original_max_position_embeddings": 8,
                               "max_position_embeddings": 64,
                               "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                   "partial_rotary_factor": 0.75,
                                                   "long_factor": [1.0, 1.5, 2.0], "short_factor": [1.0, 1.05, 1.1]}}),
    # routers stay in floats, experts are quantized per expert; top-2 of 4 experts renormalised, with a window
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW}),
    # a shared expert under a sigmoid gate, probabilities not renormalised, layer 0 dense
    "qwen2_moe": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 64, "norm_topk_prob": False,
                                "num_hidden_layers": 3, "mlp_only_layers": [0]}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "head_dim": 16, "norm_topk_prob": True}),
    "gpt2": ("gpt2", {"n_inner": 64, "activation_function": "gelu_new"}),
}
LONG = [5, 17, 3, 99, 42, 7, 1, 100, 64, 33, 12, 8, 90, 61, 23, 44, 2, 71, 19, 30]  # > window, > 8
SHORT = [9, 4, 77, 31, 50, 6]  # decoding from it crosses LongRoPE's switch at position 8
ATOL = 1e-3  # measured: 1e-7 to 1.7e-4 (the same integer kernels; fp32 sums in another order)


def _write_checkpoint(case: str, path, **overrides) -> None:
    model_type, options = {**CASES, **GGUF_CASES}[case]
    options = {**options, **overrides}
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(model_type, **{**COMMON, **options}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off transformers' init (norms of 0 or 1, zero routers), so every weight matters
        for name, p in hf.named_parameters():  # routers far from ties: one choice of experts, whatever the order
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("gate.weight") else 0.05))
    hf.save_pretrained(path)
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    Tokenizer(_word_backend(list(special.values())), special_tokens=special).save(path)


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    from corelm import kernels

    assert kernels.load(), kernels.load_error()  # make test builds them: never silently skipped
    path = tmp_path_factory.mktemp(request.param)
    _write_checkpoint(request.param, path)
    return request.param, path


@pytest.fixture(scope="module", params=["int8", "int4"])
def steps(request, checkpoint):
    """(case, the quantized model's KernelStep with an fp32 cache, its ModelStep)."""
    from corelm.generate.step import KernelStep, ModelStep, kernel_step_supported, step_for

    llm = corelm.load(checkpoint[1], dtype="fp32", quantize=request.param)
    assert kernel_step_supported(llm.model) is None, kernel_step_supported(llm.model)
    assert isinstance(step_for(llm.model), KernelStep)
    return checkpoint[0], KernelStep(llm.model, kv_dtype=torch.float32), ModelStep(llm.model)


def _greedy(step, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens after ``prompt`` and the logits of each step ``(n, V)``."""
    cache = step.new_cache(1, len(prompt) + n)
    logits = [step.prefill(cache, [prompt])[0]]
    for i in range(n - 1):
        tok = torch.tensor([int(logits[-1].argmax())])
        logits.append(step.decode(cache, tok, torch.tensor([len(prompt) + i]))[0])
    logits = torch.stack(logits)
    return logits.argmax(-1).tolist(), logits


def test_kernel_step_computes_the_models_logits(steps):
    """Every position of a prompt longer than the window, then greedy decoding from a long and a short
    prompt (crossing LongRoPE's switch): the same logits and the same tokens as the PyTorch forward."""
    _, kernel, python = steps
    with torch.inference_mode():
        got = kernel.extend(kernel.new_cache(1, 32), 0, LONG, 0)
        ref = python.extend(python.new_cache(1, 32), 0, LONG, 0)
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
        for prompt in (LONG, SHORT):
            (tokens, got), (ref_tokens, ref) = _greedy(kernel, prompt, 8), _greedy(python, prompt, 8)
            assert tokens == ref_tokens
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_batched_rows_equal_lone_rows(steps):
    """Two rows of different lengths prefilled and decoded together: each row's logits are exactly those
    it has alone (a token's arithmetic does not depend on its company)."""
    _, kernel, _ = steps
    with torch.inference_mode():
        cache = kernel.new_cache(2, 32)
        together = [kernel.prefill(cache, [LONG, SHORT])]
        toks = together[0].argmax(-1)
        for i in range(3):
            pos = torch.tensor([len(LONG) + i, len(SHORT) + i])
            together.append(kernel.decode(cache, toks, pos))
            toks = together[-1].argmax(-1)
        for row, prompt in enumerate((LONG, SHORT)):
            _, alone = _greedy(kernel, prompt, 4)
            assert torch.equal(torch.stack([t[row] for t in together]), alone)


def test_soft_caps_bind(tmp_path):
    """Gemma 2's caps change these logits (the parity test would pass without them otherwise): without
    the attention cap, or the final one, the model computes other logits; the kernel's stay under 0.5.
    The Python step's prefill logits are the model's forward's, final cap included."""
    from corelm.generate.step import KernelStep, ModelStep

    _write_checkpoint("gemma2", tmp_path)
    model = corelm.load(tmp_path, dtype="fp32", quantize="int4").model
    kernel, python = KernelStep(model, kv_dtype=torch.float32), ModelStep(model)
    with torch.inference_mode():
        capped = python.extend(python.new_cache(1, 32), 0, LONG, 0)
        torch.testing.assert_close(capped, model(torch.tensor([LONG]))[0], atol=1e-5, rtol=0)
        assert kernel.extend(kernel.new_cache(1, 32), 0, LONG, 0).abs().max() < 0.5
        model.final_softcap = None
        assert (python.extend(python.new_cache(1, 32), 0, LONG, 0) - capped).abs().max() > 0.1
        model.final_softcap = 0.5
        for block in model.model.layers:
            block.self_attn.softcap = None
        assert (python.extend(python.new_cache(1, 32), 0, LONG, 0) - capped).abs().max() > 1e-2


# what llama.cpp's architectures cannot represent (gguf_export refuses it) taken out of the cases
GGUF_OVERRIDES = {"gemma2": {"query_pre_attn_scalar": 8}, "gemma3_text": {"query_pre_attn_scalar": 8}}
# Qwen2: q/k/v biases on the blocks (its biases on int8/int4 layers: tests/test_generate_step.py)
GGUF_CASES = {"qwen2": ("qwen2", {"tie_word_embeddings": False})}
# rows of whole 256-value super-blocks, so Q4_K_M writes Q4_K and Q6_K (narrower rows fall back to Q5_0/Q8_0);
# Phi-3 keeps head_dim 8 for its LongRoPE factors
K_QUANT = {"hidden_size": 256, "intermediate_size": 256}
GGUF_RUNS = [*((case, qtype) for case in ("gemma2", "gemma3_text", "olmo2", "qwen2", "phi3-longrope")
               for qtype in ("Q8_0", "Q4_0")),
             ("qwen2", "Q4_K_M"), ("phi3-longrope", "Q4_K_M")]


@pytest.mark.parametrize("case, qtype", GGUF_RUNS)
def test_gguf_export_loads_onto_the_kernel_step(case, qtype, tmp_path):
    """A family exported to a block-quantized GGUF file and loaded back keeps every matrix in its stored
    blocks (Qwen2's biased q/k/v, Phi-3's fused qkv and gate/up split by rows), runs on the C++ step (the
    load line names both) and computes the dequantized file's fp32 logits, up to bf16 norms and
    embeddings, at every position of a prompt and at every step of greedy decoding. (Its greedy tokens
    are not asserted equal to the fp32 file's: these random logits have top-2 gaps of 4e-4 where the
    8-bit rounding moves them by 1e-2.) (A MoE file: tests/test_quant_experts.py.)"""
    from torch import nn

    from corelm.commands.decoding import describe_decoder
    from corelm.generate.step import KernelStep, ModelStep, kernel_step_supported
    from corelm.io.gguf_export import export_gguf
    from corelm.quant.kquant import GGUFBlockLinear, stored_types

    overrides = {**GGUF_OVERRIDES.get(case, {}), **(K_QUANT if qtype == "Q4_K_M" else {})}
    if qtype == "Q4_K_M" and case.startswith("phi3"):
        overrides["num_attention_heads"] = 32
    _write_checkpoint(case, tmp_path, **overrides)
    out = export_gguf(corelm.load(tmp_path, dtype="fp32").model, tmp_path / f"{qtype}.gguf", qtype)
    native = corelm.load(out)
    assert kernel_step_supported(native.model) is None, kernel_step_supported(native.model)
    assert [n for n, m in native.model.named_modules() if type(m) is nn.Linear] == []  # none left in floats
    line = describe_decoder(native.model)
    assert line == f"{qtype}, GGUF blocks as stored, C++ step", line
    # every layer matrix's type (the head's may add one: Q4_0 files keep a Q8_0 head)
    assert stored_types(out) - {"F32"} <= set(native.model.corelm_quantization["types"]) <= stored_types(out) | {"Q8_0"}
    if qtype == "Q4_K_M":  # the K-quant kernels, not only fallback types
        assert {"Q4_K", "Q6_K"} <= stored_types(out)
    if case == "qwen2":
        q_proj = native.model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, GGUFBlockLinear) and q_proj.bias is not None
    kernel, python = KernelStep(native.model, kv_dtype=torch.float32), ModelStep(corelm.load(out, dtype="fp32").model)
    with torch.inference_mode():
        got = kernel.extend(kernel.new_cache(1, 32), 0, LONG, 0)
        ref = python.extend(python.new_cache(1, 32), 0, LONG, 0)
        print(f"{case} {qtype}: max |logit diff| {(got - ref).abs().max():.2e}")
        # the native load keeps norms (and embeddings stored in floats) in bf16 (the fp32 load: in fp32), so not
        # the 1e-3 above;
        # measured 0.3-2.0e-2 (0.3-2.3% of the largest logit), where a missing norm or cap moves it by 0.1-1
        assert (got - ref).abs().max() < 0.03 * ref.abs().max()
        for prompt in (LONG, SHORT):  # decoding: each step's logits, the file's forward fed the same tokens
            tokens, steps = _greedy(kernel, prompt, 8)
            ref = python.extend(python.new_cache(1, 32), 0, prompt + tokens[:-1], 0)[len(prompt) - 1:]
            assert (steps - ref).abs().max() < 0.03 * ref.abs().max()
