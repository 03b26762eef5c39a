"""HF checkpoint import/export: transformers loads what corelm writes, corelm loads what HF writes,
bad files fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.io.hf import (
    config_from_hf,
    config_to_hf,
    load_hf_dir,
    load_hf_model,
    save_hf_dir,
    state_dict_to_hf,
)
from corelm.models import build_model

transformers.logging.set_verbosity_error()
TOL = {"atol": 1e-5, "rtol": 1e-5}
CONFIGS = {
    "llama": {"family": "llama", "vocab_size": 97, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "d_ff": 48,
                  "max_seq_len": 64, "tie_embeddings": False,
                  "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "llama-tied": {"family": "llama", "vocab_size": 97, "n_layer": 2, "n_head": 4, "n_kv_head": 4, "d_model": 32,
                   "d_ff": 48, "max_seq_len": 64, "tie_embeddings": True},
    "gpt2": {"family": "gpt2", "vocab_size": 97, "n_layer": 2, "n_head": 4, "d_model": 32, "max_seq_len": 64},
    "bert": {"family": "bert", "vocab_size": 97, "n_layer": 2, "n_head": 4, "d_model": 32, "d_ff": 64,
             "max_seq_len": 64, "norm_eps": 1e-12, "pad_token_id": 0},
}


def _model(name: str) -> tuple[ModelConfig, torch.nn.Module]:
    torch.manual_seed(0)
    config = ModelConfig(**CONFIGS[name])
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return config, model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_then_transformers_from_pretrained_equal_logits(name, tmp_path):
    config, model = _model(name)
    save_hf_dir(model, config, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    ids = torch.randint(1, 97, (2, 20))
    with torch.no_grad():
        if config.family == "bert":
            hf = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
            out = hf(ids, output_hidden_states=True)
            hidden = model(ids)
            torch.testing.assert_close(hidden, out.hidden_states[-1], **TOL)
            torch.testing.assert_close(model.mlm_logits(hidden), out.prediction_logits, **TOL)
            torch.testing.assert_close(transformers.AutoModel.from_pretrained(tmp_path)(ids).last_hidden_state,
                                       hidden, **TOL)
        else:
            hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
            torch.testing.assert_close(model(ids), hf(ids).logits, **TOL)
        # and back: corelm reads its own export, then transformers' re-save (no "corelm" key)
        _, again = load_hf_model(tmp_path)
        torch.testing.assert_close(again(ids), model(ids), atol=0, rtol=0)
        hf.save_pretrained(tmp_path / "resaved")
        hf_json = json.loads((tmp_path / "resaved" / "config.json").read_text())
        hf_json.pop("corelm", None)
        (tmp_path / "resaved" / "config.json").write_text(json.dumps(hf_json))
        config2, again = load_hf_model(tmp_path / "resaved")
        assert (config2.n_kv_head, config2.tie_embeddings, config2.rope_scaling) == \
            (config.n_kv_head, config.tie_embeddings, config.rope_scaling)
        torch.testing.assert_close(again(ids), model(ids), **TOL)


def test_load_keeps_the_checkpoint_dtype_or_casts_on_request(tmp_path):
    config, model = _model("llama")
    save_hf_dir(model, config, tmp_path)
    _, state = load_hf_dir(tmp_path)
    _, loaded = load_hf_model(tmp_path)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    _, bf16 = load_hf_dir(tmp_path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert set(state) == set(model.state_dict())


def test_sharded_index_and_torch_bin(tmp_path):
    config, model = _model("gpt2")
    hf_state = state_dict_to_hf(config, model.state_dict())
    names = sorted(hf_state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    (tmp_path / "sharded").mkdir()
    for file, keys in shards.items():
        save_file({k: hf_state[k] for k in keys}, str(tmp_path / "sharded" / file), metadata={"format": "pt"})
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "sharded" / "config.json").write_text(json.dumps(config_to_hf(config)))
    (tmp_path / "bin").mkdir()
    torch.save(hf_state, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps(config_to_hf(config)))
    ids = torch.randint(0, 97, (1, 9))
    for sub in ("sharded", "bin"):
        _, loaded = load_hf_model(tmp_path / sub)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_truncated_and_corrupt_safetensors_name_the_file(tmp_path):
    config, model = _model("llama-tied")
    save_hf_dir(model, config, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorelmError, match=r"model\.safetensors.*truncated"):
        load_hf_dir(tmp_path)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CorelmError, match=r"model\.safetensors"):
        load_hf_dir(tmp_path)
    weights.unlink()
    with pytest.raises(CorelmError, match="no weights"):
        load_hf_dir(tmp_path)
    with pytest.raises(CorelmError, match="no such file"):
        load_hf_dir(tmp_path / "missing")


def test_config_with_missing_or_unsupported_fields_is_a_clear_error():
    good = config_to_hf(ModelConfig(**CONFIGS["llama"]))
    for field in ("hidden_size", "num_hidden_layers", "vocab_size", "model_type"):
        broken = {k: v for k, v in good.items() if k != field}
        with pytest.raises(CorelmError, match=field):
            config_from_hf(broken)
    with pytest.raises(CorelmError, match="t5"):
        config_from_hf({**good, "model_type": "t5"})
    with pytest.raises(CorelmError, match="attention_bias"):
        config_from_hf({**good, "attention_bias": True})


def test_config_from_hf_reads_each_format():
    mistral = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
               "rope_theta": 1e6, "sliding_window": None, "eos_token_id": 2}
    config = config_from_hf(mistral)
    assert (config.family, config.n_kv_head, config.rope_theta, config.extra["eos_token_id"]) == ("llama", 8, 1e6, 2)
    v5 = transformers.LlamaConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, rope_theta=5e5,
                                  rope_scaling={"rope_type": "linear", "factor": 2.0}).to_dict()
    config = config_from_hf(v5)
    assert config.rope_theta == 5e5 and config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    gpt2 = config_from_hf(transformers.GPT2Config().to_dict())
    assert (gpt2.d_model, gpt2.n_layer, gpt2.max_seq_len, gpt2.activation) == (768, 12, 1024, "gelu_tanh")
    bert = config_from_hf(transformers.BertConfig().to_dict())
    assert (bert.d_model, bert.d_ff, bert.norm_eps, bert.pad_token_id) == (768, 3072, 1e-12, 0)


def test_wrong_tensor_shape_is_a_clear_error(tmp_path):
    config, model = _model("llama-tied")
    save_hf_dir(model, config, tmp_path)
    hf_json = json.loads((tmp_path / "config.json").read_text())
    hf_json.pop("corelm")
    hf_json["intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(hf_json))
    with pytest.raises(CorelmError, match=r"mlp\.gate_proj\.weight.*shape"):
        load_hf_dir(tmp_path)


def test_original_gpt2_names_and_buffers_map():
    """The original GPT-2 files name tensors without `transformer.` and carry attention-mask buffers."""
    from corelm.io.hf import state_dict_from_hf

    config, model = _model("gpt2")
    hf_state = state_dict_to_hf(config, model.state_dict())
    bare = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)  # the causal-mask buffer old checkpoints saved
    ours = state_dict_from_hf(config, bare)
    assert ours.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, atol=0, rtol=0)
    with pytest.raises(CorelmError, match="does not know"):
        state_dict_from_hf(config, {**bare, "h.0.attn.rotary.weight": torch.zeros(1)})


def test_save_writes_the_tokenizer_next_to_the_weights(tmp_path):
    from tokenizers import Tokenizer, models

    config, model = _model("llama-tied")
    tokenizer = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    save_hf_dir(model, config, tmp_path, tokenizer=tokenizer)
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id("hello") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
