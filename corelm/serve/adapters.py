"""LoRA adapters served over one base model: names, slots, and the decode step that applies them.

``corelm serve --lora sql=runs/sql-lora`` (or ``POST /v1/adapters`` at run time) reads a LoRA run
(:func:`corelm.finetune.multi_lora.read_lora`), checks it against the base model and copies it into a
free slot of the model's adapter stacks (:class:`~corelm.finetune.multi_lora.MultiLoRA`). A request
names ``"<base>:<adapter>"`` (or just ``"<adapter>"``) as its ``model``; the batcher keeps the slot with
the request's row, and :class:`AdapterStep` tells the wrapped layers which slot each row of a forward
uses. One batch therefore mixes rows of different adapters and rows with none.

Unloading takes the name away at once (new requests get 404); the slot is reused only when no queued
or running request holds it any more, so running requests finish with the adapter they started with.

Decode path: for a model on corelm's C++ step (:class:`~corelm.generate.step.KernelStep`, a quantized
llama on CPU) the step reads the adapter stacks in place (:meth:`KernelStep.attach_lora`) and adds each
row's update after each projection it targets, so rows with and without an adapter share one call, one
KV cache and one pass over every quantized weight; rows without an adapter compute exactly what the plain
step does. Any other model decodes through its own forward with the wrapped layers (:class:`AdapterStep`).
``docs/serving.md`` gives the measured cost.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from corelm.errors import CorelmError
from corelm.finetune.multi_lora import LoRAWeights, MultiLoRA, apply_multi_lora, read_lora
from corelm.generate.step import KernelStep, ModelStep, kernel_step_supported

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # no ':' -- it separates base and adapter in 'model'


class AdapterStep:
    """A decode step (:mod:`corelm.generate.step`) whose rows may each use an adapter slot.

    ``slot_of(row)`` says which slot cache row ``row`` holds (0: none); before each forward the step
    sets :class:`~corelm.finetune.multi_lora.AdapterRows` for the rows that forward runs. Prefill and
    extend run one row, so they are exactly the lone request's numbers; decode runs rows ``0..max``.
    """

    def __init__(self, step: ModelStep, multi: MultiLoRA, slot_of: Callable[[int], int] | None = None) -> None:
        self.inner = step
        self.multi = multi
        self.slot_of = slot_of or (lambda row: 0)
        self.model, self.device, self.kind = step.model, step.device, step.kind

    @contextlib.contextmanager
    def _use(self, rows: Sequence[int]) -> Iterator[None]:
        """Rows ``rows`` use their slots for one forward; afterwards the model is the base model again
        (another caller of the same model never sees a stale selection)."""
        self.multi.rows.set([self.slot_of(r) for r in rows], self.device)
        try:
            yield
        finally:
            self.multi.rows.set(None)

    def new_cache(self, batch: int, max_len: int) -> Any:
        return self.inner.new_cache(batch, max_len)

    def prefill(self, cache: Any, prompts: Sequence[Sequence[int]], rows: Sequence[int] | None = None) -> torch.Tensor:
        rows = list(range(len(prompts))) if rows is None else list(rows)
        out = []
        for prompt, row in zip(prompts, rows):  # one row per pass: each row with its own slot
            with self._use([row]):
                out.append(self.inner.prefill(cache, [prompt], [row]))
        return torch.cat(out)

    def extend(self, cache: Any, row: int, tokens: Sequence[int], pos0: int, all_logits: bool = True) -> torch.Tensor:
        with self._use([row]):
            return self.inner.extend(cache, row, tokens, pos0, all_logits)

    def decode(self, cache: Any, tokens: torch.Tensor, pos: torch.Tensor,
               rows: Sequence[int] | None = None) -> torch.Tensor:
        # ModelStep.decode runs cache rows 0..max(rows) as one batch (rows not listed idle at slot 0)
        n = tokens.shape[0] if rows is None else max(rows) + 1
        with self._use(range(n)):
            return self.inner.decode(cache, tokens, pos, rows)

    def reorder(self, cache: Any, origins: torch.Tensor) -> None:
        self.inner.reorder(cache, origins)

    def share_prefix(self, cache: Any, n: int) -> None:
        self.inner.share_prefix(cache, n)

    def read_slots(self, cache: Any, row: int, start: int, stop: int) -> Any:
        return self.inner.read_slots(cache, row, start, stop)

    def write_slots(self, cache: Any, row: int, start: int, kv: Any) -> None:
        self.inner.write_slots(cache, row, start, kv)


@dataclass
class Adapter:
    name: str
    slot: int
    rank: int
    layers: int
    source: str  # what the caller gave (shown by /v1/models, never resolved further)


class AdapterSet:
    """The adapters of one served base model: name -> slot, loading and unloading.

    Args:
        multi: the model's stacks (from :func:`apply_multi_lora`).
        in_use: returns the slots queued or running requests hold (the batcher's ``adapters_in_use``).
    """

    def __init__(self, multi: MultiLoRA, in_use: Callable[[], set[int]] | None = None) -> None:
        self.multi = multi
        self.in_use = in_use or set
        self.by_name: dict[str, Adapter] = {}
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.multi.slots

    def slot(self, name: str) -> int | None:
        adapter = self.by_name.get(name)
        return None if adapter is None else adapter.slot

    def read(self, name: str, path: str) -> LoRAWeights:
        """Read and check a run directory (slow: call it off the event loop). Raises CorelmError."""
        check_name(name)
        try:
            weights = read_lora(path)
            self.multi.check(weights)
        except CorelmError as exc:
            raise CorelmError(f"adapter {name!r}: {exc}") from None
        return weights

    def add(self, name: str, weights: LoRAWeights, source: str) -> Adapter:
        """Install read weights under ``name`` in a free slot. Raises CorelmError (name taken, no slot)."""
        with self._lock:
            if name in self.by_name:
                raise CorelmError(f"adapter {name!r} is already loaded; unload it first")
            taken = {a.slot for a in self.by_name.values()} | set(self.in_use())
            free = [s for s in range(1, self.capacity + 1) if s not in taken]
            if not free:
                raise CorelmError(f"all {self.capacity} adapter slots are in use (--max-loras); unload one first")
            self.multi.install(free[0], weights)
            adapter = Adapter(name, free[0], weights.rank, len(weights.layers), source)
            self.by_name[name] = adapter
            return adapter

    def load(self, name: str, path: str) -> Adapter:
        return self.add(name, self.read(name, path), path)

    def remove(self, name: str) -> Adapter:
        """Forget ``name``: new requests cannot use it; running ones finish with it (its slot is
        cleared and reused only once free). Raises KeyError when not loaded."""
        with self._lock:
            return self.by_name.pop(name)


def check_name(name: str) -> None:
    if not isinstance(name, str) or NAME.fullmatch(name) is None:
        raise CorelmError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '.' or '-' (starting with a "
                          "letter or digit)")


def parse_lora_option(value: str) -> tuple[str, str]:
    """``NAME=PATH`` (``--lora``) -> (name, path), or a one-line CorelmError."""
    name, sep, path = value.partition("=")
    if not sep or not path:
        raise CorelmError(f"--lora wants NAME=PATH (e.g. sql=runs/sql-lora), got {value!r}")
    check_name(name)
    return name, path


def enable_adapters(model: torch.nn.Module, slots: int, rank: int) -> tuple[AdapterStep | KernelStep, MultiLoRA]:
    """Wrap ``model``'s block linears with adapter stacks and return the step the batcher runs: corelm's
    C++ step with the stacks attached when the model runs on it (built first, from the unwrapped layers),
    else an :class:`AdapterStep` over the model's forward."""
    kernel = KernelStep(model) if kernel_step_supported(model) is None else None
    multi = apply_multi_lora(model, slots, rank)
    if kernel is not None and kernel.attach_lora():
        return kernel, multi
    return AdapterStep(ModelStep(model), multi), multi


# ---- the HTTP side (corelm.serve.app registers the routes; everything here answers OpenAI-shaped errors) ----


def resolve(name: str, models: Sequence[Any]) -> tuple[Any, str, int] | None:
    """A request's ``model`` -> ``(text model, id to echo, adapter slot)``; None when nothing matches.

    ``"<base>:<adapter>"`` names one adapter of one base model; a bare ``"<adapter>"`` works when exactly
    one base model serves an adapter of that name (a 400 asks for the full name otherwise).
    """
    from corelm.serve import errors

    base, sep, adapter = name.rpartition(":")
    if sep:
        model = next((m for m in models if m.name == base), None)
        adapters = getattr(model, "adapters", None)
        if model is None or adapters is None:
            return None
        slot = adapters.slot(adapter)
        if slot is None:
            loaded = ", ".join(f"{base}:{a}" for a in adapters.by_name) or "none"
            raise errors.APIError(404, f"adapter {adapter!r} is not loaded on model {base!r}; loaded: {loaded}",
                                  param="model", code="model_not_found")
        return model, name, slot
    owners = [m for m in models if getattr(m, "adapters", None) is not None and m.adapters.slot(name) is not None]
    if len(owners) > 1:
        raise errors.bad_request(f"several models serve an adapter {name!r}; name one as "
                                 + " or ".join(f"'{m.name}:{name}'" for m in owners), "model", code="ambiguous_model")
    if not owners:
        return None
    return owners[0], f"{owners[0].name}:{name}", owners[0].adapters.slot(name)


def served_ids(models: Sequence[Any]) -> list[str]:
    """Every id a request may send: the models, then ``<base>:<adapter>`` for their adapters."""
    ids = [m.name for m in models]
    for m in models:
        if getattr(m, "adapters", None) is not None:
            ids += [f"{m.name}:{a}" for a in m.adapters.by_name]
    return ids


def model_entries(models: Sequence[Any]) -> list[dict[str, Any]]:
    """``/v1/models`` entries of the adapters (each names its base model as ``parent``)."""
    out = []
    for m in models:
        for a in (m.adapters.by_name.values() if getattr(m, "adapters", None) is not None else ()):
            out.append({"id": f"{m.name}:{a.name}", "object": "model", "created": 0, "owned_by": "corelm",
                        "context_window": m.context_window, "kind": "lora", "parent": m.name, "root": m.name,
                        "rank": a.rank})
    return out


def _adapter_sets(models: Sequence[Any]) -> list[Any]:
    from corelm.serve import errors

    found = [m for m in models if getattr(m, "adapters", None) is not None]
    if not found:
        raise errors.APIError(404, "this server has no adapter slots: start it with --lora NAME=PATH or "
                                   "--max-loras N", code="adapters_disabled")
    return found


async def load_route(body: dict[str, Any], models: Sequence[Any]) -> dict[str, Any]:
    """``POST /v1/adapters`` ``{"name", "path", "model"?}``: read, check and install a LoRA run."""
    import asyncio

    from corelm.serve import errors

    found = _adapter_sets(models)
    for key in ("name", "path"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise errors.bad_request(f"'{key}' must be a non-empty string", key)
    base = body.get("model")
    if base is not None and (not isinstance(base, str) or base not in {m.name for m in found}):
        raise errors.APIError(404, f"model {base!r} serves no adapters here; ones that do: "
                                   + ", ".join(m.name for m in found), param="model", code="model_not_found")
    model = next(m for m in found if base is None or m.name == base)
    name = body["name"]
    try:
        weights = await asyncio.to_thread(model.adapters.read, name, body["path"])
        adapter = model.adapters.add(name, weights, body["path"])
    except CorelmError as exc:
        code = 409 if "already loaded" in str(exc) or "slots are in use" in str(exc) else 400
        raise errors.APIError(code, str(exc), param="name" if code == 409 else "path",
                              code="adapter_conflict" if code == 409 else "invalid_adapter") from None
    return {"id": f"{model.name}:{adapter.name}", "object": "model", "parent": model.name, "rank": adapter.rank,
            "layers": adapter.layers, "loaded": True}


def unload_route(name: str, models: Sequence[Any]) -> dict[str, Any]:
    """``DELETE /v1/adapters/{name}`` (``name`` or ``base:name``): new requests can no longer use it."""
    from corelm.serve import errors

    found = _adapter_sets(models)
    try:
        resolved = resolve(name, found)
    except errors.APIError:
        resolved = None
    if resolved is None:
        loaded = ", ".join(e["id"] for e in model_entries(found)) or "none"
        raise errors.APIError(404, f"no adapter {name!r} is loaded; loaded: {loaded}", param="name",
                              code="adapter_not_found")
    model, full, _ = resolved
    model.adapters.remove(full.rpartition(":")[2])
    return {"id": full, "object": "model", "deleted": True}


@dataclass
class StartAdapters:
    """Adapter slots made for a decoder before its batcher exists (:func:`start_adapters`)."""

    step: AdapterStep | KernelStep
    multi: MultiLoRA
    initial: list[tuple[str, str, LoRAWeights]]

    def attach(self, batcher: Any) -> AdapterSet:
        """Bind the step to ``batcher``'s rows and install the ``--lora`` adapters."""
        self.step.slot_of = batcher.adapter_of
        served = AdapterSet(self.multi, batcher.adapters_in_use)
        for name, path, weights in self.initial:
            served.add(name, weights, path)
        return served


def start_adapters(model: torch.nn.Module, specs: Sequence[str], slots: int = 0, rank: int = 0) -> StartAdapters:
    """Read and check the ``NAME=PATH`` runs, then give ``model`` adapter slots (``slots``: 0 = ``max(4,
    len(specs))``; ``rank``: 0 = the largest rank of ``specs``, or 16). Raises a one-line CorelmError."""
    initial, seen = [], set()
    for spec in specs:
        name, path = parse_lora_option(spec)
        if name in seen:
            raise CorelmError(f"--lora {name} is given twice")
        seen.add(name)
        try:
            initial.append((name, path, read_lora(path)))
        except CorelmError as exc:
            raise CorelmError(f"--lora {name}: {exc}") from None
    slots = slots or max(4, len(initial))
    if len(initial) > slots:
        raise CorelmError(f"{len(initial)} --lora adapters but only {slots} slots (--max-loras)")
    largest = max((w.rank for _, _, w in initial), default=0)
    if rank and largest > rank:
        raise CorelmError(f"--lora adapters have rank up to {largest}, above --max-lora-rank {rank}")
    step, multi = enable_adapters(model, slots, rank or largest or 16)
    for name, _, weights in initial:  # shapes against this base model, before anything is served
        try:
            multi.check(weights)
        except CorelmError as exc:
            raise CorelmError(f"--lora {name}: {exc}") from None
    return StartAdapters(step, multi, initial)
