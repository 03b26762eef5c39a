"""Encoder-decoder models (BART, mBART, Marian): import, parity with transformers, cached generation."""

from __future__ import annotations

import json

import pytest
import torch

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.io.hf import load_hf_dir, load_hf_model, save_hf_dir

transformers = pytest.importorskip("transformers")

VOCAB = 99
COMMON = {"vocab_size": VOCAB, "d_model": 32, "encoder_layers": 2, "decoder_layers": 3, "encoder_attention_heads": 4,
              "decoder_attention_heads": 4, "encoder_ffn_dim": 37, "decoder_ffn_dim": 37, "max_position_embeddings": 64}


def _hf_config(model_type: str):
    if model_type == "bart-untied":  # an LM head of its own (lm_head.weight in the checkpoint)
        return transformers.BartConfig(**COMMON, tie_word_embeddings=False)
    if model_type == "bart":
        return transformers.BartConfig(**COMMON)
    if model_type == "marian":  # as the opus-mt checkpoints: scaled embeddings, swish, start = pad
        return transformers.MarianConfig(**COMMON, decoder_start_token_id=VOCAB - 1, pad_token_id=VOCAB - 1,
                                         scale_embedding=True, activation_function="swish")
    return transformers.MBartConfig(**COMMON, scale_embedding=True)


def _hf_model(model_type: str, path):
    """A random transformers model saved to ``path``: norms and biases away from their 1/0 initial values,
    projections large enough (std 0.5) that the output depends on the source, not only on the LM bias."""
    torch.manual_seed(0)
    model = transformers.AutoModelForSeq2SeqLM.from_config(_hf_config(model_type)).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(std=0.1)
        for name, p in model.named_parameters():
            if model_type == "marian" and "embed_positions" in name:  # Marian's sinusoids are fixed
                continue
            projection = p.dim() == 2 and not any(e in name for e in ("shared", "embed", "lm_head"))
            p.add_(torch.randn_like(p) * (0.5 if projection else 0.05))
        if model_type == "bart-untied":  # transformers 5 unties the stacks' embeddings too; corelm shares them
            model.model.encoder.embed_tokens.weight.copy_(model.model.shared.weight)
            model.model.decoder.embed_tokens.weight.copy_(model.model.shared.weight)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["bart", "marian", "mbart", "bart-untied"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = _hf_model(request.param, path)
    config, model = load_hf_model(path)
    return request.param, path, hf, config, model


def _batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, VOCAB - 1, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # a right-padded row
    tgt = torch.randint(3, VOCAB - 1, (2, 5), generator=g)
    return src, mask, tgt


def test_config_variant(pair):
    model_type, _, _, config, _ = pair
    assert config.family == "bart" and config.is_seq2seq and not config.is_encoder
    assert (config.n_encoder_layer, config.n_layer) == (2, 3)
    model_type = model_type.removesuffix("-untied")
    assert config.tie_embeddings == (model_type == pair[0])
    assert config.positions == ("sinusoidal" if model_type == "marian" else "learned")
    assert config.normalize_before == (model_type == "mbart")
    assert config.layernorm_embedding == (model_type != "marian")
    assert config.scale_embedding == (model_type != "bart")


def test_encoder_and_logits_match_transformers(pair):
    _, _, hf, _, model = pair
    src, mask, tgt = _batch()
    with torch.no_grad():
        ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt)
        enc = model.encode(src, mask)
        logits = model(src, tgt, mask)
    real = mask.bool()  # padded positions of the encoder output are never read
    torch.testing.assert_close(enc[real], ref.encoder_last_hidden_state[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_cached_decode_equals_full_forward(pair):
    from corelm.ops.kv_cache import KVCache

    _, _, _, config, model = pair
    src, mask, tgt = _batch()
    with torch.no_grad():
        full = model(src, tgt, mask)
        kv = model.cross_kv(model.encode(src, mask))
        cache = KVCache(config.n_layer, 2, config.n_head, 8, config.head_dim)
        steps = [model.decode(tgt[:, :2], kv, mask, cache, 0)]  # a two-token prefill, then one token at a time
        steps += [model.decode(tgt[:, t : t + 1], kv, mask, cache, t) for t in range(2, tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_export_round_trip_loads_in_transformers(pair, tmp_path):
    _, _, hf, config, model = pair
    save_hf_dir(model, config, tmp_path)
    again = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    src, mask, tgt = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits,
                                   hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits)


def _rewrite(path, tmp_path, edit):
    """A copy of the checkpoint at ``path`` with its tensors passed through ``edit``."""
    from safetensors.torch import load_file, save_file

    tmp_path.mkdir()
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    return tmp_path


def test_import_table_refuses_missing_wrong_and_unknown_tensors(pair, tmp_path):
    _, path, _, _, _ = pair
    name = "model.decoder.layers.2.encoder_attn.k_proj.weight"
    with pytest.raises(CorelmError, match="missing tensor 'model.decoder.layers.2.encoder_attn.k_proj.weight'"):
        load_hf_dir(_rewrite(path, tmp_path / "a", lambda s: s.pop(name)))
    with pytest.raises(CorelmError, match=r"has shape \(32, 31\), expected \(32, 32\)"):
        load_hf_dir(_rewrite(path, tmp_path / "b", lambda s: s.__setitem__(name, s[name][:, :31].contiguous())))
    with pytest.raises(CorelmError, match="does not know"):
        extra = "model.decoder.extra.weight"
        load_hf_dir(_rewrite(path, tmp_path / "c", lambda s: s.__setitem__(extra, s[name].clone())))


def test_separate_stack_embeddings_are_refused(tmp_path):
    path = tmp_path / "hf"
    _hf_model("bart-untied", path)
    name = "model.encoder.embed_tokens.weight"
    with pytest.raises(CorelmError, match="separate encoder/decoder embeddings"):
        load_hf_dir(_rewrite(path, tmp_path / "e", lambda s: s.__setitem__(name, s[name] + 1)))


def test_missing_final_logits_bias_is_zero(pair, tmp_path):
    _, path, _, _, _ = pair
    _, state = load_hf_dir(_rewrite(path, tmp_path / "d", lambda s: s.pop("final_logits_bias")))
    assert torch.equal(state["final_logits_bias"], torch.zeros(1, VOCAB))


def test_unsupported_hf_configs_are_refused(tmp_path):
    from corelm.io.hf import config_from_hf

    base = {**_hf_config("marian").to_dict(), "model_type": "marian"}
    with pytest.raises(CorelmError, match="separate source/target embeddings"):
        config_from_hf({**base, "share_encoder_decoder_embeddings": False})
    with pytest.raises(CorelmError, match="decoder_ffn_dim=64 != encoder_ffn_dim=37"):
        config_from_hf({**base, "decoder_ffn_dim": 64})
    with pytest.raises(CorelmError, match="missing required field 'encoder_layers'"):
        config_from_hf({k: v for k, v in base.items() if k != "encoder_layers"})
    json.dumps(base)  # the dict is what a config.json holds


@pytest.mark.parametrize("fields, message", [
    ({"decoder_start_token_id": None}, "needs decoder_start_token_id"),
    ({"decoder_start_token_id": 500}, "needs decoder_start_token_id"),
    ({"positions": "rotary"}, "positions must be one of learned, sinusoidal"),
    ({"n_encoder_layer": 0}, "n_encoder_layer must be a positive integer"),
    ({"n_kv_head": 2}, "no grouped-query attention"),
])
def test_config_validation(fields, message):
    kwargs = {"family": "bart", "vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "d_model": 32,
              "decoder_start_token_id": 2}
    with pytest.raises(CorelmError, match=message):
        ModelConfig(**{**kwargs, **fields})
    assert ModelConfig(**kwargs).n_encoder_layer == 2


@pytest.mark.parametrize("eos", ["config", "early"])
@pytest.mark.parametrize("num_beams, extra", [(1, {}), (4, {}), (4, {"length_penalty": 2.0}),
                                              (4, {"early_stopping": True}), (3, {"early_stopping": "never"}),
                                              (4, {"forced_bos_token_id": 5, "suppress_tokens": [1, 7]})])
def test_generate_matches_transformers(pair, eos, num_beams, extra):
    """Greedy and beam outputs equal transformers' token for token. Tiny random models repeat one token and
    rarely say EOS, so the "early" case makes EOS the second token greedy decoding writes for row 0: rows
    and hypotheses then end at different lengths (padding, finished-beam bookkeeping, early stopping)."""
    from corelm.generate.seq2seq import Seq2SeqParams, generate

    _, _, hf, _, model = pair
    src, mask, _ = _batch()
    if eos == "early":
        eos_id = int(generate(model, src, mask, Seq2SeqParams(max_new_tokens=3))[0, 2])
        extra = {**extra, "eos_token_id": eos_id}
    ref = hf.generate(input_ids=src, attention_mask=mask, do_sample=False, num_beams=num_beams, max_new_tokens=12,
                      **extra)
    ours = generate(model, src, mask, Seq2SeqParams(max_new_tokens=12, num_beams=num_beams, **extra))
    assert ours.tolist() == ref.tolist()


def _with_tokenizer(pair, tmp_path):
    """A copy of the checkpoint with a word-level tokenizer.json over its 99 ids (``t0`` .. ``t98``); sources end
    in EOS (the post-processor adds it, as Marian's does); EOS, pad and the start token are special."""
    import shutil

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    _, path, _, config, _ = pair
    out = tmp_path / "with-tokenizer"
    shutil.copytree(path, out)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = config.extra["eos_token_id"]
    tok.post_processor = processors.TemplateProcessing(single=f"$A t{eos}", special_tokens=[(f"t{eos}", eos)])
    specials = {eos, config.pad_token_id, config.decoder_start_token_id, config.extra.get("bos_token_id", eos)}
    tok.add_special_tokens([AddedToken(f"t{i}", special=True) for i in sorted(specials)])
    tok.save(str(out / "tokenizer.json"))
    return out, tok


@pytest.mark.parametrize("settings", [{}, {"num_beams": 4}])
def test_load_translate_matches_transformers(pair, tmp_path, settings):
    import corelm

    _, _, hf, config, _ = pair
    path, tok = _with_tokenizer(pair, tmp_path)
    texts = ["t5 t17 t9 t40 t41", "t60 t7"]
    s2s = corelm.load(path, dtype="fp32")
    assert type(s2s).__name__ == "Seq2Seq"
    rows = [e.ids for e in tok.encode_batch(texts)]
    ids = torch.full((2, max(map(len, rows))), config.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                      num_beams=settings.get("num_beams", 1))
    expected = [tok.decode(r, skip_special_tokens=True) for r in ref.tolist()]
    assert s2s.translate(texts, max_new_tokens=10, **settings) == expected
    assert any(expected)  # some words were generated


def test_generation_config_settings_match_transformers(pair, tmp_path):
    """generation_config.json as Marian checkpoints ship it: beams, max_length, the pad id banned, renormalised."""
    import corelm

    _, _, hf, config, _ = pair
    path, _ = _with_tokenizer(pair, tmp_path)
    gen = {"num_beams": 3, "max_length": 9, "bad_words_ids": [[config.pad_token_id]], "renormalize_logits": True,
           "length_penalty": 0.5}
    (path / "generation_config.json").write_text(json.dumps(gen))
    src, mask, _ = _batch()
    ref = hf.generate(input_ids=src, attention_mask=mask, do_sample=False, **gen)
    s2s = corelm.load(path, dtype="fp32")
    got = s2s.generate_ids([r[m.bool()].tolist() for r, m in zip(src, mask)])
    eos = config.extra["eos_token_id"]
    targets = [r[1:] for r in ref.tolist()]  # without the start token (BART's is EOS itself)
    assert got == [t[: t.index(eos) + 1] if eos in t else t for t in targets]
    assert all(config.pad_token_id not in row for row in got)


@pytest.mark.parametrize("positions, normalize_before", [("learned", False), ("sinusoidal", False), ("learned", True)])
def test_fresh_model_is_initialised_and_decodes(positions, normalize_before):
    """A model built from a config (no checkpoint) has initialised weights; greedy decoding runs with its cache."""
    from corelm.generate.seq2seq import Seq2SeqParams, generate
    from corelm.models import build_model

    torch.manual_seed(0)
    config = ModelConfig(family="bart", vocab_size=VOCAB, n_layer=2, n_head=4, d_model=32, max_seq_len=32,
                         decoder_start_token_id=2, pad_token_id=1, positions=positions,
                         normalize_before=normalize_before, extra={"eos_token_id": 2})
    model = build_model(config).eval()
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    src, mask, tgt = _batch()
    with torch.no_grad():
        logits = model(src, tgt, mask)
    assert logits.shape == (2, 5, VOCAB) and torch.isfinite(logits).all()
    out = generate(model, src, mask, Seq2SeqParams(max_new_tokens=6, num_beams=2))
    assert out.shape[0] == 2 and (out[:, 0] == 2).all()


def test_generate_refuses_more_tokens_than_positions(pair):
    from corelm.generate.seq2seq import Seq2SeqParams, generate

    _, _, _, config, model = pair
    src, mask, _ = _batch()
    with pytest.raises(CorelmError, match="more than the 64 target positions"):
        generate(model, src, mask, Seq2SeqParams(max_new_tokens=config.max_seq_len + 1))
    with pytest.raises(CorelmError, match="early_stopping must be"):
        generate(model, src, mask, Seq2SeqParams(early_stopping="sometimes"))
