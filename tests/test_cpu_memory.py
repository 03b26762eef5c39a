"""corelm.cpu.keep_freed_memory: a training step's large tensors reuse freed memory instead of faulting in new pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Counts the minor page faults of three "steps" that each allocate and free a 48 MiB and a 4 MiB tensor,
# after six warm-up steps (glibc takes a few to settle its heap), with or without keep_freed_memory() first,
# in a fresh process: the setting is process-wide, and corelm's training loop makes it before its first step.
SCRIPT = """
import resource, sys, torch
from corelm.cpu import keep_freed_memory

kept = keep_freed_memory() if sys.argv[1] == "keep" else None

def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        x, y = torch.ones(12 * 2**20), torch.ones(2**20)
        del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

faults(), faults()
print(kept, faults())
"""


def page_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    _, default = page_faults("default")
    assert default > 3 * 10_000  # glibc's default: each 48 MiB block is a fresh mmap, 12,288 pages faulted
    kept, after = page_faults("keep")
    assert kept == "True"
    assert after < 1_000
