"""corelm.load with quantization: GGUF Q4 blocks reused, quantized directories, the fast decode path."""

from __future__ import annotations

import torch

import corelm
from corelm.compress.quant import quantize_model
from corelm.generate import engine
from corelm.presets import embedded_path


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

    # the fast path: same greedy tokens as the engine on the same quantized model
    ids = llm.encode_prompt("The capital of France is")
    params = llm._params(16, 0.0, 1.0, 0, 1.0, None, True)
    expected = list(engine.stream(llm.model, ids, params))
    got = llm.generate_ids(ids, 16, ignore_eos=True)
    assert "_corelm_fast" in llm.model.__dict__  # the api took the fast path
    assert got == expected and len(got) == 16


def test_quantized_dir_loads_with_its_tokenizer(tmp_path):
    from corelm.commands.quantize import quantize

    out = quantize("llama-tiny", tmp_path / "q4", method="int4")
    llm = corelm.load(out)
    assert llm.model.corelm_quantization["method"] == "int4"
    assert llm.tokenizer is not None and llm.tokenizer.vocab_size == llm.config.vocab_size
    ref = corelm.load("llama-tiny", dtype="fp32", quantize="int4")
    ids = llm.encode_prompt("one two three")
    assert llm.generate_ids(ids, 8, ignore_eos=True) == ref.generate_ids(ids, 8, ignore_eos=True)
