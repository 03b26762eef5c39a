"""quantize_model swaps a model's linears for quantized layers (the layout the device runs), ties the
embedding to a quantized head, and checks every layer before it changes anything."""

import pytest
import torch
from torch import nn

from corelm import kernels
from corelm.errors import CorelmError
from corelm.quant import layers
from corelm.quant.io import load_quantized_state_dict, quantized_state_dict
from corelm.quant.layers import Int4Linear, Int4PackedLinear, Int8Embedding, Int8Linear, Q8Linear
from corelm.quant.transform import is_quantized, quantize_model, quantized_structure


@pytest.fixture(params=["kernels", "pytorch"])
def path(request):
    """Layers made in the test run on corelm's C++ kernels, or on PyTorch's packed kernels."""
    if request.param == "kernels":
        assert kernels.load(), kernels.load_error()  # make test builds them: never silently skipped
        yield "kernels"
    else:
        with layers.pytorch_kernels():
            yield "pytorch"


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.body = nn.Sequential(nn.Linear(64, 128, bias=False), nn.SiLU(), nn.Linear(128, 64, bias=False))
        self.lm_head = nn.Linear(64, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.body(self.embed(ids)))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantize_model_swaps_linears_and_ties_embedding(method, path):
    torch.manual_seed(3)
    model = _Tiny()
    ids = torch.randint(0, 50, (2, 6))
    ref = model(ids)
    assert not is_quantized(model)
    quantize_model(model, method, group_size=32)
    assert is_quantized(model)
    assert isinstance(model.lm_head, Q8Linear) and model.lm_head.refine > 0
    assert isinstance(model.embed, Int8Embedding) and model.embed.head is model.lm_head  # one matrix, the head's
    assert not list(model.embed.buffers()) and not any(k.startswith("embed.") for k in model.state_dict())
    int4 = Int4Linear if path == "kernels" else Int4PackedLinear
    cls = Int8Linear if method == "int8" else int4
    assert all(type(m) is cls for m in (model.body[0], model.body[2]))
    out = model(ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.02 if method == "int8" else 0.15), rel
    # a quantized state dict loads into a fresh float model given the quantized structure
    fresh = quantized_structure(_Tiny(), model.corelm_quantization)
    load_quantized_state_dict(fresh, quantized_state_dict(model))
    assert torch.equal(fresh(ids), out)


def test_head_methods():
    torch.manual_seed(8)
    model = quantize_model(_Tiny(), "int4", head="int8")
    assert isinstance(model.lm_head, Int8Linear) and model.embed.head is model.lm_head
    model = quantize_model(_Tiny(), "int8", head="int4")
    assert isinstance(model.lm_head, (Int4Linear, Int4PackedLinear))
    assert isinstance(model.embed, nn.Embedding), "an int4 head has no int8 matrix to share"
    model = quantize_model(_Tiny(), "int8", skip=["body.2"])
    assert isinstance(model.body[2], nn.Linear) and isinstance(model.body[0], Int8Linear)


def test_bad_input_is_a_clear_error():
    with pytest.raises(CorelmError, match="unknown quantization method"):
        quantize_model(_Tiny(), "int3")
    with pytest.raises(CorelmError, match="unknown head quantization"):
        quantize_model(_Tiny(), "int8", head="int2")
    model = _Tiny()
    with pytest.raises(CorelmError, match="does not divide"):
        quantize_model(model, "int4", group_size=128)
    assert isinstance(model.body[0], nn.Linear), "nothing changed before the error"
    with pytest.raises(CorelmError, match="group size must be"):
        quantize_model(_Tiny(), "int4", group_size=48)
    model = quantize_model(_Tiny(), "int8")
    with pytest.raises(CorelmError, match="already quantized"):
        quantize_model(model, "int4")


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantize_at_load_reads_the_checkpoint_dtype_and_equals_quantizing_the_float_model(tied, method, tmp_path,
                                                                                           monkeypatch):
    """``load_parts(hf_dir, quantize=...)`` keeps a bf16 checkpoint in bf16, quantizes each matrix from it
    (bf16 -> fp32 is exact, so the integers are those of the fp32 model) and casts only what stays float."""
    transformers = pytest.importorskip("transformers")
    from corelm.loading import load_parts

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    from corelm.quant import transform

    seen, quantize_linear = [], transform.quantize_linear
    monkeypatch.setattr(transform, "quantize_linear",
                        lambda linear, *a: seen.append(linear.weight.dtype) or quantize_linear(linear, *a))
    streamed = load_parts(tmp_path, dtype="fp32", quantize=method).model
    assert seen and set(seen) == {torch.bfloat16}  # no fp32 copy of the matrices was made
    monkeypatch.undo()
    reference = load_parts(tmp_path, dtype="fp32").model
    assert all(p.dtype == torch.float32 for p in reference.parameters() if p.is_floating_point())
    quantize_model(reference, method)
    floats = [(n, p.dtype) for n, p in streamed.named_parameters() if p.is_floating_point()]
    assert floats and all(dtype == torch.float32 for _, dtype in floats), floats
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.inference_mode():
        y, ref = streamed(ids), reference(ids)
    assert y.dtype == torch.float32 and torch.equal(y, ref)


def test_quantize_model_casts_what_stays_float_and_keeps_ties():
    torch.manual_seed(0)
    model = _Tiny().to(torch.bfloat16)
    model.norm = nn.LayerNorm(64).to(torch.bfloat16)
    quantize_model(model, "int8", dtype=torch.float32)
    assert model.norm.weight.dtype == torch.float32 and model.norm.bias.dtype == torch.float32
    assert isinstance(model.embed, Int8Embedding) and model.embed(torch.tensor([3])).dtype == torch.float32
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
