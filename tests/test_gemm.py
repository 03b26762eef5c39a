"""The many-token panel GEMM (corelm/kernels/gemm.h) in each of its arithmetics equals
dequantize-then-matmul within the error that arithmetic allows, for every block format and every
instruction-set build this CPU runs, on shapes that leave partial tiles and partial panels; and a
SmolLM2 prefill on it keeps the fp32 panels' logits and top-1 tokens."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corelm import kernels
from corelm.cpu import cpu_flags


def _levels():
    return kernels.runnable_builds()


# Every build: fp32 and aten; AVX-512 VNNI builds add int16, int8 and the AMX kernel on emulated tiles (on
# real ones too where the CPU declares AMX-INT8), the avx512bf16 build bf16.
MODES = {"generic": ["fp32", "aten"], "avx2": ["fp32", "aten"],
         "avx512vnni": ["fp32", "int16", "int8", "amx-emulated", "aten"],
         "avx512bf16": ["fp32", "int16", "int8", "amx-emulated", "bf16", "aten"]}
AMX = {"amx_tile", "amx_int8"} <= cpu_flags()  # the tiles themselves, where the CPU declares them
if AMX:
    for modes in (MODES["avx512vnni"], MODES["avx512bf16"]):
        modes.insert(modes.index("amx-emulated"), "amx")

# Bounds, with bound = |x| @ |W|^T (u = 2^-24, fp32's unit roundoff; b = 2^-8, bf16's):
#   fp32   sums of K exact-ish products: |y - x @ W^T| <= K u bound (the classic gamma_K bound)
#   bf16   x and W rounded to bf16 (relative <= b each): each product within 2b + b^2, then the fp32 sum;
#          and y equals the product of the rounded operands to K u bound (VDPBF16PS's products are exact)
#   int16  the integer kernels' arithmetic (15-bit tokens per block of 32): equal to their PyTorch
#          reference to fp32 rounding of the per-block sums, 1e-5 of the output scale
#   int8   tokens rounded to 8-bit integers per block of 32, exact integer sums: dequantize-then-matmul of
#          those tokens to 2 K u bound (Q6_K, whose integers do not fit a byte, takes the int16 panels)
#   amx    (and amx-emulated) the int16 arithmetic on tiles: equal to the int16 panels bit for bit
#   aten   as bf16, plus at::mm's bf16 output: b |y| more
CHECK = r"""
import os, sys, torch
from corelm import kernels
from corelm.quant import kquant, layers
from tests.test_kquants import random_blocks, TYPES
assert kernels.load(), kernels.load_error()
print(torch.ops.corelm.isa())
u, b = 2.0 ** -24, 2.0 ** -8

def tokens8(x):  # gemm.h's quantize_rows_i8 in PyTorch: d = amax / 127, a = round(x * (1 / d)), then a * d
    xb = x.reshape(x.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    a = torch.round(xb * torch.where(d > 0, 1 / d, torch.zeros_like(d)))
    assert a.abs().max() <= 127
    return (a.double() * d.double()).reshape(x.shape)

def matrices(n):
    for kind, t in TYPES.items():
        # the K-quants and IQ4_XS: 256-value super-blocks; 96 values: byte panels of 24 words, not whole vectors
        for k in (512,) if kquant.FORMATS[t][1] == 256 else (576, 96):
            blocks = random_blocks(kind, n, k, seed=t + n)
            op = lambda x, blocks=blocks, t=t: torch.ops.corelm.qlinear_blocks(x, blocks, t)
            reference = lambda x, blocks=blocks, t=t: kquant.reference_qlinear_blocks(x, blocks, t)
            yield kind, k, op, kquant.dequantize_blocks(blocks, t, k), reference
    torch.manual_seed(n)
    q, scale, zero = layers.quantize_int4_groupwise(torch.randn(n, 576), 64)
    q4, s4 = kernels.pack_blocks(q), torch.stack([scale, zero], -1).contiguous()
    q8, s8 = layers.quantize_int8_groupwise(torch.randn(n, 576), 32)
    q8c, s8c = layers.quantize_int8_per_channel(torch.randn(n, 576))
    for kind, q, s in (("int4 g64", q4, s4), ("int8 g32", q8, s8), ("int8 per channel", q8c, s8c)):
        yield kind, 576, (lambda x, q=q, s=s: torch.ops.corelm.qlinear(x, q, s)), kernels.dequantize(q, s, 576), \
            (lambda x, q=q, s=s: kernels.reference_qlinear(x, q, s))

torch.manual_seed(0)
for n in (40, 70):  # one partial panel of 8 columns; two whole panels and one of 6
    for kind, k, op, w, reference in matrices(n):
        for T in (64, 77):  # 77: partial register tiles of every build
            x = torch.randn(T, k)
            x[3] *= 100  # rows of another scale: per-token scaling is exercised
            ref = x.double() @ w.double().t()
            bound = x.abs().double() @ w.abs().double().t()
            for mode in sys.argv[1].split(","):
                os.environ["CORELM_GEMM"] = mode
                assert torch.ops.corelm.gemm() == mode
                y = op(x).double()
                err = (y - ref).abs()
                if mode == "fp32":
                    ok = err <= k * u * bound + 1e-30
                elif mode == "bf16":
                    exact = x.bfloat16().double() @ w.bfloat16().double().t()
                    ok = (err <= (2 * b + b * b + k * u) * bound) & ((y - exact).abs() <= k * u * bound + 1e-30)
                elif mode in ("amx", "amx-emulated"):
                    os.environ["CORELM_GEMM"] = "int16"
                    ok = torch.tensor(torch.equal(y, op(x).double()))
                elif mode == "int8" and kind != "Q6_K":
                    x8 = tokens8(x)
                    ok = (y - x8 @ w.double().t()).abs() <= 2 * k * u * (x8.abs() @ w.abs().double().t()) + 1e-30
                elif mode in ("int16", "int8"):
                    r = reference(x).double()
                    ok = (y - r).abs() <= 1e-5 * r.abs().amax(1, keepdim=True) + 1e-30
                else:
                    ok = err <= (2 * b + b * b + k * u) * bound + b * y.abs()
                assert bool(ok.all()), (kind, n, T, mode, float((err / bound).max()))
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("level", _levels())
def test_every_build_and_arithmetic_equals_dequantize_then_matmul(level):
    env = dict(os.environ, CORELM_KERNELS_ISA=level)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", CHECK, ",".join(MODES[level])], env=env, capture_output=True,
                         text=True, timeout=600, check=False, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [level, "ok"]


def test_bad_arithmetic_is_refused(monkeypatch):
    assert kernels.load(), kernels.load_error()
    monkeypatch.setenv("CORELM_GEMM", "int3")
    with pytest.raises(RuntimeError, match="fp32, bf16, int16, int8, amx, amx-emulated or aten"):
        torch.ops.corelm.qlinear_blocks(torch.randn(64, 32), torch.zeros(4, 34, dtype=torch.uint8), 8)


def test_amx_is_refused_where_the_cpu_has_none(monkeypatch):
    assert kernels.load(), kernels.load_error()
    if AMX:
        pytest.skip("this CPU declares AMX-INT8")
    monkeypatch.setenv("CORELM_GEMM", "amx")
    with pytest.raises(RuntimeError, match="the amx panel GEMM needs a CPU that declares AMX-INT8"):
        torch.ops.corelm.gemm()


def test_the_tile_check_answers_what_the_cpu_declares():
    """The child process corelm runs before using the tiles (kernels.amx_verdict): 0 where the CPU declares
    AMX-INT8 and the tiles agree with their C emulation to the bit, 1 where there are none."""
    level = kernels.isa()
    if level not in ("avx512vnni", "avx512bf16"):
        pytest.skip("no AVX-512 VNNI build on this CPU")
    assert kernels.load(), kernels.load_error()
    out = subprocess.run([sys.executable, "-m", "corelm.kernels", "--amx-check"], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ("0" if AMX else "1")
    assert kernels.amx_verdict()["ok"] is AMX
    assert torch.ops.corelm.amx_enable() is AMX  # where there are no tiles, asking for them changes nothing
    assert torch.ops.corelm.gemm() == ("amx" if AMX else "int16") or os.environ.get("CORELM_GEMM")


@pytest.fixture
def fake_tile_check(monkeypatch, request):
    """A CPU that declares AMX, a verdict file of this test's own, and a tile check that runs ``command``
    (set it: ``fake_tile_check(command)``); yields the verdict file's path, removed afterwards."""
    level = kernels.isa()
    if level not in ("avx512vnni", "avx512bf16"):
        pytest.skip("no AVX-512 VNNI build on this CPU")
    assert kernels.load(), kernels.load_error()
    key = f"test-{os.getpid()}-{abs(hash(request.node.name))}"
    monkeypatch.setattr(kernels, "amx_declared", lambda: True)
    monkeypatch.setattr(kernels, "_cpu_key", lambda: key)
    monkeypatch.setattr(kernels, "AMX_CHECK_SECONDS", 2)
    monkeypatch.delenv("CORELM_GEMM", raising=False)
    remembered = kernels.cache_dir(level) / f"amx-{key}.json"

    def runs(command: list[str]) -> Path:
        monkeypatch.setattr(kernels, "_amx_check_command", lambda level: command)
        return remembered

    yield runs
    remembered.unlink(missing_ok=True)


@pytest.mark.parametrize("child,reason", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "the AMX tile check crashed (SIGSEGV)"),
    ("import time; time.sleep(30)", "the AMX tile check did not finish in 2 s"),
    ("print(2)", "the AMX tiles disagreed with their C emulation"),
    ("print(1)", "the OS did not grant this process the AMX tiles"),
    ("raise SystemExit('no library')", "the AMX tile check failed (exit 1: no library)"),
    ("print(0)", "the tiles agreed with their C emulation to the bit"),
])
def test_the_tile_check_verdict_is_remembered_and_only_yes_uses_the_tiles(fake_tile_check, monkeypatch, capsys,
                                                                          child, reason):
    """A fault, hang or disagreement on the tiles in the child process is a verdict of "no" with a reason,
    printed once, and the panel GEMM stays on AVX-512; only an answer of 0 gives amx. Either verdict is
    remembered per build and CPU, so no later process runs the check (or the tiles that failed it) again."""
    fake_tile_check([sys.executable, "-c", child])
    ok = child == "print(0)"
    verdict = kernels.amx_verdict()
    assert verdict == {"ok": ok, "reason": reason}
    assert (reason in capsys.readouterr().err) is not ok
    assert kernels.gemm() == ("amx" if ok else "int16")
    monkeypatch.setattr(kernels, "_run_amx_check", lambda cmd: pytest.fail("the verdict was not remembered"))
    assert kernels.amx_verdict() == verdict and capsys.readouterr().err == ""


def test_a_tile_check_that_cannot_start_or_be_saved_still_gives_a_verdict(fake_tile_check, monkeypatch, capsys):
    """The check never takes the kernels down with it: an interpreter that cannot start is a "no", and a
    cache that cannot be written leaves the verdict unsaved (the next process asks again)."""
    remembered = fake_tile_check(["/nonexistent/python3"])

    def unwritable(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(kernels.tempfile, "mkstemp", unwritable)
    verdict = kernels.amx_verdict()
    assert verdict == {"ok": False, "reason": "the AMX tile check could not start (No such file or directory)"}
    assert verdict["reason"] in capsys.readouterr().err
    assert not remembered.exists()


def test_default_follows_the_build(monkeypatch):
    assert kernels.load(), kernels.load_error()
    monkeypatch.delenv("CORELM_GEMM", raising=False)
    assert torch.ops.corelm.gemm() == kernels.gemm()


@pytest.fixture(scope="module")
def smollm2_logits():
    """Every position's logits of two 256-token windows of Python's own docstrings (held-out text),
    prefilled with each arithmetic this build has."""
    assert kernels.load(), kernels.load_error()
    import argparse
    import collections
    import json
    import textwrap

    from corelm.generate.step import KernelStep
    from corelm.loading import load_parts
    from corelm.presets import embedded_path

    loaded = load_parts(embedded_path("smollm2-135m-instruct"))
    text = "\n\n".join(inspect.getdoc(m) for m in (json, argparse, collections.OrderedDict, textwrap))
    ids = loaded.tokenizer.encode(text)
    assert len(ids) >= 512
    step = KernelStep(loaded.model)
    modes = [m for m in ("fp32", "int16", "int8", "bf16") if m in MODES[torch.ops.corelm.isa()]]
    out = {}
    old = os.environ.get("CORELM_GEMM")
    try:
        with torch.inference_mode():
            for mode in modes:
                os.environ["CORELM_GEMM"] = mode
                out[mode] = torch.cat([step.extend(step.new_cache(1, 264), 0, ids[i:i + 256], 0) for i in (0, 256)])
    finally:
        os.environ.pop("CORELM_GEMM") if old is None else os.environ.update(CORELM_GEMM=old)
    return out


# (max |logit diff| to the fp32 panels, top-1 agreement floor). Measured on the Zen 4 (512 positions):
# int16 0.030-0.034 and 100% (the integer kernels' 15-bit tokens); bf16 0.44-0.57 and 98.8-99.2% (8-bit
# significands; on the int4 layers the default load used before and on the file's Q4_1 blocks as stored,
# before and after attention.h's vector exponentials and summation order moved the near-tied positions).
MODEL = {"int16": (0.1, 0.99), "int8": (9.0, 0.9), "bf16": (1.0, 0.98)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODEL))
def test_smollm2_prefill_keeps_the_fp32_logits(smollm2_logits, mode):
    if mode not in smollm2_logits:
        pytest.skip(f"the {torch.ops.corelm.isa()} build has no {mode} GEMM")
    ref, got = smollm2_logits["fp32"], smollm2_logits[mode]
    atol, floor = MODEL[mode]
    diff = (got - ref).abs().max().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{mode} panels vs fp32: max |logit diff| {diff:.4f}, top-1 agreement {agree:.4f}")
    assert not torch.equal(got, ref)  # the switch took effect
    assert diff <= atol and agree >= floor, (diff, agree)


def test_an_assembler_without_amx_gives_a_build_without_tiles(monkeypatch):
    """amx.h writes the tile instructions as inline assembly: a toolchain older than AMX (binutils < 2.36)
    compiles the VNNI builds with -DCORELM_NO_AMX instead of failing the whole build."""
    monkeypatch.setattr(kernels, "assembler_has_amx", lambda: False)
    assert "-DCORELM_NO_AMX" in kernels._flags("avx512vnni") and "-DCORELM_NO_AMX" in kernels._flags("avx512bf16")
    assert "-DCORELM_NO_AMX" not in kernels._flags("avx2")
    monkeypatch.setattr(kernels, "assembler_has_amx", lambda: True)
    assert kernels._flags("avx512vnni") == kernels.FLAGS["avx512vnni"]
