"""Decoding for encoder-decoder models (:class:`~corelm.models.bart.Bart`, :class:`~corelm.models.t5.T5`): greedy
and beam search on token ids.

The source is encoded once and each decoder layer's cross-attention keys/values are projected once
per source (beam copies share them by ``repeat_interleave``); the decoder's self-attention keys go to a
preallocated :class:`~corelm.ops.kv_cache.KVCache`, so each step feeds one token per row.

The results equal transformers' ``generate(do_sample=False, num_beams=1)`` and ``generate(num_beams=N)``
(transformers >= 4.50's vectorised beam search): the same per-step candidate sets (top ``2N``), the
same length penalty (a finished hypothesis scores ``sum log p / n_generated ** length_penalty``, EOS
counted) and the same ``early_stopping`` semantics (``True``: stop a row once N hypotheses finished;
``False``: stop when the best running beam, scored at its current length, cannot beat the worst
finished one; ``"never"``: the same with the best hypothetical length ``max_new_tokens`` when
``length_penalty > 0``). Logit processors implemented: ``forced_bos_token_id`` (mBART-50),
``forced_eos_token_id`` and banned single tokens (Marian's ``bad_words_ids = [[pad]]``); others
(``no_repeat_ngram_size``, ``min_length``, repetition penalties) are not, nor sampling,
several returned sequences per source or several EOS ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from corelm.errors import CorelmError
from corelm.ops.kv_cache import KVCache

_NEG = -1.0e9  # transformers' "never choose this beam" score
DEFAULT_BEAMS = 4  # corelm translate / evaluate when neither the user nor the checkpoint's generation config says


@dataclass
class Seq2SeqParams:
    """How to decode; token ids left ``None`` come from the model config.

    Attributes:
        max_new_tokens: Tokens to generate after the decoder start token.
        num_beams: 1 = greedy, else beam search with this many beams.
        length_penalty: Exponent of the generated length dividing a finished hypothesis's log-probability.
        early_stopping: ``True``, ``False`` or ``"never"`` (transformers' semantics, see the module docstring).
        decoder_start_token_id: First decoder token; default ``config.decoder_start_token_id``.
        eos_token_id: Ends a hypothesis; default ``config.extra["eos_token_id"]`` (None = only the length limit).
        pad_token_id: Fills rows after their end; default ``config.pad_token_id``.
        forced_bos_token_id: Forced as the first generated token; default from ``config.extra``.
        forced_eos_token_id: Forced as the last token the length limit allows; default from ``config.extra``.
        suppress_tokens: Token ids never generated (Marian checkpoints ban their pad id).
        renormalize_logits: Log-softmax again after the processors (transformers' ``renormalize_logits``).
    """

    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    decoder_start_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    suppress_tokens: list[int] = field(default_factory=list)
    renormalize_logits: bool = False

    @classmethod
    def from_generation_config(cls, data: dict[str, Any], **overrides: Any) -> Seq2SeqParams:
        """The settings of an HF ``generation_config.json`` dict (Marian: 4-6 beams, the pad id banned,
        log-probabilities renormalised), then ``overrides``. ``max_length`` counts the start token."""
        kwargs: dict[str, Any] = {k: data[k] for k in (
            "num_beams", "length_penalty", "early_stopping", "decoder_start_token_id", "eos_token_id", "pad_token_id",
            "forced_bos_token_id", "forced_eos_token_id", "renormalize_logits") if data.get(k) is not None}
        if data.get("max_new_tokens") is not None:
            kwargs["max_new_tokens"] = data["max_new_tokens"]
        elif data.get("max_length") is not None:
            kwargs["max_new_tokens"] = data["max_length"] - 1
        banned = data.get("bad_words_ids") or []
        if any(len(words) != 1 for words in banned):
            raise CorelmError("bad_words_ids of more than one token are not supported by corelm's seq2seq decoding")
        kwargs["suppress_tokens"] = [words[0] for words in banned] + list(data.get("suppress_tokens") or [])
        return cls(**{**kwargs, **overrides})

    def resolved(self, config) -> Seq2SeqParams:
        """A copy with the ``None`` token ids taken from a ``bart`` :class:`~corelm.config.ModelConfig`."""
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise CorelmError("max_new_tokens and num_beams must be at least 1")
        if self.early_stopping not in (True, False, "never"):
            raise CorelmError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        extra = config.extra
        pick = lambda value, default: default if value is None else value
        eos = pick(self.eos_token_id, extra.get("eos_token_id"))
        if isinstance(eos, list):
            if len(eos) > 1:
                raise CorelmError("more than one EOS id is not supported by corelm's seq2seq decoding")
            eos = eos[0] if eos else None
        return Seq2SeqParams(
            self.max_new_tokens, self.num_beams, self.length_penalty, self.early_stopping,
            pick(self.decoder_start_token_id, config.decoder_start_token_id), eos,
            pick(self.pad_token_id, config.pad_token_id if config.pad_token_id is not None else 0),
            pick(self.forced_bos_token_id, extra.get("forced_bos_token_id")),
            pick(self.forced_eos_token_id, extra.get("forced_eos_token_id")), list(self.suppress_tokens),
            self.renormalize_logits)


def _process(scores: torch.Tensor, cur_len: int, max_length: int, p: Seq2SeqParams) -> torch.Tensor:
    """The logit processors on next-token scores ``(N, V)``; ``cur_len`` decoder tokens exist (start included)."""
    if p.suppress_tokens:
        scores[:, p.suppress_tokens] = -float("inf")
    forced = (p.forced_bos_token_id if cur_len == 1 else None)
    if cur_len == max_length - 1 and p.forced_eos_token_id is not None:
        forced = p.forced_eos_token_id
    if forced is not None:
        scores[:] = -float("inf")
        scores[:, forced] = 0.0
    # transformers' LogitNormalization, the last processor: the banned tokens' mass goes back to the others
    return torch.log_softmax(scores, dim=-1) if p.renormalize_logits else scores


def _encode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            copies: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """Encoder output and cross-attention keys/values, computed once per source, then repeated per beam."""
    kv = model.cross_kv(model.encode(input_ids, attention_mask))
    if copies > 1:
        kv = [(k.repeat_interleave(copies, 0), v.repeat_interleave(copies, 0)) for k, v in kv]  # (B*N, h, S, hd)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(copies, 0)
    return kv, attention_mask


def _cache(model: nn.Module, rows: int, max_length: int, like: torch.Tensor) -> KVCache:
    c = model.config
    return KVCache(c.n_layer, rows, c.n_head, max_length, c.head_dim, like.dtype, like.device)


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             params: Seq2SeqParams | None = None) -> torch.Tensor:
    """Decode a batch of sources.

    Args:
        model: a :class:`~corelm.models.bart.Bart` or :class:`~corelm.models.t5.T5`.
        input_ids: ``(B, S)`` source ids (right-padded).
        attention_mask: ``(B, S)``, 1 = real source token; None = no padding.
        params: decoding settings (:class:`Seq2SeqParams`).
    Returns:
        ``(B, 1 + T)`` target ids starting with the decoder start token, rows that ended early padded
        with ``pad_token_id`` (transformers' ``generate`` layout).
    """
    p = (params or Seq2SeqParams()).resolved(model.config)
    if p.max_new_tokens > model.config.max_seq_len:  # token t is decoded at position t - 1
        raise CorelmError(f"max_new_tokens={p.max_new_tokens} is more than the {model.config.max_seq_len} target "
                          "positions this model has")
    if p.num_beams == 1:
        return _greedy(model, input_ids, attention_mask, p)
    return _beam_search(model, input_ids, attention_mask, p)


def _greedy(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            p: Seq2SeqParams) -> torch.Tensor:
    B, max_length = input_ids.shape[0], 1 + p.max_new_tokens
    kv, mask = _encode(model, input_ids, attention_mask, 1)
    cache = _cache(model, B, max_length, kv[0][0])
    seq = torch.full((B, 1), p.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    running = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    for cur_len in range(1, max_length):
        logits = model.decode(seq[:, -1:], kv, mask, cache, cur_len - 1)[:, -1].float()  # (B, V)
        token = _process(logits, cur_len, max_length, p).argmax(-1)  # (B,)
        token = torch.where(running, token, p.pad_token_id)
        seq = torch.cat([seq, token[:, None]], dim=1)
        if p.eos_token_id is not None:
            running &= token != p.eos_token_id
        if not running.any():
            break
    return seq


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx (B, K)`` of ``t (B, N, ...)`` per batch entry -> ``(B, K, ...)``."""
    return torch.take_along_dim(t, idx.view(*idx.shape, *[1] * (t.dim() - 2)), dim=1)


def _beam_search(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 p: Seq2SeqParams) -> torch.Tensor:
    """Beam search with transformers' bookkeeping: ``2N`` candidates per row and step, the ``N`` best that did
    not end keep running, the ``N`` best ended ones (length-penalised) are kept as finished hypotheses."""
    B, N, dev = input_ids.shape[0], p.num_beams, input_ids.device
    max_length = 1 + p.max_new_tokens
    K = 2 * N  # candidates per row and step (transformers: max(2, 1 + n_eos) * N, one EOS id here)
    kv, mask = _encode(model, input_ids, attention_mask, N)
    cache = _cache(model, B * N, max_length, kv[0][0])

    running = torch.full((B, N, max_length), p.pad_token_id, dtype=torch.long, device=dev)
    running[:, :, 0] = p.decoder_start_token_id
    finished = running.clone()  # the kept finished hypotheses
    running_scores = torch.zeros(B, N, device=dev)
    running_scores[:, 1:] = _NEG  # all beams start identical: only the first may expand
    finished_scores = torch.full((B, N), _NEG, device=dev)
    finished_len = torch.zeros(B, N, dtype=torch.long, device=dev)  # generated tokens of each finished one
    is_finished = torch.zeros(B, N, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    top_n = torch.arange(K, device=dev) < N  # only the first N candidates may become finished hypotheses
    row_offset = torch.arange(B, device=dev)[:, None] * N  # (B, 1)

    for cur_len in range(1, max_length):
        logits = model.decode(running[:, :, cur_len - 1].reshape(B * N, 1), kv, mask, cache, cur_len - 1)
        log_probs = _process(torch.log_softmax(logits[:, -1].float(), dim=-1), cur_len, max_length, p)
        V = log_probs.shape[-1]
        log_probs = (log_probs.view(B, N, V) + running_scores[:, :, None]).view(B, N * V)
        cand_scores, cand = torch.topk(log_probs, K)  # (B, K)
        parent, token = cand // V, cand % V
        cand_seq = _gather(running, parent)  # (B, K, max_length)
        cand_seq[:, :, cur_len] = token
        ends = torch.full_like(token, cur_len + 1 >= max_length, dtype=torch.bool)  # (B, K)
        if p.eos_token_id is not None:
            ends |= token == p.eos_token_id

        # the N best candidates that did not end keep running
        alive_scores = cand_scores + ends.to(torch.float32) * _NEG
        keep = torch.topk(alive_scores, N)[1]
        running, running_scores = _gather(cand_seq, keep), _gather(alive_scores, keep)
        running_parent = _gather(parent, keep)  # (B, N) the beam each continues

        # ended candidates among the first N compete with the kept finished hypotheses
        just_ended = ends & top_n[None, :]
        scores = cand_scores / ((cur_len + 1 - 1) ** p.length_penalty)
        scores += (is_finished.all(-1, keepdim=True) & (p.early_stopping is True)).to(torch.float32) * _NEG
        scores += (~improvable).to(torch.float32) * _NEG
        scores += (~just_ended) * _NEG
        merged = torch.topk(torch.cat([finished_scores, scores], dim=1), N)[1]
        finished = _gather(torch.cat([finished, cand_seq], dim=1), merged)
        finished_scores = _gather(torch.cat([finished_scores, scores], dim=1), merged)
        finished_len = _gather(torch.cat([finished_len, torch.full_like(cand, cur_len)], dim=1), merged)
        is_finished = _gather(torch.cat([is_finished, just_ended], dim=1), merged)

        # each running beam continues its parent's cached keys
        rows = (running_parent + row_offset).view(-1)
        for t in cache.k + cache.v:
            t.copy_(t[rows])

        # can a running beam still beat the worst finished hypothesis? (scored at its current length, or
        # at the longest one for early_stopping="never" with a positive length penalty)
        best_len = (max_length - 1) if p.early_stopping == "never" and p.length_penalty > 0.0 else cur_len
        best_running = running_scores[:, :1] / (best_len ** p.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], _NEG)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        if not (improvable.any() and not (is_finished.all() and p.early_stopping is True) and not ends.all()):
            break

    best = finished[:, 0]  # (B, max_length)
    return best[:, : 1 + int(finished_len[:, 0].max())]


# ---- text in, text out ------------------------------------------------------------------------------


class Seq2Seq:
    """An encoder-decoder with its tokenizer: :meth:`translate` (or summarize) texts.

    Attributes:
        model: a :class:`~corelm.models.bart.Bart` or :class:`~corelm.models.t5.T5`.
        tokenizer: its :class:`~corelm.tokenizer.Tokenizer` (from ``tokenizer.json``), or None: then only
            :meth:`generate_ids` works. Marian repositories ship two SentencePiece models (``source.spm``,
            ``target.spm``) and a ``vocab.json`` instead, which corelm does not read (transformers'
            ``MarianTokenizer`` needs the ``sentencepiece`` package and has no fast, tokenizer.json form).
        config: the :class:`~corelm.config.ModelConfig`.
        params: the checkpoint's decoding settings (``generation_config.json`` next to the weights, if any).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: Any, source: str = "") -> None:
        self.model, self.tokenizer, self.config, self.source = model, tokenizer, config, source
        gen = Path(source) / "generation_config.json" if source else None
        data = json.loads(gen.read_text()) if gen is not None and gen.is_file() else {}
        self.generation_config = data  # what the checkpoint asked for (``corelm translate`` defaults to 4 beams)
        self.params = Seq2SeqParams.from_generation_config(data)

    def __repr__(self) -> str:
        return f"Seq2Seq({self.config.name or self.config.extra.get('model_type', 'bart')}, {self.source})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate_ids(self, sources: list[list[int]], **overrides: Any) -> list[list[int]]:
        """Target ids (start token and padding removed, EOS kept) of source id lists; ``overrides`` are
        :class:`Seq2SeqParams` fields (``num_beams=1``, ``max_new_tokens=...``)."""
        params = dataclass_replace(self.params, **overrides).resolved(self.config)
        width = max(len(s) for s in sources)
        ids = torch.full((len(sources), width), params.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sources), width), dtype=torch.long)
        for i, row in enumerate(sources):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        out = generate(self.model, ids.to(self.device), mask.to(self.device), params)[:, 1:].tolist()
        return [row[: row.index(params.eos_token_id) + 1] if params.eos_token_id in row else row for row in out]

    def translate(self, texts: list[str], batch_size: int = 32, progress: Any = None, **overrides: Any) -> list[str]:
        """Translate (or summarize) ``texts``: one output string each, special tokens dropped.

        Args:
            batch_size: sources decoded together (sorted by length, so a batch pads little).
            progress: called with the number of texts done after each batch (a progress bar's ``update``).
            overrides: :class:`Seq2SeqParams` fields, e.g. ``num_beams=4``, ``max_new_tokens=32``.
        """
        if self.tokenizer is None:
            if self.source and (Path(self.source) / "source.spm").is_file():
                raise CorelmError(f"{self.source} ships Marian's SentencePiece source.spm/target.spm, not a "
                                  "tokenizer.json, and corelm reads tokenizer.json only: encode with transformers' "
                                  "MarianTokenizer (needs sentencepiece) and pass ids to generate_ids")
            raise CorelmError(f"{self.source or 'this model'} has no tokenizer.json; use generate_ids with token ids")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise CorelmError("translate takes a list of strings")
        if batch_size < 1:
            raise CorelmError(f"batch_size must be at least 1, got {batch_size}")
        eos = self.config.extra.get("eos_token_id")
        sources = []
        for ids in self.tokenizer.encode_batch(texts, add_special_tokens=True):
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]  # sources end in </s>, as the models were trained
            limit = self.config.max_seq_len  # keep the start and the final </s>
            sources.append(ids[: limit - 1] + ids[-1:] if len(ids) > limit else ids)
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        out: list[str] = [""] * len(sources)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for i, row in zip(chunk, self.generate_ids([sources[i] for i in chunk], **overrides)):
                out[i] = self.tokenizer.decode(row, skip_special_tokens=True)
            if progress is not None:
                progress(len(chunk))
        return out


def decoding_overrides(s2s: Seq2Seq, num_beams: int | None, max_new_tokens: int | None,
                       length_penalty: float | None = None) -> dict[str, Any]:
    """The :class:`~corelm.generate.seq2seq.Seq2SeqParams` fields to override: the options given, and the defaults
    (4 beams, 64 tokens within the model's positions) where the checkpoint's generation config is silent."""
    gen = s2s.generation_config
    out: dict[str, Any] = {}
    if num_beams is not None or "num_beams" not in gen:
        out["num_beams"] = num_beams or DEFAULT_BEAMS
    if max_new_tokens is not None:
        out["max_new_tokens"] = max_new_tokens
    elif "max_new_tokens" not in gen and "max_length" not in gen:
        out["max_new_tokens"] = min(64, s2s.config.max_seq_len)
    if length_penalty is not None:
        out["length_penalty"] = length_penalty
    return out
