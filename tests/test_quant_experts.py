"""A MoE's routed experts quantized (corelm/quant/experts.py) and run on the C++ step.

Tiny random Qwen2-MoE checkpoints written by transformers (a dense layer 0, a shared expert under its
sigmoid gate, top-2 of 8 experts without renormalisation, widths of 32s): ``quantize="int8"|"int4"``
quantizes every expert matrix per expert and leaves the routers in floats; the quantized experts' forward
is the grouped form of a per-token reference; the C++ step computes the quantized model's own forward;
the quantized model stays close to the float one. A Qwen2-MoE GGUF file (corelm's own export, Q4_K_M and
Q4_0) loads with its experts on the file's blocks, none of them ever dequantized, and generates on the
C++ step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import corelm
from corelm.generate.step import KernelStep, ModelStep, describe_layer, kernel_step_supported, step_for
from corelm.quant.experts import QuantizedExperts, expert_layers
from corelm.quant.layers import Int4Linear, Int8Linear

transformers.logging.set_verbosity_error()

CONFIG = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
          "shared_expert_intermediate_size": 64, "norm_topk_prob": False, "mlp_only_layers": [0]}
PROMPT = [5, 17, 3, 99, 42, 7, 1, 100, 64, 33, 12, 8, 90, 61, 23, 44, 2, 71, 19, 30]
ATOL = 1e-3  # the step and the forward run the same integer kernels; fp32 sums in another order
LAYER = {"int8": Int8Linear, "int4": Int4Linear}


def _write(path, **overrides) -> None:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model("qwen2_moe", **{**CONFIG, **overrides}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off transformers' init (zero routers: ties), so every weight and choice matters
        for name, p in hf.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("gate.weight") else 0.05))
    hf.save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from corelm import kernels

    assert kernels.load(), kernels.load_error()  # never silently skipped
    path = tmp_path_factory.mktemp("qwen2_moe")
    _write(path)
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The float model's logits at every position of PROMPT."""
    with torch.inference_mode():
        return corelm.load(checkpoint, dtype="fp32").model(torch.tensor([PROMPT]))[0]


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request, checkpoint):
    return request.param, corelm.load(checkpoint, dtype="fp32", quantize=request.param).model


def test_experts_are_quantized_per_expert_and_routers_are_not(quantized):
    method, model = quantized
    assert type(model.model.layers[0].mlp.down_proj) is LAYER[method]  # the dense layer
    for block in model.model.layers[1:]:
        moe = block.mlp
        assert type(moe.gate) is nn.Linear and type(moe.shared_expert_gate) is nn.Linear  # routing in floats
        assert isinstance(moe.experts, QuantizedExperts) and len(moe.experts) == 8
        assert {type(m) for m in [moe.experts[e].gate_proj for e in range(8)]} == {LAYER[method]}
    assert len(expert_layers(model)) == 2 * 8 * 3
    floats = [n for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n and ".gate." not in n
              and "shared_expert_gate" not in n]
    assert floats == []  # no float expert stack is left behind


def test_grouped_forward_equals_per_token_reference(quantized):
    """The quantized experts' grouped forward is sum_j w_j * down_e(silu(gate_e x) * up_e x) per token,
    with the matrices the layers hold (dequantized), up to the kernels' 15-bit activations; the dense form
    (every expert on every token, weight 0 where not picked) is the same sums."""
    _, model = quantized
    experts = model.model.layers[1].mlp.experts
    gate_up, down = experts.stacked()  # (E, 2F, d), (E, d, F)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 64, generator=g)
    chosen = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(11)])  # (N, 2) distinct experts
    weights = torch.rand(11, 2, generator=g)
    want = torch.zeros_like(x)
    for t in range(11):
        for j in range(2):
            e = int(chosen[t, j])
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            want[t] += weights[t, j] * (down[e] @ (F.silu(gate) * up))
    with torch.inference_mode():
        got = experts(x, weights, chosen)
        dense = experts._dense(x, weights, chosen)  # the static-shape form a compiled step traces
    torch.testing.assert_close(got, want, atol=2e-3 * want.abs().max().item(), rtol=0)
    torch.testing.assert_close(dense, got, atol=1e-5 * want.abs().max().item(), rtol=0)


def _greedy(step, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens after ``prompt`` and the logits of each step ``(n, V)``."""
    cache = step.new_cache(1, len(prompt) + n)
    logits = [step.prefill(cache, [prompt])[0]]
    for i in range(n - 1):
        logits.append(step.decode(cache, logits[-1].argmax()[None], torch.tensor([len(prompt) + i]))[0])
    logits = torch.stack(logits)
    return logits.argmax(-1).tolist(), logits


def test_kernel_step_runs_the_quantized_experts(quantized):
    """The C++ step is handed each expert's quantized matrices (not float stacks) and computes the quantized
    model's own forward: every position of a prompt, and each step of greedy decoding."""
    _, model = quantized
    assert kernel_step_supported(model) is None, kernel_step_supported(model)
    assert isinstance(step_for(model), KernelStep)
    tensors, _ = describe_layer(model.config, model.model.layers[1])
    assert "experts.7.down_proj.values" in tensors and "experts.gate_up" not in tensors
    kernel, python = KernelStep(model, kv_dtype=torch.float32), ModelStep(model)
    with torch.inference_mode():
        got = kernel.extend(kernel.new_cache(1, 32), 0, PROMPT, 0)
        torch.testing.assert_close(got, python.extend(python.new_cache(1, 32), 0, PROMPT, 0), atol=ATOL, rtol=0)
        (tokens, got), (want_tokens, want) = _greedy(kernel, PROMPT[:7], 8), _greedy(python, PROMPT[:7], 8)
    assert tokens == want_tokens
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_batched_rows_equal_lone_rows_bit_for_bit(quantized):
    """Two rows prefilled and decoded together: each row's logits are exactly those it has alone (a token's
    experts run on rows whose arithmetic does not depend on the call's other tokens)."""
    _, model = quantized
    kernel = KernelStep(model, kv_dtype=torch.float32)
    prompts = [PROMPT, PROMPT[3:9]]
    with torch.inference_mode():
        cache = kernel.new_cache(2, 32)
        together = [kernel.prefill(cache, prompts)]
        toks = together[0].argmax(-1)
        for i in range(3):
            together.append(kernel.decode(cache, toks, torch.tensor([len(p) + i for p in prompts])))
            toks = together[-1].argmax(-1)
        for row, prompt in enumerate(prompts):
            assert torch.equal(torch.stack([t[row] for t in together]), _greedy(kernel, prompt, 4)[1])


# relative error ||q - f|| / ||f|| measured on this checkpoint: experts alone 0.011 (int8), 0.14 (int4) --
# two experts swapped give 0.40-0.82; whole-model logits 0.018 (int8), 0.24 (int4), where int4 on these
# random matrices (no outliers, every group's range used) is as coarse as it gets
EXPERTS_CLOSE = {"int8": 0.03, "int4": 0.25}
LOGITS_CLOSE = {"int8": 0.05, "int4": 0.4}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def test_quantized_model_stays_close_to_the_float_model(quantized, checkpoint, reference):
    """Each layer's quantized experts against its float experts on the same tokens and routing, and the
    whole quantized model's logits against the float model's."""
    from corelm.models.moe import route

    method, model = quantized
    float_model = corelm.load(checkpoint, dtype="fp32").model
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        for i in (1, 2):
            want_moe, got_moe = float_model.model.layers[i].mlp, model.model.layers[i].mlp
            weights, chosen = route(want_moe.gate(x), 2, False)
            err = _rel(got_moe.experts(x, weights, chosen), want_moe.experts(x, weights, chosen))
            assert 0 < err < EXPERTS_CLOSE[method], (i, err)
        err = _rel(model(torch.tensor([PROMPT]))[0], reference)
    assert 0 < err < LOGITS_CLOSE[method], err


# A Qwen2-MoE GGUF file: rows of whole 256-value super-blocks, so Q4_K_M writes Q4_K and Q6_K experts;
# Q4_0 experts load as int4 layers. (llama.cpp's qwen2moe has no dense layers between the sparse ones.)
GGUF_CONFIG = {"hidden_size": 256, "intermediate_size": 256, "moe_intermediate_size": 256,
               "shared_expert_intermediate_size": 256, "num_hidden_layers": 2, "mlp_only_layers": []}


@pytest.fixture(scope="module", params=["Q4_K_M", "Q4_0"])
def gguf_file(request, tmp_path_factory):
    from corelm.io.gguf_export import export_gguf

    path = tmp_path_factory.mktemp(f"gguf-{request.param}")
    _write(path / "hf", **GGUF_CONFIG)
    return request.param, export_gguf(corelm.load(path / "hf", dtype="fp32").model, path / "moe.gguf", request.param)


def test_gguf_moe_loads_with_its_experts_on_their_blocks(gguf_file, monkeypatch):
    """The file runs on its stored blocks (its F32 routers no longer stop that): every expert of every layer
    is a layer on the file's blocks of that stack's type, the routers stay float ``nn.Linear``, and no expert
    stack is ever dequantized (the loader takes them from the file before any float copy exists)."""
    from corelm.commands.decoding import describe_decoder
    from corelm.io import gguf as gguf_io
    from corelm.quant.kquant import TYPE_IDS, GGUFBlockLinear

    qtype, path = gguf_file
    dequantized = []
    real = gguf_io.dequantize
    monkeypatch.setattr(gguf_io, "dequantize", lambda buf, t, shape: dequantized.append(shape) or real(buf, t, shape))
    model = corelm.load(path).model
    assert dequantized and not [s for s in dequantized if len(s) == 3]  # the (E, F, d) stacks: never
    file = gguf_io.read_gguf(path)
    kinds = {n: t.qtype.name for n, t in file.tensors.items()}
    file.close()
    # (llama-quantize gives an 8-expert model's attn_k/attn_v Q8_0 in every mix, Q4_0 included)
    assert describe_decoder(model) == f"{qtype}, GGUF blocks as stored, C++ step"
    if qtype == "Q4_K_M":
        assert {"Q4_K", "Q6_K"} <= {k for n, k in kinds.items() if "_exps." in n}
    for i, block in enumerate(model.model.layers):
        experts = block.mlp.experts
        assert isinstance(experts, QuantizedExperts) and len(experts) == 8
        for name, stack in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            stored = kinds[f"blk.{i}.{stack}.weight"]
            for e in range(8):
                layer = getattr(experts[e], name)  # Q4_0 too: its fp16 d as stored
                assert type(layer) is GGUFBlockLinear and layer.ggml_type == TYPE_IDS[stored]
        assert kinds[f"blk.{i}.ffn_gate_inp.weight"] == "F32" and type(block.mlp.gate) is nn.Linear
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m) is nn.Linear} == \
        {"gate", "shared_expert_gate"}  # nothing else left in floats
    floats = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
              if t.is_floating_point() and t.dim() >= 2 and "embed" not in n and not n.endswith(
                  ("mlp.gate.weight", "shared_expert_gate.weight", "scale_zeros"))]
    assert floats == []


def test_gguf_moe_generates_on_the_kernel_step(gguf_file):
    """On the file's blocks the C++ step computes the model's own forward (an fp32 model quantized to the
    file's blocks: tight), and the native load decodes on it, each step's logits close to the dequantized
    file's fp32 forward fed the same tokens (the native load's norms, embeddings and routers are bf16: a
    router's choice can move)."""
    from corelm.generate.engine import SamplingParams, generate

    _, path = gguf_file
    exact = corelm.load(path, dtype="fp32", quantize="gguf").model  # float stacks -> the file's blocks
    assert isinstance(exact.model.layers[0].mlp.experts, QuantizedExperts)
    model = corelm.load(path).model
    kernel = step_for(model)
    assert isinstance(kernel, KernelStep)
    dequantized = ModelStep(corelm.load(path, dtype="fp32").model)
    with torch.inference_mode():
        k, p = KernelStep(exact, kv_dtype=torch.float32), ModelStep(exact)
        got, want = k.extend(k.new_cache(1, 32), 0, PROMPT, 0), p.extend(p.new_cache(1, 32), 0, PROMPT, 0)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        tokens, logits = _greedy(kernel, PROMPT, 8)
        ref = dequantized.extend(dequantized.new_cache(1, 32), 0, PROMPT + tokens[:-1], 0)[len(PROMPT) - 1:]
        err = _rel(logits, ref)
        print(f"{path.parent.name}: ||logit diff|| / ||logits|| {err:.4f}")
        assert err < 0.05  # measured 0.008 (Q4_K_M), 0.022 (Q4_0); two experts of a layer swapped: 0.37, 0.15
        assert generate(model, [PROMPT], SamplingParams(max_new_tokens=8, temperature=0.0))[0] == tokens
        # the routers stay F32 as the file stores them, also where the model runs in bf16, and its own
        # forward takes them so (bf16 activations there: not the step's fp32, hence the loose bound)
        assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32
        forward = model(torch.tensor([PROMPT]))[0, -1].float()
        print(f"{path.parent.name}: forward vs step {_rel(forward, logits[0]):.4f}")
        assert _rel(forward, logits[0]) < 0.05


def test_quantized_experts_export_to_gguf(tmp_path):
    """GGUF export writes the matrices a quantized MoE's experts multiply with (none left out): the F32 file
    reloads with the int8 model's logits, up to the kernels' 15-bit activations."""
    from corelm.io.gguf_export import export_gguf

    _write(tmp_path / "hf", mlp_only_layers=[], num_hidden_layers=2)
    model = corelm.load(tmp_path / "hf", dtype="fp32", quantize="int8").model
    back = corelm.load(export_gguf(model, tmp_path / "moe.gguf", "F32"), dtype="fp32").model
    with torch.inference_mode():
        got, want = back(torch.tensor([PROMPT]))[0], model(torch.tensor([PROMPT]))[0]
    assert _rel(got, want) < 2e-3, _rel(got, want)


def test_q4_0_mixtral_file_loads_as_int4_and_saves(tmp_path):
    """A Mixtral file whose every block matrix is Q4_0 (4 experts: llama-quantize keeps attn_k/attn_v at Q4_0)
    loaded with ``quantize="int4"`` (by default it runs its Q4_0 blocks as stored) is an int4 model, its experts
    int4 layers on the file's nibbles, and a `corelm quantize` directory written from it reloads with the same
    experts and logits."""
    from corelm.commands.decoding import describe_decoder
    from corelm.io.gguf_export import export_gguf
    from corelm.quant.io import save_quantized_dir

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(
        "mixtral", vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "hf")
    path = export_gguf(corelm.load(tmp_path / "hf", dtype="fp32").model, tmp_path / "m.gguf", "Q4_0")
    assert describe_decoder(corelm.load(path).model) == "Q4_0, GGUF blocks as stored, C++ step"
    llm = corelm.load(path, quantize="int4")
    assert describe_decoder(llm.model) == "int4, C++ step"
    assert type(llm.model.model.layers[1].mlp.experts[3].up_proj) is Int4Linear
    save_quantized_dir(llm.model, llm.config, tmp_path / "q")
    back = corelm.load(tmp_path / "q").model
    assert type(back.model.layers[1].mlp.experts[3].up_proj) is Int4Linear
    with torch.inference_mode():
        assert torch.equal(back(torch.tensor([PROMPT])), llm.model(torch.tensor([PROMPT])))
