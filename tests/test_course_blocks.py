"""Textbook building blocks as small options: MLP activations, dropout, sinusoidal positions, uniform init,
SGD with momentum, an MSE regression head -- and HF checkpoints whose activation is not the family default."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.io.hf import config_from_hf, config_to_hf, load_hf_model
from corelm.models import build_model
from corelm.ops.kv_cache import KVCache

transformers.logging.set_verbosity_error()


def _tiny(family: str, **kw) -> ModelConfig:
    return ModelConfig(**{"family": family, "vocab_size": 61, "n_layer": 2, "n_head": 4, "d_model": 32,
                          "max_seq_len": 64, **kw})


def _randomize(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ---------------------------------------------------------------------------------------------- activations

@pytest.mark.parametrize("family, hf_cls, hf_config", [
    ("gpt2", transformers.GPT2LMHeadModel,
     transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                             activation_function="relu")),
    ("llama", transformers.LlamaForCausalLM,
     transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              hidden_act="relu")),
])
def test_relu_checkpoints_load_with_transformers_logits(tmp_path, family, hf_cls, hf_config):
    torch.manual_seed(0)
    hf = hf_cls(hf_config).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path)  # safetensors
    config, model = load_hf_model(tmp_path)
    assert (config.family, config.activation) == (family, "relu")
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
        # the MLP really is ReLU: swapping in the family default moves the logits
        wrong = build_model(ModelConfig.from_dict({**config.to_dict(), "activation": None})).eval()
        wrong.load_state_dict(model.state_dict())
        assert (wrong(ids) - model(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_every_activation_is_what_the_mlp_computes(family, act):
    torch.manual_seed(0)
    model = build_model(_tiny(family, activation=act)).eval()
    mlp = model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    f = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
         "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh")}[act]
    with torch.no_grad():
        want = (mlp.c_proj(f(mlp.c_fc(x))) if family == "gpt2"
                else mlp.down_proj(f(mlp.gate_proj(x)) * mlp.up_proj(x)))
        torch.testing.assert_close(mlp(x), want, atol=0, rtol=0)


def test_unknown_activation_is_refused():
    with pytest.raises(CorelmError, match="activation 'banana'.*relu, gelu, gelu_tanh, silu"):
        _tiny("gpt2", activation="banana")
    with pytest.raises(CorelmError, match="not implemented for family bert"):
        _tiny("bert", activation="silu")  # BERT's MLP has no SiLU: refused rather than run as another function
    with pytest.raises(CorelmError, match="not implemented for family moe"):
        ModelConfig(family="moe", vocab_size=61, n_layer=2, n_head=4, d_model=32, n_experts=2,
                    n_experts_per_tok=1, activation="relu")


def test_hf_activation_names_map_and_unknown_ones_are_one_line():
    base = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4).to_dict()
    for hf_name, ours in [("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu"),
                          ("relu", "relu"), ("silu", "silu"), ("swish", "silu")]:
        assert config_from_hf({**base, "activation_function": hf_name}).activation == ours
    with pytest.raises(CorelmError) as err:
        config_from_hf({**base, "activation_function": "quick_gelu"})
    assert "unsupported activation 'quick_gelu'" in str(err.value) and "\n" not in str(err.value)
    llama = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, hidden_act="relu").to_dict()
    assert config_from_hf(llama).activation == "relu"
    assert config_to_hf(config_from_hf(llama))["hidden_act"] == "relu"


# ---------------------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_dropout_is_active_only_in_train_mode(family):
    torch.manual_seed(0)
    plain = build_model(_tiny(family))
    model = build_model(_tiny(family, dropout=0.3, attn_dropout=0.3))
    model.load_state_dict(plain.state_dict())  # dropout adds no parameters
    ids = torch.randint(0, 61, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), plain.eval()(ids), atol=0, rtol=0)
        model.train()
        a, b = model(ids), model(ids)
    assert (a - b).abs().max() > 1e-4  # two draws of the masks differ


@pytest.mark.parametrize("which", ["dropout", "attn_dropout"])
def test_each_dropout_acts_on_its_own(which):
    torch.manual_seed(0)
    model = build_model(_tiny("gpt2", **{which: 0.5})).train()
    ids = torch.randint(0, 61, (1, 10))
    with torch.no_grad():
        assert (model(ids) - model(ids)).abs().max() > 1e-4


def test_default_dropout_leaves_training_bit_identical():
    torch.manual_seed(0)
    model = build_model(_tiny("gpt2")).train()
    ids = torch.randint(0, 61, (2, 10))
    state = torch.random.get_rng_state()
    out = model(ids)
    assert torch.equal(torch.random.get_rng_state(), state)  # p = 0 draws no random numbers
    torch.testing.assert_close(out, model.eval()(ids), atol=0, rtol=0)


def test_dropout_is_validated_and_mapped_from_hf():
    with pytest.raises(CorelmError, match=r"dropout must be a probability in \[0, 1\)"):
        _tiny("gpt2", dropout=1.0)
    with pytest.raises(CorelmError, match="attn_dropout is implemented for gpt2, llama, gemma, t5, not bert"):
        _tiny("bert", attn_dropout=0.1)
    gpt2 = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.2,
                                   embd_pdrop=0.2, attn_pdrop=0.05).to_dict()
    config = config_from_hf(gpt2)
    assert (config.dropout, config.attn_dropout) == (0.2, 0.05)
    out = config_to_hf(config)
    assert (out["resid_pdrop"], out["embd_pdrop"], out["attn_pdrop"]) == (0.2, 0.2, 0.05)
    llama = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, attention_dropout=0.1).to_dict()
    assert config_from_hf(llama).attn_dropout == 0.1
    with pytest.raises(CorelmError, match="embd_pdrop=0.1 but resid_pdrop=0.2"):
        config_from_hf({**gpt2, "embd_pdrop": 0.1})


# ---------------------------------------------------------------------------------------------- positions

def test_sinusoidal_positions_follow_vaswani():
    config = _tiny("gpt2", positions="sinusoidal")
    model = build_model(config).eval()
    assert not any("wpe" in name for name in model.state_dict())  # a fixed function, no table
    pe = model.transformer.wpe(torch.arange(50)[None])[0]  # (T, d)
    p, i = 37, 5  # PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)
    angle = p / 10000 ** (2 * i / config.d_model)
    assert math.isclose(float(pe[p, 2 * i]), math.sin(angle), abs_tol=1e-6)
    assert math.isclose(float(pe[p, 2 * i + 1]), math.cos(angle), abs_tol=1e-6)
    ids = torch.randint(0, 61, (1, 12))
    with torch.no_grad():  # cached decoding sees the same positions as the full forward
        full = model(ids)
        cache = KVCache.for_model(config, 1, 16, torch.float32)
        model(ids[:, :8], kv_cache=cache, input_pos=torch.arange(8))
        step = model(ids[:, 8:9], kv_cache=cache, input_pos=torch.tensor([8]))
        torch.testing.assert_close(step[:, -1], full[:, 8], atol=1e-5, rtol=1e-5)
    with pytest.raises(CorelmError, match="implemented for gpt2 and bart"):
        _tiny("llama", positions="sinusoidal")
    with pytest.raises(CorelmError, match="positions must be one of learned, sinusoidal"):
        _tiny("gpt2", positions="rotary")


# ---------------------------------------------------------------------------------------------- init

@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])
def test_uniform_init_has_the_documented_range(family):
    torch.manual_seed(0)
    model = build_model(_tiny(family, init="uniform", vocab_size=2000))
    bound = math.sqrt(3) * 0.02
    block = model.layers[0]  # a block's first projection, and the token table
    w = next(m.weight for m in block.modules() if isinstance(m, torch.nn.Linear))
    table = model.get_submodule("transformer.wte" if family == "gpt2" else "model.embed_tokens").weight
    for t in (w, table):
        top = float(t.detach().abs().max())
        assert 0.95 * bound < top <= bound  # fills U(-a, a)
    table = table.detach()
    assert abs(float(table.std()) - 0.02) < 1e-3  # same standard deviation as the normal init
    assert float((table.abs() > 2 * 0.02).float().mean()) == 0.0  # a normal draw would have ~4.6% here
    torch.manual_seed(0)
    normal = build_model(_tiny(family, vocab_size=2000))
    nt = normal.get_submodule("transformer.wte" if family == "gpt2" else "model.embed_tokens").weight.detach()
    assert float((nt.abs() > 2 * 0.02).float().mean()) > 0.03
    with pytest.raises(CorelmError, match="init must be one of normal, uniform"):
        _tiny(family, init="xavier")


# ---------------------------------------------------------------------------------------------- optimizer

def test_sgd_with_momentum_is_the_loops_update(tmp_path):
    from corelm.objectives import causal_lm_loss
    from corelm.train import ResumableLoader, TrainConfig, train

    data = (torch.randint(0, 61, (16, 1), generator=torch.Generator().manual_seed(0)) + torch.arange(17)) % 61
    lr, mu = 0.05, 0.9
    torch.manual_seed(0)
    model = build_model(_tiny("gpt2"))
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    cfg = TrainConfig(max_steps=2, lr=lr, warmup_steps=0, min_lr_ratio=1.0, optimizer="sgd", momentum=mu,
                      weight_decay=0.0, grad_clip=0.0, progress=False, tensorboard=False, measure_mfu=False)
    train(model, causal_lm_loss, ResumableLoader(data, batch_size=4, seed=3), cfg)

    # the same two steps by hand: v = mu v + g, w -= lr v (Sutskever et al. 2013)
    torch.manual_seed(0)
    ref = build_model(_tiny("gpt2")).train()
    ref.load_state_dict({k: w0[k] for k in w0}, strict=False)
    loader, velocity = ResumableLoader(data, batch_size=4, seed=3), {}
    for _ in range(2):
        ref.zero_grad()
        causal_lm_loss(ref, next(loader))[0].backward()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                velocity[name] = mu * velocity[name] + p.grad if name in velocity else p.grad.clone()
                p -= lr * velocity[name]
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, dict(ref.named_parameters())[name], atol=1e-6, rtol=1e-5)


def test_optimizer_choice_is_validated_and_on_the_cli():
    from corelm.commands.pretrain import PretrainOptions, build_parser
    from corelm.train import TrainConfig

    with pytest.raises(CorelmError, match="unknown optimizer 'adam'; expected one of adamw, sgd"):
        TrainConfig(optimizer="adam")
    args = build_parser().parse_args(["--model", "gpt2-tiny", "--data", "d", "--out", "o", "--optimizer", "sgd",
                                      "--momentum", "0.8"])
    cfg = PretrainOptions(**{k: v for k, v in vars(args).items()}).train_config()
    assert (cfg.optimizer, cfg.momentum) == ("sgd", 0.8)
    text = build_parser().format_help()
    assert "(default: True)" not in text and "--no-progress" in text  # issue 17 item 7


# ---------------------------------------------------------------------------------------------- regression

def test_regression_task_lowers_the_mse(tmp_path):
    from corelm.finetune.methods import build_task_model
    from corelm.finetune.tasks import DataOptions, get_task
    from corelm.train import ResumableLoader, TrainConfig, train

    task = get_task("regression")
    g = torch.Generator().manual_seed(0)
    # a text's target is the share of token 7 in it, scaled to [0, 3]: learnable from the tokens alone
    items = []
    for _ in range(64):
        ids = torch.randint(1, 12, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        items.append({"input_ids": ids, "target": 3.0 * ids.count(7) / len(ids)})
    torch.manual_seed(0)
    config = _tiny("gpt2", vocab_size=16)
    model = build_task_model("regression", build_model(config), config, task.labels([]), "mean")
    assert model.classifier.out_features == 1
    before = task.evaluate(model, items, [], ["value"], pad_id=0)["val_loss"]
    cfg = TrainConfig(max_steps=60, lr=3e-3, warmup_steps=5, progress=False, tensorboard=False, measure_mfu=False)
    batches = ResumableLoader(items, 16, lambda b: task.collate(b, 0), seed=0)
    result = train(model, task.loss, batches, cfg)
    after = task.evaluate(model, items, [], ["value"], pad_id=0)
    assert after["val_loss"] < 0.5 * before, (before, after)
    targets = torch.tensor([it["target"] for it in items])
    assert after["val_loss"] < float(targets.var(unbiased=False))  # better than predicting the mean
    assert result.losses[-1][1] < result.losses[0][1]

    # data: a text and a numeric target; anything else is a one-line error naming the value
    good = tmp_path / "r.jsonl"
    good.write_text('{"text": "a b", "label": 1.5}\n{"text": "c", "label": "-2"}\n')
    rows = task.read(str(good), DataOptions()).items
    task.check_data(rows, "r.jsonl", DataOptions())
    batch = task.collate(task.encode(rows, _CharTokenizer(), ["value"], 8), 0)
    assert batch["target"].tolist() == [1.5, -2.0]
    with pytest.raises(CorelmError, match="r.jsonl: regression target 'high' is not a finite number"):
        task.check_data([("x", "high")], "r.jsonl", DataOptions())


class _CharTokenizer:
    def encode(self, text: str, *args, **kwargs) -> list[int]:
        return [1 + ord(c) % 10 for c in text]


def test_options_survive_a_saved_model_directory(tmp_path):
    from corelm.io.hf import save_hf_dir

    config = _tiny("gpt2", positions="sinusoidal", activation="relu", dropout=0.1, attn_dropout=0.1, init="uniform")
    model = build_model(config).eval()
    save_hf_dir(model, config, tmp_path)  # what every pretraining checkpoint writes
    loaded_config, loaded = load_hf_model(tmp_path)
    assert loaded_config == config
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
