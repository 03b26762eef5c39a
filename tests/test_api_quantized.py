"""corelm.load with quantization: GGUF Q4 blocks reused, quantized directories, the fast decode path."""

from __future__ import annotations

import torch

import corelm
from corelm.generate import engine
from corelm.presets import embedded_path
from corelm.quant.transform import quantize_model


def test_int4_from_embedded_gguf_reuses_its_blocks_and_fast_path_matches_engine():
    llm = corelm.load("smollm2-135m-instruct", dtype="fp32", quantize="int4")
    # the wiring: load(quantize=) equals quantize_model(from_gguf=the file), and differs from re-quantizing
    base = corelm.load("smollm2-135m-instruct", dtype="fp32").model
    down = base.model.layers[1].mlp.down_proj.weight.detach().clone()
    quantize_model(base, "int4", from_gguf=embedded_path("smollm2-135m-instruct"))
    loaded = llm.model.model.layers[1].mlp.down_proj.dequantize()
    torch.testing.assert_close(loaded, base.model.layers[1].mlp.down_proj.dequantize(), rtol=0, atol=0)
    with torch.no_grad():
        fresh = torch.nn.Linear(down.shape[1], down.shape[0], bias=False)
        fresh.weight.copy_(down)
    requantized = quantize_model(torch.nn.Sequential(fresh), "int4")[0].dequantize()
    assert not torch.equal(loaded, requantized)

    # the api decodes on corelm's C++ step: the same greedy tokens as the model's own forward
    from corelm.generate.step import KernelStep, ModelStep, step_for

    assert isinstance(step_for(llm.model), KernelStep)
    ids = llm.encode_prompt("The capital of France is")
    got = llm.generate_ids(ids, 16, ignore_eos=True)
    params = llm._params(16, 0.0, 1.0, 0, 1.0, None, True)
    with torch.inference_mode():
        step = ModelStep(llm.model)
        cache = step.new_cache(1, len(ids) + 16)
        logits, expected = step.prefill(cache, [ids]), []
        for i in range(16):
            expected.append(int(logits[0].argmax()))
            logits = step.decode(cache, torch.tensor(expected[-1:]), torch.tensor([len(ids) + i]))
    assert got == expected == list(engine.stream(llm.model, ids, params))


def test_a_quantized_gguf_runs_its_own_blocks_by_default():
    """No option: the embedded Q4_1 file decodes on its blocks as stored (Q4_1 matrices, the Q8_0 tied
    embedding and head, C++ step); a dtype opts out."""
    from corelm.loading import stored_quantization
    from corelm.quant.kquant import GGUFBlockEmbedding, GGUFBlockLinear

    assert stored_quantization(embedded_path("smollm2-135m-instruct")) == "gguf"
    default = corelm.load("smollm2-135m-instruct")
    spec = default.model.corelm_quantization
    assert spec["method"] == "gguf" and spec["types"] == ["Q4_1", "Q8_0"] and spec["embedding"] == "Q8_0"
    q_proj, head, embed = default.model.model.layers[0].self_attn.q_proj, default.model.lm_head, \
        default.model.model.embed_tokens
    assert isinstance(q_proj, GGUFBlockLinear) and q_proj.ggml_type == 3
    assert isinstance(embed, GGUFBlockEmbedding) and embed.packed is head.packed  # tied: one copy, repacked
    assert head.raw is None and embed.raw is None and head.packed is not None
    explicit = corelm.load("smollm2-135m-instruct", dtype="fp32", quantize="gguf")
    ids = default.encode_prompt("The capital of France is")
    assert default.generate_ids(ids, 12, ignore_eos=True) == explicit.generate_ids(ids, 12, ignore_eos=True)
    floats = corelm.load("smollm2-135m-instruct", dtype="fp32")
    assert not getattr(floats.model, "corelm_quantization", None) and floats.dtype == torch.float32


def test_quantized_dir_loads_with_its_tokenizer(tmp_path):
    from corelm.commands.quantize import quantize

    out = quantize("llama-tiny", tmp_path / "q4", method="int4")
    llm = corelm.load(out)
    assert llm.model.corelm_quantization["method"] == "int4"
    assert llm.tokenizer is not None and llm.tokenizer.vocab_size == llm.config.vocab_size
    ref = corelm.load("llama-tiny", dtype="fp32", quantize="int4")
    ids = llm.encode_prompt("one two three")
    assert llm.generate_ids(ids, 8, ignore_eos=True) == ref.generate_ids(ids, 8, ignore_eos=True)
