"""The generation engine: prefill, decode, sampling, batching, streaming and beam search over token ids.

The structure follows gpt-fast's ``generate.py`` (Hugging Face / PyTorch Labs, 2023): a KV cache
preallocated once, ``prefill`` (the whole prompt in one forward) and ``decode_one`` (one token per
row) as separate functions, and a decode step that allocates nothing it can precompute, so it can be
``torch.compile``d. The forward passes are a *step*'s (:mod:`corelm.generate.step`): the model's own
forward, or corelm's C++ step for a llama-family, Gemma, OLMo 2 or MoE decoder on CPU (quantized, fp32 or
bf16); this module never calls a model directly.
Tokenizers and chat templates live above it (``corelm/api.py``); it speaks token ids only.

Batching follows docs/DESIGN.md: prompts of different lengths are prefilled right-padded, each row
keeps its own positions in the cache, and decoding continues every row from its own length.

Structured output: a row may carry a :class:`~corelm.generate.constraints.Constraint` (a JSON schema,
regex or grammar). Its logits are masked before sampling (so before temperature, top-k and top-p), the
chosen token advances its grammar, and the row ends when the grammar is complete. Beam search keeps
one grammar state per beam and forks it with the beam.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from corelm.errors import CorelmError
from corelm.generate.constraints import Constraint, mask_rows
from corelm.generate.step import model_device, step_for
from corelm.ops.sampling import apply_repetition_penalty, sample_from_logits


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    Attributes:
        max_new_tokens: tokens to generate at most (>= 0).
        temperature: 0 = greedy; otherwise softmax temperature (> 0).
        top_k: sample among the k most likely tokens (0 = no limit).
        top_p: sample from the smallest set with this much probability (0 < top_p <= 1).
        repetition_penalty: > 1 discourages tokens already in the prompt or output (1 = off).
        seed: seeds this request's own ``torch.Generator``: same seed, same tokens, whatever the batch.
        stop_token_ids: generation ends (without emitting it) when one of these is produced.
        ignore_eos: never stop early on EOS or ``stop_token_ids``: always ``max_new_tokens`` (benchmarks).
        num_beams: beams for :func:`beam_search` (1 = no beam search).
        length_penalty: beam scores are ``sum(logprobs) / length ** length_penalty``.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> CorelmError:
            return CorelmError(f"invalid sampling parameter {name}={getattr(self, name)!r}: must be {rule}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise bad("max_new_tokens", "an integer >= 0")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", ">= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise bad("num_beams", "an integer >= 1")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an integer or None")
        self.stop_token_ids = tuple(int(t) for t in (self.stop_token_ids or ()))

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """This request's random stream (None for greedy decoding)."""
        if self.temperature == 0:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def check_length(model: nn.Module, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse requests the context window cannot hold, with the counts in the message."""
    ctx = model.config.max_seq_len
    if prompt_len == 0:
        raise CorelmError("the prompt is empty: give at least one token")
    if prompt_len + max_new_tokens > ctx:
        raise CorelmError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
                          f"{prompt_len + max_new_tokens} exceeds the context window of {ctx} tokens")


# --------------------------------------------------------------------------------------------
# Batched generation
# --------------------------------------------------------------------------------------------

class _Rows:
    """Per-row state of a batch being generated: sampling settings, seen tokens, stop conditions."""

    def __init__(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], vocab: int,
                 eos_token_id: int | Sequence[int] | None, device: torch.device) -> None:
        self.params = params
        self.generators = [p.generator(device) for p in params]
        eos = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else eos_token_id
        self.stops = [set() if p.ignore_eos else set(p.stop_token_ids) | set(eos) for p in params]
        self.remaining = [p.max_new_tokens for p in params]
        self.done = [n == 0 for n in self.remaining]
        first = params[0]
        self.uniform = all((p.temperature, p.top_k, p.top_p, p.repetition_penalty)
                           == (first.temperature, first.top_k, first.top_p, first.repetition_penalty) for p in params)
        self.penalized = any(p.repetition_penalty != 1.0 for p in params)
        self.seen = None
        self.penalties = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]  # (B, 1)
        if self.penalized:  # (B, V) bool, preallocated once and updated in place
            self.seen = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
            for b, p in enumerate(prompts):
                self.seen[b, torch.as_tensor(list(p), dtype=torch.long, device=device)] = True

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` logits -> ``(B,)`` next tokens, each row with its own settings and generator."""
        if self.penalized:
            logits = apply_repetition_penalty(logits, self.seen, self.penalties)
        if self.uniform:
            p = self.params[0]
            tokens = sample_from_logits(logits, p.temperature, p.top_k, p.top_p, self.generators)
        else:
            tokens = torch.cat([sample_from_logits(logits[b : b + 1], p.temperature, p.top_k, p.top_p,
                                                   self.generators[b]) for b, p in enumerate(self.params)])
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        return tokens

    def accept(self, tokens: list[int]) -> list[int | None]:
        """Apply stop conditions: the token each live row emits, None for rows that are done."""
        out: list[int | None] = []
        for b, t in enumerate(tokens):
            if self.done[b] or t in self.stops[b]:
                self.done[b] = True
                out.append(None)
                continue
            self.remaining[b] -= 1
            self.done[b] = self.remaining[b] == 0
            out.append(t)
        return out


def generate_stream(model: nn.Module, prompts: Sequence[Sequence[int]],
                    params: SamplingParams | Sequence[SamplingParams], *,
                    eos_token_id: int | Sequence[int] | None = None, compile: bool = False,
                    constraints: Sequence[Constraint | None] | None = None) -> Iterator[list[int | None]]:
    """Generate for a batch of prompts, yielding one step at a time.

    Args:
        model: a corelm decoder (GPT-2 or Llama family).
        prompts: token ids per row; lengths may differ.
        params: one :class:`SamplingParams` for all rows or one per row.
        eos_token_id: end-of-sequence id(s); default ``model.config.extra["eos_token_id"]`` if present.
        compile: ``torch.compile`` the model's decode step (static shapes: attends all cache slots);
            without it a decoder the C++ step runs (quantized or fp32/bf16, on CPU) decodes there (see
            :func:`step_for`).
        constraints: per row, a fresh :class:`Constraint` (its grammar at the start) or None; a
            constrained row ends when its grammar is complete.
    Yields:
        per step, a list with each row's new token id, or None where the row has finished. Stop
        iterating (``close()``, ``break``) to end early, e.g. when a stop string appears.
    Raises:
        CorelmError: a prompt plus ``max_new_tokens`` does not fit the context window.
    """
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise CorelmError(f"{len(params)} sampling parameter sets for {len(prompts)} prompts")
    constraints = list(constraints) if constraints is not None else [None] * len(prompts)
    if len(constraints) != len(prompts):
        raise CorelmError(f"{len(constraints)} constraints for {len(prompts)} prompts")
    if not prompts:
        return
    for p, sp in zip(prompts, params):
        check_length(model, len(p), sp.max_new_tokens)
    if eos_token_id is None:
        eos_token_id = model.config.extra.get("eos_token_id")
    step = step_for(model, compile=compile)
    device = model_device(model)
    cache = step.new_cache(len(prompts), max(len(p) + sp.max_new_tokens for p, sp in zip(prompts, params)))
    rows = _Rows(prompts, params, model.config.vocab_size, eos_token_id, device)
    if all(rows.done):
        return
    with torch.inference_mode():
        logits = step.prefill(cache, prompts)
    pos = torch.tensor([len(p) for p in prompts], device=device)  # (B,) next slot of each row
    # 1 for rows still generating, 0 for finished ones: a finished row stays on its last slot
    # (its outputs are ignored) so it never runs past its own context window.
    advance = torch.ones_like(pos)
    frozen = [False] * len(prompts)
    while True:
        with torch.inference_mode():
            logits = mask_rows(logits, [None if done else c for c, done in zip(constraints, rows.done)])
            tokens = rows.choose(logits)
        emitted = rows.accept(tokens.tolist())
        for b, token in enumerate(emitted):
            if token is not None and constraints[b] is not None:
                constraints[b].advance(token)
                rows.done[b] = rows.done[b] or constraints[b].complete  # the document is finished
        for b, finished in enumerate(rows.done):
            if finished and not frozen[b]:
                frozen[b] = True
                advance[b] = 0
        yield emitted
        if all(rows.done):
            return
        with torch.inference_mode():
            logits = step.decode(cache, tokens, pos)
            pos += advance


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
             *, eos_token_id: int | Sequence[int] | None = None, compile: bool = False,
             should_stop: Callable[[int, list[int]], bool] | None = None,
             constraints: Sequence[Constraint | None] | None = None) -> list[list[int]]:
    """Generate for a batch of prompts and return each row's new tokens (stop tokens excluded).

    Args:
        should_stop: optional hook ``(row, tokens_so_far) -> bool`` called after each new token;
            True ends that row (used for text-level stop strings above the engine).
        Other arguments as in :func:`generate_stream`.
    """
    out: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    stream = generate_stream(model, prompts, params, eos_token_id=eos_token_id, compile=compile,
                             constraints=constraints)
    for step in stream:
        for b, t in enumerate(step):
            if t is not None and not stopped[b]:
                out[b].append(t)
                if should_stop is not None and should_stop(b, out[b]):
                    stopped[b] = True
        if all(stopped):
            stream.close()
            break
    return out


def stream(model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams, *,
           eos_token_id: int | Sequence[int] | None = None, compile: bool = False,
           constraint: Constraint | None = None) -> Iterator[int]:
    """Stream one prompt's new token ids as they are produced (stop tokens are not yielded)."""
    for step in generate_stream(model, [prompt_ids], params, eos_token_id=eos_token_id, compile=compile,
                                constraints=[constraint]):
        if step[0] is None:
            return
        yield step[0]


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                history: Sequence[int] = ()) -> int:
    """Pick one token for one row, for callers that run their own decode loop (the serving batcher).

    Args:
        logits: ``(1, V)`` or ``(V,)``.
        params: anything with ``temperature``, ``top_k``, ``top_p`` (and optionally ``repetition_penalty``).
        generator: the request's generator (needed when ``temperature > 0`` for reproducibility).
        history: the prompt and tokens so far (for the repetition penalty).
    """
    logits = logits.reshape(1, -1).float()
    penalty = getattr(params, "repetition_penalty", 1.0)
    if penalty != 1.0 and len(history):
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[0, torch.as_tensor(list(history), dtype=torch.long, device=logits.device)] = True
        logits = apply_repetition_penalty(logits, seen, penalty)
    return int(sample_from_logits(logits, params.temperature, params.top_k, params.top_p, generator)[0])


# --------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------

def _select_beams(
    top_scores: torch.Tensor, top_idx: torch.Tensor, vocab: int, stops: set[int], nb: int,
    beams: list[list[int]], norm: float,
) -> tuple[list[tuple[int, int, float]], list[tuple[float, list[int]]]]:
    """Split a step's best candidates (flat indices into ``(nb, vocab)``, best first) into running and finished beams.

    Returns:
        up to ``nb`` running beams ``(origin beam, token, score)`` and the beams a stop token finished,
        ``(score / norm, tokens)`` with ``norm = length ** length_penalty``.
    """
    running: list[tuple[int, int, float]] = []
    finished: list[tuple[float, list[int]]] = []
    for rank, (score, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
        origin, token = divmod(idx, vocab)
        if token in stops:
            if rank < nb and score > -1e8:  # length counts the stop token
                finished.append((score / norm, beams[origin]))
            continue
        running.append((origin, token, score))
        if len(running) == nb:
            break
    return running, finished


def _fork_grammars(grammars: list[Constraint], origins: list[int], beams: list[list[int]],
                   scores: list[float]) -> list[Constraint]:
    """Each beam's grammar state: its origin's, copied (several beams may share an origin), advanced by
    the beam's new token."""
    forked = [grammars[o].clone() for o in origins]
    for g, beam, score in zip(forked, beams, scores):
        if score > -1e8:  # dead padding beams never emit
            g.advance(beam[-1])
    return forked


def _running_at_the_end(beams: list[list[int]], scores: list[float], grammars: list[Constraint] | None,
                        lp: float, any_finished: bool) -> list[tuple[float, list[int]]]:
    """The running beams that compete with the finished ones at ``max_new_tokens``, scored like them.
    Under a grammar only beams holding a complete document do, unless no beam at all is whole."""
    live = [b for b, beam in enumerate(beams) if beam and scores[b] > -1e8]
    whole = [b for b in live if grammars is None or grammars[b].accepting]
    return [(scores[b] / len(beams[b]) ** lp, beams[b]) for b in (whole if whole or any_finished else live)]


@torch.inference_mode()
def beam_search(model: nn.Module, prompt_ids: Sequence[int], params: SamplingParams, *,
                num_beams: int | None = None, length_penalty: float | None = None,
                eos_token_id: int | Sequence[int] | None = None, constraint: Constraint | None = None) -> list[int]:
    """Beam search (deterministic): keep the ``num_beams`` most likely continuations at each step.

    A beam that produces a stop token is finished with score ``sum(logprobs) / length **
    length_penalty``; search ends when ``num_beams`` beams are finished and no running beam can
    beat them, or at ``max_new_tokens``. ``num_beams=1`` is greedy decoding.

    Under a ``constraint`` each beam has its own grammar state (forked with the beam) and its scores are
    log-probabilities of the constrained distribution: the logits its grammar forbids get ``-inf`` before
    the log-softmax, as greedy and sampled decoding see them. So a beam whose document is complete ends
    at no cost (EOS is its only continuation) instead of losing the end-of-sequence token's raw
    log-probability to beams that run on (masking after the log-softmax, as ``transformers``'
    ``prefix_allowed_tokens_fn`` does, returned a cut-off ``{"a": 1000...`` where greedy found
    ``{"a":10}``). At ``max_new_tokens`` only beams holding a complete document compete (any beam if
    none does). ``ignore_eos`` does not apply under a grammar.

    Returns:
        the best continuation's token ids (stop token excluded).
    """
    nb = num_beams or params.num_beams
    lp = params.length_penalty if length_penalty is None else length_penalty
    if not isinstance(nb, int) or nb < 1:
        raise CorelmError(f"num_beams must be an integer >= 1, got {nb!r}")
    check_length(model, len(prompt_ids), params.max_new_tokens)
    if params.max_new_tokens == 0:
        return []
    if eos_token_id is None:
        eos_token_id = model.config.extra.get("eos_token_id")
    eos = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    # ignore_eos does not apply under a grammar: there EOS is allowed only where the document may end
    stops = set() if params.ignore_eos and constraint is None else set(params.stop_token_ids) | set(eos)
    device = model_device(model)
    n = len(prompt_ids)
    decoder = step_for(model)
    cache = decoder.new_cache(nb, n + params.max_new_tokens)
    logits = decoder.prefill(cache, [prompt_ids], rows=[0])  # (1, V)
    decoder.share_prefix(cache, n)  # every beam starts from the prompt's keys/values
    grammars = None if constraint is None else [constraint] + [constraint.clone() for _ in range(nb - 1)]
    if grammars is not None:
        logits = constraint.mask(logits)
    logprobs = torch.log_softmax(logits, dim=-1).expand(nb, -1)  # (nb, V)
    beam_scores = torch.full((nb,), -1e9, device=device)
    beam_scores[0] = 0.0  # the first step expands beam 0 only: the others are copies of it
    beams: list[list[int]] = [[] for _ in range(nb)]
    finished: list[tuple[float, list[int]]] = []
    vocab = logprobs.shape[-1]
    done = False
    for step in range(params.max_new_tokens):
        scores = (beam_scores[:, None] + logprobs).reshape(-1)  # (nb * V,)
        top_scores, top_idx = scores.topk(min(2 * nb, scores.numel()))
        next_beams, ended = _select_beams(top_scores, top_idx, vocab, stops, nb, beams, (step + 1) ** lp)
        finished = sorted(finished + ended, key=lambda x: -x[0])[:nb]
        if not next_beams or (len(finished) == nb and finished[-1][0] >= next_beams[0][2] / (step + 1) ** lp):
            done = True  # no running beam can overtake the finished ones
            break
        origins = torch.tensor([o for o, _, _ in next_beams], device=device)
        beams = [beams[o] + [t] for o, t, _ in next_beams]
        beam_scores = torch.tensor([s for _, _, s in next_beams], device=device)
        if len(next_beams) < nb:  # fewer candidates than beams (tiny vocabularies): pad with dead beams
            pad = nb - len(next_beams)
            origins = torch.cat([origins, origins[:1].expand(pad)])
            beams += [beams[0]] * pad
            beam_scores = torch.cat([beam_scores, torch.full((pad,), -1e9, device=device)])
        if not torch.equal(origins, torch.arange(nb, device=device)):
            decoder.reorder(cache, origins)  # each beam continues from its origin's keys/values
        if grammars is not None:
            grammars = _fork_grammars(grammars, origins.tolist(), beams, beam_scores.tolist())
        if step + 1 == params.max_new_tokens:
            break
        tokens = torch.tensor([b[-1] for b in beams], device=device)
        pos = torch.full((nb,), n + step, device=device)
        logits = decoder.decode(cache, tokens, pos)
        logprobs = torch.log_softmax(logits if grammars is None else mask_rows(logits, grammars), dim=-1)
    if not done:  # max_new_tokens reached: running beams compete with the finished ones
        finished += _running_at_the_end(beams, beam_scores.tolist(), grammars, lp, bool(finished))
    if not finished:
        return []
    return max(finished, key=lambda x: x[0])[1]
