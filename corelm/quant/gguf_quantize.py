"""Quantize float matrices to GGUF's block formats, and pick each tensor's type as llama.cpp's mixes do.

:func:`quantize_blocks` turns an (..., K) fp32 matrix into the bytes of GGML type Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q4_K, Q5_K or Q6_K, whole matrices at a time. The arithmetic is that of llama.cpp's
reference quantizers (``ggml/src/ggml-quants.c``, ``quantize_row_*_ref``: what ``llama-quantize``
runs without an importance matrix), so the bytes match it: the legacy 32-value formats round once
with a scale from the block's extreme value; the K formats search a few scales per sub-block and
then round the scales themselves to 6 or 8 bits:

* Q4_K / Q5_K (``make_qkx2_quants``): per 32 values an asymmetric ``x ~ s*q - m``, scales tried at
  ``(nmax + rmin + 0.1*i) / (max - min)`` and refit by weighted least squares (weights
  ``rms(x) + |x|``), keeping the one of least weighted squared error; then the eight scales and
  mins of a 256-value super-block are stored as 6-bit multiples of two fp16 super-scales and every
  value is rounded again against the stored scale.
* Q6_K (``make_qx_quants``, ``rmse_type=1``): per 16 values a symmetric ``x ~ s*(q - 32)``, scales
  ``-(32 + 0.1*i) / max`` for ``i`` in -9..9, keeping the one of largest ``(sum w x q)^2 / sum w q^2``
  (weights ``x^2``); the sixteen scales are int8 multiples of one fp16 scale.

The sums run in a different order from the C loops (vectorized), so a value that sits on a rounding
tie of a searched scale can land on the neighbouring code; the test suite measures how often.

:func:`tensor_type` is llama.cpp's ``llama_tensor_get_type`` (``src/llama-quant.cpp``) for the
mixes corelm writes: ``Q4_K_M`` keeps ``attn_v`` and ``ffn_down`` at Q6_K on the first and last
eighth of the layers and every third layer between, the output head (the token embedding when tied)
at Q6_K; a matrix whose rows are not whole 256-value super-blocks falls back to Q5_0 (from Q4_K),
Q5_1 (Q5_K) or Q8_0 (Q6_K), and the head to Q8_0 -- SmolLM2's 576 columns hit exactly that.
"""

from __future__ import annotations

import numpy as np
import torch

from corelm.errors import CorelmError

QK = 32
QK_K = 256
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
BLOCK_SIZE = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256,
              "IQ4_NL": 32, "IQ4_XS": 256}
# llama.cpp's llama_ftype of each mix, and the type of its ordinary matrices (llama_ftype_get_default_type)
MIXES = {"Q4_0": (2, "Q4_0"), "Q4_1": (3, "Q4_1"), "Q8_0": (7, "Q8_0"), "Q5_0": (8, "Q5_0"), "Q5_1": (9, "Q5_1"),
         "Q4_K_S": (14, "Q4_K"), "Q4_K_M": (15, "Q4_K"), "Q5_K_S": (16, "Q5_K"), "Q5_K_M": (17, "Q5_K"),
         "Q6_K": (18, "Q6_K"), "IQ4_NL": (25, "IQ4_NL"), "IQ4_XS": (30, "IQ4_XS")}
MIX_NAMES = {ftype: name for name, (ftype, _) in MIXES.items()}
# tensor_type_fallback: a 256-value type on rows that are not whole super-blocks
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
_ROW_CHUNK = 1 << 18  # values quantized per pass: the scale searches stream over them ~20 times, keep them in cache


# --------------------------------------------------------------------------------------------------
# Helpers with C semantics
# --------------------------------------------------------------------------------------------------

def _f16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the fp32 value of its fp16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return x.half().float()


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.half().unsqueeze(-1).view(torch.uint8)  # (..., 2) little-endian


def _inv(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1/d : 0``."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """``c / t`` rounded once, as C divides (torch computes a number over a tensor as ``c * (1/t)``)."""
    return torch.full_like(t, c) / t


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (halves away from zero) without the ``floor(x + 0.5)`` error just below one half."""
    a = x.abs()
    f = a.floor()
    return torch.copysign(f + (2 * (a - f)).floor(), x)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim, with its sign (the first of equal magnitudes)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (lo & 0xF) | ((hi & 0xF) << 4)


def _bits(q: torch.Tensor) -> torch.Tensor:
    """(..., 32) values -> (..., 4) bytes holding bit 4 of each, value ``j`` at bit ``j`` (little-endian)."""
    hi = ((q >> 4) & 1).reshape(*q.shape[:-1], 4, 8)
    return (hi << torch.arange(8)).sum(-1)


def _u8(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.to(torch.uint8) for p in parts], -1)


# --------------------------------------------------------------------------------------------------
# Legacy 32-value blocks (quantize_row_q{4,5,8}_{0,1}_ref)
# --------------------------------------------------------------------------------------------------

def _q8_0(x: torch.Tensor) -> torch.Tensor:  # x (B, 32)
    d = x.abs().amax(-1, keepdim=True) / 127
    q = _roundf(x * _inv(d)).to(torch.int8).view(torch.uint8)
    return _u8(_f16_bytes(d[..., 0]), q)


def _symmetric(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0: ``d = max / -2^(bits-1)``, ``q = min(2^bits - 1, trunc(x/d + 2^(bits-1) + 0.5))``."""
    half = 1 << (bits - 1)
    d = _signed_absmax(x) / -half
    q = (x * _inv(d) + (half + 0.5)).trunc().clamp(0, 2 * half - 1).to(torch.int32)
    return d[..., 0], q


def _asymmetric(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1: ``d = (max - min) / (2^bits - 1)``, ``q = trunc((x - min)/d + 0.5)``."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d = (hi - lo) / ((1 << bits) - 1)
    q = ((x - lo) * _inv(d) + 0.5).trunc().clamp(0, (1 << bits) - 1).to(torch.int32)
    return d[..., 0], lo[..., 0], q


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 4)
    return _u8(_f16_bytes(d), _nibbles(q[..., :16], q[..., 16:]))


def _q4_1(x: torch.Tensor) -> torch.Tensor:
    d, m, q = _asymmetric(x, 4)
    return _u8(_f16_bytes(d), _f16_bytes(m), _nibbles(q[..., :16], q[..., 16:]))


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 5)
    return _u8(_f16_bytes(d), _bits(q), _nibbles(q[..., :16], q[..., 16:]))


def _q5_1(x: torch.Tensor) -> torch.Tensor:
    d, m, q = _asymmetric(x, 5)
    return _u8(_f16_bytes(d), _f16_bytes(m), _bits(q), _nibbles(q[..., :16], q[..., 16:]))


# --------------------------------------------------------------------------------------------------
# K super-blocks (quantize_row_q{4,5,6}_K_ref)
# --------------------------------------------------------------------------------------------------

def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the first dim one element after another in fp32, as the C loops accumulate: the scale
    searches compare errors that tie exactly in real arithmetic (weights already on a coarser grid),
    and the rounding of a pairwise sum would pick a different winner from llama.cpp's. (n, ...) -> (1, ...)."""
    acc = t[0:1].clone()
    for j in range(1, t.shape[0]):
        acc += t[j:j + 1]
    return acc


def _qkx2(x: torch.Tensor, nmax: int, rmin: float, nstep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``make_qkx2_quants`` on every 32-value sub-block at once: ``x ~ scale*L - min``.

    The scales are tried in order, and each try rounds against the offset of the best fit so far
    (the C loop updates ``min`` as it goes), so the steps run one after another, each over all
    sub-blocks. The values are held transposed, (32, B), so that each sum adds contiguous rows.

    Args:
        x: (B, 32) fp32 sub-blocks.
        nmax: largest code (15 or 31); ``rmin``, ``nstep``: the scales tried,
            ``(nmax + rmin + 0.1*i) / (max - min)`` for ``i`` in 0..nstep.

    Returns:
        ``scale`` (B,), ``min`` (B,) >= 0, ``L`` (B, 32) int32 codes of the best fit.
    """
    x = x.t().contiguous()  # (32, B)
    w = (_seqsum(x * x) / QK).sqrt() + x.abs()  # weights: rms of the sub-block + |x|
    lo = x.amin(0, keepdim=True).clamp(max=0)  # (1, B)
    hi = x.amax(0, keepdim=True)
    flat = hi == lo  # one value throughout: codes 0, scale 0, the value as the min
    lo0 = lo.clone()
    wx = w * x
    sum_w, sum_x = _seqsum(w), _seqsum(wx)
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    # the first guess: plain min/max scaling
    iscale = _rdiv(nmax, span)
    scale = 1 / iscale
    L = torch.round(iscale * (x - lo)).clamp(0, nmax)
    best = _seqsum(w * (scale * L + lo - x).square())
    steps = np.float32(rmin) + np.float32(0.1) * np.arange(nstep + 1, dtype=np.float32) + np.float32(nmax)
    for step in steps.tolist():
        span = torch.where(flat, torch.ones_like(hi), hi - lo)
        laux = torch.round(_rdiv(step, span) * (x - lo)).clamp(0, nmax)
        wl = w * laux
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * laux), _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Dsafe = torch.where(ok, D, torch.ones_like(D))
        s = (sum_w * sum_xl - sum_x * sum_l) / Dsafe
        m = (sum_l2 * sum_x - sum_l * sum_xl) / Dsafe
        pos = m > 0  # a positive offset is not representable: refit the scale through zero
        s = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), s)
        m = torch.where(pos, torch.zeros_like(m), m)
        err = _seqsum(w * (s * laux + m - x).square())
        better = ok & (err < best) & ~flat  # strictly smaller: the first of equal errors stays
        best = torch.where(better, err, best)
        scale, lo = torch.where(better, s, scale), torch.where(better, m, lo)
        L = torch.where(better, laux, L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    lo = torch.where(flat, lo0, lo)
    L = torch.where(flat, torch.zeros_like(L), L)
    return scale[0], -lo[0], L.t().to(torch.int32)


def _k_scales(scale: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Eight sub-block scales and mins (B, 8) -> 6-bit codes, the fp16 ``d``/``dmin`` and the 12 packed bytes."""
    max_scale = scale.amax(-1, keepdim=True).clamp(min=0)  # the C loops start from 0
    max_min = mins.amax(-1, keepdim=True).clamp(min=0)
    inv_s = torch.where(max_scale > 0, _rdiv(63, max_scale), torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, _rdiv(63, max_min), torch.zeros_like(max_min))
    # uint8_t ls = nearest_int(...): a negative code wraps before MIN(63, .)
    ls = (torch.round(inv_s * scale).to(torch.int32) & 0xFF).clamp(max=63)
    lm = (torch.round(inv_m * mins).to(torch.int32) & 0xFF).clamp(max=63)
    d, dmin = max_scale[..., 0] / 63, max_min[..., 0] / 63
    packed = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                        (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], -1)  # get_scale_min_k4's layout
    return ls, lm, d, dmin, packed


def _q45_k(x: torch.Tensor, bits: int) -> torch.Tensor:  # x (B, 256)
    nmax = (1 << bits) - 1
    sub = x.reshape(-1, QK)
    scale, mins, L = _qkx2(sub, nmax, -1.0 if bits == 4 else -0.5, 20 if bits == 4 else 15)
    n = x.shape[0]
    ls, lm, d, dmin, packed = _k_scales(scale.reshape(n, 8), mins.reshape(n, 8))
    # every value again against the scale and min as stored
    dj = _f16(d)[:, None] * ls  # (B, 8)
    dm = _f16(dmin)[:, None] * lm
    xs = x.reshape(n, 8, QK)
    q = torch.round((xs + dm[..., None]) / torch.where(dj == 0, torch.ones_like(dj), dj)[..., None]).clamp(0, nmax)
    L = torch.where(dj[..., None] == 0, L.reshape(n, 8, QK), q.to(torch.int32)).reshape(n, 4, 2, QK)
    ql = _nibbles(L[:, :, 0], L[:, :, 1]).reshape(n, 128)  # 64 values per 32 bytes: low nibbles first
    head = _u8(_f16_bytes(d), _f16_bytes(dmin), packed)
    if bits == 4:
        return _u8(head, ql)
    hi = (L >> 4) << torch.tensor([0, 1]).reshape(1, 1, 2, 1)  # bit 2c (first 32) / 2c+1 (second 32)
    qh = (hi << (2 * torch.arange(4)).reshape(1, 4, 1, 1)).sum((1, 2))  # (B, 32)
    return _u8(head, qh, ql)


def _qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` on every row of (B, n): ``x ~ scale*(L - nmax)``.
    Returns ``scale`` (B,) and ``L`` (B, n) in 0..2*nmax-1."""
    mx = _signed_absmax(x)  # (B, 1)
    zero = mx.abs() < 1e-15  # GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x

    def fit(step: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ls = torch.round(torch.full_like(mx, -step) / mx * x).clamp(-nmax, nmax - 1)
        return ls, _seqsum((w * x * ls).t()).t(), _seqsum((w * ls * ls).t()).t()

    L, sumlx, suml2 = fit(float(nmax))
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), torch.zeros_like(mx))
    best = scale * sumlx
    for i in (*range(-9, 0), *range(1, 10)):  # then -(nmax + 0.1 i) / max, in the C loop's order
        ls, sumlx, suml2 = fit(float(np.float32(nmax) + np.float32(0.1) * np.float32(i)))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / torch.where(better, suml2, torch.ones_like(suml2))
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx, best)
        L = torch.where(better, ls, L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)[:, 0]
    L = torch.where(zero, torch.zeros_like(L), L + nmax)
    return scale, L.to(torch.int32)


def _q6_k(x: torch.Tensor) -> torch.Tensor:  # x (B, 256)
    n = x.shape[0]
    scale, L = _qx(x.reshape(-1, 16), 32)
    scale, L = scale.reshape(n, 16), L.reshape(n, 16, 16)
    max_scale = _signed_absmax(scale)  # (B, 1)
    empty = max_scale.abs()[:, 0] < 1e-15
    iscale = _rdiv(-128, torch.where(empty[:, None], torch.ones_like(max_scale), max_scale))
    d = 1 / iscale[:, 0]
    sc = torch.round(iscale * scale).clamp(max=127).to(torch.int32)  # (B, 16)
    dj = _f16(d)[:, None] * sc
    q = torch.round(x.reshape(n, 16, 16) / torch.where(dj == 0, torch.ones_like(dj), dj)[..., None]).clamp(-32, 31)
    L = torch.where(dj[..., None] == 0, L, (q + 32).to(torch.int32)).reshape(n, 2, 4, QK)  # (B, half, quarter, 32)
    ql = torch.stack([_nibbles(L[:, :, 0], L[:, :, 2]), _nibbles(L[:, :, 1], L[:, :, 3])], 2).reshape(n, 128)
    qh = ((L >> 4) << (2 * torch.arange(4)).reshape(1, 1, 4, 1)).sum(2).reshape(n, 64)
    out = _u8(ql, qh, sc.to(torch.int8).view(torch.uint8), _f16_bytes(d))
    out[empty] = 0  # an all-zero super-block is stored as zeros
    return out


# --------------------------------------------------------------------------------------------------
# IQ4_NL / IQ4_XS (quantize_row_iq4_nl_impl with no importance matrix, ntry 7: what llama-quantize runs)
# --------------------------------------------------------------------------------------------------

IQ4_LEVELS = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                          dtype=torch.float32)  # kvalues_iq4nl


_IQ4_BRACKET = (torch.arange(-128, 128, dtype=torch.float32)[:, None] >= IQ4_LEVELS).sum(-1).clamp(1, 15)
_IQ4_LO, _IQ4_HI = IQ4_LEVELS[_IQ4_BRACKET - 1], IQ4_LEVELS[_IQ4_BRACKET]


def _iq4_index(t: torch.Tensor, codes: bool = True) -> torch.Tensor:
    """``best_index_int8(16, kvalues_iq4nl, t)`` elementwise: the nearest level's code (the lower one unless
    the upper is strictly nearer); with ``codes=False`` the level itself."""
    # v[mu - 1] <= t < v[mu]: the levels are integers, so the bracket is floor(t)'s (a table lookup, ~2x faster
    # than a binary search per value); beyond the end levels the comparison picks the end level
    k = (torch.floor(t).clamp(-128, 127) + 128).long()
    lower = t - _IQ4_LO[k] < _IQ4_HI[k] - t
    if not codes:
        return torch.where(lower, _IQ4_LO[k], _IQ4_HI[k])
    return _IQ4_BRACKET[k] - lower.to(torch.int64)


def _iq4_scales(x: torch.Tensor) -> torch.Tensor:
    """Each 32-value row's scale ``d`` with ``x ~ d * level`` (B, 32) -> (B, 1): the scale from the extreme
    value, refit by least squares (weights ``x^2``), then 15 more scales ``(i - 127) / max`` tried, keeping the
    one of largest ``(sum w q x)^2 / sum w q^2``; 0 for an all-zero row."""
    w = x * x
    mx = _signed_absmax(x)  # (B, 1)
    zero = mx.abs() < 1e-15  # GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)

    def fit(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = _iq4_index(inv * x, codes=False)
        return _seqsum((w * q * x).t()).t(), _seqsum((w * q * q).t()).t()

    sumqx, sumq2 = fit(1 / (-mx / -127.0))
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2)), torch.zeros_like(mx))
    best = d * sumqx
    for i in range(-7, 8):
        sumqx, sumq2 = fit(_rdiv(i - 127, mx))  # (i + values[0]) / max, one division as in C
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / torch.where(better, sumq2, torch.ones_like(sumq2)), d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, torch.zeros_like(d), d)


def _iq4_nl(x: torch.Tensor) -> torch.Tensor:  # x (B, 32)
    d = _iq4_scales(x)
    codes = _iq4_index(_inv(d) * x)
    return _u8(_f16_bytes(d[:, 0]), _nibbles(codes[:, :16], codes[:, 16:]))


def _iq4_xs(x: torch.Tensor) -> torch.Tensor:  # x (B, 256)
    n = x.shape[0]
    scales = _iq4_scales(x.reshape(n * 8, QK)).reshape(n, 8)
    d = -_signed_absmax(scales) / 32  # (B, 1); the sub-block scales as 6-bit multiples of it
    ls = torch.round(_inv(d) * scales).clamp(-32, 31)  # nearest_int: to the nearest, ties to even
    # (B, 8, 32), against d * ls (fp32 d, as llama.cpp)
    codes = _iq4_index(_inv(d * ls)[..., None] * x.reshape(n, 8, QK))
    lq = (ls + 32).to(torch.int32)
    scales_l = (lq[:, 0::2] & 0xF) | ((lq[:, 1::2] & 0xF) << 4)  # (B, 4)
    scales_h = ((lq >> 4) << (2 * torch.arange(8))).sum(1, keepdim=True)  # (B, 1) 16 bits
    qs = _nibbles(codes[..., :16], codes[..., 16:]).reshape(n, 128)
    return _u8(_f16_bytes(d[:, 0]), scales_h & 0xFF, scales_h >> 8, scales_l, qs)


_QUANTIZERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
               "Q4_K": lambda x: _q45_k(x, 4), "Q5_K": lambda x: _q45_k(x, 5), "Q6_K": _q6_k,
               "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs}


def quantize_blocks(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """A float matrix as GGUF blocks of ``qtype``, as llama.cpp's reference quantizer writes them.

    Args:
        weight: (..., K) float; every row is quantized on its own (an expert stack (E, N, K) too).
        qtype: one of :data:`BLOCK_TYPES`.

    Returns:
        (..., K / block values * block bytes) uint8: each row's blocks as a GGUF file stores them;
        :func:`corelm.quant.kquant.dequantize_blocks` (and gguf-py's ``dequantize``) read them back.

    Raises:
        CorelmError: an unknown type, or rows that are not whole blocks.
    """
    if qtype not in _QUANTIZERS:
        raise CorelmError(f"unknown GGUF block type {qtype!r}; expected one of {', '.join(BLOCK_TYPES)}")
    k, per = weight.shape[-1], BLOCK_SIZE[qtype]
    if k % per:
        raise CorelmError(f"{qtype} rows are whole blocks of {per} values; {k} columns are not")
    x = weight.detach().to("cpu", torch.float32).reshape(-1, per)
    chunk = max(1, _ROW_CHUNK // per)
    out = torch.cat([_QUANTIZERS[qtype](x[i:i + chunk].contiguous()) for i in range(0, x.shape[0], chunk)])
    return out.reshape(*weight.shape[:-1], -1)


# --------------------------------------------------------------------------------------------------
# Which tensor gets which type (llama_tensor_get_type)
# --------------------------------------------------------------------------------------------------

def _more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def _layer_type(name: str, mix: str, qtype: str, layer: int, n_layer: int, n_expert: int, n_gqa: int) -> str:
    """The ``blk.*`` rules of ``llama_tensor_get_type_impl`` for the mixes of :data:`MIXES` (no importance
    matrix)."""
    k_m, iq4 = mix in ("Q4_K_M", "Q5_K_M"), mix in ("IQ4_NL", "IQ4_XS")
    if ".attn_v." in name or ".attn_qkv." in name:  # llama.cpp's attn_v-like tensors
        if iq4 and n_gqa >= 4:
            qtype = "Q5_K"
        elif k_m and _more_bits(layer, n_layer):
            qtype = "Q6_K"
        elif mix == "Q4_K_S" and layer < 4:
            qtype = "Q5_K"
        return "Q8_0" if n_expert == 8 else qtype
    if ".attn_k." in name:
        return "Q8_0" if n_expert == 8 else qtype
    if ".ffn_down" in name:
        if k_m and _more_bits(layer, n_layer):
            return "Q6_K"
        return "Q5_K" if (mix == "Q4_K_S" or iq4) and layer < n_layer // 8 else qtype
    if ".attn_output." in name and n_expert == 8 and mix in ("Q4_K_S", "Q4_K_M", "IQ4_NL", "IQ4_XS"):
        return "Q5_K"
    return qtype


def tensor_type(name: str, mix: str, cols: int, n_layer: int, n_expert: int = 0, tied: bool = False,
                n_gqa: int = 1) -> str:
    """The GGML type llama.cpp's ``llama-quantize`` gives tensor ``name`` in ``mix`` (no importance matrix).

    Args:
        name: the GGUF tensor name (``blk.3.attn_v.weight``, ``output.weight``, ``token_embd.weight``).
        mix: a key of :data:`MIXES` (``Q4_K_M``, ...).
        cols: the tensor's row length (its first GGUF dimension).
        n_layer: the model's block count; ``n_expert``: its experts (0 or 1 for dense models).
        tied: the token embedding is also the output head (no ``output.weight``).
        n_gqa: query heads per key/value head (the IQ4 mixes keep ``attn_v`` at Q5_K from 4 on).

    Returns:
        A name of :data:`BLOCK_TYPES`, or ``F16`` for rows that are not whole 32-value blocks.
    """
    if mix not in MIXES:
        raise CorelmError(f"unknown GGUF mix {mix!r}; expected one of {', '.join(MIXES)}")
    qtype = MIXES[mix][1]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        # the head: Q8_0 if the mix's blocks do not fit its rows, else Q6_K (Q8_0 stays Q8_0)
        qtype = "Q8_0" if cols % BLOCK_SIZE[qtype] else qtype if qtype == "Q8_0" else "Q6_K"
    elif name.startswith("blk."):
        qtype = _layer_type(name, mix, qtype, int(name.split(".")[1]), n_layer, n_expert, n_gqa)
    if cols % BLOCK_SIZE[qtype]:  # tensor_type_fallback
        qtype = FALLBACK.get(qtype, qtype)
        if cols % BLOCK_SIZE[qtype]:
            qtype = "F16"
    return qtype
