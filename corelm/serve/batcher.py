"""Continuous batching: requests join and leave the running batch at every decode step.

One worker thread owns the model and a preallocated :class:`~corelm.ops.kv_cache.KVCache` with
``max_batch`` rows; each running request holds one row (its per-request KV cache). Every loop:

1. drop requests whose client went away or whose deadline passed (their rows are free at once);
2. admit waiting requests into free rows; the longest head of the prompt that the prefix cache
   holds (:mod:`corelm.serve.prefix`: a shared system prompt, a chat template's head) is copied into
   the row instead of being prefilled again;
3. one step for all rows together: each decoding row feeds its last token at its own position
   (per-row ``input_pos``), and the rows still prefilling feed the next chunk of their prompts --
   at most ``prefill_chunk`` prompt tokens per step in all (chunked prefill, Agrawal et al. 2023,
   "SARATHI"), so a long prompt never stalls the running streams for more than one chunk's time.
   On corelm's C++ step the decode tokens and the chunk are one call (``KernelStep.mixed``); on the
   model's own forward each chunk is its own pass (isolated: a failing prompt fails alone) and the
   decode rows one batched pass.

A token's logits do not depend on what else shares its step, nor on whether its prompt's head came
from the prefix cache or in chunks: a greedy request gives the same tokens alone or in any company.

The batcher speaks token ids only (tokenizer, chat template and stop strings live in
:mod:`corelm.serve.service`). The forward passes are the model's decode step
(:func:`corelm.generate.step.step_for`: corelm's C++ step for a decoder it runs on CPU, quantized or float, where a
decode step of B rows is one call, else the model's forward) and sampling is the engine's
(:func:`~corelm.generate.engine.sample_next`); this module only schedules. Each request samples with
its own ``torch.Generator``, so its tokens do not depend on what else is in the batch. The HTTP
layer talks to it through :meth:`Batcher.submit`, which returns a :class:`Handle` to iterate
asynchronously.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from corelm.generate import engine
from corelm.generate.constraints import GrammarError
from corelm.generate.engine import SamplingParams
from corelm.generate.step import model_device, step_for
from corelm.serve import errors
from corelm.serve.prefix import PrefixCache

log = logging.getLogger("corelm.serve")


@dataclass
class Event:
    """One item of a request's stream: a token, the end, or an error."""

    kind: str                      # "token" | "done" | "error"
    token: int = -1
    logprob: float | None = None   # the token's log-probability under the model (when asked for)
    top: list[tuple[int, float]] | None = None  # the most likely tokens and their log-probabilities
    finish_reason: str | None = None   # "stop" | "length" | "cancelled" on "done"
    error: errors.APIError | None = None
    time: float = 0.0
    step: int = -1                 # the batcher's step that produced it (Batcher.steps)


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    spec: SamplingParams
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.monotonic)
    id: int = 0
    row: int = -1
    tokens: list[int] = field(default_factory=list)  # generated so far
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator | None = None
    admitted: float = 0.0
    constraint: Any = None  # a corelm.generate.constraints.Constraint: structured output
    logprobs: int | None = None  # None: off; k: the token's log-probability and the k most likely
    adapter: int = 0  # the LoRA adapter slot the row decodes with (corelm.serve.adapters); 0: the base model
    done: int = 0    # prompt tokens in the row's cache so far (prefilled or copied from the prefix cache)
    cached: int = 0  # of those, the ones copied from the prefix cache

    @property
    def prefilling(self) -> bool:
        return self.done < len(self.prompt)

    def emit(self, event: Event) -> None:
        event.time = time.monotonic()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the caller's event loop is closed: nobody is left to tell
            self.cancelled = True


class Handle:
    """The caller's end of one request: async-iterate :class:`Event` s; :meth:`cancel` frees its row."""

    def __init__(self, request: _Request, batcher: Batcher) -> None:
        self._request = request
        self._batcher = batcher

    @property
    def arrival(self) -> float:
        return self._request.arrival

    @property
    def admitted(self) -> float:
        return self._request.admitted

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the prefix cache (not prefilled)."""
        return self._request.cached

    def cancel(self) -> None:
        """Abandon the request (client gone, stop string seen): its row is freed before the next step."""
        self._batcher._cancel(self._request)

    def __aiter__(self) -> Handle:
        return self

    async def __anext__(self) -> Event:
        if self._request.finished and self._request.queue.empty():
            raise StopAsyncIteration
        event = await self._request.queue.get()
        if event.kind != "token":
            self._request.finished = True
        return event


class Batcher:
    """Continuous batching over a decoder model and a per-row KV cache.

    Args:
        model: a corelm decoder (``model(ids, input_pos=, kv_cache=)``, ``hidden_states``, ``lm_head``).
        max_batch: rows of the KV cache = requests decoded together.
        max_seq_len: slots per row; a request's prompt + max_new_tokens must fit.
        max_queue: requests that may wait for a row; beyond that :meth:`submit` refuses at once.
        sample: sampler ``(logits (1, V), spec, generator, history) -> token id``; default: the engine's
            :func:`~corelm.generate.engine.sample_next`.
        step: the decode step (default :func:`~corelm.generate.step.step_for`); with LoRA adapters, a
            :class:`corelm.serve.adapters.AdapterStep` that reads each row's slot from :meth:`adapter_of`.
        prefill_chunk: prompt tokens prefilled per step, all prefilling rows together.
        prefix_block: tokens per prefix-cache block (only whole blocks are reused).
        prefix_cache_mib: memory the prefix cache may hold, MiB (0: no prefix caching).
    """

    def __init__(self, model: torch.nn.Module, *, max_batch: int = 8, max_seq_len: int = 2048,
                 max_queue: int = 64, sample: Any = None, step: Any = None, prefill_chunk: int = 128,
                 prefix_block: int = 16, prefix_cache_mib: float = 256) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._sample = sample or engine.sample_next
        self.step = step or step_for(model)
        self.device = model_device(model)
        self.cache = self.step.new_cache(max_batch, max_seq_len)
        copies = hasattr(self.step, "read_slots")  # a step that cannot copy slots out serves without the cache
        self.prefix_token_bytes = PrefixCache.bytes_per_token(self.step, self.cache) if copies else 0
        self.prefixes = PrefixCache(self.step, prefix_block,
                                    int(prefix_cache_mib * 2**20) // self.prefix_token_bytes if copies else 0)
        self._outbox: list[tuple[_Request, Event]] = []  # events of this step, sent together at its end
        self._rows: list[_Request | None] = [None] * max_batch
        self._waiting: collections.deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run (a metric)

    # ---- public API (event-loop thread) ----

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def adapter_of(self, row: int) -> int:
        """The adapter slot of the request in cache row ``row`` (0: none, or a free row)."""
        request = self._rows[row]
        return 0 if request is None else request.adapter

    def adapters_in_use(self) -> set[int]:
        """Adapter slots that queued or running requests hold (a slot is reused only once free)."""
        with self._cond:
            return {r.adapter for r in [*self._rows, *self._waiting] if r is not None and r.adapter}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="corelm-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, prompt: list[int], spec: SamplingParams, deadline: float | None = None, *,
               constraint: Any = None, logprobs: int | None = None, adapter: int = 0) -> Handle:
        """Queue a request; must be called from the running event loop.

        ``constraint`` (a :class:`corelm.generate.constraints.Constraint`) masks this row's logits
        before each token; ``logprobs`` = k attaches each token's log-probability (the model's
        log-softmax, before temperature and masks) and the k most likely tokens to its event;
        ``adapter`` is the LoRA slot the row decodes with (0: the base model).

        Raises:
            APIError: 503 with Retry-After when every row is busy and the waiting queue is full.
        """
        if len(prompt) + spec.max_new_tokens > self.max_seq_len:  # the caller validates; this guards
            raise errors.context_exceeded(
                f"prompt ({len(prompt)} tokens) + max_tokens ({spec.max_new_tokens}) exceeds the "
                f"server's per-request limit of {self.max_seq_len} tokens", "max_tokens")
        loop = asyncio.get_running_loop()
        request = _Request(list(prompt), spec, deadline, loop, asyncio.Queue(), id=next(self._ids),
                           constraint=constraint, logprobs=logprobs, adapter=adapter)
        with self._cond:
            free_rows = self.max_batch - self.running
            if len(self._waiting) >= self.max_queue + max(free_rows, 0):
                raise errors.overloaded()
            self._waiting.append(request)
            self._cond.notify_all()
        return Handle(request, self)

    def _cancel(self, request: _Request) -> None:
        with self._cond:
            request.cancelled = True
            if request in self._waiting:  # never started: leave the queue at once
                self._waiting.remove(request)
                request.emit(Event("done", finish_reason="cancelled"))
            self._cond.notify_all()

    # ---- worker thread ----

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stop and not self._waiting and self.running == 0:
                        self._cond.wait()
                    if self._stop:
                        break
                try:
                    self._step()
                except Exception:  # the shared forward pass failed: fail this step's rows, keep serving
                    log.exception("batcher step failed")
                    for row, request in enumerate(self._rows):
                        if request is not None:
                            self._finish(row, error=errors.internal_error())
                self._flush()
        for row, request in enumerate(self._rows):
            if request is not None:
                self._finish(row, error=errors.shutting_down())
        with self._cond:  # and the requests still waiting for a row
            waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            self._send(request, Event("error", error=errors.shutting_down()))
        self._flush()

    def _send(self, request: _Request, event: Event) -> None:
        event.step = self.steps
        self._outbox.append((request, event))

    def _flush(self) -> None:
        """Hand this step's events to their event loops: one wake-up per loop and step, not per token."""
        if not self._outbox:
            return
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Event]]] = {}
        for request, event in self._outbox:
            event.time = now
            by_loop.setdefault(request.loop, []).append((request, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the caller's event loop is closed: nobody is left to tell
                for request, _ in items:
                    request.cancelled = True

    def _step(self) -> None:
        now = time.monotonic()
        for row, request in enumerate(self._rows):
            if request is None:
                continue
            if request.cancelled:
                self._finish(row, reason="cancelled")
            elif request.deadline is not None and now > request.deadline:
                self._finish(row, error=errors.deadline_exceeded(request.deadline - request.arrival))
        self._admit(now)
        chunks = self._chunks()
        if chunks and hasattr(self.step, "mixed"):
            self._mixed(chunks)
            return
        for row, request, stop in chunks:
            self._isolated(row, self._prefill_chunk, row, request, stop)
        if any(r is not None and not r.prefilling for r in self._rows):
            self._decode()

    def _admit(self, now: float) -> None:
        while True:
            with self._cond:
                if not self._waiting or self.running == self.max_batch:
                    return
                request = self._waiting.popleft()
                if request.deadline is not None and now > request.deadline:
                    request.emit(Event("error", error=errors.deadline_exceeded(request.deadline - request.arrival)))
                    continue
                row = self._rows.index(None)  # lowest free row keeps the decoded prefix short
                self._rows[row] = request
            request.row = row
            request.admitted = time.monotonic()
            self._isolated(row, self._start, row, request)

    def _start(self, row: int, request: _Request) -> None:
        """Set a newly admitted request up in ``row``: its generator, and its prompt's cached head."""
        request.generator = request.spec.generator(self.device)  # None when greedy
        # an adapter changes the keys and values: the prefix cache (base model's) is not shared with it
        request.done = request.cached = 0 if request.adapter else self.prefixes.load(self.cache, row, request.prompt)

    def _chunks(self) -> list[tuple[int, _Request, int]]:
        """This step's prefill work, first come first served: ``(row, request, stop)`` -- the request's
        prompt tokens ``done..stop`` -- at most ``prefill_chunk`` tokens in all.

        Blocks that the prefix cache gained since a request was admitted (stored by an earlier request's
        chunks) are copied in first; a request whose next block an earlier request is prefilling right now
        waits for it instead of computing it too (``n`` > 1, or a burst of requests with a new system prompt).
        """
        budget, work = self.prefill_chunk, []
        prefilling = sorted((r for r in self._rows if r is not None and r.prefilling), key=lambda r: r.id)
        for i, request in enumerate(prefilling):
            if budget <= 0:
                break
            if not request.adapter and request.done % self.prefixes.block == 0:
                done = self.prefixes.load(self.cache, request.row, request.prompt, have=request.done)
                request.cached += done - request.done
                request.done = done
            if self._waits_for(request, prefilling[:i]):
                continue
            stop = min(len(request.prompt), request.done + budget)
            work.append((request.row, request, stop))
            budget -= stop - request.done
        return work

    def _waits_for(self, request: _Request, earlier: list[_Request]) -> bool:
        """Whether an earlier prefilling request is about to compute ``request``'s next cacheable block."""
        end = request.done + self.prefixes.block
        if (self.prefixes.max_blocks == 0 or request.adapter or request.done % self.prefixes.block
                or end > len(request.prompt) - 1):
            return False
        head = request.prompt[:end]
        return any(e.done < end and not e.adapter and e.prompt[:end] == head for e in earlier)

    def _prefill_chunk(self, row: int, request: _Request, stop: int) -> None:
        """Prompt tokens ``done..stop`` of one request, alone, into its row (the model step's path)."""
        if request.done == 0 and stop == len(request.prompt):  # the whole prompt: the same pass as a lone request
            logits = self.step.prefill(self.cache, [request.prompt], rows=[row])  # (1, V)
        else:
            logits = self.step.extend(self.cache, row, request.prompt[request.done:stop], request.done,
                                      all_logits=False)  # (1, V)
        self._prefilled(row, request, stop, logits)

    def _prefilled(self, row: int, request: _Request, stop: int, logits: torch.Tensor) -> None:
        request.done = stop
        if not request.adapter:  # its full blocks so far, for the requests that share them
            self.prefixes.store(self.cache, row, request.prompt, stop)
        if not request.prefilling:  # the prompt is in: sample its first token
            self._accept(row, request, logits)

    def _decode(self) -> None:
        """One decode step for every decoding row, each feeding its last token at its own position.

        Rows still prefilling join with a dummy token at their next prompt slot (the model step runs
        rows ``0..max`` together and writes a slot in each); that slot is overwritten by their next chunk.
        """
        active = [row for row, r in enumerate(self._rows) if r is not None]
        requests = [self._rows[row] for row in active]
        tokens = torch.tensor([r.tokens[-1] if not r.prefilling else 0 for r in requests], device=self.device)
        pos = torch.tensor([len(r.prompt) + len(r.tokens) - 1 if not r.prefilling else r.done for r in requests],
                           device=self.device)
        logits = self.step.decode(self.cache, tokens, pos, rows=active)  # (len(active), V) fp32
        self.steps += 1
        decoding = [(i, row) for i, (row, r) in enumerate(zip(active, requests)) if not r.prefilling]
        self._accept_all([(row, requests[i], logits[i:i + 1]) for i, row in decoding])

    def _mixed(self, chunks: list[tuple[int, _Request, int]]) -> None:
        """One call of the fused step: every decoding row's next token and this step's prefill chunks."""
        decoding = [(row, r) for row, r in enumerate(self._rows) if r is not None and not r.prefilling]
        runs = [(row, [r.tokens[-1]], len(r.prompt) + len(r.tokens) - 1) for row, r in decoding]
        runs += [(row, request.prompt[request.done:stop], request.done) for row, request, stop in chunks]
        logits = self.step.mixed(self.cache, runs)  # (len(runs), V) fp32
        self.steps += 1
        self._accept_all([(row, r, logits[i:i + 1]) for i, (row, r) in enumerate(decoding)])
        for i, (row, request, stop) in enumerate(chunks, start=len(decoding)):
            self._isolated(row, self._prefilled, row, request, stop, logits[i:i + 1])

    def _accept_all(self, rows: list[tuple[int, _Request, torch.Tensor]]) -> None:
        """Sample every row of a step; greedy rows without masks take one batched argmax."""
        plain = self._sample is engine.sample_next
        greedy = [plain and r.spec.temperature == 0 and r.constraint is None and r.logprobs is None
                  and r.spec.repetition_penalty == 1.0 for _, r, _ in rows]
        picks = torch.cat([x for (_, _, x), g in zip(rows, greedy) if g]).argmax(-1).tolist() if any(greedy) else []
        picks.reverse()
        for (row, request, logits), g in zip(rows, greedy):
            self._isolated(row, self._accept, row, request, logits, picks.pop() if g else None)

    def _isolated(self, row: int, work: Any, *args: Any) -> None:
        """Run one row's own work (its prefill, its sampling); if it raises, that request alone fails.

        A row's failure must never reach the other rows: their streams go on as if it had not been there
        (each row samples with its own generator, and a failed row's cache slots are simply reused).
        """
        try:
            work(*args)
        except GrammarError as exc:  # the request's own grammar: a 400 for it alone
            log.warning("request %s: %s", getattr(self._rows[row], "id", "?"), exc)
            if self._rows[row] is not None:
                self._finish(row, error=errors.bad_request(str(exc), param="response_format"))
        except errors.NonFiniteLogits:
            log.error("request %s: the model produced non-finite logits in row %d", getattr(self._rows[row], "id", "?"),
                      row)
            self._scrub(row)
            if self._rows[row] is not None:
                self._finish(row, error=errors.model_fault())
        except Exception:
            log.exception("request %s failed in row %d", getattr(self._rows[row], "id", "?"), row)
            if self._rows[row] is not None:
                self._finish(row, error=errors.internal_error())

    def _scrub(self, row: int) -> None:
        """Zero a row's cache slots after non-finite logits: the NaN keys and values it wrote would reach the
        row's next request wherever they lie past that request's positions, since attention weighs masked slots
        by exactly 0 and 0 * NaN is NaN."""
        if hasattr(self.step, "read_slots"):
            k, v = self.step.read_slots(self.cache, row, 0, self.max_seq_len)
            self.step.write_slots(self.cache, row, 0, (torch.zeros_like(k), torch.zeros_like(v)))

    def _accept(self, row: int, request: _Request, logits: torch.Tensor, token: int | None = None) -> None:
        """Sample the next token of ``request`` from ``logits`` (1, V) (or take ``token``, its greedy
        pick) and stream or finish it."""
        if request.cancelled:
            self._finish(row, reason="cancelled")
            return
        event = Event("token")
        if request.logprobs is not None:
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)
            if request.logprobs:
                top = logprobs.topk(request.logprobs)
                event.top = list(zip(top.indices.tolist(), top.values.tolist()))
        if token is None:
            if not bool(torch.isfinite(logits).all()):  # before the mask, which writes -inf
                raise errors.NonFiniteLogits
            if request.constraint is not None:
                logits = request.constraint.mask(logits.clone())
            history = request.prompt + request.tokens  # the repetition penalty's (and a custom sampler's)
            if self._sample is not engine.sample_next:
                self._flush()  # a caller's sampler may take its time: the tokens already made go out first
            token = int(self._sample(logits, request.spec, request.generator, history))
        elif not math.isfinite(float(logits[0, token])):  # a batched greedy pick: argmax returns a NaN's index
            raise errors.NonFiniteLogits
        if request.constraint is not None:
            request.constraint.advance(token)
        if token in request.spec.stop_token_ids and not request.spec.ignore_eos:
            self._finish(row, reason="stop")
            return
        request.tokens.append(token)
        event.token = token
        if request.logprobs is not None:
            event.logprob = float(logprobs[token])
        self._send(request, event)
        full = len(request.prompt) + len(request.tokens) >= self.max_seq_len
        if request.constraint is not None and request.constraint.complete:
            self._finish(row, reason="stop")  # the document is complete: only EOS could follow
        elif len(request.tokens) >= request.spec.max_new_tokens or full:
            self._finish(row, reason="length")

    def _finish(self, row: int, *, reason: str | None = None, error: errors.APIError | None = None) -> None:
        request = self._rows[row]
        self._free(row)  # first: whoever reads the last event finds the row already free
        if error is not None:
            self._send(request, Event("error", error=error))
        else:
            self._send(request, Event("done", finish_reason=reason))

    def _free(self, row: int) -> None:
        with self._cond:
            self._rows[row] = None


def _deliver(items: list[tuple[_Request, Event]]) -> None:
    """On the caller's event loop: queue one step's events for their requests."""
    for request, event in items:
        request.queue.put_nowait(event)
