"""Files corelm writes for the user follow the user's umask (the safetensors writer alone would make
them 0600, so a converted or quantized model could not be shared with the group)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from corelm.cli import main
from tests.test_gguf import write_tiny_gguf


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_written_weights_follow_the_umask(command: str, tmp_path: Path, umask_022: None) -> None:
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src)
    out = tmp_path / "out"
    assert main([command, str(src), str(out)]) == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
