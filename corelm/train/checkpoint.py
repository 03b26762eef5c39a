"""Checkpoints that lose nothing, written atomically.

Layout of one checkpoint (``RUN/checkpoints/step-000100/``)::

    config.json, model.safetensors, tokenizer.json ...   the model, as the caller's export writes it
    trainer_state/
        weights.safetensors   trainable parameters, corelm names (exact resume, also for adapters)
        optimizer.pt          optimizer state keyed by parameter name (loads under any parallelism)
        rng.pt                torch / CUDA / numpy / python RNG state of every rank
        scaler.pt             fp16 loss-scaler state (fp16-mixed only)
        state.json            step, data position, counters, the caller's extra state, the run config
        files.json            size and sha256 of every file above: written last, checked on load

Writing: everything goes to ``checkpoints/.step-000100.tmp``, each file is fsync'ed, then the
directory is renamed into place (one atomic rename) and the parent fsync'ed. Only after that are old
checkpoints beyond ``keep_last`` deleted, and the run directory's own model files re-pointed (hard
links) at the new checkpoint, so ``RUN/`` itself is always a loadable model directory.
Reading: :func:`latest_checkpoint` returns the newest checkpoint whose ``files.json`` matches its
files, skipping (and reporting) a partial or corrupt one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from corelm.errors import CorelmError

STATE_DIR = "trainer_state"
_STEP_RE = re.compile(r"^step-(\d+)$")

ExportFn = Callable[[dict[str, torch.Tensor], Path], None]


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop names that alias an earlier tensor (tied embeddings): safetensors stores each storage once."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def default_export(state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Write ``model.safetensors`` with the model's own parameter names."""
    save_file(unique_tensors(state), str(out_dir / "model.safetensors"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Finished (renamed-into-place) checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return sorted(found)


def verify_checkpoint(path: Path) -> None:
    """Check every file against ``files.json``.

    Raises:
        CorelmError: naming the missing, truncated or altered file.
    """
    index = Path(path) / STATE_DIR / "files.json"
    if not index.is_file():
        raise CorelmError(f"checkpoint {path} is incomplete: {STATE_DIR}/files.json is missing")
    try:
        files = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise CorelmError(f"checkpoint {path} is corrupt: cannot parse {index.name} ({exc})") from None
    for rel, meta in files.items():
        f = Path(path) / rel
        if not f.is_file():
            raise CorelmError(f"checkpoint {path} is incomplete: {rel} is missing")
        if f.stat().st_size != meta["size"]:
            raise CorelmError(f"checkpoint {path} is corrupt: {rel} has {f.stat().st_size} bytes, "
                              f"expected {meta['size']}")
        if _sha256(f) != meta["sha256"]:
            raise CorelmError(f"checkpoint {path} is corrupt: {rel} does not match its recorded sha256")


def latest_checkpoint(path: str | Path) -> Path | None:
    """Newest complete checkpoint of a run directory (or ``path`` itself if it is a checkpoint).

    Partial or corrupt checkpoints are skipped with a warning that names them.
    """
    path = Path(path)
    if (path / STATE_DIR).is_dir() and path.parent.name == "checkpoints":
        verify_checkpoint(path)
        return path
    for _, ckpt in reversed(checkpoint_dirs(path)):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CorelmError as exc:
            warnings.warn(f"skipping checkpoint: {exc}", stacklevel=2)
    return None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    scaler: torch.amp.GradScaler | None = None,
    export_fn: ExportFn | None = None,
    keep_last: int = 3,
    rank: int = 0,
    world_size: int = 1,
) -> Path | None:
    """Write checkpoint ``step`` of ``model`` (the unwrapped, possibly FSDP-sharded module).

    Collective under torch.distributed: every rank must call it; only rank 0 writes.

    Args:
        run_dir: the run directory (``--out``).
        step: optimizer steps done.
        model: the model (not a DDP/compile wrapper); its full state is gathered from shards.
        optimizer: saved keyed by parameter names, so it reloads under another parallelism.
        state: JSON-able trainer state (data position, counters, extra state, config).
        scaler: fp16 loss scaler, if any.
        export_fn: writes the loadable model files from the full state dict (default: one
            ``model.safetensors`` with corelm names).
        keep_last: how many checkpoints to keep (older ones are removed after this one is durable).

    Returns:
        The checkpoint directory on rank 0, ``None`` elsewhere.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    distributed = world_size > 1
    opts = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    full = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    rngs = [rng_state()]
    if distributed:
        import torch.distributed as dist

        gathered: list[Any] | None = [None] * world_size if rank == 0 else None
        dist.gather_object(rngs[0], gathered, dst=0)
        rngs = gathered or []
    if rank != 0:
        _barrier(distributed)
        return None

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.tmp"
    for stale in root.glob(".step-*.tmp"):  # left by a writer that crashed mid-checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    (tmp / STATE_DIR).mkdir(parents=True)
    try:
        (export_fn or default_export)(full, tmp)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        save_file({n: full[n].detach().contiguous() for n in trainable}, str(tmp / STATE_DIR / "weights.safetensors"))
        torch.save(optim_state, tmp / STATE_DIR / "optimizer.pt")
        torch.save(rngs, tmp / STATE_DIR / "rng.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / STATE_DIR / "scaler.pt")
        (tmp / STATE_DIR / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
        files = {}
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        index = tmp / STATE_DIR / "files.json"
        index.write_text(json.dumps(files, indent=1))
        with open(index, "rb+") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp / STATE_DIR)
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # re-saving a step (e.g. interrupted right after a scheduled save)
            old = root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _barrier(distributed)
        raise
    _link_latest(Path(run_dir), final)
    for _, old in checkpoint_dirs(Path(run_dir))[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(distributed)
    return final


def _link_latest(run_dir: Path, ckpt: Path) -> None:
    """Point the run directory's top-level model files at ``ckpt`` (hard links; copies if unsupported)."""
    for src in ckpt.iterdir():
        if not src.is_file():
            continue
        dst, tmp = run_dir / src.name, run_dir / f".{src.name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    (run_dir / "latest_checkpoint").write_text(ckpt.name + "\n")


def _barrier(distributed: bool) -> None:
    if distributed:
        import torch.distributed as dist

        dist.barrier()


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    rank: int = 0,
    world_size: int = 1,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``model`` (and optimizer, scaler, RNG).

    Works for any parallelism on either side: weights and optimizer state are full tensors keyed by
    name and are re-sharded on load.

    Returns:
        The trainer state (``step``, data position, counters, extra state).

    Raises:
        CorelmError: the checkpoint is partial/corrupt, or does not match the model.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    verify_checkpoint(path)
    sd_dir = path / STATE_DIR
    try:
        weights = load_file(str(sd_dir / "weights.safetensors"))
        state = json.loads((sd_dir / "state.json").read_text())
    except Exception as exc:  # noqa: BLE001 - any decode failure is a bad file
        raise CorelmError(f"cannot read checkpoint {path}: {exc}") from None
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != names:
        missing, unexpected = sorted(names - set(weights)), sorted(set(weights) - names)
        raise CorelmError(f"checkpoint {path} does not match the model's trainable parameters "
                          f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    if optimizer is not None:
        optim_state = torch.load(sd_dir / "optimizer.pt", map_location="cpu", weights_only=False)
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
    if scaler is not None and (sd_dir / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(sd_dir / "scaler.pt", weights_only=False))
    if restore_rng:
        rngs = torch.load(sd_dir / "rng.pt", weights_only=False)
        if len(rngs) == world_size:
            set_rng_state(rngs[rank])
        else:
            warnings.warn(f"checkpoint was written by {len(rngs)} processes, resuming with {world_size}: "
                          "random streams restart from rank 0's state", stacklevel=2)
            set_rng_state(rngs[0])
    return state
