"""Packed int8/int4 layers equal a dequantize-then-matmul reference; GGUF blocks map exactly."""

import numpy as np
import pytest
import torch
from torch import nn

from corelm.compress import quant
from corelm.errors import CorelmError


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # The kernels see bf16 activations: the reference rounds x the same way, then multiplies in fp32.
    y = x.to(torch.bfloat16).float() @ w.float().t()
    return y if bias is None else y + bias


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_dequantized_reference(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias)
    q = quant.Int8Linear.from_float(lin)
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() <= 127
    x = torch.randn(3, 5, 96)
    y = q(x)
    assert y.shape == (3, 5, 40) and y.dtype == torch.float32
    ref = _reference(x, q.dequantize(), lin.bias.detach() if bias else None)
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    # and the quantization error itself is small against the float layer
    err = (q.dequantize() - lin.weight).abs().max() / lin.weight.abs().max()
    assert err < 1 / 127


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_linear_matches_dequantized_reference(group_size):
    torch.manual_seed(group_size)
    lin = nn.Linear(256, 48, bias=True)
    q = quant.Int4Linear.from_float(lin, group_size)
    x = torch.randn(7, 256)
    ref = _reference(x, q.dequantize(), lin.bias.detach())
    torch.testing.assert_close(q(x), ref, rtol=2e-2, atol=3e-2)
    # dequantized weight is within half a step of the float weight, group by group
    step = q.scale_zeros[..., 0].t().float().repeat_interleave(group_size, dim=1)
    assert ((q.dequantize() - lin.weight).abs() <= step * 0.5 + 1e-3).all()


def test_int4_unpack_through_kernel_is_exact():
    torch.manual_seed(1)
    qv = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    scales = torch.rand(24, 2).to(torch.bfloat16) + 0.1
    zeros = torch.randn(24, 2).to(torch.bfloat16)
    mod = quant.Int4Linear(64, 24, 32)
    mod.set_quantized(qv, scales, zeros)
    q2, s2, z2 = mod.quantized()
    assert torch.equal(q2, qv) and torch.equal(s2, scales) and torch.equal(z2, zeros)
    assert torch.equal(quant.unpack_nibbles(quant.pack_nibbles(qv)), qv)


def test_int4_state_dict_round_trip_repacks():
    torch.manual_seed(2)
    lin = nn.Linear(64, 16)
    q = quant.Int4Linear.from_float(lin, 32)
    sd = q.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "bias"}
    assert sd["qweight"].shape == (16, 32) and sd["qweight"].dtype == torch.uint8
    fresh = quant.Int4Linear(64, 16, 32, bias=True)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), q(x))


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
def test_quantize_model_swaps_linears_and_ties_embedding(method):
    torch.manual_seed(3)
    model = _Tiny()
    ids = torch.randint(0, 50, (2, 6))
    ref = model(ids)
    quant.quantize_model(model, method, group_size=32)
    assert isinstance(model.lm_head, quant.Int8Linear)
    assert isinstance(model.embed, quant.Int8Embedding) and model.embed.weight is model.lm_head.weight
    cls = quant.Int8Linear if method == "int8" else quant.Int4Linear
    assert all(isinstance(m, cls) for m in (model.body[0], model.body[2]))
    out = model(ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.02 if method == "int8" else 0.15), rel
    # a quantized state dict loads into a fresh float model given the quantized structure
    fresh = quant.quantized_structure(_Tiny(), model.corelm_quantization)
    quant.load_quantized_state_dict(fresh, quant.quantized_state_dict(model))
    assert torch.equal(fresh(ids), out)


def test_bad_input_is_a_clear_error():
    with pytest.raises(CorelmError, match="unknown quantization method"):
        quant.quantize_model(_Tiny(), "int3")
    model = _Tiny()
    with pytest.raises(CorelmError, match="does not divide"):
        quant.quantize_model(model, "int4", group_size=128)
    assert isinstance(model.body[0], nn.Linear), "nothing changed before the error"
    with pytest.raises(CorelmError, match="group size must be"):
        quant.quantize_model(_Tiny(), "int4", group_size=48)
    model = quant.quantize_model(_Tiny(), "int8")
    with pytest.raises(CorelmError, match="already quantized"):
        quant.quantize_model(model, "int4")


def _q4_1_blocks(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Write GGUF Q4_1 blocks by hand (ggml layout: d, m, 16 bytes; low nibbles are elements 0..15)."""
    n, k = q.shape
    qb = q.reshape(n, k // 32, 32)
    qs = (qb[..., :16] | (qb[..., 16:] << 4)).astype(np.uint8)
    head = np.stack([d.astype(np.float16), m.astype(np.float16)], -1).view(np.uint8).reshape(n, k // 32, 4)
    return np.concatenate([head, qs], -1).reshape(n, -1)


def test_q4_1_blocks_map_to_int4_without_dequantizing():
    rng = np.random.default_rng(0)
    n, k = 8, 64
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    d = rng.uniform(0.01, 0.1, (n, k // 32)).astype(np.float16)
    m = rng.uniform(-1, 0, (n, k // 32)).astype(np.float16)
    raw = _q4_1_blocks(q, d, m)
    qt, scales, zeros = quant.int4_from_gguf(raw, "Q4_1", (n, k))
    assert torch.equal(qt, torch.from_numpy(q)), "the 4-bit values are copied as they are"
    mod = quant.int4_linear_from_gguf(raw, "Q4_1", (n, k))
    file_w = (q.reshape(n, -1, 32) * d[..., None].astype(np.float32) + m[..., None].astype(np.float32))
    file_w = torch.from_numpy(file_w.reshape(n, k))
    # only d and m + 8d are rounded to bf16: the weight differs by at most that rounding
    bound = (2 ** -8) * (8 * d.astype(np.float32) + np.abs(m) + 8 * d).max()
    assert (mod.dequantize() - file_w).abs().max() <= bound
    x = torch.randn(3, k)
    torch.testing.assert_close(mod(x), _reference(x, mod.dequantize()), rtol=2e-2, atol=2e-2)


def test_q8_0_blocks_dequantize():
    rng = np.random.default_rng(1)
    q = rng.integers(-127, 128, (4, 64)).astype(np.int8)
    d = rng.uniform(0.001, 0.01, (4, 2)).astype(np.float16)
    raw = np.concatenate([d[..., None].view(np.uint8).reshape(4, 2, 2),
                          q.reshape(4, 2, 32).view(np.uint8)], -1).reshape(4, -1)
    w = quant.dequantize_gguf_q8_0(raw, (4, 64))
    ref = q.reshape(4, 2, 32).astype(np.float32) * d[..., None].astype(np.float32)
    torch.testing.assert_close(w, torch.from_numpy(ref.reshape(4, 64)))
