"""Packed int8/int4 layers equal a dequantize-then-matmul reference; GGUF blocks map exactly."""

import numpy as np
import pytest
import torch
from torch import nn

from corelm import kernels
from corelm.compress import quant
from corelm.errors import CorelmError


@pytest.fixture(params=["kernels", "pytorch"])
def path(request):
    """Layers made in the test run on corelm's C++ kernels, or on PyTorch's packed kernels."""
    if request.param == "kernels":
        assert kernels.load(), kernels.load_error()  # make test builds them: never silently skipped
        yield "kernels"
    else:
        with quant.pytorch_kernels():
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
    q = quant.Int8Linear.from_float(lin)
    assert q.kernel == (path == "kernels")
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() <= 127
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
    q = quant.Int4Linear.from_float(lin, group_size)
    assert q.kernel == (path == "kernels")
    x = torch.randn(7, 256)
    ref = _reference(x, q.dequantize(), lin.bias.detach(), path)
    torch.testing.assert_close(q(x), ref, **_tol(path))
    # dequantized weight is within half a step of the float weight, group by group
    step = q.quantized()[1].float().repeat_interleave(group_size, dim=1)
    assert ((q.dequantize() - lin.weight).abs() <= step * 0.5 + 1e-3).all()


def test_int4_unpack_through_kernel_is_exact(path):
    torch.manual_seed(1)
    qv = torch.randint(0, 16, (24, 64), dtype=torch.uint8)
    scales = torch.rand(24, 2).to(torch.bfloat16) + 0.1
    zeros = torch.randn(24, 2).to(torch.bfloat16)
    mod = quant.Int4Linear(64, 24, 32)
    mod.set_quantized(qv, scales, zeros)
    q2, s2, z2 = mod.quantized()
    assert torch.equal(q2, qv) and torch.equal(s2, scales) and torch.equal(z2, zeros)
    assert torch.equal(quant.unpack_nibbles(quant.pack_nibbles(qv)), qv)


def test_int4_state_dict_round_trip_repacks(path):
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
def test_quantize_model_swaps_linears_and_ties_embedding(method, path):
    torch.manual_seed(3)
    model = _Tiny()
    ids = torch.randint(0, 50, (2, 6))
    ref = model(ids)
    quant.quantize_model(model, method, group_size=32)
    assert isinstance(model.lm_head, quant.Q8Linear)
    assert isinstance(model.embed, quant.Int8Embedding) and model.embed.weight is model.lm_head.qweight
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
    d32, m32 = torch.from_numpy(d.astype(np.float32)), torch.from_numpy(m.astype(np.float32))
    assert torch.equal(scales, d32.to(torch.bfloat16)) and torch.equal(zeros, (m32 + 8 * d32).to(torch.bfloat16))
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


HELD_OUT = (
    "The Industrial Revolution began in Britain in the late eighteenth century, when new machines for "
    "spinning and weaving cotton were powered first by water and then by steam. Factories grew around coal "
    "fields, canals and later railways connected cities, and millions of people moved from farms into towns. "
    "Historians still debate why it started there: cheap coal, expensive labour, secure property rights and "
    "a culture of tinkering all played a part. def mean(xs):\n    return sum(xs) / len(xs)\n"
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts of "
    "plant cells, and almost every food chain on Earth depends on it. A hash table stores keys in an array "
    "of buckets chosen by a hash function; when two keys land in the same bucket, the table either chains "
    "them in a list or probes for the next free slot, and it grows when the load factor passes a threshold "
    "so that lookups stay constant time on average. The Treaty of Westphalia in 1648 ended the Thirty "
    "Years' War and is often said to mark the beginning of the modern system of sovereign states."
)


@pytest.mark.slow
def test_embedded_int4_from_q4_1_agrees_with_dequantized_model(path):
    from corelm.io import gguf as gguf_io
    from corelm.models import build_model
    from corelm.presets import embedded_path
    from corelm.tokenizer import Tokenizer

    f = gguf_io.read_gguf(embedded_path("smollm2-135m-instruct"))
    config = gguf_io.config_from_gguf(f)
    ids = torch.tensor([Tokenizer.from_gguf(f).encode(HELD_OUT)])
    assert ids.shape[1] > 200

    def fresh():
        with torch.device("meta"):
            model = build_model(config)
        model.load_state_dict(gguf_io.load_gguf_state_dict(f, config), assign=True, strict=False)
        return model.eval()

    with torch.no_grad():
        ref = fresh()(ids).float()
        model = quant.quantize_model(fresh(), "int4", from_gguf=f)
        layer = model.model.layers[3].mlp.up_proj
        assert isinstance(layer, quant.Int4Linear)
        # the 4-bit values are the file's; scale/zero differ from d and m + 8d only by bf16 rounding
        qb = gguf_io.quant_blocks(f, "blk.3.ffn_up.weight")
        q, scales, zeros = layer.quantized()
        assert torch.equal(q, quant._gguf_nibbles(qb.qs.reshape(q.shape[0], -1, 16)))
        torch.testing.assert_close(scales.float(), qb.scales.float(), rtol=2**-8, atol=0)
        want_zeros = qb.mins.float() + 8 * qb.scales.float()
        torch.testing.assert_close(zeros.float(), want_zeros, rtol=2**-8, atol=1e-6)
        out = model(ids).float()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    print(f"int4 (from Q4_1, {path}) vs dequantized fp32: top-1 agreement {agree:.4f}, mean KL {kl:.5f} nats")
    assert agree >= 0.98
    assert kl < 0.01


def test_q8_linear_splits_int8_into_two_exact_int4_halves():
    torch.manual_seed(4)
    with quant.pytorch_kernels():
        _check_q8_pair()


def test_q8_linear_on_corelm_kernels_matches_fp32():
    assert kernels.load(), kernels.load_error()
    torch.manual_seed(5)
    lin = nn.Linear(96, 40, bias=False)
    q8 = quant.Q8Linear.from_float(lin)
    assert q8.kernel and q8.pair.scale_zeros.numel() == 0  # no int4 pair is built
    x = torch.randn(5, 96)
    torch.testing.assert_close(q8(x), x @ q8.dequantize().t(), rtol=1e-3, atol=1e-3)
    fresh = quant.Q8Linear(96, 40)
    fresh.load_state_dict(q8.state_dict())
    assert torch.equal(fresh(x), q8(x))


def _check_q8_pair():
    lin = nn.Linear(64, 32, bias=False)
    q8 = quant.Q8Linear.from_float(lin)
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
    fresh = quant.Q8Linear(64, 32)
    fresh.load_state_dict(q8.state_dict())
    fresh.refine = 4
    assert set(q8.state_dict()) == {"qweight", "scales"}
    assert torch.equal(fresh(x), y)
