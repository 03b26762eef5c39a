"""LoRA, AdaLoRA and adapters as transforms on tiny models, trained through the one training loop."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.finetune.adalora import RankAllocator, apply_adalora
from corelm.finetune.adapters import apply_adapters
from corelm.finetune.lora import LoRALinear, apply_lora, merge_lora, set_merged
from corelm.models import build_model
from corelm.train import TrainConfig, train

VOCAB = 64


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(family="llama", vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                      max_seq_len=64)
    return build_model(cfg)


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        # a learnable pattern: every sequence counts up by one modulo the vocabulary
        start = torch.randint(0, VOCAB, (8, 1), generator=g)
        yield {"input_ids": (start + torch.arange(16)) % VOCAB}


def lm_loss(model, batch):
    ids = batch["input_ids"]
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()), ids.numel()


def quiet(steps: int, lr: float = 1e-2) -> TrainConfig:
    return TrainConfig(max_steps=steps, lr=lr, warmup_steps=0, weight_decay=0.0, progress=False, tensorboard=False,
                       measure_mfu=False)


def test_lora_keeps_base_weights_bit_identical_and_merge_equals_unmerged() -> None:
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
    names = apply_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8)
    assert len(names) == 4 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # B = 0: the update starts at zero

    result = train(model, lm_loss, batches(), quiet(8))
    assert result.losses[-1][1] < result.losses[0][1]
    state = model.state_dict()
    for name, tensor in base.items():  # same names, same bits
        assert torch.equal(state[name], tensor), name
    assert any(float(model.get_submodule(n).lora_B.detach().abs().max()) > 0 for n in names)

    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        set_merged(model, True)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        set_merged(model, False)
        for name in names:  # unmerge restores the base weight up to one rounding
            torch.testing.assert_close(model.get_submodule(name).weight, base[name + ".weight"], rtol=0, atol=1e-6)
        merge_lora(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
        assert not (model(x) - before).abs().max() < 1e-6  # training changed the function
    assert set(model.state_dict()) == set(base)  # plain nn.Linear again, HF names
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_lora_forward_equals_peft() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(16, 8))
    ref = get_peft_model(copy.deepcopy(net), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    layer = LoRALinear(net.proj, rank=4, alpha=8)
    peft_layer = ref.base_model.model.proj
    with torch.no_grad():
        layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.copy_(torch.randn(8, 4))
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), peft_layer.get_delta_weight("default"), rtol=1e-6, atol=1e-6)


def test_lora_refuses_packed_weights_and_unknown_targets() -> None:
    from corelm.quant.transform import quantize_model

    model = tiny_llama()
    with pytest.raises(CorelmError, match="no linear layer matches"):
        apply_lora(model, ["qkv"])
    quantize_model(model, "int8")
    with pytest.raises(CorelmError, match="unquantized"):
        apply_lora(model, ["q_proj"])


def test_adalora_total_rank_reaches_target_budget() -> None:
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_adalora(model, ["q_proj", "v_proj", "o_proj"], init_rank=6, alpha=6)
    steps = 30
    alloc = RankAllocator(model, target_rank=2, total_steps=steps, warmup=4, final=6, interval=2)
    budgets = [alloc.budget(t) for t in range(steps + 1)]
    assert budgets[0] == 6 * 6 and budgets[-1] == 2 * 6
    assert all(a >= b for a, b in itertools.pairwise(budgets))  # the cubic schedule only decreases

    def loss_fn(m, batch):
        loss, n = lm_loss(m, batch)
        return loss + alloc.regularizer(), n

    def optimizer_fn(m):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-2)
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
        alloc.attach(opt)
        return opt

    result = train(model, loss_fn, batches(), quiet(steps), optimizer_fn=optimizer_fn)
    assert result.losses[-1][1] < result.losses[0][1]
    ranks = alloc.ranks()
    assert set(ranks) == set(names)
    assert sum(ranks.values()) == 2 * len(names)  # the target budget, reached exactly
    assert all(0 <= r <= 6 for r in ranks.values())
    for name, tensor in base.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert float(alloc.regularizer().detach()) >= 0


def test_adapters_train_only_adapter_parameters() -> None:
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
    names = apply_adapters(model, "llama", size=8)
    assert sorted(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names) == \
        ["mlp.down_proj"] * 2 + ["self_attn.o_proj"] * 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # an untrained adapter is the identity
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_" in n for n in trainable)
    train(model, lm_loss, batches(), quiet(5))
    state = model.state_dict()
    for name, tensor in base.items():
        assert torch.equal(state[name], tensor), name
    assert any(float(state[n].abs().max()) > 0 for n in state if n.endswith("adapter_up.weight"))
