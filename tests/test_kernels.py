"""corelm's C++ kernels equal their PyTorch reference (every instruction set this CPU runs), stay
within 1e-3 of fp32 (the fused decoder step is tested with the decode steps, test_generate_step.py)."""

import os
import subprocess
import sys
import time

import pytest
import torch

from corelm import kernels
from corelm.quant import layers


@pytest.fixture(autouse=True)
def _built():
    assert kernels.load(), kernels.load_error()  # `make test` builds them; a failure is a failure


def _int4(n, k, g, seed=0):
    torch.manual_seed(seed)
    q, s, z = layers.quantize_int4_groupwise(torch.randn(n, k) * 0.05, g)
    return kernels.pack_blocks(q), torch.stack([s, z], -1).contiguous()


def _int8(n, k, g, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * 0.05
    if g is None:
        return layers.quantize_int8_per_channel(w)
    return layers.quantize_int8_groupwise(w, g)


CASES = [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 32), ("int8", None)]


@pytest.mark.parametrize("kind,group", CASES)
@pytest.mark.parametrize("t", [1, 5])
def test_qlinear_equals_reference_and_fp32(kind, group, t, monkeypatch):
    n, k = 40, 384  # 12 blocks per row; 40 rows split across threads
    q, s = _int4(n, k, group) if kind == "int4" else _int8(n, k, group)
    x = torch.randn(t, k) * 3
    x[0, 5] = 40.0  # an outlier: its block's scale grows, the others' do not
    y = torch.ops.corelm.qlinear(x, q, s)
    ref = kernels.reference_qlinear(x, q, s)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    exact = x @ kernels.dequantize(q, s, k).t()
    assert ((y - exact).abs().max() / exact.abs().max()) < 1e-3  # 15-bit activations
    many = torch.randn(77, k)  # 64 rows and more: the fp32 panel GEMM on the dequantized weights (77: a partial tile)
    monkeypatch.setenv("CORELM_GEMM", "fp32")  # the other arithmetics: tests/test_gemm.py
    torch.testing.assert_close(torch.ops.corelm.qlinear(many, q, s), many @ kernels.dequantize(q, s, k).t(),
                               rtol=1e-5, atol=1e-5)


def test_odd_block_count_and_zero_rows():
    q, s = _int4(3, 96, 32)  # 3 blocks: the unrolled loop's odd tail
    x = torch.zeros(2, 96)
    x[1] = torch.randn(96)
    y = torch.ops.corelm.qlinear(x, q, s)
    torch.testing.assert_close(y, kernels.reference_qlinear(x, q, s), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[0], torch.zeros(3))


@pytest.mark.parametrize("t", [1, 3, 8, 70])  # row kernels, repacked rows, the many-token GEMM
def test_a_nan_activation_makes_only_its_row_nan(t, monkeypatch):
    """A NaN in a token's activations comes out as NaN outputs for that token (a failed row is seen as
    failed, not as finite garbage), and the other tokens keep their values."""
    q, s = _int4(16, 96, 32)
    x = torch.randn(t, 96)
    x[t // 2, 40] = float("nan")
    others = [i for i in range(t) if i != t // 2]
    for mode in ("fp32", "int16"):
        monkeypatch.setenv("CORELM_GEMM", mode)
        y = torch.ops.corelm.qlinear(x, q, s)
        assert torch.isnan(y[t // 2]).all() and torch.isfinite(y[others]).all(), mode
        if t <= 8:
            r = torch.ops.corelm.qlinear_repacked(x, q, s)
            assert torch.isnan(r[t // 2]).all() and torch.isfinite(r[others]).all()
            torch.testing.assert_close(r[others], y[others])


def test_pack_blocks_round_trip_and_layout():
    q = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    packed = kernels.pack_blocks(q)
    assert torch.equal(kernels.unpack_blocks(packed), q)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 16]) << 4)  # GGUF Q4_1's order


def test_bad_shapes_are_refused():
    q, s = _int4(8, 64, 32)
    with pytest.raises(RuntimeError, match="int4 weight must be"):
        torch.ops.corelm.qlinear(torch.randn(1, 96), q, s)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.corelm.qlinear(torch.randn(1, 64, dtype=torch.float64), q, s)


def _supported():
    return kernels.runnable_builds()


CHECK = r"""
import os, torch
from corelm import kernels
from corelm.cpu import cpu_flags
from corelm.quant import layers
assert kernels.load(), kernels.load_error()
print(torch.ops.corelm.isa())
torch.manual_seed(0)
x = torch.randn(8, 320)
many = torch.randn(70, 320)  # from 64 rows: the fp32 panel GEMM on dequantized weights
os.environ["CORELM_GEMM"] = "fp32"  # the other arithmetics: tests/test_gemm.py
for w, g in [(layers.quantize_int4_groupwise(torch.randn(40, 320), 32), 32),
             (layers.quantize_int8_groupwise(torch.randn(40, 320)), 32)]:
    if len(w) == 3:
        q, s = kernels.pack_blocks(w[0]), torch.stack([w[1], w[2]], -1).contiguous()
    else:
        q, s = w
    for t in (1, 3, 5, 7, 8):  # every batched-row kernel (1-4, 6, 8 rows per pass); a row equals it alone
        y = torch.ops.corelm.qlinear(x[:t], q, s)
        # outputs ~20: fp32 summation order differs between the paths
        torch.testing.assert_close(y, kernels.reference_qlinear(x[:t], q, s), rtol=1e-4, atol=1e-4)
        assert all(torch.equal(y[i], torch.ops.corelm.qlinear(x[i:i + 1], q, s)[0]) for i in range(t))
    torch.testing.assert_close(torch.ops.corelm.qlinear(many, q, s), many @ kernels.dequantize(q, s, 320).t(),
                               rtol=1e-5, atol=1e-4)
{ATTENTION}
{FLOAT}
print("ok")
"""

# corelm::attention (attention.h) against softmax(q K^T * scale) V in float64, on every cache dtype, head
# width (a multiple of 16 and not), window and soft-cap, over one span of 256 slots and over several
# (windows that start mid-span too); each token equals its lone call bit for bit (a lone token's spans
# are spread over the threads, a batch's are not), prefetching or not.
ATTENTION = r"""
def attention_reference(q, kc, vc, rows, pos, window, scale, softcap):
    H, hd = q.shape[1] // kc.shape[3], kc.shape[3]
    group = H // kc.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for t, (r, p) in enumerate(zip(rows.tolist(), pos.tolist())):
        lo = max(0, p - window + 1) if window > 0 else 0
        for h in range(H):
            k, v = kc[r, h // group, lo:p + 1].double(), vc[r, h // group, lo:p + 1].double()
            s = (k @ q[t, h * hd:(h + 1) * hd].double()) * scale
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            out[t, h * hd:(h + 1) * hd] = torch.softmax(s, 0) @ v
    return out.float()

torch.manual_seed(1)
torch.set_num_threads(2)  # the pool's split: (token, kv head) units for the batch, one per span alone
rows = torch.tensor([0] * 20 + [1, 2, 2, 1])
pos = torch.tensor(list(range(20)) + [150, 198, 199, 700])  # 700: three spans
for hd in (64, 40):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        kc, vc = torch.randn(2, 3, 2, 701, hd).to(dtype)
        q = torch.randn(len(rows), 6 * hd) * 2
        for window, softcap in ((0, 0.0), (7, 0.0), (300, 0.0), (0, 5.0)):
            y = torch.ops.corelm.attention(q, kc, vc, rows, pos, window, hd ** -0.5, softcap)
            ref = attention_reference(q, kc, vc, rows, pos, window, hd ** -0.5, softcap)
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
            for t in (0, 7, 19, 20, 22, 23):
                lone = torch.ops.corelm.attention(q[t:t + 1], kc, vc, rows[t:t + 1], pos[t:t + 1], window,
                                                  hd ** -0.5, softcap)
                assert torch.equal(lone[0], y[t]), (hd, dtype, window, softcap, t)
            for pf in ("0", "64", "4096"):
                os.environ["CORELM_PREFETCH"] = pf
                same = torch.ops.corelm.attention(q, kc, vc, rows, pos, window, hd ** -0.5, softcap)
                assert torch.equal(same, y), (hd, dtype, window, softcap, pf)
            os.environ.pop("CORELM_PREFETCH")
q[3, 5] = float("nan")  # a NaN in one query head makes that head's output NaN, nothing else
y = torch.ops.corelm.attention(q, kc, vc, rows, pos, 0, hd ** -0.5, 0.0)
assert y[3, :hd].isnan().all() and not y[3, hd:].isnan().any() and not y[torch.arange(24) != 3].isnan().any()
"""
# Float weights (fgemv.h: an nn.Linear's fp32 or bf16 weight, no scales) against x @ W^T in float64: widths
# that are and are not multiples of the vector lanes, every tile of 1-4 weight rows and 1-4 tokens, the
# panels from 64 rows; below 64 rows each token equals its lone call bit for bit.
FLOAT = r"""
torch.manual_seed(2)
none = torch.empty(0)
for K in (64, 333, 5):
    x = torch.randn(70, K)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(43, K).to(dtype)
        ref = (x.double() @ w.double().t()).float()
        for t in (1, 2, 3, 4, 6, 9, 63, 64, 70):
            y = torch.ops.corelm.qlinear(x[:t], w, none)
            torch.testing.assert_close(y, ref[:t], rtol=1e-5, atol=1e-4)
            if t < 64:
                assert all(torch.equal(y[i], torch.ops.corelm.qlinear(x[i:i + 1], w, none)[0]) for i in range(t))
                for pf in ("0", "64", "4096"):  # prefetching ahead or not (CORELM_PREFETCH) reads the same
                    os.environ["CORELM_PREFETCH"] = pf
                    assert torch.equal(torch.ops.corelm.qlinear(x[:t], w, none), y), (K, dtype, t, pf)
                os.environ.pop("CORELM_PREFETCH")
"""
CHECK = CHECK.replace("{ATTENTION}", ATTENTION).replace("{FLOAT}", FLOAT)


@pytest.mark.slow
@pytest.mark.parametrize("level", _supported())
def test_every_instruction_set_build_equals_reference(level):
    env = dict(os.environ, CORELM_KERNELS_ISA=level)
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [level, "ok"]


COLD = r"""
import time, torch
from corelm import kernels
from corelm.cpu import cpu_flags
from corelm.quant.transform import quantize_linear
lin = torch.nn.Linear(64, 8, bias=False)
layer = quantize_linear(lin, "int4", 32)   # no library in this cache: PyTorch's kernels, build started
print(layer.kernel, kernels.load_error())
lock = kernels.cache_dir() / ".building"
print(lock.exists())
"""


@pytest.mark.slow
def test_first_run_builds_in_the_background_and_falls_back(tmp_path):
    env = dict(os.environ, CORELM_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", COLD], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    first, locked = out.stdout.splitlines()
    assert first.startswith("False") and "background" in first and locked == "True"
    assert "compiling the C++ kernels" in out.stderr
    for _ in range(240):  # the detached build finishes on its own (nice 19)
        if not list(tmp_path.glob("kernels/*/.building")):
            break
        time.sleep(0.5)
    assert list(tmp_path.glob("kernels/*/corelm_kernels.so")), "the background build produced no library"
    warm = subprocess.run([sys.executable, "-c", COLD], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert warm.stdout.splitlines()[0].startswith("True"), warm.stdout + warm.stderr


def test_disabled_kernels_fall_back_to_pytorch():
    code = ("import torch; from corelm.quant.transform import quantize_linear; torch.manual_seed(0); "
            "lin = torch.nn.Linear(64, 8); m = quantize_linear(lin, 'int4', 32); x = torch.randn(2, 64); "
            "print(m.kernel, float((m(x) - lin(x)).abs().max()))")
    env = dict(os.environ, CORELM_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    kernel, err = out.stdout.split()
    assert kernel == "False" and float(err) < 0.2, out.stderr[-2000:]


def test_a_worker_descheduled_mid_chunk_is_left_out_for_a_while():
    """pool.h's stall rule: a worker that holds the caller up longer than the caller's own share (here a
    chunk that sleeps 20 ms) twice within 64 jobs is left out of the next jobs, which run on the caller
    alone, and is back when the window (50 ms, doubling up to 1 s) ends; a worker's short chunk is no stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        after, during, back = torch.ops.corelm.pool_probe(20_000)
        assert after == 0 and during == 0, (after, during)
        # the window is at most 1 s; the margin is for this thread's own polling on a loaded machine
        assert 0 <= back <= 1_500, back
        short = []
        for _ in range(10):  # on a loaded machine a worker's wake-up can outlast a short share: the caller's is 5 ms
            short.append(torch.ops.corelm.pool_probe(20, 5_000))
            if short[-1][0] == 1 and short[-1][2] == 0:
                break
        assert short[-1][0] == 1 and short[-1][2] == 0, short
    finally:
        torch.set_num_threads(threads)


def test_builds_unused_for_30_days_are_pruned(tmp_path, monkeypatch):
    """Each corelm or torch upgrade makes a new build directory; those no process has loaded for 30 days go
    when a new build is made, the ones in use (a recent ``.used`` mark, or a recent directory) stay."""
    monkeypatch.setenv("CORELM_CACHE", str(tmp_path))
    root = kernels.cache.cache_subdir("kernels")
    old = time.time() - 40 * 86400
    stale, marked, fresh, kept = (root / name for name in ("avx2-stale", "avx2-marked", "generic-fresh", "avx2-kept"))
    for d in (stale, marked, fresh, kept):
        d.mkdir(mode=0o700)
        (d / "corelm_kernels.so").write_bytes(b"")
    (marked / ".used").touch()
    for d in (stale, marked, kept):
        os.utime(d, (old, old))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    os.utime(outside, (old, old))
    assert kernels.prune_builds(keep=kept) == [stale]
    assert not stale.exists() and marked.exists() and fresh.exists() and kept.exists() and outside.exists()
    kernels._mark_used(kept)
    for path in (kept / ".used", kept):
        os.utime(path, (old, old))
    assert kernels.prune_builds() == [kept]


def test_loading_a_build_marks_it_used():
    assert kernels.load(), kernels.load_error()
    marker = kernels._state["path"].parent / ".used"
    assert marker.exists() and time.time() - marker.stat().st_mtime < 86400


def test_the_tile_check_without_a_build_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, CORELM_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "corelm.kernels", "--amx-check"], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert f"python -m corelm.kernels --isa {kernels.isa()}" in out.stderr
