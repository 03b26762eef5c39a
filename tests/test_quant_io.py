"""Quantized checkpoint directories: the saved format is pinned (portable int4 nibbles, no packed
bytes, the tied embedding left out) and a directory loads back into either int4 layout."""

import json

import pytest
import torch
from safetensors.torch import load_file

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.models import build_model
from corelm.quant import layers
from corelm.quant.io import QUANT_KEY, is_quantized_dir, load_quantized_dir, save_quantized_dir
from corelm.quant.layers import Int4Linear, Int4PackedLinear, Int8Embedding, Int8Linear, Q8Linear
from corelm.quant.transform import quantize_model


def _tiny():
    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=64, n_layer=1, n_head=2, d_model=64, d_ff=128, max_seq_len=32)
    return config, build_model(config).eval()


def test_saved_int4_directory_format(tmp_path):
    config, model = _tiny()
    quantize_model(model, "int4", group_size=32)
    out = save_quantized_dir(model, config, tmp_path / "q4")
    hf = json.loads((out / "config.json").read_text())
    assert hf[QUANT_KEY] == model.corelm_quantization and hf["corelm"] == config.to_dict()
    assert is_quantized_dir(out) and not is_quantized_dir(tmp_path)
    state = load_file(str(out / "model.safetensors"))
    up = "model.layers.0.mlp.up_proj."
    assert state[up + "qweight"].shape == (128, 32) and state[up + "qweight"].dtype == torch.uint8
    assert state[up + "scales"].shape == state[up + "zeros"].shape == (128, 2)
    assert state[up + "scales"].dtype == state[up + "zeros"].dtype == torch.bfloat16
    assert not any(k.endswith(("packed", "scale_zeros")) for k in state), "packed bytes are never saved"
    assert state["lm_head.qweight"].dtype == torch.int8 and state["lm_head.scales"].shape == (64, 2)
    if config.tie_embeddings:
        assert not any(k.startswith("model.embed_tokens") for k in state), "re-tied at load"
    # the nibbles are the portable order whatever layout the layer held
    q = model.model.layers[0].mlp.up_proj.quantized()[0]
    assert torch.equal(state[up + "qweight"], layers.pack_nibbles(q))


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("pytorch", [False, True])
def test_directory_loads_back_in_either_layout(tmp_path, pytorch, method):
    config, model = _tiny()
    with layers.pytorch_kernels() if pytorch else torch.no_grad():
        quantize_model(model, method, group_size=32)
    save_quantized_dir(model, config, tmp_path / "q4")
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        want = model(ids)
    with layers.pytorch_kernels() if pytorch else torch.no_grad():
        _, back = load_quantized_dir(tmp_path / "q4")
    up = back.model.layers[0].mlp.up_proj
    int4 = Int4PackedLinear if pytorch or not layers.use_kernels("cpu") else Int4Linear
    assert type(up) is (Int8Linear if method == "int8" else int4)
    assert torch.equal(up.dequantize(), model.model.layers[0].mlp.up_proj.dequantize())
    assert isinstance(back.lm_head, Q8Linear)
    if config.tie_embeddings:
        assert isinstance(back.model.embed_tokens, Int8Embedding)
        assert back.model.embed_tokens.head is back.lm_head
    with torch.no_grad():
        got = back(ids)
    assert torch.equal(got, want)  # (int8 on PyTorch's kernel: it crashed on tensors read from a file)


def test_not_a_quantized_directory(tmp_path):
    with pytest.raises(CorelmError, match="not a quantized corelm checkpoint"):
        load_quantized_dir(tmp_path)
    with pytest.raises(CorelmError, match="not quantized"):
        save_quantized_dir(_tiny()[1], _tiny()[0], tmp_path / "x")
