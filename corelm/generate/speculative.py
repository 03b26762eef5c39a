"""Speculative decoding (Leviathan et al. 2023) and prompt-lookup decoding (Saxena 2023).

A cheap proposer guesses ``k`` tokens; the target model scores all of them in one forward pass and
keeps the longest prefix it agrees with, plus one token of its own. The proposer is either a small
draft model with the same tokenizer, or the prompt itself: prompt lookup finds the last ``n``
tokens earlier in the context and proposes what followed them there (cheap and effective when the
output copies from the input: code edits, summaries, extraction).

Correctness does not depend on the proposer:

- greedy: a drafted token is kept only if it is the target's argmax, so the output is token for
  token the plain greedy output;
- sampling: draft token ``x`` with draft probability ``q(x)`` is kept with probability
  ``min(1, p(x)/q(x))``; on rejection the token is drawn from ``norm(max(0, p - q))``. The result is
  distributed exactly as sampling from ``p`` (Leviathan et al. 2023, appendix A.1). A lookup draft
  is a deterministic proposal (``q`` one-hot).

Both models decode through their step (:mod:`corelm.generate.step`), each with a static KV cache;
rejected tokens need no cache rollback because the cache is written at positions and a query never
sees a slot past its own. On corelm's C++ step a verify pass is one call whose rows equal one-token
steps bit for bit, so greedy output is token for token what plain greedy decoding gives there.

Under a grammar (:class:`~corelm.generate.constraints.Constraint`: a JSON schema, regex...) the draft
proposes from its masked logits while the grammar advances over its proposals tentatively; a lookup
proposal is cut to the prefix the grammar accepts. The grammar then rolls back to the round's start,
and verification masks each position with the grammar state after the drafts kept so far, advancing
it only over the tokens kept: every emitted token is the one constrained decoding picks from the same
logits, and the run ends when the document is complete, as in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from corelm.errors import CorelmError
from corelm.generate.constraints import Constraint
from corelm.generate.step import step_for
from corelm.ops.sampling import sample_from_probs, temperature_probs


@dataclass
class SpecStats:
    """What a speculative run did: drafted and accepted tokens, target forward passes."""

    drafted: int = 0
    accepted: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    emitted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.emitted / self.target_calls if self.target_calls else 0.0


class _Cached:
    """A decoder's step with its own one-row KV cache and the number of positions already in it."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        self.step = step_for(model)
        self.cache = self.step.new_cache(1, max_len)
        self.length = 0

    def feed(self, tokens: list[int], all_logits: bool = True) -> torch.Tensor:
        """Run ``tokens`` at the next positions; returns logits ``(len(tokens), V)`` in fp32 (the
        last token's only when ``all_logits`` is False)."""
        logits = self.step.extend(self.cache, 0, tokens, self.length, all_logits)
        self.length += len(tokens)
        return logits

    def rewind(self, length: int) -> None:
        self.length = length  # slots past `length` are overwritten before any query can see them


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return temperature_probs(logits, temperature)  # total: any temperature > 0 gives a distribution


def _sample(p: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(sample_from_probs(p.reshape(1, -1), generator)[0])


def rejection_step(p: torch.Tensor, q: torch.Tensor | None, x: int,
                   generator: torch.Generator | None = None) -> tuple[bool, int | None]:
    """Keep draft token ``x`` with probability ``min(1, p(x)/q(x))``, else draw from ``norm(max(0, p - q))``.

    Args:
        p: target probabilities (V,).
        q: draft probabilities (V,), or ``None`` for a deterministic proposal (prompt lookup).
        x: the drafted token.
    Returns:
        ``(True, None)`` when kept, ``(False, replacement)`` otherwise.
    """
    q_x = q[x] if q is not None else p.new_tensor(1.0)
    if torch.rand((), generator=generator) < torch.clamp(p[x] / q_x, max=1.0):
        return True, None
    residual = (p - q).clamp(min=0) if q is not None else p.index_fill(0, torch.tensor(x), 0.0)
    if not residual.sum() > 0:  # p and q agree to fp32 rounding: the residual's limit is p itself
        residual = p
    return False, _sample(residual / residual.sum(), generator)


def lookup_draft(tokens: list[int], ngram: int, k: int) -> list[int]:
    """Prompt-lookup proposal: find the most recent earlier occurrence of the last ``n`` tokens
    (``n = ngram .. 1``) and return up to ``k`` tokens that followed it."""
    for n in range(min(ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                follow = tokens[start + n:start + n + k]
                if follow:
                    return follow
    return []


def check_draft(target: nn.Module, draft: nn.Module) -> None:
    """A draft must speak the target's vocabulary (same tokenizer)."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise CorelmError(f"the draft model's vocabulary ({dv} tokens) differs from the target's ({tv}); "
                          "speculative decoding needs the same tokenizer")


@torch.inference_mode()
# propose / verify / accept read top to bottom as in Leviathan et al.'s algorithm 1; splitting scatters it
def speculative_generate(target: nn.Module, prompt: list[int], max_new_tokens: int, *,  # noqa: C901
                         draft: nn.Module | None = None, lookup: int | None = None, k: int = 4,
                         temperature: float = 0.0, eos_token_id: int | None = None,
                         generator: torch.Generator | None = None,
                         constraint: Constraint | None = None) -> tuple[list[int], SpecStats]:
    """Generate with a draft model (``draft=``) or prompt lookup (``lookup=n``), batch 1.

    Args:
        target: the model whose distribution the output follows.
        prompt: token ids.
        max_new_tokens: tokens to generate (fewer if ``eos_token_id`` appears).
        draft: a smaller decoder with the same vocabulary.
        lookup: n-gram length for prompt-lookup proposals (used when ``draft`` is None).
        k: tokens proposed per round.
        temperature: 0 for greedy (output identical to plain greedy), > 0 for sampling.
        constraint: a fresh grammar the output follows (it ends when the grammar is complete).
    Returns:
        ``(new_tokens, stats)``.
    """
    if (draft is None) == (lookup is None):
        raise CorelmError("speculative decoding needs exactly one proposer: a draft model or --lookup N")
    if k < 1:
        raise CorelmError(f"draft length k must be at least 1, got {k}")
    if draft is not None:
        check_draft(target, draft)
    if not prompt:
        raise CorelmError("the prompt is empty")
    max_len = len(prompt) + max_new_tokens + k + 1
    if max_len > target.config.max_seq_len:
        raise CorelmError(f"prompt + max_new_tokens exceeds the model's {target.config.max_seq_len} positions")
    greedy = temperature <= 0
    tgt = _Cached(target, max_len)
    drf = _Cached(draft, max_len) if draft is not None else None
    tokens, stats, grammar = list(prompt), SpecStats(), constraint
    # The target has seen all but the last token: every round feeds it [unseen..., drafts...].
    if len(tokens) > 1:
        for cached in (tgt, drf) if drf is not None else (tgt,):
            cached.feed(tokens[:-1], all_logits=False)  # only the cache matters here
    out: list[int] = []
    while len(out) < max_new_tokens:
        budget = max_new_tokens - len(out)
        # ---- propose ----
        drafts: list[int] = []
        q_rows: list[torch.Tensor] = []
        if drf is not None:
            logits = drf.feed(tokens[drf.length:])[-1]
            stats.draft_calls += 1
            for i in range(min(k, budget)):
                if grammar is not None:
                    logits = grammar.mask(logits[None].clone())[0]
                if greedy:
                    x = int(logits.argmax())
                else:
                    q = _probs(logits, temperature)
                    x = _sample(q, generator)
                    q_rows.append(q)
                drafts.append(x)
                if grammar is not None:
                    grammar.advance(x)  # tentatively: the next draft position's mask needs it
                    if grammar.complete:
                        break
                if i + 1 < min(k, budget):
                    logits = drf.feed([x])[-1]
                    stats.draft_calls += 1
            if grammar is not None:
                grammar.rollback(len(drafts))
        else:
            drafts = lookup_draft(tokens, lookup, min(k, budget))
            if grammar is not None:
                drafts = drafts[:grammar.valid_prefix(drafts)]
        # ---- verify: one target pass over the unseen tokens and the drafts ----
        seen = tgt.length
        logits = tgt.feed(tokens[seen:] + drafts)[len(tokens) - 1 - seen:]  # (len(drafts) + 1, V)
        stats.target_calls += 1
        if grammar is not None:
            logits = logits.clone()  # masked row by row below, each with the state after the drafts kept
        accepted, extra = 0, None
        for i, x in enumerate(drafts):
            if grammar is not None:
                grammar.mask(logits[i:i + 1])
            if greedy:
                best = int(logits[i].argmax())
                if best != x:
                    extra = best
                    break
            else:
                keep, replacement = rejection_step(_probs(logits[i], temperature), q_rows[i] if q_rows else None,
                                                   x, generator)
                if not keep:
                    extra = replacement
                    break
            accepted += 1
            if grammar is not None:
                grammar.advance(x)
        finished = False
        if grammar is not None and grammar.complete:  # the kept drafts end the document: nothing follows
            extra, finished = None, True
        elif extra is None:  # every draft kept: the target's own next token comes free
            last = logits[len(drafts)]
            if grammar is not None:
                grammar.mask(last[None])
            extra = int(last.argmax()) if greedy else _sample(_probs(last, temperature), generator)
        if grammar is not None and extra is not None and extra != eos_token_id:
            grammar.advance(extra)
            finished = grammar.complete
        stats.drafted += len(drafts)
        stats.accepted += accepted
        stats.accepted_per_round.append(accepted)
        new = drafts[:accepted] + ([extra] if extra is not None else [])
        # keep only cache positions of tokens that are now part of the sequence
        tokens_before = len(tokens)
        tgt.rewind(tokens_before + accepted)
        if drf is not None:
            drf.rewind(min(drf.length, tokens_before + accepted))
        for t in new[:budget]:
            tokens.append(t)
            out.append(t)
            if t == eos_token_id:
                stats.emitted = len(out)
                return out, stats
        if finished:
            break
    stats.emitted = len(out)
    return out, stats
