"""What this CPU declares: the feature flags that choose kernels and the default dtype.

Choices made from the flags are the same on every run of the same machine (a timing probe is not: on
a shared 2-core machine it flipped between fp32 and bf16 from one run to the next, and the two dtypes
give different greedy text after a few dozen tokens).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# Native bf16 arithmetic: AVX512_BF16 (VDPBF16PS; Intel Cooper Lake+, AMD Zen 4+) or AMX-BF16 tiles
# (Intel Sapphire Rapids+). Without them oneDNN emulates bf16 matmuls through fp32 conversions, which
# measured ~0.3 GFLOP/s on an AVX2-only Zen 3 (docs: the benchmarks page) against ~136 in fp32.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ``flags`` line of /proc/cpuinfo (empty where there is none: non-Linux, some containers)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True when the CPU declares bf16 arithmetic (:data:`BF16_FLAGS`)."""
    return any(f in (cpu_flags() if flags is None else flags) for f in BF16_FLAGS)


def physical_cores() -> int:
    """Cores this process may run on, counting each physical core once (SMT siblings share one core's
    execution units: a second thread per core slows a bandwidth-bound decode down rather than up)."""
    import os

    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        block: dict[str, str] = {}
        for line in [*Path("/proc/cpuinfo").read_text().splitlines(), ""]:
            if line.strip():
                key, _, value = line.partition(":")
                block[key.strip()] = value.strip()
            elif block:
                if int(block.get("processor", -1)) in allowed:
                    cores.add((block.get("physical id", "0"), block.get("core id", block.get("processor", ""))))
                block = {}
    except (OSError, ValueError):
        pass
    return max(1, len(cores) or len(allowed))


def default_threads() -> int:
    """torch threads when a command is given no ``--threads``: ``OMP_NUM_THREADS`` if set, else
    :func:`physical_cores`."""
    import os

    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return physical_cores()


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    By default glibc serves every block above 32 MiB (and, until its threshold adapts, above 128 KiB) with a
    fresh ``mmap`` and unmaps it on ``free``; the kernel zero-fills each page again on first touch. A
    training step allocates the same large tensors every time (the logits of GPT-2 with an 8192-token
    vocabulary at B=8, T=256 are 33 MiB in bf16 and 67 MiB in fp32), so it paid ~110k page faults, ~450 MB
    of zeroing, per step: 12-14% of a bf16-mixed step's CPU time on an AMD Zen 4 (benchmarks/train.py). Raising
    the mmap and trim thresholds to 1 GiB keeps those blocks in the heap; the resident set stays at the
    step's high-water mark, which a training run reaches on every step anyway. Process-wide, once.

    Returns:
        True when glibc took both settings; False elsewhere (another C library, a platform without libc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the kernel (glibc's ``malloc_trim(0)``).

    Quantizing a model at load frees its float weights matrix by matrix; glibc keeps most of those blocks in
    its heap (its mmap threshold adapts upwards as large blocks are freed), so the resident set stays near the
    float model's. Measured on ``corelm.load("smollm2-135m-instruct", quantize="int4")`` followed by a
    32-token generation (AMD Zen 4): resident 650 MB without the trim, 392 MB with it.

    Returns:
        True when glibc trimmed something; False otherwise (nothing to give back, or another C library).
    """
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
