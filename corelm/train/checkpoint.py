"""Checkpoints that lose nothing, written atomically, and that hold no code.

Layout of one checkpoint (``RUN/checkpoints/step-000100/``)::

    config.json, model.safetensors, tokenizer.json ...   the model, as the caller's export writes it
    trainer_state/
        weights.safetensors   trainable parameters, corelm names (exact resume, also for adapters)
        optimizer.safetensors optimizer state tensors, ``state.{parameter name}.{key}`` (e.g. ``exp_avg``)
        optimizer.json        param groups (hyperparameters, parameter names) and non-tensor state
        rng.safetensors       torch CPU / CUDA generator states of every rank (``rank0.torch``, ``rank0.cuda.0``)
        rng.json              python ``random`` and numpy MT19937 states of every rank, as lists
        scaler.json           fp16 loss-scaler scalars (fp16-mixed only)
        state.json            step, data position, counters, the caller's extra state, the run config
        files.json            size and sha256 of every file above: written last, checked on load

Every file is safetensors or JSON, so reading a checkpoint can give wrong numbers but never runs code:
a pickle (``torch.save``) would execute whatever its ``__reduce__`` names. Checkpoints of the earlier
format (``optimizer.pt``, ``rng.pt``, ``scaler.pt``) are refused, never unpickled (SECURITY.md).
Optimizer state is keyed by parameter name, so it reloads under any parallelism.

Across layouts (save under TP x 2, resume under FSDP x 2, PP x TP or one process): the weights and optimizer
state are gathered to full tensors on save and re-sharded on load by ``torch.distributed.checkpoint.state_dict``
(``get_model_state_dict`` / ``set_model_state_dict`` with ``full_state_dict=True``), so a checkpoint does not
depend on the layout that wrote it. corelm does not write DCP's own sharded format: its ``FileSystemWriter``
pickles the ``.metadata`` file and its reader unpickles it (``torch/distributed/checkpoint/filesystem.py``,
torch 2.13), and DCP's pickle-free ``HuggingFaceStorageWriter`` holds tensors only (no optimizer hyperparameters
or trainer state). The price of full tensors: rank 0 holds the whole model and optimizer state while saving.

Writing: everything goes to ``checkpoints/.step-000100.tmp``, each file is fsync'ed, then the
directory is renamed into place (one atomic rename) and the parent fsync'ed. Only after that are old
checkpoints beyond ``keep_last`` deleted, and the run directory's own model files re-pointed (hard
links) at the new checkpoint, so ``RUN/`` itself is always a loadable model directory.
Reading: :func:`latest_checkpoint` returns the newest checkpoint whose ``files.json`` matches its
files, skipping (and reporting) a partial or corrupt one. ``files.json`` guards against crashes and
truncation, not against an attacker (who can recompute it); the formats are what make loading safe.
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _json_value(value: Any, what: str) -> Any:
    """``value`` as JSON (tuples become lists). Anything else is not checkpointable state."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, what) for v in value]
    raise TypeError(f"{what} is a {type(value).__name__}: a checkpoint holds only tensors and JSON values")


def encode_optimizer_state(optim_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a name-keyed optimizer state dict into named tensors and a JSON document.

    Args:
        optim_state: ``{"state": {param name: {key: tensor | scalar}}, "param_groups": [...]}`` as
            ``get_optimizer_state_dict`` returns it (full tensors, ``params`` given as names).

    Returns:
        ``(tensors, doc)``: tensors named ``state.{param name}.{key}``; ``doc["state"]`` mirrors the state
        with ``{"tensor": name}`` in place of each tensor, ``doc["param_groups"]`` is the groups as JSON.
    """
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for param, entry in optim_state["state"].items():
        state[param] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                name = f"state.{param}.{key}"
                if name in tensors:
                    raise ValueError(f"optimizer state names collide at {name!r}")
                tensors[name] = value.detach().cpu().contiguous()
                state[param][key] = {"tensor": name}
            else:
                state[param][key] = _json_value(value, f"optimizer state {param}.{key}")
    groups = [{k: _json_value(v, f"optimizer param group {k!r}") for k, v in g.items()}
              for g in optim_state["param_groups"]]
    return tensors, {"state": state, "param_groups": groups}


def decode_optimizer_state(tensors: dict[str, torch.Tensor], doc: dict[str, Any],
                           optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """Inverse of :func:`encode_optimizer_state`, checked against the live ``optimizer`` and ``model``.

    JSON has no tuples: a hyperparameter that is a tuple in the live optimizer (AdamW's ``betas``) comes
    back as a list of the same length (``set_optimizer_state_dict`` turns tuples into lists anyway;
    :func:`load_checkpoint` makes them tuples again).

    Raises:
        ValueError / KeyError / TypeError: the document does not describe this optimizer.
    """
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight may go by either name
    state: dict[str, dict[str, Any]] = {}
    for param, entry in doc["state"].items():
        if param not in params:
            raise ValueError(f"state for {param!r}, which is not a parameter of the model")
        state[param] = {}
        for key, value in entry.items():
            if isinstance(value, dict):
                t = tensors[value["tensor"]]
                if t.ndim and t.shape != params[param].shape:  # moments have the parameter's shape
                    raise ValueError(f"{param}.{key} has shape {tuple(t.shape)}, "
                                     f"the parameter {tuple(params[param].shape)}")
                value = t
            state[param][key] = value
    saved_groups, live_groups = doc["param_groups"], optimizer.param_groups
    if len(saved_groups) != len(live_groups):
        raise ValueError(f"{len(saved_groups)} parameter groups, the optimizer has {len(live_groups)}")
    groups = []
    for saved, live in zip(saved_groups, live_groups):
        group = {}
        for key, value in saved.items():
            ref = live.get(key)
            if key == "params":
                if not (isinstance(value, list) and all(isinstance(n, str) and n in params for n in value)):
                    raise ValueError("a parameter group lists names that are not parameters of the model")
            elif isinstance(ref, tuple):
                if not (isinstance(value, list) and len(value) == len(ref)):
                    raise TypeError(f"param group {key!r} is {value!r}, expected {len(ref)} values")
            elif isinstance(ref, (int, float)) and not isinstance(value, (int, float)):
                raise TypeError(f"param group {key!r} is {value!r}, expected a number")
            group[key] = value
        groups.append(group)
    return {"state": state, "param_groups": groups}


def encode_rng_states(rngs: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The :func:`rng_state` of every rank as named tensors (torch, CUDA) and JSON (python, numpy)."""
    tensors: dict[str, torch.Tensor] = {}
    ranks = []
    for r, s in enumerate(rngs):
        tensors[f"rank{r}.torch"] = s["torch"]
        for i, t in enumerate(s.get("cuda", [])):
            tensors[f"rank{r}.cuda.{i}"] = t.cpu()
        version, internal, gauss_next = s["python"]
        bit_generator, key, pos, has_gauss, cached_gaussian = s["numpy"]
        ranks.append({
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
            "numpy": {"bit_generator": bit_generator, "key": key.tolist(), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "cuda_devices": len(s.get("cuda", [])),
        })
    return tensors, {"ranks": ranks}


def _numpy_state(doc: dict[str, Any]) -> tuple:
    """numpy's legacy MT19937 state, range-checked: numpy trusts ``pos`` as an index into the key, and a
    crafted one reads outside it (a segfault, not an exception)."""
    key, pos, has_gauss = doc["key"], doc["pos"], doc["has_gauss"]
    if doc["bit_generator"] != "MT19937":
        raise ValueError(f"numpy bit generator {doc['bit_generator']!r}, expected 'MT19937'")
    if not (isinstance(key, list) and len(key) == 624 and all(type(k) is int and 0 <= k < 2**32 for k in key)):
        raise ValueError("numpy state key is not 624 unsigned 32-bit integers")
    if not (type(pos) is int and 0 <= pos <= 624 and has_gauss in (0, 1)):
        raise ValueError(f"numpy state position {pos!r} is outside 0..624")
    return ("MT19937", np.asarray(key, dtype=np.uint32), pos, int(has_gauss), float(doc["cached_gaussian"]))


def decode_rng_states(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Inverse of :func:`encode_rng_states`; each state is tried on a scratch generator first, so a bad one
    raises here and leaves the process's generators untouched."""
    rngs = []
    for r, s in enumerate(doc["ranks"]):
        py, npy = s["python"], s["numpy"]
        state = {
            "torch": tensors[f"rank{r}.torch"],
            "python": (py["version"], tuple(py["state"]), py["gauss_next"]),
            "numpy": _numpy_state(npy),
        }
        torch.Generator().set_state(state["torch"])
        random.Random().setstate(state["python"])
        np.random.RandomState().set_state(state["numpy"])
        if s["cuda_devices"]:
            state["cuda"] = [tensors[f"rank{r}.cuda.{i}"] for i in range(s["cuda_devices"])]
        rngs.append(state)
    if not rngs:
        raise ValueError("no RNG state")
    return rngs


def decode_scaler_state(doc: Any, scaler: torch.amp.GradScaler) -> dict[str, float | int]:
    """The loss scaler's scalars, checked against the keys the live ``scaler`` has."""
    expected = set(scaler.state_dict())
    if not isinstance(doc, dict) or not expected <= set(doc):
        raise ValueError(f"expected the keys {sorted(expected)}")
    for key, value in doc.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key} is {value!r}, expected a number")
    return doc


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=1))


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
        files = json.loads(index.read_bytes())
    except (ValueError, RecursionError) as exc:  # not JSON, or not UTF-8
        raise CorelmError(f"checkpoint {path} is corrupt: cannot parse {STATE_DIR}/{index.name} "
                          f"({_one_line(exc)})") from None
    well_formed = isinstance(files, dict) and all(
        isinstance(meta, dict) and type(meta.get("size")) is int and isinstance(meta.get("sha256"), str)
        and not Path(rel).is_absolute() and ".." not in Path(rel).parts for rel, meta in files.items())
    if not well_formed:
        raise CorelmError(f"checkpoint {path} is corrupt: {STATE_DIR}/{index.name} is not a list of "
                          "files inside the checkpoint with their size and sha256")
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
        tensors, doc = encode_optimizer_state(optim_state)
        save_file(tensors, str(tmp / STATE_DIR / "optimizer.safetensors"))
        _write_json(tmp / STATE_DIR / "optimizer.json", doc)
        tensors, doc = encode_rng_states(rngs)
        save_file(tensors, str(tmp / STATE_DIR / "rng.safetensors"))
        _write_json(tmp / STATE_DIR / "rng.json", doc)
        if scaler is not None:
            _write_json(tmp / STATE_DIR / "scaler.json", scaler.state_dict())
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
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _barrier(distributed)
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":  # full, read-only, forbidden disk
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).split(" at path")[0]
            raise CorelmError(f"cannot write the checkpoint of step {step} under {root}: {reason}; the previous "
                              "checkpoint is kept") from None
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


# read and check everything, then restore: the order is the point (a bad file fails before any RNG moves)
def load_checkpoint(  # noqa: C901
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
        CorelmError: the checkpoint is partial/corrupt, in the old pickled format, or does not match the
            model/optimizer/scaler (one line naming the file).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    sd_dir = path / STATE_DIR
    legacy = sorted(f.name for f in sd_dir.glob("*.pt"))
    if legacy:  # never unpickled: a .pt file can run any code when loaded
        raise CorelmError(f"checkpoint {path} is in the old trainer-state format ({STATE_DIR}/{', '.join(legacy)}: "
                          "pickle files, which corelm no longer loads because unpickling can run code); trainer "
                          "state is now safetensors + JSON: start a new run, or finish this one with the corelm "
                          "version that wrote it")
    verify_checkpoint(path)

    def read(name: str) -> Any:
        try:
            if name.endswith(".safetensors"):
                return load_file(str(sd_dir / name))
            return json.loads((sd_dir / name).read_bytes())
        except Exception as exc:  # noqa: BLE001 - any decode failure is a bad file
            raise CorelmError(f"cannot read checkpoint {path}: {STATE_DIR}/{name}: {_one_line(exc)}") from None

    def decode(stem: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - files that parse but are not what this run saves
            raise CorelmError(f"checkpoint {path} does not fit this run: {STATE_DIR}/{stem}.*: "
                              f"{_one_line(exc)}") from None

    # Read and check every file before restoring anything: a bad file fails before the RNGs move.
    weights, state = read("weights.safetensors"), read("state.json")
    counters = ("step", "skipped_steps", "tokens_seen")
    if not (isinstance(state, dict) and "step" in state
            and all(type(state.get(k, 0)) is int and state.get(k, 0) >= 0 for k in counters)):
        raise CorelmError(f"checkpoint {path} is corrupt: {STATE_DIR}/state.json lacks the step counts")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != names:
        missing, unexpected = sorted(names - set(weights)), sorted(set(weights) - names)
        raise CorelmError(f"checkpoint {path} does not match the model's trainable parameters "
                          f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    optim_state = scaler_state = rngs = None
    if optimizer is not None:
        tensors, doc = read("optimizer.safetensors"), read("optimizer.json")
        optim_state = decode("optimizer", lambda: decode_optimizer_state(tensors, doc, optimizer, model))
    if scaler is not None and scaler.is_enabled() and (sd_dir / "scaler.json").is_file():
        doc = read("scaler.json")
        scaler_state = decode("scaler", lambda: decode_scaler_state(doc, scaler))
    if restore_rng:
        tensors, doc = read("rng.safetensors"), read("rng.json")
        rngs = decode("rng", lambda: decode_rng_states(tensors, doc))

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    if optim_state is not None:
        tuples = [[k for k, v in g.items() if isinstance(v, tuple)] for g in optimizer.param_groups]
        decode("optimizer", lambda: set_optimizer_state_dict(model, optimizer, optim_state, options=opts))
        for group, keys in zip(optimizer.param_groups, tuples):  # as the uninterrupted run has them
            group.update({k: tuple(group[k]) for k in keys})
    if scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    if rngs is not None:
        if len(rngs) == world_size:
            set_rng_state(rngs[rank])
        else:
            warnings.warn(f"checkpoint was written by {len(rngs)} processes, resuming with {world_size}: "
                          "random streams restart from rank 0's state", stacklevel=2)
            set_rng_state(rngs[0])
    return state
