"""corelm's caches hold code it loads (the C++ kernels, inductor's graphs): they must be private and
checked, so nobody else can plant a library in them (SECURITY.md, "Caches")."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from corelm import cache

OTHER_UID = 12345


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty CORELM_CACHE and TMPDIR under tmp_path."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("CORELM_CACHE", str(tmp_path / "home-cache" / "corelm"))
    monkeypatch.setattr(cache, "_state", {"root": None, "skipped": []})
    return tmp_path


def _plant(path: Path) -> None:
    """Make ``path`` someone else's: owned by another uid where we may chown (root), else world-writable."""
    path.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)
    os.chmod(path, 0o777)


def test_cache_directories_are_created_private(fresh):
    root = cache.cache_root()
    assert root == fresh / "home-cache" / "corelm"
    sub = cache.cache_subdir("kernels", "avx2-abc")
    for d in (root, root / "kernels", sub):
        assert _mode(d) == 0o700
    assert cache.skipped() == []


def test_an_existing_cache_of_ours_is_tightened_to_0700(fresh):
    root = fresh / "home-cache" / "corelm"
    root.mkdir(parents=True, mode=0o755)
    os.chmod(root, 0o755)
    assert cache.cache_root() == root and _mode(root) == 0o700


def test_a_writable_by_others_root_is_skipped_for_a_private_fallback(fresh):
    _plant(fresh / "home-cache" / "corelm")
    root = cache.cache_root()
    assert root == fresh / "tmp" / f"corelm-cache-{os.getuid()}"
    assert _mode(root) == 0o700 and os.lstat(root).st_uid == os.getuid()
    assert any("corelm" in why for why in cache.skipped())


def test_a_planted_fallback_is_never_used(fresh):
    _plant(fresh / "home-cache" / "corelm")
    planted = fresh / "tmp" / f"corelm-cache-{os.getuid()}"
    _plant(planted)
    root = cache.cache_root()
    assert root != planted and planted not in root.parents  # (a fresh mkdtemp name may share its prefix)
    assert _mode(root) == 0o700 and os.lstat(root).st_uid == os.getuid()
    assert len(cache.skipped()) == 2


def test_a_symlinked_cache_directory_is_refused(fresh):
    target = fresh / "elsewhere"
    target.mkdir(mode=0o700)
    link = fresh / "home-cache" / "corelm"
    link.parent.mkdir()
    link.symlink_to(target)
    with pytest.raises(PermissionError, match="symlink"):
        cache.check_private(link)
    assert cache.cache_root() != link


def test_check_file_refuses_a_library_others_can_write(fresh):
    d = cache.cache_subdir("kernels", "x")
    lib = d / "corelm_kernels.so"
    lib.write_bytes(b"\x7fELF")
    os.chmod(lib, 0o644)
    cache.check_file(lib)
    os.chmod(lib, 0o666)
    with pytest.raises(PermissionError, match="writable by other users"):
        cache.check_file(lib)
    if os.getuid() == 0:
        os.chmod(lib, 0o644)
        os.chown(lib, OTHER_UID, OTHER_UID)
        with pytest.raises(PermissionError, match="owned by uid"):
            cache.check_file(lib)


_LOAD = """
import json, sys
from corelm import kernels
ok = kernels.load(build_if_missing=False)
try:
    where = str(kernels.cache_dir())
except PermissionError:
    where = None
print(json.dumps({"ok": ok, "error": kernels.load_error(), "dir": where}))
"""


@pytest.mark.parametrize("how", ["world-writable-dir", "foreign-file"])
def test_a_planted_kernel_library_is_not_loaded(tmp_path, how):
    """A fresh process whose kernel directory holds a library someone else could have written refuses
    to load it (it would run that library's constructors in this process)."""
    if how == "foreign-file" and os.getuid() != 0:
        pytest.skip("chown to another uid needs root")
    env = {**os.environ, "CORELM_CACHE": str(tmp_path / "c"), "TMPDIR": str(tmp_path)}
    where = json.loads(subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True,
                                      check=True).stdout)["dir"]
    kdir = Path(where)
    marker = tmp_path / "constructor-ran"
    # A real shared library whose constructor would leave a marker, if it were ever loaded.
    src = tmp_path / "evil.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void f(void) '
                   f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    lib = kdir / "corelm_kernels.so"
    subprocess.run(["gcc", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    if how == "world-writable-dir":
        os.chmod(kdir, 0o777)
    else:
        os.chown(lib, OTHER_UID, OTHER_UID)
    out = json.loads(subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    assert not marker.exists()
    assert out["ok"] is False
    assert ("writable by other users" if how == "world-writable-dir" else "owned by uid") in out["error"]
