"""The quantized layers equal a dequantize-then-matmul reference on both kernels; each class keeps one
layout, and its state dict is the portable form whatever that layout is."""

import pytest
import torch
from torch import nn

from corelm import kernels
from corelm.quant import layers
from corelm.quant.layers import Int4Linear, Int4PackedLinear, Int8Embedding, Int8Linear, Q8Linear


@pytest.fixture(params=["kernels", "pytorch"])
def path(request):
    """Layers made in the test run on corelm's C++ kernels, or on PyTorch's packed kernels."""
    if request.param == "kernels":
        assert kernels.load(), kernels.load_error()  # make test builds them: never silently skipped
        yield "kernels"
    else:
        with layers.pytorch_kernels():
            yield "pytorch"


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
               path: str = "pytorch") -> torch.Tensor:
    # PyTorch's kernels see bf16 activations: the reference rounds x the same way, then multiplies in
    # fp32. corelm's kernels take fp32 and quantize it to 15 bits per 32-block (error ~1e-4).
    y = (x if path == "kernels" else x.to(torch.bfloat16).float()) @ w.float().t()
    return y if bias is None else y + bias


def _tol(path: str) -> dict:
    return {"rtol": 1e-3, "atol": 1e-3} if path == "kernels" else {"rtol": 2e-2, "atol": 3e-2}


@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_dequantized_reference(bias, path):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=bias)
    q = Int8Linear.from_float(lin)
    assert q.kernel == (path == "kernels")
    weight, scales = q.quantized()
    assert weight.dtype == torch.int8 and weight.abs().max() <= 127 and scales.shape == (40,)
    x = torch.randn(3, 5, 96)
    y = q(x)
    assert y.shape == (3, 5, 40) and y.dtype == torch.float32
    ref = _reference(x, q.dequantize(), lin.bias.detach() if bias else None, path)
    torch.testing.assert_close(y, ref, **_tol(path))
    # and the quantization error itself is small against the float layer
    err = (q.dequantize() - lin.weight).abs().max() / lin.weight.abs().max()
    assert err < 1 / 127


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_linear_matches_dequantized_reference(group_size, path):
    torch.manual_seed(group_size)
    lin = nn.Linear(256, 48, bias=True)
    cls = layers.int4_class("cpu")
    assert cls is (Int4Linear if path == "kernels" else Int4PackedLinear)
    q = cls.from_float(lin, group_size)
    assert q.kernel == (path == "kernels")
    x = torch.randn(7, 256)
    ref = _reference(x, q.dequantize(), lin.bias.detach(), path)
    torch.testing.assert_close(q(x), ref, **_tol(path))
    # dequantized weight is within half a step of the float weight, group by group
    step = q.quantized()[1].float().repeat_interleave(group_size, dim=1)
    assert ((q.dequantize() - lin.weight).abs() <= step * 0.5 + 1e-3).all()


def test_int4_layouts_hold_their_own_shapes():
    """Int4Linear: GGUF Q4_1 nibble order + (N, K/G, 2); Int4PackedLinear: PyTorch's + (K/G, N, 2)."""
    torch.manual_seed(6)
    qv = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    scales, zeros = torch.rand(24, 2).to(torch.bfloat16) + 0.1, torch.randn(24, 2).to(torch.bfloat16)
    ours, theirs = Int4Linear(64, 24, 32), Int4PackedLinear(64, 24, 32)
    ours.set_quantized(qv, scales, zeros)
    theirs.set_quantized(qv, scales, zeros)
    packed, scale_zeros = ours.kernel_rows()  # unpacked from the records where the build interleaves rows
    assert packed.shape == (24, 32) and scale_zeros.shape == (24, 2, 2)
    assert int(packed[0, 0]) == int(qv[0, 0]) | (int(qv[0, 16]) << 4)
    assert theirs.scale_zeros.shape == (2, 32, 2)  # rows padded to a multiple of 16
    torch.testing.assert_close(ours.dequantize(), theirs.dequantize(), rtol=0, atol=0)


def test_int4_unpack_is_exact(path):
    torch.manual_seed(1)
    qv = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    scales = torch.rand(24, 2).to(torch.bfloat16) + 0.1
    zeros = torch.randn(24, 2).to(torch.bfloat16)
    mod = layers.int4_class("cpu")(64, 24, 32)
    mod.set_quantized(qv, scales, zeros)
    q2, s2, z2 = mod.quantized()
    assert torch.equal(q2, qv) and torch.equal(s2, scales) and torch.equal(z2, zeros)
    assert torch.equal(layers.unpack_nibbles(layers.pack_nibbles(qv)), qv)


@pytest.mark.parametrize("cls", [Int4Linear, Int4PackedLinear])
def test_int4_state_dict_is_portable_across_layouts(cls):
    torch.manual_seed(2)
    lin = nn.Linear(64, 16)
    q = cls.from_float(lin, 32)
    sd = q.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "bias"}
    assert sd["qweight"].shape == (16, 32) and sd["qweight"].dtype == torch.uint8
    assert sd["scales"].shape == sd["zeros"].shape == (16, 2) and sd["scales"].dtype == torch.bfloat16
    # the portable nibble order: even column in the high nibble
    qv = q.quantized()[0]
    assert int(sd["qweight"][0, 0]) == (int(qv[0, 0]) << 4) | int(qv[0, 1])
    for other in (Int4Linear, Int4PackedLinear):
        fresh = other(64, 16, 32, bias=True)
        fresh.load_state_dict(sd)
        assert torch.equal(fresh.dequantize(), q.dequantize()) and torch.equal(fresh.bias, q.bias)
    x = torch.randn(2, 64)
    fresh = cls(64, 16, 32, bias=True)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), q(x))


def test_kernel_weights_are_the_layers_own_tensors():
    torch.manual_seed(7)
    lin = nn.Linear(64, 32, bias=True)
    int4 = Int4Linear.from_float(lin, 32)
    values, scales = int4.kernel_weights()
    if int4.records.numel():  # rows interleaved (repack.h): the records and their (type, rows)
        assert values is int4.records and scales.tolist() == [Int4Linear.TYPE, 32]
    else:
        assert values is int4.packed and scales is int4.scale_zeros
    assert Int4PackedLinear.from_float(lin, 32).kernel_weights() is None
    int8 = Int8Linear.from_float(lin)
    values, scales = int8.kernel_weights()
    if int8.records.numel():
        assert values is int8.records and scales.tolist() == [Int8Linear.TYPE, 32]
    else:
        assert values is int8.weight and scales is int8.scales
    with layers.pytorch_kernels():  # the same tensors whichever kernel multiplies
        q8 = Q8Linear.from_float(nn.Linear(64, 32, bias=False))
    assert all(a is b for a, b in zip(q8.kernel_weights(), (q8.qweight, q8.scales), strict=True))
    emb = Int8Embedding(q8.qweight, q8.scales, torch.float32)
    assert emb.kernel_weights()[0] is q8.qweight
    assert Int8Embedding.tied(q8, torch.float32).kernel_weights()[0] is q8.qweight


def test_q8_linear_splits_int8_into_two_exact_int4_halves():
    torch.manual_seed(4)
    with layers.pytorch_kernels():
        lin = nn.Linear(64, 32, bias=False)
        q8 = Q8Linear.from_float(lin)
    assert isinstance(q8.pair, Int4PackedLinear)
    scales = q8.scales
    # the int4 pair dequantizes to exactly q * d (hi*16d + lo*d, both exact in fp32)
    pair = q8.pair.dequantize()
    torch.testing.assert_close(pair[:, :64] + pair[:, 64:], q8.dequantize(), rtol=0, atol=1e-6)
    assert (q8.dequantize() - lin.weight).abs().max() <= scales.float().max() / 2 + 1e-6
    x = torch.randn(5, 64)
    torch.testing.assert_close(q8(x), _reference(x, q8.dequantize()), rtol=2e-2, atol=2e-2)
    # as a head it refines the top outputs in fp32: those equal x @ W^T in fp32
    q8.refine = 4
    y = q8(x)
    exact = x @ q8.dequantize().t()
    top = y.topk(4, dim=-1).indices
    torch.testing.assert_close(y.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-5)
    with layers.pytorch_kernels():
        fresh = Q8Linear(64, 32)
    fresh.load_state_dict(q8.state_dict())
    fresh.refine = 4
    assert set(q8.state_dict()) == {"qweight", "scales"}
    assert torch.equal(fresh(x), y)


def test_q8_linear_on_corelm_kernels_matches_fp32():
    assert kernels.load(), kernels.load_error()
    torch.manual_seed(5)
    lin = nn.Linear(96, 40, bias=False)
    q8 = Q8Linear.from_float(lin)
    assert q8.kernel and q8.pair is None  # no int4 pair is built
    x = torch.randn(5, 96)
    torch.testing.assert_close(q8(x), x @ q8.dequantize().t(), rtol=1e-3, atol=1e-3)
    fresh = Q8Linear(96, 40)
    fresh.load_state_dict(q8.state_dict())
    assert torch.equal(fresh(x), q8(x))


@pytest.mark.parametrize("repack", ["1", "0"])
def test_int4_layer_keeps_one_copy_of_its_weight(repack, monkeypatch):
    """With rows interleaved (CORELM_REPACK=1, every build with vectors by default) the layer holds only the
    records: no rows beside them; they multiply as the rows do, and save and load the same portable state."""
    monkeypatch.setenv("CORELM_REPACK", repack)
    torch.manual_seed(8)
    lin = nn.Linear(256, 40, bias=True)
    layer = Int4Linear.from_float(lin, 64)
    kept = [b for b in (layer.records, layer.packed, layer.scale_zeros) if b.numel()]
    if repack == "1":
        assert kept == [layer.records] and layer.records.numel() == 40 * (256 // 2 + 256 // 32 * 4)
    else:
        assert kept == [layer.packed, layer.scale_zeros] and layer.records.numel() == 0
    q, s, z = layer.quantized()
    rows, pairs = kernels.pack_blocks(q), torch.stack([s, z], -1).contiguous()
    for t in (1, 3, 70):
        x = torch.randn(t, 256)
        want = torch.ops.corelm.qlinear(x, rows, pairs) + lin.bias.detach()
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    fresh = Int4Linear(256, 40, 64, bias=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 256)
    assert torch.equal(fresh(x), layer(x)) and torch.equal(fresh.records, layer.records)


@pytest.mark.parametrize("repack", ["1", "0"])
def test_int8_layer_keeps_one_copy_of_its_weight(repack, monkeypatch):
    """As int4: with rows interleaved the int8 layer holds only its records, which multiply as the rows do
    and save the same state."""
    monkeypatch.setenv("CORELM_REPACK", repack)
    torch.manual_seed(9)
    lin = nn.Linear(96, 44, bias=True)
    layer = Int8Linear.from_float(lin)
    want_q, want_s = layers.quantize_int8_per_channel(lin.weight)
    kept = [b for b in (layer.records, layer.weight, layer.scales) if b.numel()]
    assert kept == ([layer.records] if repack == "1" else [layer.weight, layer.scales])
    q, s = layer.quantized()
    assert torch.equal(q, want_q) and torch.equal(s, want_s)
    for t in (1, 3, 70):
        x = torch.randn(t, 96)
        want = torch.ops.corelm.qlinear(x, want_q, want_s) + lin.bias.detach()
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)
    state = layer.state_dict()
    assert set(state) == {"weight", "scales", "bias"} and torch.equal(state["weight"], want_q)
    fresh = Int8Linear(96, 44, bias=True)
    fresh.load_state_dict(state)
    x = torch.randn(2, 96)
    assert torch.equal(fresh(x), layer(x)) and torch.equal(fresh.records, layer.records)


@pytest.mark.parametrize("head_class", [Q8Linear, Int8Linear])
@pytest.mark.parametrize("repack", ["1", "0"])
def test_tied_embedding_reads_the_heads_records_or_rows(head_class, repack, monkeypatch):
    """A tied embedding holds nothing of its own: its lookups are the head's int8 rows times their scales,
    whether the head keeps records (unpack_rows on the looked-up rows' groups) or rows."""
    monkeypatch.setenv("CORELM_REPACK", repack)
    torch.manual_seed(10)
    lin = nn.Linear(64, 45, bias=False)
    head = head_class.from_float(lin)
    assert bool(head.records.numel()) == (repack == "1")
    q, s = head.quantized()
    emb = Int8Embedding.tied(head, torch.float32)
    assert not list(emb.buffers()) and emb.state_dict() == {}
    ids = torch.tensor([[0, 44, 7], [8, 8, 39]])
    groups = s if s.dim() == 2 else s[:, None].expand(45, 2)
    want = (q.float().reshape(45, 2, 32) * groups.float()[..., None]).reshape(45, 64)[ids]
    assert torch.equal(emb(ids), want)
    assert torch.equal(emb.dequantize(), (q.float().reshape(45, 2, 32) * groups.float()[..., None]).reshape(45, 64))
