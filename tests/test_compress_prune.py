"""Pruning gives exactly the requested sparsity / N:M pattern; Wanda uses activation norms."""

import pytest
import torch
from torch import nn

from corelm.compress import prune, quant
from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.models import build_model


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
        prune.prune_model(quant.quantize_model(_tiny(), "int8"), "magnitude", 0.5)
    with pytest.raises(CorelmError, match="calibration"):
        prune.prune_model(_tiny(), "wanda", 0.5, calibration=[])
