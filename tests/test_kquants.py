"""GGUF block formats (Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) on corelm's C++ kernels: the kernel equals the
PyTorch statement of its integer arithmetic, and stays within 1e-3 of fp32 against gguf-py's own
dequantizer (an independent reading of the layouts), on every instruction set this CPU runs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from corelm import kernels
from corelm.cpu import cpu_flags
from corelm.quant import kquant

TYPES = {"Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


def random_blocks(kind: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """(n, row bytes) uint8 of valid blocks: random integer fields, fp16 scales of realistic size
    (gguf-py has no K-quant quantizer, so the blocks are built byte-wise)."""
    g = np.random.default_rng(seed)
    _, per, nbytes = kquant.FORMATS[TYPES[kind]]
    b = g.integers(0, 256, size=(n, k // per, nbytes), dtype=np.uint8)

    def half(lo: float, hi: float) -> np.ndarray:
        return g.uniform(lo, hi, size=(n, k // per, 1)).astype(np.float16).view(np.uint8)

    if kind in ("Q8_0", "Q5_0"):
        b[..., 0:2] = half(1e-4, 2e-3)
    elif kind == "Q5_1":
        b[..., 0:2], b[..., 2:4] = half(1e-4, 2e-3), half(-2e-2, 0)
    elif kind == "Q6_K":
        b[..., 208:210] = half(1e-4, 5e-4)
    else:  # d, dmin
        b[..., 0:2], b[..., 2:4] = half(1e-4, 5e-4), half(1e-4, 5e-4)
    return torch.from_numpy(b.reshape(n, -1))


def gguf_matrix(blocks: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    w = gguf_dequantize(blocks.numpy(), GGMLQuantizationType[kind])
    return torch.from_numpy(np.ascontiguousarray(w)).reshape(blocks.shape[0], k)


@pytest.fixture(autouse=True)
def _built():
    assert kernels.load(), kernels.load_error()


@pytest.mark.parametrize("kind", list(TYPES))
def test_unpacking_matches_gguf_py(kind):
    blocks = random_blocks(kind, 7, 512)
    torch.testing.assert_close(kquant.dequantize_blocks(blocks, TYPES[kind], 512), gguf_matrix(blocks, kind, 512),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("t", [1, 3, 6])
def test_kernel_equals_reference_and_fp32(kind, t):
    n, k = 40, 768
    blocks = random_blocks(kind, n, k, seed=t)
    torch.manual_seed(t)
    x = torch.randn(t, k)
    y = torch.ops.corelm.qlinear_blocks(x, blocks, TYPES[kind])
    ref = kquant.reference_qlinear_blocks(x, blocks, TYPES[kind])
    exact = x.double() @ gguf_matrix(blocks, kind, k).double().t()
    scale = exact.abs().max().item()
    # same integers, fp32 summation in another order
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6 * scale)
    assert (y.double() - exact).abs().max().item() < 1e-3 * scale
    # a row's result does not depend on how many rows come with it
    for i in range(t):
        assert torch.equal(torch.ops.corelm.qlinear_blocks(x[i:i + 1], blocks, TYPES[kind]), y[i:i + 1])


@pytest.mark.parametrize("kind", list(TYPES))
def test_gemm_path_dequantizes_exactly(kind):
    blocks = random_blocks(kind, 16, 256, seed=3)
    x = torch.randn(600, 256)  # >= 512 rows: dequantized panels and ATen's GEMM
    w = gguf_matrix(blocks, kind, 256)
    torch.testing.assert_close(torch.ops.corelm.qlinear_blocks(x, blocks, TYPES[kind]), x @ w.t(),
                               rtol=1e-5, atol=1e-5)


def test_layer_forward_and_fallback():
    blocks = random_blocks("Q4_K", 24, 512)
    layer = kquant.GGUFBlockLinear(blocks, TYPES["Q4_K"], 512)
    x = torch.randn(2, 3, 512)
    y = layer(x)
    assert y.shape == (2, 3, 24) and layer.kernel
    values, fmt = layer.kernel_weights()
    assert values is layer.blocks and fmt.tolist() == [12]
    layer.kernel = False  # the dequantized fallback, as without the kernels
    torch.testing.assert_close(layer(x), y, rtol=1e-3, atol=1e-3 * y.abs().max().item())


def test_bad_shapes_are_refused():
    blocks = random_blocks("Q6_K", 4, 256)
    with pytest.raises(RuntimeError, match="210"):
        torch.ops.corelm.qlinear_blocks(torch.randn(1, 512), blocks, 14)
    with pytest.raises(RuntimeError, match="no kernel"):
        torch.ops.corelm.qlinear_blocks(torch.randn(1, 256), blocks, 2)
    with pytest.raises(RuntimeError, match="no kernel"):
        torch.ops.corelm.qlinear_blocks(torch.randn(1, 96), random_blocks("Q8_0", 4, 96)[:, :0], 14)


def _supported():
    flags = cpu_flags()
    levels = ["generic"]
    if {"avx2", "fma", "f16c"} <= flags:
        levels.append("avx2")
    if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        levels.append("avx512vnni")
    return levels


CHECK = r"""
import torch
from corelm import kernels
from corelm.quant import kquant
from tests.test_kquants import random_blocks, TYPES
assert kernels.load(), kernels.load_error()
print(torch.ops.corelm.isa())
torch.manual_seed(0)
x = torch.randn(5, 512)
for kind, t in TYPES.items():
    b = random_blocks(kind, 24, 512, seed=t)
    y = torch.ops.corelm.qlinear_blocks(x, b, t)
    ref = kquant.reference_qlinear_blocks(x, b, t)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    for i in range(5):
        assert torch.equal(torch.ops.corelm.qlinear_blocks(x[i:i + 1], b, t), y[i:i + 1]), kind
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("level", _supported())
def test_every_instruction_set_build_equals_reference(level):
    env = dict(os.environ, CORELM_KERNELS_ISA=level)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300,
                         check=False, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [level, "ok"]
