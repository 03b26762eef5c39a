"""Pruning gives exactly the requested sparsity / N:M pattern; Wanda uses activation norms."""

import pytest
import torch
from torch import nn

from corelm.compress import prune
from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.models import build_model
from corelm.quant.layers import Int4Linear, Int4PackedLinear
from corelm.quant.transform import quantize_model


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                         d_ff=64, max_seq_len=64)
    return build_model(config).eval()


def _linears(model):
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_unstructured_sparsity_is_exact_per_row(method, sparsity):
    model = _tiny()
    calib = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
    report = prune.prune_model(model, method, sparsity, calibration=calib)
    for name, m in _linears(model).items():
        zeros_per_row = (m.weight == 0).sum(1)
        assert (zeros_per_row == int(sparsity * m.in_features)).all(), name
    assert report["zeros"] == sum(int(sparsity * m.in_features) * m.out_features for m in _linears(model).values())


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_2_4_pattern_is_exact(method):
    model = _tiny()
    prune.prune_model(model, method, pattern="2:4", calibration=[torch.randint(0, 64, (1, 16))])
    for m in _linears(model).values():
        assert prune.satisfies_pattern(m.weight, 2, 4)
        assert prune.sparsity_of(m.weight) == 0.5


def test_magnitude_removes_the_smallest_weights():
    lin = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1., -8, 3, 2, -5, 6, 0.5, 7], [8, 7, -6, 5, 4, 3, 2, -1]]))
    model = nn.Sequential(lin)
    prune.prune_model(model, "magnitude", 0.5, skip=())
    assert lin.weight.tolist() == [[0, -8, 0, 0, -5, 6, 0, 7], [8, 7, -6, 5, 0, 0, 0, 0]]


def test_wanda_weighs_by_input_norm():
    # column 0 has the smallest weights but a huge input: Wanda keeps it, magnitude drops it
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, 1.0, 2.0, 3.0]]))
    model = nn.Sequential(lin)
    x = torch.tensor([[100.0, 1.0, 1.0, 1.0]])
    prune.prune_model(model, "wanda", 0.5, calibration=[x], skip=())
    assert lin.weight.tolist()[0] == pytest.approx([0.1, 0.0, 0.0, 3.0])


def test_bad_input():
    with pytest.raises(CorelmError, match="sparsity"):
        prune.prune_model(_tiny(), "magnitude", 1.0)
    with pytest.raises(CorelmError, match="sparsity"):
        prune.prune_model(_tiny(), "magnitude", -0.1)
    with pytest.raises(CorelmError, match="unknown pruning method"):
        prune.prune_model(_tiny(), "random", 0.5)
    with pytest.raises(CorelmError, match="N:M"):
        prune.prune_model(_tiny(), "magnitude", pattern="2-4")
    with pytest.raises(CorelmError, match="quantized"):
        prune.prune_model(quantize_model(_tiny(), "int8"), "magnitude", 0.5)
    with pytest.raises(CorelmError, match="calibration"):
        prune.prune_model(_tiny(), "wanda", 0.5, calibration=[])


# ---------------------------------------------------------------------------------------------
# structured pruning: a smaller dense llama model
# ---------------------------------------------------------------------------------------------

def _tiny4(tie: bool = True) -> nn.Module:
    """4 layers, width 64, 4 query heads in 2 KV groups, d_ff 128."""
    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=64, n_layer=4, n_head=4, n_kv_head=2, d_model=64,
                         d_ff=128, max_seq_len=64, tie_embeddings=tie)
    return build_model(config).eval()


def _calib():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 24), generator=g) for _ in range(2)]


def _zero_structures(model) -> dict[str, float]:
    """Silence one unit of every structure in place; returns the ratios that remove exactly those."""
    hd = model.config.head_dim
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            o = block.self_attn.o_proj.weight  # (d, n_head * hd)
            o[:, (i % 2) * hd:(i % 2 + 1) * hd] = 0  # one query head of KV group 0 ...
            o[:, (2 + (i + 1) % 2) * hd:(3 + (i + 1) % 2) * hd] = 0  # ... and one of group 1
            block.mlp.down_proj.weight[:, torch.arange(i, 128, 4)] = 0  # 32 of 128 channels
        model.layers[2].self_attn.o_proj.weight.zero_()  # block 2 adds nothing: an identity
        model.layers[2].mlp.down_proj.weight.zero_()
    return {"layers": 0.25, "heads": 0.5, "channels": 0.25}


@pytest.mark.parametrize("structure", ["layers", "heads", "channels", "all"])
def test_removing_silent_structures_keeps_logits(structure):
    model = _tiny4()
    ratios = _zero_structures(model)
    ratios = ratios if structure == "all" else {structure: ratios[structure]}
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        ref = model(ids)
        pruned, report = prune.prune_structured(model, ratios, _calib())
        out = pruned(ids)
    c = pruned.config
    assert (c.n_layer, c.n_head, c.n_kv_head, c.d_ff) == (3 if "layers" in ratios else 4, 2 if "heads" in ratios else 4,
                                                          2, 96 if "channels" in ratios else 128)
    assert report["params_after"] < report["params_before"]
    if "layers" in ratios:
        assert report["steps"][0]["removed_layers"] == [2]
    torch.testing.assert_close(out, ref)


def test_removing_a_silent_kv_group_keeps_logits():
    model = _tiny4()
    hd = model.config.head_dim
    with torch.no_grad():
        for i, block in enumerate(model.layers):  # silence KV group i % 2: its two query heads
            block.self_attn.o_proj.weight[:, (i % 2) * 2 * hd:(i % 2 + 1) * 2 * hd] = 0
        ids = torch.randint(0, 64, (1, 16))
        ref = model(ids)
        pruned, _ = prune.prune_structured(model, {"kv-groups": 0.5}, _calib())
        assert (pruned.config.n_head, pruned.config.n_kv_head) == (2, 1)
        torch.testing.assert_close(pruned(ids), ref)
        # the layers kept the other group's k/v rows: removing the wrong one would change the logits
        assert torch.equal(pruned.layers[0].self_attn.k_proj.weight, model.layers[0].self_attn.k_proj.weight[hd:])


def test_live_structures_are_kept_and_removing_them_changes_logits():
    # the scores, not the position, pick what goes: with nothing silenced the logits must move
    model = _tiny4()
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        pruned, _ = prune.prune_structured(model, {"channels": 0.25}, _calib())
        assert not torch.allclose(pruned(ids), model(ids), atol=1e-4)
        importance = prune.structure_importance(model, "channels", _calib())
        kept = importance[0].topk(96).indices.sort().values
        assert torch.equal(pruned.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight[kept])


@pytest.mark.parametrize("tie", [True, False])
def test_pruned_parameter_count_is_the_arithmetic(tie):
    model = _tiny4(tie)
    pruned, report = prune.prune_structured(model, {"layers": 0.25, "kv-groups": 0.5, "channels": 0.5}, _calib())
    d, hd, V = 64, 16, 64
    per_layer = d * hd * (2 * 2 + 2 * 1) + 3 * d * 64 + 2 * d  # q/o 2 heads, k/v 1 head, d_ff 64, two norms
    expected = V * d + 3 * per_layer + d + (0 if tie else V * d)
    assert report["params_after"] == sum(p.numel() for p in pruned.parameters()) == expected
    assert prune.llama_param_count(pruned.config) == expected
    assert prune.llama_param_count(model.config) == report["params_before"]


def test_pruned_model_saves_loads_decodes_and_quantizes(tmp_path):
    from corelm.io.hf import load_hf_model, save_hf_dir
    from corelm.ops.kv_cache import KVCache

    model = _tiny4()
    pruned, _ = prune.prune_structured(model, {"layers": 0.5, "heads": 0.5, "channels": 0.25}, _calib(), multiple_of=32)
    save_hf_dir(pruned, pruned.config, tmp_path / "p")
    config, back = load_hf_model(tmp_path / "p")
    assert (config.n_layer, config.n_head, config.n_kv_head, config.d_ff, config.head_dim) == (2, 2, 2, 96, 16)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        ref = pruned(ids)
        torch.testing.assert_close(back(ids), ref)
        # the renumbered layers write their own cache slots: prefill + one-token decode == full forward
        cache = KVCache(config.n_layer, 1, config.n_kv_head, 16, config.head_dim, torch.float32, "cpu")
        back(ids[:, :8], input_pos=torch.arange(8)[None], kv_cache=cache)
        steps = [back(ids[:, t:t + 1], input_pos=torch.tensor([[t]]), kv_cache=cache) for t in range(8, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), ref[:, 8:])
        q = quantize_model(back, "int4", group_size=32)
        q = back if q is None else q
        assert isinstance(q.layers[0].mlp.down_proj, (Int4Linear, Int4PackedLinear))
        torch.testing.assert_close(q(ids), ref, atol=0.1, rtol=0.1)


def test_structured_bad_input():
    model = _tiny4()
    calib = _calib()
    with pytest.raises(CorelmError, match="would remove all 4 layers"):
        prune.prune_structured(model, {"layers": 0.9}, calib)
    with pytest.raises(CorelmError, match="removes none of the 2 KV groups"):
        prune.prune_structured(model, {"kv-groups": 0.2}, calib)
    with pytest.raises(CorelmError, match="sparsity must be in"):
        prune.prune_structured(model, {"channels": 1.0}, calib)
    with pytest.raises(CorelmError, match="unknown structure"):
        prune.parse_structures("rows=0.5", 0.5)
    with pytest.raises(CorelmError, match="given twice"):
        prune.parse_structures("layers,layers=0.5", 0.5)
    with pytest.raises(CorelmError, match="calibration"):
        prune.prune_structured(model, {"channels": 0.5}, [])
    with pytest.raises(CorelmError, match="quantized"):
        prune.prune_structured(quantize_model(_tiny4(), "int8"), {"channels": 0.5}, calib)
    mha = build_model(ModelConfig(family="llama", vocab_size=64, n_layer=1, n_head=2, d_model=32, d_ff=64))
    with pytest.raises(CorelmError, match="remove kv-groups instead"):
        prune.prune_structured(mha, {"heads": 0.5}, calib)
    gpt2 = build_model(ModelConfig(family="gpt2", vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=32))
    with pytest.raises(CorelmError, match="llama-family"):
        prune.prune_structured(gpt2, {"channels": 0.5}, calib)
    assert prune.parse_structures("channels=0.25, kv-groups", 0.5) == {"channels": 0.25, "kv-groups": 0.5}


@pytest.mark.parametrize("extra,message", [
    (["--structure", "channels", "--pattern", "2:4"], "cannot be combined with --pattern"),
    (["--structure", "channels", "--method", "magnitude"], "--method magnitude is for weight pruning"),
    (["--structure", "channels"], "--structure needs --calib"),
    (["--structure", "rows", "--calib", "c.txt"], "unknown structure 'rows'"),
    (["--structure", "channels=1.2", "--calib", "c.txt"], "must be in (0, 1)"),
    (["--structure", "channels=x", "--calib", "c.txt"], "must be a number"),
    (["--method", "magnitude", "--recover-steps", "5"], "--recover-steps needs --structure"),
])
def test_structured_cli_bad_input_is_one_line(extra, message, tmp_path, capsys, monkeypatch):
    from corelm.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["prune", "--model", "smollm2-135m-instruct", "--out", "OUT", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_structured_cli_end_to_end(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    import corelm
    from corelm.cli import main
    from corelm.io.hf import save_hf_dir

    words = [f"w{i}" for i in range(63)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + ["[UNK]"])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model = _tiny4()
    save_hf_dir(model, model.config, tmp_path / "tiny", tokenizer=tokenizer)
    g = torch.Generator().manual_seed(2)
    (tmp_path / "calib.txt").write_text(" ".join(words[i] for i in torch.randint(0, 63, (300,), generator=g)))
    argv = ["prune", "--model", str(tmp_path / "tiny"), "--calib", str(tmp_path / "calib.txt"), "--out"]
    # a ratio this model cannot take: one line, nothing written
    assert main([*argv, str(tmp_path / "bad"), "--structure", "layers=0.95"]) == 2
    assert "would remove all 4 layers" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    assert main([*argv, str(tmp_path / "p"), "--structure", "layers=0.25,kv-groups=0.5", "--multiple-of", "1"]) == 0
    assert "n_layer 4->3, n_head 4->2, n_kv_head 2->1" in capsys.readouterr().err
    llm = corelm.load(tmp_path / "p", dtype="fp32")
    assert (llm.config.n_layer, llm.config.n_head, llm.config.n_kv_head) == (3, 2, 1)
    assert llm.model(torch.tensor([llm.tokenizer.encode("w1 w2 w3")])).shape == (1, 3, 64)


def test_recovery_moves_the_pruned_model_toward_the_unpruned_one():
    import torch.nn.functional as F

    teacher = _tiny4()
    pruned, _ = prune.prune_structured(teacher, {"channels": 0.5, "kv-groups": 0.5}, _calib())
    g = torch.Generator().manual_seed(3)
    text = torch.randint(0, 64, (600,), generator=g).tolist()
    probe = torch.tensor([text[:64]])

    def kl() -> float:
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(pruned(probe), -1), F.log_softmax(teacher(probe), -1),
                                  log_target=True, reduction="batchmean"))

    before = kl()
    report = prune.recover(pruned, teacher, text, 20, seq_len=32, batch_size=4, lr=3e-3, progress=False)
    assert report["steps"] == 20 and report["tokens"] == 20 * 4 * 32
    after = kl()
    assert after < 0.7 * before
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(CorelmError, match="at least 4 windows"):
        prune.recover(pruned, teacher, text[:100], 1, seq_len=32, batch_size=4)
