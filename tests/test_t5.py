"""T5 and T5 v1.1 (family ``t5``): import, parity with transformers, cached and beam-search generation."""

from __future__ import annotations

import json

import pytest
import torch

import corelm
from corelm.errors import CorelmError
from corelm.io.hf import config_from_hf, load_hf_dir, load_hf_model, save_hf_dir

transformers = pytest.importorskip("transformers")

VOCAB = 99
COMMON = {"vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 2, "num_decoder_layers": 3,
          "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20,
          "decoder_start_token_id": 0}


def _hf_model(variant: str, path):
    """A random transformers T5 saved to ``path`` and read back by transformers.

    ``t5``: ReLU MLP, the embedding as head with the ``d_model ** -0.5`` rescale. ``v1.1``: gated-GELU MLP and an
    LM head of its own (as google/t5-v1_1-* ship it: ``tie_word_embeddings: false``). ``v1.1-tied``: what
    transformers >= 5 saves for a fresh v1.1 config: the head tied to the embedding, no rescale.
    Weights are perturbed away from their initial values and the sources are 9-14 tokens long, so the
    relative-position buckets past the exact ones (8 buckets: distances 0-3 exact, 4-19 logarithmic) are used.
    """
    torch.manual_seed(0)
    gated = {"feed_forward_proj": "gated-gelu"} if variant.startswith("v1.1") else {}
    if variant == "v1.1-tied":  # transformers 5 reads this as: no rescale, and the head tied all the same
        gated["tie_word_embeddings"] = False
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**COMMON, **gated)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if "layer_norm" in name else 0.15))
        if variant == "v1.1-tied":  # an unscaled head on the embedding: keep logits of a few units (see below)
            model.shared.weight.mul_(0.2)
        if variant == "v1.1":  # untie: an LM head of its own
            # std 0.3: logits of a few units (a head of std ~1 makes them ~20, where the 1-ulp difference between
            # torch's fused tanh-GELU and transformers' written-out gelu_new grows past 1e-5)
            model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(VOCAB, 32))
            model.config.tie_word_embeddings = False
    model.save_pretrained(path)
    if variant == "v1.1":  # the config.json of a hub v1.1 checkpoint (transformers < 5 wrote no scale field)
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("scale_decoder_outputs", None)
        (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    return transformers.T5ForConditionalGeneration.from_pretrained(path).eval()


@pytest.fixture(scope="module", params=["t5", "v1.1", "v1.1-tied"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param.replace(".", ""))
    hf = _hf_model(request.param, path)
    config, model = load_hf_model(path)
    return request.param, path, hf, config, model


def _batch():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(2, VOCAB, (2, 14), generator=g)
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, 9:] = 0  # a right-padded row
    src[1, 9:] = 0
    tgt = torch.randint(2, VOCAB, (2, 11), generator=g)
    tgt[:, 0] = 0  # the decoder starts from the pad id
    return src, mask, tgt


def test_config_variant(pair):
    variant, _, hf, config, _ = pair
    assert config.family == "t5" and config.is_seq2seq and (config.n_encoder_layer, config.n_layer) == (2, 3)
    assert config.gated_mlp == variant.startswith("v1.1")
    assert config.activation == ("gelu_tanh" if config.gated_mlp else "relu")
    assert config.tie_embeddings == (variant != "v1.1")
    assert config.scale_decoder_outputs == (variant == "t5")
    assert (hf.lm_head.weight is hf.shared.weight) == config.tie_embeddings  # transformers reads it the same way
    assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (8, 20)


def test_planner_counts_the_parameters(pair):
    from corelm.plan.formulas import param_count

    _, _, hf, config, model = pair
    assert param_count(config) == sum(p.numel() for p in model.parameters())  # shared tensors counted once
    assert param_count(config) == hf.num_parameters()


def test_relative_position_bucket_matches_transformers():
    from corelm.models.t5 import relative_position_bucket

    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    rel = torch.arange(-300, 300)[None, :] - torch.arange(0, 40)[:, None]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance),
                               ref(rel, bidirectional, buckets, distance))


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
    assert logits.shape == (2, 11, VOCAB) and float(ref.logits.std()) > 0.5  # logits that differ across the vocab


def test_unpadded_call_by_keyword_matches_transformers(pair):
    """``llm.model(input_ids, decoder_input_ids=...)`` with no attention mask, as outside checks call it."""
    _, path, hf, _, _ = pair
    src, _, tgt = _batch()
    with torch.no_grad():
        logits = corelm.load(str(path), dtype="fp32").model(src, decoder_input_ids=tgt)
        ref = hf(input_ids=src, decoder_input_ids=tgt).logits
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


def test_cached_decode_equals_full_forward(pair):
    from corelm.ops.kv_cache import KVCache

    _, _, _, config, model = pair
    src, mask, tgt = _batch()
    with torch.no_grad():
        full = model(src, tgt, mask)
        kv = model.cross_kv(model.encode(src, mask))
        cache = KVCache(config.n_layer, 2, config.n_head, 16, config.head_dim)
        steps = [model.decode(tgt[:, :3], kv, mask, cache, 0)]  # a three-token prefill, then one token at a time
        steps += [model.decode(tgt[:, t : t + 1], kv, mask, cache, t) for t in range(3, tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_generate_matches_transformers(pair, num_beams):
    """Greedy and 4-beam outputs equal transformers' token for token. EOS is made a token that greedy decoding writes
    early in row 0 and never in row 1, so rows and hypotheses end at different lengths."""
    from corelm.generate.seq2seq import Seq2SeqParams, generate

    _, _, hf, _, model = pair
    src, mask, _ = _batch()
    row0, row1 = generate(model, src, mask, Seq2SeqParams(max_new_tokens=25, eos_token_id=-1))[:, 1:].tolist()
    eos = next(t for t in row0[2:] if t not in row1)
    # use_cache=False: transformers 5.25 sizes T5's cache by the encoder's layer count (2 here, 3 decoder layers)
    ref = hf.generate(input_ids=src, attention_mask=mask, do_sample=False, num_beams=num_beams, max_new_tokens=25,
                      eos_token_id=eos, use_cache=False)
    ours = generate(model, src, mask, Seq2SeqParams(max_new_tokens=25, num_beams=num_beams, eos_token_id=eos))
    assert ours.tolist() == ref.tolist()
    assert ref.shape[1] > 12  # decoded past the exact buckets


def test_export_round_trip_loads_in_transformers(pair, tmp_path):
    _, _, hf, config, model = pair
    save_hf_dir(model, config, tmp_path)
    again = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    src, mask, tgt = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits,
                                   hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    hf_config.pop("corelm")  # the HF fields alone describe the same model
    assert config_from_hf(hf_config).to_dict() == {**config.to_dict(), "name": ""}


def test_load_translate_matches_transformers(pair, tmp_path):
    """``corelm.load`` of a T5 directory with a tokenizer: ``translate`` equals transformers' beam search."""
    import shutil

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    import corelm

    _, path, hf, _, _ = pair
    out = tmp_path / "with-tokenizer"
    shutil.copytree(path, out)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A t1", special_tokens=[("t1", 1)])
    tok.add_special_tokens([AddedToken("t0", special=True), AddedToken("t1", special=True)])
    tok.save(str(out / "tokenizer.json"))
    texts = ["t5 t17 t9 t40 t41 t8 t30", "t60 t7"]
    s2s = corelm.load(out, dtype="fp32")
    assert type(s2s).__name__ == "Seq2Seq" and s2s.config.family == "t5"
    enc = tok.encode_batch(texts)
    ids = torch.zeros(2, max(len(e.ids) for e in enc), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)], mask[i, : len(e.ids)] = torch.tensor(e.ids), 1
    ref = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=4, max_new_tokens=10,
                      use_cache=False)
    assert s2s.translate(texts, num_beams=4, max_new_tokens=10) == [
        tok.decode(r, skip_special_tokens=True) for r in ref.tolist()]


def test_unsupported_t5_configs_are_refused(pair):
    _, path, _, _, _ = pair
    base = json.loads((path / "config.json").read_text())
    with pytest.raises(CorelmError, match="unsupported feed_forward_proj 'gated-banana'"):
        config_from_hf({**base, "feed_forward_proj": "gated-banana"})
    with pytest.raises(CorelmError, match="missing required field 'd_kv'"):
        config_from_hf({k: v for k, v in base.items() if k != "d_kv"})


def test_import_table_refuses_missing_and_unknown_tensors(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path, _, _, _ = pair
    state = load_file(str(path / "model.safetensors"))
    state.pop("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    state["decoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CorelmError, match="missing tensor 'decoder.block.0.layer.0.SelfAttention.relative_attention"):
        load_hf_dir(tmp_path)


def test_fresh_model_decodes():
    """A T5 built from a config (no checkpoint) is initialised (Mesh TF scales) and decodes with its cache."""
    from corelm.config import ModelConfig
    from corelm.generate.seq2seq import Seq2SeqParams, generate
    from corelm.models import build_model

    torch.manual_seed(0)
    config = ModelConfig(family="t5", vocab_size=VOCAB, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=32,
                         decoder_start_token_id=0, pad_token_id=0, gated_mlp=True, activation="gelu_tanh",
                         extra={"eos_token_id": 1})
    model = build_model(config).eval()
    assert config.scale_decoder_outputs and not config.bias
    assert abs(float(model.shared.weight.detach().std()) - 1.0) < 0.1
    src, mask, tgt = _batch()
    with torch.no_grad():
        logits = model(src, tgt, mask)
    assert logits.shape == (2, 11, VOCAB) and torch.isfinite(logits).all()
    out = generate(model, src, mask, Seq2SeqParams(max_new_tokens=6, num_beams=2))
    assert out.shape[0] == 2 and (out[:, 0] == 0).all()


def test_dropout_acts_in_train_mode_only():
    """T5's dropout_rate (embeddings, sub-layer outputs, MLP hidden units, attention probabilities) is read from
    config.json and acts only in train mode."""
    from corelm.config import ModelConfig
    from corelm.models import build_model

    torch.manual_seed(0)
    kwargs = {"family": "t5", "vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "d_model": 32, "max_seq_len": 32,
              "decoder_start_token_id": 0}
    model = build_model(ModelConfig(**kwargs, dropout=0.3, attn_dropout=0.3))
    plain = build_model(ModelConfig(**kwargs))
    plain.load_state_dict(model.state_dict())
    src, mask, tgt = _batch()
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(src, tgt, mask), model(src, tgt, mask))
        model.eval()
        plain.train()
        torch.testing.assert_close(model(src, tgt, mask), plain(src, tgt, mask), rtol=0, atol=0)
    assert config_from_hf({**transformers.T5Config(**COMMON, dropout_rate=0.2).to_dict()}).dropout == 0.2
