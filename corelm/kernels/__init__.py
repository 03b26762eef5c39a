"""corelm's C++ CPU kernels: quantized matmuls with int8 activations, and a fused decoder step.

PyTorch's packed-weight CPU kernels take bf16 activations and dequantize each weight group to floats;
llama.cpp instead quantizes the activation row to int8 once and multiplies integers (VPDPBUSD on
AVX-512 VNNI, VPMADDUBSW on AVX2). ``corelm_kernels.cpp`` does the same on the tensors corelm's
quantized layers hold (int4 nibbles in GGUF Q4_1's block order with bf16 scale/zero per group; int8
with bf16 scales per group or channel), with 15-bit activations (two int8 digits, two integer dot
products per block: 8-bit ones cost SmolLM2 1.5 points of top-1 agreement), and registers two
operators with ``torch.library``:

- ``torch.ops.corelm.qlinear(x (T, K) f32, q, s) -> (T, N) f32`` (from 64 rows on: panels of 32
  weight rows dequantized once and multiplied by every row in register tiles on corelm's pool, which
  reuses each weight T times; ``CORELM_GEMM_ROWS`` moves the threshold)
- float weights (fgemv.h): ``qlinear`` with an fp32 or bf16 ``(N, K)`` weight and empty scales (an
  ``nn.Linear``'s own tensor) computes ``x @ W^T`` in fp32, bf16 rows converted in registers; fewer than
  64 rows in a fixed per-output order (each row equals its lone call), from 64 on the fp32 panels
- ``torch.classes.corelm.DecoderStep``: a decoder (llama family, Gemma, OLMo 2, MoE) described once
  by named tensors; its ``forward`` runs N tokens, each with its own cache row and position, through
  the whole model in one call (a batched decode step, a prefill, a speculative verify), so a step
  costs no Python or dispatcher work per layer (see :mod:`corelm.generate.kernel_step`).

The many-row panel GEMM (``gemm.h``) has these arithmetics; :func:`gemm` names the one this build uses,
chosen from the flags the CPU declares (``CORELM_GEMM=fp32|int16|int8|amx|bf16|aten`` overrides it, read
at every call):

- ``int16``, the default of every AVX-512 VNNI build (``avx512vnni``, and ``avx512bf16`` for CPUs that
  also declare ``avx512_bf16``): the integer kernels' arithmetic as a GEMM, the format's integer weights
  (exact in int16) times the 15-bit tokens by VPDPWSSD, block scales in fp32: logits within 0.04 of
  the fp32 panels', every top-1 token equal, so a prompt's prefill computes what the decode kernels
  compute. On the 2-core Zen 4 its GEMM ran at 0.7-0.9x bf16's speed (the per-block scaling), 1.5-2x
  fp32's.
- ``amx``, the default where the CPU declares AMX-INT8 (Intel Sapphire Rapids and later) and Linux grants
  the process its tiles: the int16 arithmetic on tiles (``amx.h``), the 15-bit tokens as two byte digits
  and the weights as bytes, TDPBSUD per block of 32; its outputs equal the int16 panels' bit for bit
  (Q6_K, whose integers do not fit a byte, stays on the int16 panels). Before the tiles run by default, a
  small problem runs on them and on their C emulation in a child process (:func:`amx_verdict`, once
  per build and CPU, remembered in the build's cache directory): AMX is used only if the two agree to
  the bit, and a fault on the tiles costs a one-line warning instead of the command that met it.
  ``amx-emulated`` runs the same kernel with the tile instructions computed in C (any AVX-512 VNNI
  build; slow, for tests). Not yet measured on an AMX CPU.
- ``int8``, on request in the AVX-512 VNNI builds: llama.cpp's arithmetic, tokens rounded to 8-bit
  integers per block of 32 and one VPDPBUSD per four products (Q6_K stays on int16). Its GEMM ran
  1.4-1.6x int16's on the 2-core Intel Xeon, but on SmolLM2 (512 positions of held-out text) 8-bit
  tokens moved the logits by up to 1.7 from the fp32 panels' and kept only 96.7% of top-1 tokens.
- ``bf16``, on request (``CORELM_GEMM=bf16``) in the ``avx512bf16`` build (``-mavx512bf16``, built where
  the CPU declares ``avx512_bf16``: AMD Zen 4+, Intel Cooper Lake+, AMX Xeons): weights and tokens
  rounded to bf16 and multiplied by VDPBF16PS into fp32 sums, twice the multiply-adds of an fp32 FMA.
  Each product is within 2^-7 + 2^-16 (relative) of the fp32 one, so
  ``|y - x @ W^T| <= (2^-7 + 2^-16 + K 2^-24) |x| @ |W|^T``; on SmolLM2 (512 positions of held-out
  text) the logits moved by up to 0.44-0.51 from the fp32 panels', 98.8-99.2% of top-1 tokens equal
  (tests/test_gemm.py); it ran ~1.1x int16's prefill on the Zen 4, too little for that cost.
- ``fp32`` everywhere else (AVX2-only CPUs such as Zen 3 run bf16 at ~0.3 GFLOP/s): fp32 panels and FMA
  tiles, equal to ``x @ W^T`` to fp32 rounding.
- ``aten``, only on request: each matrix dequantized whole to bf16 and handed to ``at::mm`` (oneDNN,
  which would use AMX tiles on CPUs that have them; not yet measured on one). Its output is rounded to
  bf16 (SmolLM2: 97% of top-1 tokens equal), and on the 2-core Zen 4 its OpenMP GEMM ran 3-30x slower
  than the panels at 2 threads under a neighbour's load.

Decode steps stream every weight byte once, and their kernels prefetch the bytes ahead of the record
being read (:func:`prefetch`): on the 2-core Intel Xeon this took SmolLM2's 1-thread decode from 71 to
108 tok/s (Q4_1) and from 62 to 95 (Q4_K_M); float weights (fgemv.h) too, fp32 +5-16% and bf16 +23-34%
(two runs). It is on by default where it was measured (Intel CPUs,
4096 bytes ahead) and off elsewhere until measured there; ``CORELM_PREFETCH=<bytes>`` sets it (0: off).

The library is compiled with the system C++ compiler once per instruction set and source version,
into ``~/.cache/corelm/kernels/<isa>-<hash>/`` (``CORELM_CACHE`` moves the root; every directory is
private and checked before a library is loaded from it, see :mod:`corelm.cache`); ``make`` set-up
builds it (``python -m corelm.kernels``), and any later run loads it in milliseconds. Builds that no
process has loaded for 30 days (those of earlier corelm or torch versions) are removed when a new one
is made (:func:`prune_builds`). The
instruction set (``avx512bf16``, ``avx512vnni``, ``avx2`` or ``generic``) follows what ATen dispatches
to (so ``ATEN_CPU_CAPABILITY=avx2`` selects the AVX2 build on an AVX-512 machine) and what the CPU
reports. Without a compiler, :func:`load` returns False and the quantized layers use PyTorch's kernels.
``CORELM_KERNELS=0`` disables it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import torch

from corelm import cache
from corelm.cpu import cpu_flags

SOURCE = Path(__file__).with_name("corelm_kernels.cpp")  # the one translation unit; it includes the headers
HEADERS = ("pool.h", "dot.h", "kquants.h", "repack.h", "gemm.h", "amx.h", "fgemv.h", "qlinear.h", "attention.h",
           "decoder_step.h")
QK = 32  # values per block

_AVX512 = ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
FLAGS = {
    "avx512bf16": [*_AVX512, "-mavx512bf16"],
    "avx512vnni": _AVX512,
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}

_state: dict[str, object] = {"loaded": None, "error": None, "build_seconds": None, "path": None}


def isa() -> str:
    """The kernel build for this process: ``avx512bf16``, ``avx512vnni``, ``avx2`` or ``generic``.

    ATen's capability caps it (``ATEN_CPU_CAPABILITY=avx2`` gives the AVX2 build on an AVX-512 CPU);
    the CPU's flags confirm the extensions the build uses (``avx512bf16``: the AVX-512 VNNI build plus
    ``avx512_bf16``, for the bf16 panel GEMM).
    """
    forced = os.environ.get("CORELM_KERNELS_ISA")
    if forced in FLAGS:
        return forced
    if not sys.platform.startswith("linux") or os.uname().machine not in ("x86_64", "AMD64"):
        return "generic"
    cap, flags = torch.backends.cpu.get_cpu_capability(), cpu_flags()
    if cap == "AVX512" and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"} <= flags:
        return "avx512bf16" if "avx512_bf16" in flags else "avx512vnni"
    if cap in ("AVX512", "AVX2") and {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "generic"


def runnable_builds(flags: frozenset[str] | None = None) -> list[str]:
    """Every kernel build this CPU can run (its declared flags), from ``generic`` up: what the tests
    check each kernel on, one build per process (``CORELM_KERNELS_ISA``)."""
    flags = cpu_flags() if flags is None else flags
    levels = ["generic"]
    if {"avx2", "fma", "f16c"} <= flags:
        levels.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
            levels.append("avx512vnni")
            if "avx512_bf16" in flags:
                levels.append("avx512bf16")
    return levels


def gemm(level: str | None = None) -> str:
    """The panel GEMM's arithmetic for a build (default: this process's; see the module docstring):
    ``int16`` for the AVX-512 VNNI builds (``avx512vnni``, ``avx512bf16``), ``amx`` on those where the
    CPU declares AMX-INT8, ``fp32`` otherwise. ``CORELM_GEMM`` overrides it."""
    forced = os.environ.get("CORELM_GEMM")
    if forced:
        return forced
    vnni = (level or isa()) in ("avx512bf16", "avx512vnni")
    return ("amx" if amx_declared() and amx_verdict(level)["ok"] else "int16") if vnni else "fp32"


def amx_declared() -> bool:
    """Whether the CPU declares AMX-TILE and AMX-INT8 (its flags; whether the tiles work is :func:`amx_verdict`)."""
    return {"amx_tile", "amx_int8"} <= cpu_flags()


AMX_CHECK_SECONDS = 120


def amx_verdict(level: str | None = None) -> dict[str, object]:
    """Whether the AMX tiles run corelm's tile kernel right on this CPU, for one build (default: this
    process's): ``{"ok": bool, "reason": str}``.

    The tile kernel (``amx.h``) was written against the instruction set's rules and checked against its C
    emulation, and only a CPU that declares AMX can run it. So before any process uses the tiles by
    default, a child process runs ``torch.ops.corelm.amx_check()`` (a small problem on the tiles and on
    their emulation, compared to the bit). A crash, a hang or a disagreement there leaves the panel GEMM
    on AVX-512 with one warning, instead of killing the command that first met the tiles. The verdict is
    kept in the build's private cache directory, keyed by the CPU's model and flags, so the child runs
    once per build and machine.
    """
    level = level or isa()
    if level not in ("avx512bf16", "avx512vnni") or not amx_declared():
        return {"ok": False, "reason": "this CPU or build has no AMX tiles"}
    build_dir = cache_dir(level)  # hashes the sources: once
    if not (build_dir / "corelm_kernels.so").exists():
        return {"ok": False, "reason": f"the {level} kernels are not built"}
    path = build_dir / f"amx-{_cpu_key()}.json"
    try:
        cache.check_file(path)
        verdict = json.loads(path.read_text())
        if isinstance(verdict, dict) and isinstance(verdict.get("ok"), bool):
            return verdict
    except (OSError, ValueError):
        pass
    verdict = _run_amx_check(_amx_check_command(level))
    try:  # remembered where the cache can be written; otherwise the next process asks again
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(verdict, f)
        os.replace(tmp, path)
    except OSError:
        pass
    if not verdict["ok"]:
        print(f"corelm: {verdict['reason']}; the panel GEMM stays on AVX-512 (remembered in {path})",
              file=sys.stderr, flush=True)
    return verdict


def _cpu_key() -> str:
    """The CPU model and flags, hashed: a cache shared by machines of different CPUs keeps one verdict each."""
    model = ""
    try:
        model = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return hashlib.sha1(" ".join([model, *sorted(cpu_flags())]).encode()).hexdigest()[:12]


def _amx_check_command(level: str) -> list[str]:
    return [sys.executable, "-m", "corelm.kernels", "--amx-check", "--isa", level]


def _run_amx_check(cmd: list[str]) -> dict[str, object]:
    """Run the tile check in a child process and read its one-line answer (see :func:`amx_verdict`)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=AMX_CHECK_SECONDS, check=False,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"the AMX tile check did not finish in {AMX_CHECK_SECONDS} s"}
    except OSError as exc:  # the interpreter itself could not be started
        return {"ok": False, "reason": f"the AMX tile check could not start ({exc.strerror or exc})"}
    if proc.returncode < 0:
        import signal

        name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else "?"
        return {"ok": False, "reason": f"the AMX tile check crashed ({name})"}
    answer = proc.stdout.strip()
    if proc.returncode == 0 and answer == "0":
        return {"ok": True, "reason": "the tiles agreed with their C emulation to the bit"}
    reasons = {"1": "the OS did not grant this process the AMX tiles",
               "2": "the AMX tiles disagreed with their C emulation"}
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return {"ok": False, "reason": reasons.get(answer, f"the AMX tile check failed (exit {proc.returncode}: {last})")}


def cache_dir(level: str | None = None) -> Path:
    """Build directory for one instruction set and one version of the source, torch and compiler.

    Created ``0700`` and checked for owner and mode (:mod:`corelm.cache`): a library is only ever
    loaded from a directory nobody else can write to.
    """
    level = level or isa()
    key = hashlib.sha1()
    for part in (SOURCE.name, *HEADERS):
        key.update(SOURCE.with_name(part).read_bytes())
    key.update(" ".join([torch.__version__, _compiler() or "", *_flags(level)]).encode())
    return cache.cache_subdir("kernels", f"{level}-{key.hexdigest()[:12]}")


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@lru_cache(maxsize=1)
def assembler_has_amx() -> bool:
    """Whether this toolchain assembles AMX instructions (binutils 2.36+, 2021): amx.h writes them as inline
    assembly, and a build for an older assembler leaves the tiles out (``-DCORELM_NO_AMX``) rather than
    failing."""
    cxx = _compiler()
    if cxx is None:
        return False
    probe = 'int main() { asm volatile("tilerelease"); return 0; }'
    proc = subprocess.run([cxx, "-x", "c++", "-c", "-", "-o", os.devnull], input=probe, capture_output=True,
                          text=True, check=False)
    return proc.returncode == 0


def _flags(level: str) -> list[str]:
    """The compiler flags of a build: its instruction set's, and no tiles where the assembler has none."""
    vnni = level in ("avx512vnni", "avx512bf16")
    return [*FLAGS[level], *(["-DCORELM_NO_AMX"] if vnni and not assembler_has_amx() else [])]


def build(level: str | None = None, force: bool = False) -> Path:
    """Compile the kernels for ``level`` (default: this process's :func:`isa`); returns the library.

    Idempotent: a library already in the cache is returned as is. The compile goes to a temporary
    name first and is renamed into place, so concurrent builds never load half a file.

    Raises:
        RuntimeError: no C++ compiler, or the compile failed (the compiler's message is included).
    """
    from torch.utils import cpp_extension

    level = level or isa()
    out = cache_dir(level) / "corelm_kernels.so"
    if out.exists() and not force:
        cache.check_file(out)
        return out
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++, or set CXX)")
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           *_flags(level), *includes, str(SOURCE), "-o", tmp, f"-L{torch_lib}", "-lc10", "-ltorch_cpu",
           f"-Wl,-rpath,{torch_lib}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr.strip()[-2000:]}")
    os.replace(tmp, out)
    _state["build_seconds"] = time.perf_counter() - start
    prune_builds(keep=out.parent)
    return out


KEEP_UNUSED_DAYS = 30


def prune_builds(keep: Path | None = None, days: float = KEEP_UNUSED_DAYS) -> list[Path]:
    """Remove the kernel builds no process has loaded for ``days`` days; returns the directories removed.

    A build is one instruction set and one version of the source, torch and compiler, so every upgrade
    of corelm or torch leaves the previous builds behind (about 1 MB each). :func:`load` marks the build
    it loads (its ``.used`` file's time); :func:`build` prunes after each new build. ``keep`` is never
    removed, nor is anything that is not a plain directory of the kernels cache.
    """
    root = cache.cache_subdir("kernels")
    cutoff = time.time() - days * 86400
    removed = []
    for entry in root.iterdir():
        if entry == keep or entry.is_symlink() or not entry.is_dir():
            continue
        marker = entry / ".used"
        try:
            last = max(entry.stat().st_mtime, marker.stat().st_mtime if marker.exists() else 0.0)
        except OSError:
            continue
        if last < cutoff:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _mark_used(directory: Path) -> None:
    try:
        (directory / ".used").touch()
    except OSError:  # a read-only cache still loads
        pass


def load(build_if_missing: bool = True, background: bool = False) -> bool:
    """Make ``torch.ops.corelm`` available; False (with :func:`load_error`) when it cannot be.

    The answer is decided once per process (layers choose their kernels when they are made).

    Args:
        build_if_missing: compile the library when this machine's cache has none (~10 s, once).
        background: instead of waiting for that compile, start it in a background process and
            return False: this process keeps PyTorch's kernels, the next one finds the library.
    """
    if _state["loaded"] is not None:
        return bool(_state["loaded"])
    if os.environ.get("CORELM_KERNELS", "1") == "0":
        _state["loaded"], _state["error"] = False, "disabled by CORELM_KERNELS=0"
        return False
    try:
        path = cache_dir() / "corelm_kernels.so"
        if not path.exists():
            if not build_if_missing:
                raise RuntimeError(f"no kernel build in {path.parent}")
            if background:
                _build_in_background()
                raise RuntimeError("the C++ kernels are being compiled in the background (once per machine)")
            print(f"corelm: compiling the C++ kernels for {isa()} (once per machine) ...", file=sys.stderr,
                  flush=True)
            path = build()
        cache.check_file(path)  # never load a library another user could have written
        torch.ops.load_library(str(path))
        _register_fakes()
        _state["loaded"], _state["path"] = True, path
        _mark_used(path.parent)  # prune_builds keeps what is in use
        if os.environ.get("CORELM_GEMM", "") in ("", "amx") and amx_verdict()["ok"]:
            torch.ops.corelm.amx_enable()  # the default (or the requested) panel GEMM runs on the tiles
    except (RuntimeError, OSError) as exc:  # PermissionError: a cache file or directory failed its check
        _state["loaded"], _state["error"] = False, str(exc)
    return bool(_state["loaded"])


def _build_in_background() -> None:
    """Start ``python -m corelm.kernels`` detached, unless one started in the last 10 minutes."""
    if _compiler() is None:
        return
    lock = cache_dir() / ".building"
    try:
        if time.time() - lock.stat().st_mtime < 600:
            return
        lock.unlink()
    except FileNotFoundError:
        pass
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # another process won the race
    os.close(fd)
    print(f"corelm: compiling the C++ kernels for {isa()} in the background (once per machine); this run "
          "uses PyTorch's kernels", file=sys.stderr, flush=True)
    # lowest priority: on a 2-core machine the compiler must not take a core from this run's threads
    nice = [shutil.which("nice"), "-n", "19"] if shutil.which("nice") else []
    subprocess.Popen([*nice, sys.executable, "-m", "corelm.kernels", "--lock", str(lock)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def prefetch() -> int:
    """How many bytes ahead of the weight record being read the decode kernels prefetch (0: not at all):
    4096 on Intel CPUs, 0 elsewhere, ``CORELM_PREFETCH`` overriding it (read at every call); 0 when the
    kernels are not built (PyTorch's kernels prefetch nothing of corelm's)."""
    return int(torch.ops.corelm.prefetch()) if load(build_if_missing=False) else 0


def check_settings() -> None:
    """Refuse, in one line each, the kernel settings of the environment that are not understood:
    ``CORELM_GEMM``, ``CORELM_GEMM_ROWS`` and ``CORELM_PREFETCH`` (the C++ kernels read them at every
    call, so a bad value would otherwise fail mid-generation or, for short prompts, not at all)."""
    from corelm.errors import CorelmError

    rows = os.environ.get("CORELM_GEMM_ROWS", "").strip()
    if rows and not (rows.isdigit() and int(rows) >= 1):
        raise CorelmError(f"CORELM_GEMM_ROWS={rows!r}: give the number of tokens (1 or more) from which a "
                          "matmul runs on the panel GEMM, or leave it unset")
    if not load(build_if_missing=False):
        return
    for name, op in (("CORELM_GEMM", torch.ops.corelm.gemm), ("CORELM_PREFETCH", torch.ops.corelm.prefetch)):
        try:
            op()
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
            raise CorelmError(msg if msg.startswith(name) else f"{name}={os.environ.get(name)!r}: {msg}") from None


def load_error() -> str | None:
    """Why :func:`load` returned False (None when it succeeded or was not called)."""
    return _state["error"]  # type: ignore[return-value]


def _register_fakes() -> None:
    # Shapes for torch.compile / meta tensors: the operators are opaque kernels to the compiler.
    @torch.library.register_fake("corelm::qlinear")
    def _(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("corelm::qlinear_repacked")
    def _(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("corelm::qlinear_blocks")
    def _(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], blocks.shape[0])

    @torch.library.register_fake("corelm::qlinear_packed")
    def _(x: torch.Tensor, packed: torch.Tensor, ggml_type: int, n: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], n)


# --------------------------------------------------------------------------------------------------
# The int4 nibble order the kernels read, and a pure-PyTorch reference of their arithmetic
# --------------------------------------------------------------------------------------------------


def pack_blocks(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8 in GGUF Q4_1's order: in every block of 32 columns,
    byte ``j`` holds column ``j`` in its low nibble and column ``j + 16`` in its high nibble."""
    n, k = q.shape
    qb = q.to(torch.uint8).reshape(n, k // QK, QK)
    return (qb[..., : QK // 2] | (qb[..., QK // 2:] << 4)).reshape(n, k // 2).contiguous()


def unpack_blocks(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_blocks`: (N, K/2) uint8 -> (N, K) values 0..15."""
    n = packed.shape[0]
    raw = packed.reshape(n, -1, QK // 2)
    return torch.cat([raw & 0xF, raw >> 4], dim=-1).reshape(n, -1)


def _block_scales(q: torch.Tensor, s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer weights (N, K/32, 32), scale per block (N, K/32) and, for int4, ``m`` per block."""
    n, nb = q.shape[0], k // QK
    if q.dtype == torch.uint8:  # int4: w = (q - 8) * scale + zero = q * scale + (zero - 8 * scale)
        qv = unpack_blocks(q).reshape(n, nb, QK)
        scale, zero = s[..., 0].float(), s[..., 1].float()
        rep = nb // scale.shape[1]
        scale, m = scale.repeat_interleave(rep, 1), (zero - 8.0 * scale).repeat_interleave(rep, 1)
        return qv, scale, m
    scale = s.float() if s.dim() == 2 else s.float()[:, None]
    return q.reshape(n, nb, QK), scale.repeat_interleave(nb // scale.shape[1], 1), None


def dequantize(q: torch.Tensor, s: torch.Tensor, k: int) -> torch.Tensor:
    """The float (N, K) weight of a kernel-layout matrix."""
    qv, scale, m = _block_scales(q, s, k)
    w = qv.float() * scale[..., None] + (m[..., None] if m is not None else 0.0)
    return w.reshape(q.shape[0], k)


ACT_MAX = 127 * 128  # activations are 15-bit integers, two int8 digits in the kernels


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, K) float -> integer values (T, K/32, 32) in +-16256, scales ``d`` and ``d * sum(a)`` (T, K/32)."""
    xb = x.float().reshape(x.shape[0], -1, QK)
    d = xb.abs().amax(-1) / ACT_MAX
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    a = torch.round(xb * inv[..., None])
    return a, d, d * a.sum(-1)


def reference_qlinear(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """What ``torch.ops.corelm.qlinear`` computes for fewer than 64 rows, in PyTorch: 15-bit integer
    activations, exact integer block dot products, then the float scales. (T, K) f32 -> (T, N) f32.
    From 64 rows on the kernel multiplies fp32 ``x`` with the dequantized weights (a GEMM)."""
    k = x.shape[1]
    qv, scale, m = _block_scales(q, s, k)
    a, da, sa = quantize_activations(x)
    sumi = torch.einsum("tbj,nbj->tnb", a.double(), qv.double())  # exact integers
    y = (sumi.float() * scale[None] * da[:, None]).sum(-1)
    if m is not None:
        y = y + (m[None] * sa[:, None]).sum(-1)
    return y
