"""The few-row matmul on weight rows interleaved eight at a time (corelm/kernels/repack.h, what the C++
decoder step runs from 1 to 63 tokens) equals the PyTorch statement of its integer arithmetic for every
repacked layout (corelm int4 and int8, GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)
and the row kernels, for 1..8 activation rows, N not a multiple of 8, on every instruction set this CPU runs;
a row's result does not depend on the rows that came with it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corelm import kernels

CHECK = r"""
import torch
from corelm import kernels
from corelm.quant import kquant, layers
from tests.test_kquants import TYPES, random_blocks

assert kernels.load(), kernels.load_error()
print(torch.ops.corelm.isa())
torch.manual_seed(0)
k = 512
x = torch.randn(8, k)
for n in (37, 16):  # 37: the last group of eight holds five rows
    cases = []
    for group in (32, 128):
        q, s, z = layers.quantize_int4_groupwise(torch.randn(n, k) * 0.05, group)
        cases.append((f"int4/{group}", kernels.pack_blocks(q), torch.stack([s, z], -1).contiguous(), None))
    cases.append(("int8/32", *layers.quantize_int8_groupwise(torch.randn(n, k) * 0.05, 32), None))
    cases.append(("int8/channel", *layers.quantize_int8_per_channel(torch.randn(n, k) * 0.05), None))
    for kind, t in TYPES.items():
        cases.append((kind, random_blocks(kind, n, k, seed=n + t), torch.tensor([t]), t))
    for name, q, s, ggml in cases:
        for t in range(1, 9):
            y = torch.ops.corelm.qlinear_repacked(x[:t], q, s)
            if ggml is None:
                ref, rows = kernels.reference_qlinear(x[:t], q, s), torch.ops.corelm.qlinear(x[:t], q, s)
            else:
                ref = kquant.reference_qlinear_blocks(x[:t], q, ggml)
                rows = torch.ops.corelm.qlinear_blocks(x[:t], q, ggml)
            scale = ref.abs().max().item()
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6 * scale, msg=f"{name} n={n} t={t}")
            torch.testing.assert_close(y, rows, rtol=1e-5, atol=1e-6 * scale, msg=f"{name} n={n} t={t}")
            for i in range(t):
                assert torch.equal(y[i], torch.ops.corelm.qlinear_repacked(x[i:i + 1], q, s)[0]), (name, n, t, i)
print("ok")
"""


def _levels():
    return kernels.runnable_builds()


@pytest.mark.slow
@pytest.mark.parametrize("level", _levels())
def test_repacked_matmul_equals_reference_on_every_instruction_set(level):
    env = dict(os.environ, CORELM_KERNELS_ISA=level, CORELM_REPACK="1")  # the generic build too
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1],
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [level, "ok"]


def test_repacked_matches_row_kernels_at_a_decode_shape():
    assert kernels.load(), kernels.load_error()
    torch.manual_seed(1)
    from corelm.quant import layers

    q, s, z = layers.quantize_int4_groupwise(torch.randn(1536, 576) * 0.05, 32)
    q, s = kernels.pack_blocks(q), torch.stack([s, z], -1).contiguous()
    x = torch.randn(1, 576)
    y = torch.ops.corelm.qlinear_repacked(x, q, s)
    torch.testing.assert_close(y, kernels.reference_qlinear(x, q, s), rtol=1e-5, atol=1e-5)


def test_activation_quantization_equals_the_reference_bit_for_bit():
    """Identity int8 weights read the kernel's activation integers back: y = d_a * a exactly."""
    assert kernels.load(), kernels.load_error()
    torch.manual_seed(2)
    k = 256
    x = torch.randn(6, k) * torch.logspace(-3, 3, 6)[:, None]
    x[1, :32] = 0  # a zero block
    x[2, 40] = 1e30  # one huge value: the rest of its block rounds to 0
    q = torch.eye(k, dtype=torch.int8)
    s = torch.ones(k, k // 32, dtype=torch.bfloat16)
    a, d, _ = kernels.quantize_activations(x)
    assert torch.equal(torch.ops.corelm.qlinear(x, q, s), (a * d[..., None]).reshape(6, k))
    assert torch.equal(torch.ops.corelm.qlinear_repacked(x, q, s), (a * d[..., None]).reshape(6, k))
