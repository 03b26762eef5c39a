"""GGUF export round-trips through corelm's own importer: equal logits (F32), close logits (F16/Q8_0/Q4_0),
bit-exact int4 blocks (Q4_1), and the embedded tokenizer rebuilds to the same ids."""

import pytest
import torch

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.io import gguf as gguf_io
from corelm.io.gguf_export import export_gguf
from corelm.models import build_model
from corelm.quant.transform import quantize_model


def _tiny(vocab: int = 96, tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                         d_ff=128, max_seq_len=64, tie_embeddings=tie, rope_theta=10000.0)
    return build_model(config).eval()


def _reimport(path) -> torch.nn.Module:
    f = gguf_io.read_gguf(path)
    config = gguf_io.config_from_gguf(f)
    model = build_model(config).eval()
    model.load_state_dict(gguf_io.load_gguf_state_dict(f, config), strict=False)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_f32_round_trip_has_equal_logits(tmp_path, tie):
    model = _tiny(tie=tie)
    path = export_gguf(model, tmp_path / "m.gguf", "F32")
    back = _reimport(path)
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("qtype,tol", [("F16", 2e-3), ("Q8_0", 2e-2), ("Q4_0", 0.3)])
def test_quantized_round_trip_is_close(tmp_path, qtype, tol):
    model = _tiny()
    back = _reimport(export_gguf(model, tmp_path / "m.gguf", qtype))
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        ref, out = model(ids), back(ids)
    assert (out - ref).norm() / ref.norm() < tol


def test_int4_model_exports_its_own_blocks_as_q4_1(tmp_path):
    model = quantize_model(_tiny(), "int4", group_size=32)
    path = export_gguf(model, tmp_path / "q.gguf", "Q4_1")
    f = gguf_io.read_gguf(path)
    assert f.tensors["blk.0.attn_q.weight"].qtype.name == "Q4_1"
    back = _reimport(path)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        want = model.model.layers[1].get_submodule(name).dequantize()
        got = back.model.layers[1].get_submodule(name).weight
        # same 4-bit values; only d and m pass through fp16
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * want.abs().max().item())
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert (back(ids) - model(ids)).norm() / model(ids).norm() < 0.05


@pytest.mark.slow
def test_tokenizer_metadata_round_trips(tmp_path):
    from corelm.presets import embedded_path
    from corelm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(embedded_path("smollm2-135m-instruct"))
    path = export_gguf(_tiny(vocab=49152), tmp_path / "t.gguf", "F16", tokenizer=tok)
    back = Tokenizer.from_gguf(path)
    text = "def f(x):\n    return x**2  # 12345 héllo 世界 <|im_start|>"
    assert back.encode(text) == tok.encode(text)
    assert back.eos_token_id == tok.eos_token_id and back.chat_template == tok.chat_template


def test_bad_input(tmp_path):
    with pytest.raises(CorelmError, match="unknown GGUF type"):
        export_gguf(_tiny(), tmp_path / "m.gguf", "Q3_K")
    with pytest.raises(CorelmError, match=".gguf"):
        export_gguf(_tiny(), tmp_path / "m.bin", "F16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [{"qkv_bias": True}, {"qk_norm": True}, {"sliding_window": 8}],
                         ids=["qwen2-biases", "qwen3-qk-norm", "mistral-window"])
def test_export_and_structured_pruning_refuse_what_they_would_drop(tmp_path, extra):
    """Qwen2/Qwen3 features go to llama.cpp's qwen2/qwen3 architectures; a Mistral window has no place in
    llama.cpp's llama architecture, nor any of them in the pruning surgery: a one-line refusal, not a
    model that silently lost them."""
    from corelm.compress.prune import prune_structured
    from corelm.config import ModelConfig
    from corelm.errors import CorelmError
    from corelm.io.gguf_export import export_gguf
    from corelm.models import build_model

    model = build_model(ModelConfig(family="llama", vocab_size=96, n_layer=1, n_head=4, n_kv_head=2, d_model=64,
                                    d_ff=128, max_seq_len=32, **extra))
    if "sliding_window" in extra:
        with pytest.raises(CorelmError, match="llama architecture has no sliding window"):
            export_gguf(model, tmp_path / "x.gguf")
        assert not (tmp_path / "x.gguf").exists()
    else:
        arch = gguf_io.read_gguf(export_gguf(model, tmp_path / "x.gguf")).metadata["general.architecture"]
        assert arch == ("qwen2" if "qkv_bias" in extra else "qwen3")
    with pytest.raises(CorelmError, match="plain llama"):
        prune_structured(model, {"channels": 0.25}, [torch.randint(0, 96, (1, 8))])
