"""Mixtral, Qwen2-MoE and Qwen3-MoE (corelm/models/moe.py) against transformers, and the grouped
expert computation against a per-token reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import corelm
from corelm.errors import CorelmError
from corelm.generate.engine import SamplingParams, generate
from corelm.models import moe

transformers = pytest.importorskip("transformers")

_COMMON = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_experts_per_tok": 2, "max_position_embeddings": 256}
CONFIGS = {
    "mixtral": {"intermediate_size": 48, "num_local_experts": 4, "rope_theta": 10000.0},
    # norm_topk_prob=False: the top-2 weights keep their full-softmax values (Qwen2-MoE's default)
    "qwen2_moe": {"intermediate_size": 64, "num_experts": 8, "moe_intermediate_size": 16,
                  "shared_expert_intermediate_size": 48, "norm_topk_prob": False},
    "qwen3_moe": {"intermediate_size": 64, "num_experts": 8, "moe_intermediate_size": 16, "head_dim": 16,
                  "norm_topk_prob": True},
}


def _random_router(model: torch.nn.Module) -> None:
    # transformers initialises routers to zeros (uniform routing, ties); random routers make top-k matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "shared_expert_gate.weight")):
                p.normal_(0.0, 0.5)


def _hf_pair(model_type: str, tmp_path, **overrides):
    cfg = transformers.AutoConfig.for_model(model_type, **_COMMON, **{**CONFIGS[model_type], **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    _random_router(hf)
    hf.save_pretrained(tmp_path)
    return hf, corelm.load(str(tmp_path), dtype="fp32")


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_logits_and_greedy_match_transformers(model_type, tmp_path):
    hf, llm = _hf_pair(model_type, tmp_path)
    model = llm.model
    assert llm.config.family == "moe" and llm.config.extra["model_type"] == model_type
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    prompts = [[5, 9, 17, 3, 44], [7, 1, 2]]
    out = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0.0))
    for prompt, got in zip(prompts, out):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert got == want


def test_sliding_window_mixtral(tmp_path):
    hf, llm = _hf_pair("mixtral", tmp_path, sliding_window=4)
    assert llm.config.sliding_window == 4
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
        want = hf.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)[0, 11:].tolist()
    assert generate(llm.model, [ids[0].tolist()], SamplingParams(max_new_tokens=6, temperature=0.0))[0] == want


def test_quantize_leaves_routers_in_floats_and_reloads(tmp_path):
    """int8 quantizes attention, the routed experts (one layer per expert matrix), the shared expert and the
    head, never a router (llama.cpp's rule too); the saved model reloads with the same structure and logits."""
    from corelm.quant.experts import QuantizedExperts
    from corelm.quant.io import save_quantized_dir
    from corelm.quant.layers import Int8Linear
    from corelm.quant.transform import quantize_model

    _, llm = _hf_pair("qwen2_moe", tmp_path / "in", shared_expert_intermediate_size=64,
                      moe_intermediate_size=32)  # widths of 32s
    model = llm.model
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(4))
    quantize_model(model, "int8")
    moe = model.model.layers[0].mlp
    assert type(moe.gate) is torch.nn.Linear and type(moe.shared_expert_gate) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is not torch.nn.Linear  # the rest is quantized
    assert isinstance(moe.experts, QuantizedExperts) and type(moe.experts[7].down_proj) is Int8Linear
    assert "model.layers.0.mlp.gate" in model.corelm_quantization["skip"]
    save_quantized_dir(model, llm.config, tmp_path / "q")
    back = corelm.load(str(tmp_path / "q"), dtype="fp32")
    assert type(back.model.model.layers[0].mlp.gate) is torch.nn.Linear
    assert type(back.model.model.layers[1].mlp.experts[3].gate_proj) is Int8Linear
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids), model(ids), rtol=0, atol=1e-5)


def test_dense_layers_and_save_round_trip(tmp_path):
    # Qwen's mlp_only_layers: layer 0 a dense SwiGLU; then corelm writes the checkpoint back
    hf, llm = _hf_pair("qwen2_moe", tmp_path / "in", mlp_only_layers=[0])
    assert llm.config.dense_layers == [0]
    from corelm.io.hf import save_hf_dir

    save_hf_dir(llm.model, llm.config, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    want = hf.state_dict()
    assert back.state_dict().keys() == want.keys()
    for name, tensor in back.state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=0)  # the same bits come back
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)


def _naive_experts(x, weights, experts, gate_up, down):
    """Per-token, per-slot reference: y_t = sum_j w_tj * down_e(silu(gate_e x_t) * up_e x_t)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            g, u = (gate_up[e] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (down[e] @ (F.silu(g) * u))
    return out


# aligned rows take torch._grouped_mm, odd ones the per-expert path
@pytest.mark.parametrize("d,f", [(32, 16), (30, 14)])
def test_grouped_experts_equal_per_token_reference(d, f):
    g = torch.Generator().manual_seed(4)
    N, E, k = 37, 6, 2
    x = torch.randn(N, d, generator=g)
    gate_up, down = torch.randn(E, 2 * f, d, generator=g), torch.randn(E, d, f, generator=g)
    logits = torch.randn(N, E, generator=g)
    logits[:, 5] -= 100.0  # expert 5 gets no token: an empty group
    weights, experts = moe.route(logits, k, normalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(N))
    got = moe.experts_forward(x, weights, experts, gate_up, down)
    want = _naive_experts(x, weights, experts, gate_up, down)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # the compiled decode step's form
    torch.testing.assert_close(moe.gathered_experts_forward(x, weights, experts, gate_up, down), want,
                               rtol=1e-5, atol=1e-4)


def test_grouped_experts_gradients_match_reference():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 32, generator=g)
    gate_up, down = torch.randn(4, 32, 32, generator=g), torch.randn(4, 32, 16, generator=g)
    weights, experts = moe.route(torch.randn(20, 4, generator=g), 2, normalize=False)
    ours = [t.clone().requires_grad_() for t in (x, gate_up, down)]
    ref = [t.clone().requires_grad_() for t in (x, gate_up, down)]
    target = torch.randn(20, 32, generator=g)
    (moe.experts_forward(ours[0], weights, experts, ours[1], ours[2]) * target).sum().backward()
    (_naive_experts(ref[0], weights, experts, ref[1], ref[2]) * target).sum().backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_load_balancing_loss_matches_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(6)
    logits = tuple(torch.randn(2 * 7, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 7)
    mask[1, 5:] = 0
    torch.testing.assert_close(moe.load_balancing_loss(logits, 8, 2), load_balancing_loss_func(logits, 8, 2))
    torch.testing.assert_close(moe.load_balancing_loss(logits, 8, 2, mask),
                               load_balancing_loss_func(logits, 8, 2, mask))
    uniform = (torch.zeros(10, 4),)  # uniform router probabilities: loss = k whatever the tie-breaking
    torch.testing.assert_close(moe.load_balancing_loss(uniform, 4, 2), torch.tensor(2.0))


def test_router_aux_loss_wrapper_adds_to_the_loss(tmp_path):
    from corelm.objectives import causal_lm_loss

    _, llm = _hf_pair("qwen3_moe", tmp_path)
    batch = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    base, _ = causal_lm_loss(llm.model, batch)
    loss, metrics = moe.with_router_aux_loss(causal_lm_loss, coef=0.5)(llm.model, batch)
    assert metrics["router_aux_loss"] >= 2.0 - 1e-5  # >= k, equality only for perfectly balanced routing
    torch.testing.assert_close(loss, base + 0.5 * metrics["router_aux_loss"])
    loss.backward()
    assert llm.model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_config_validation():
    from corelm.config import ModelConfig

    base = {"family": "moe", "vocab_size": 16, "n_layer": 2, "n_head": 2, "d_model": 8}
    with pytest.raises(CorelmError, match="n_experts"):
        ModelConfig(**base)
    with pytest.raises(CorelmError, match="n_experts_per_tok"):
        ModelConfig(**base, n_experts=4, n_experts_per_tok=5)
    cfg = ModelConfig(**base, n_experts=4, n_experts_per_tok=2, d_ff=12)
    assert cfg.moe_d_ff == 12 and cfg.bias is False and cfg.activation == "silu"


def test_decode_step_traces_as_one_graph(tmp_path):
    # the engine compiles the decode step (static full-window cache); fullgraph=True fails on any graph break
    from corelm.generate.step import ModelStep, _decode_one

    _, llm = _hf_pair("qwen2_moe", tmp_path)
    step = ModelStep(llm.model, compile=True)
    cache = step.new_cache(2, 16)
    step.prefill(cache, [[1, 2, 3], [4, 5]])
    tokens, pos = torch.tensor([7, 8]), torch.tensor([3, 2])
    traced = torch.compile(_decode_one, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(traced(llm.model, cache, tokens, pos), _decode_one(llm.model, cache, tokens, pos))


def test_fused_expert_checkpoints_import_too(tmp_path):
    # transformers 5 holds the experts fused in memory (mlp.experts.gate_up_proj); a file saved that way loads the same
    from corelm.io.hf import state_dict_from_hf

    hf, llm = _hf_pair("mixtral", tmp_path)
    fused = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    ours, want = state_dict_from_hf(llm.config, fused), llm.model.state_dict()
    assert ours.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0)
    del fused["model.layers.1.mlp.experts.down_proj"]
    with pytest.raises(CorelmError, match="missing tensor 'model.layers.1.mlp.experts.down_proj'"):
        state_dict_from_hf(llm.config, fused)
