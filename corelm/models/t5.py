"""T5 (Raffel et al. 2020) and T5 v1.1 / mT5: the encoder-decoder Transformer with relative-position buckets.

Where T5 departs from the Transformer of Vaswani et al. (2017), as implemented in
:mod:`corelm.models.bart`:

- positions are not added to the input: each attention score gets a learned scalar per head and per
  *bucket* of the relative distance ``key_pos - query_pos`` (:func:`relative_position_bucket`: exact
  buckets for short distances, logarithmic ones up to ``relative_attention_max_distance``). The encoder
  buckets both directions, the causal decoder only the past. Only the first block of each stack owns
  the table; every block of that stack reuses its bias. Cross-attention has no position bias;
- the scores are ``Q K^T + bias``, not divided by ``sqrt(head_dim)`` (the scale is folded into the
  initialisation, Mesh TensorFlow's convention);
- norms are RMS norms without bias (T5's "LayerNorm": no mean subtracted), applied before each
  sub-layer, with one more after the last block of each stack; no linear layer has a bias;
- the MLP is ``wo(relu(wi x))`` (T5) or the gated ``wo(gelu_tanh(wi_0 x) * wi_1 x)`` (T5 v1.1, mT5);
- the LM head is the embedding matrix, with the decoder output multiplied by ``d_model ** -0.5``
  first (T5), or a matrix of its own and no rescale (T5 v1.1, mT5).

Parameter names are those of Hugging Face ``T5ForConditionalGeneration``: ``shared``,
``encoder.block.{i}.layer.{j}.*``, ``decoder.block.{i}.layer.{j}.*``, ``*.final_layer_norm``, ``lm_head``.
The interface is :class:`corelm.models.bart.Bart`'s (``encode``, ``cross_kv``, ``decode``), so the
seq2seq decoding of :mod:`corelm.generate.seq2seq` serves both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.ops.activation import activation_fn
from corelm.ops.kv_cache import KVCache
from corelm.ops.tied import TiedLMHead


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """The bucket of each relative position ``key_pos - query_pos`` (Raffel et al. 2020, section 2.1).

    Half the buckets (per direction when ``bidirectional``) hold the distances ``0 .. n/2 - 1`` exactly;
    the rest cover ``n/2 .. max_distance`` logarithmically, and every longer distance shares the last one.
    A causal decoder only sees the past, so its future positions all fall in bucket 0 (they are masked).

    Args:
        relative_position: integer tensor of any shape.
    Returns:
        long tensor of the same shape, values in ``0 .. num_buckets - 1``.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets  # keys after the query: the upper half
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # log-spaced for max_exact <= distance < max_distance (distance 0 is never taken from this branch)
    log_bucket = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                              * (num_buckets - max_exact)).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


class T5LayerNorm(nn.Module):
    """RMS norm (Zhang & Sennrich 2019): ``w * x / sqrt(mean(x^2) + eps)``; no mean, no bias."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the mean square in fp32: bf16 squares of a large residual lose the small channels
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)


class Attention(nn.Module):
    """Unscaled multi-head attention ``softmax(Q K^T + bias) V``; the first block of a stack also owns the
    relative-position bias table ``relative_attention_bias`` (``(num_buckets, n_head)``)."""

    def __init__(self, config: ModelConfig, relative_bias: bool) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        inner = config.n_head * config.head_dim
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.attn_dropout = config.attn_dropout  # on the attention probabilities, in train mode
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.n_head)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``x (B, S, d)``, each ``(B, n_head, S, hd)``."""
        return self._heads(self.k(x)), self._heads(self.v(x))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x (B, T, d)`` attends keys/values ``(B, n_head, S, hd)``; ``bias`` broadcasts to ``(B, n_head, T, S)``
        and holds the position bias plus ``-inf`` where a key may not be attended."""
        B, T, _ = x.shape
        # scale=1: T5 scales no scores (its initialisation does, see _init_t5_)
        y = F.scaled_dot_product_attention(self._heads(self.q(x)), k, v, attn_mask=bias.to(x.dtype), scale=1.0,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, d)


class DenseReluDense(nn.Module):
    """T5's MLP: ``wo(act(wi x))``, or gated ``wo(act(wi_0 x) * wi_1 x)`` (T5 v1.1)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.gated_mlp
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.act = activation_fn(config.activation)
        self.dropout = nn.Dropout(config.dropout)  # on the hidden units, as transformers' T5 does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(self.dropout(h))


class SelfAttentionLayer(nn.Module):
    """``layer.0``: the norm and self-attention of a block (``SelfAttention``)."""

    def __init__(self, config: ModelConfig, relative_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = Attention(config, relative_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.norm_eps)


class CrossAttentionLayer(nn.Module):
    """``layer.1`` of a decoder block: the norm and attention over the encoder output (``EncDecAttention``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.EncDecAttention = Attention(config, relative_bias=False)
        self.layer_norm = T5LayerNorm(config.d_model, config.norm_eps)


class FeedForwardLayer(nn.Module):
    """The last ``layer.*`` of a block: the norm and the MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.DenseReluDense = DenseReluDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.DenseReluDense(self.layer_norm(x))


class EncoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, relative_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([SelfAttentionLayer(config, relative_bias), FeedForwardLayer(config)])
        self.dropout = nn.Dropout(config.dropout)  # on each sub-layer's output before the residual add

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        sa, ff = self.layer
        h = sa.layer_norm(x)
        x = x + self.dropout(sa.SelfAttention(h, *sa.SelfAttention.project_kv(h), bias))
        return x + self.dropout(ff(x))


class DecoderBlock(nn.Module):
    def __init__(self, config: ModelConfig, relative_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList([SelfAttentionLayer(config, relative_bias), CrossAttentionLayer(config),
                                    FeedForwardLayer(config)])
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, self_bias: torch.Tensor, cross_kv: tuple[torch.Tensor, torch.Tensor],
                cross_bias: torch.Tensor, cache: KVCache | None, index: int, input_pos: torch.Tensor) -> torch.Tensor:
        sa, ca, ff = self.layer
        h = sa.layer_norm(x)
        k, v = sa.SelfAttention.project_kv(h)  # (B, n_head, T, hd)
        if cache is not None:  # this step's keys go to their slots; attend every slot written so far
            k, v = cache.update(index, input_pos, k, v, self_bias.shape[-1])
        x = x + self.dropout(sa.SelfAttention(h, k, v, self_bias))
        x = x + self.dropout(ca.EncDecAttention(ca.layer_norm(x), *cross_kv, cross_bias))
        return x + self.dropout(ff(x))


def _key_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``0`` for real keys and ``-inf`` for padding, ``(B, 1, 1, S)``; zero of shape ``(1, 1, 1, 1)`` when nothing is
    padded (attention masks need four dimensions: cross-attention has no position bias to add it to)."""
    if mask is None:
        return torch.zeros((1, 1, 1, 1), dtype=torch.float32, device=like.device)
    return torch.zeros(mask.shape, dtype=torch.float32, device=like.device).masked_fill(
        ~mask.bool(), float("-inf"))[:, None, None, :]


class Stack(nn.Module):
    """Blocks of one side (``encoder`` or ``decoder``) and the final norm; block 0 owns the position bias."""

    def __init__(self, config: ModelConfig, block: type[nn.Module], n_layer: int, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.block = nn.ModuleList([block(config, relative_bias=i == 0) for i in range(n_layer)])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)  # on the embedded input and on the stack's output

    def position_bias(self, query_pos: torch.Tensor, n_keys: int) -> torch.Tensor:
        """The learned bias ``(1, n_head, T, S)`` of queries at ``query_pos (T,)`` over keys ``0 .. n_keys - 1``."""
        relative = torch.arange(n_keys, device=query_pos.device)[None, :] - query_pos[:, None]  # (T, S)
        bucket = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        table = self.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(bucket).permute(2, 0, 1)[None].float()  # (1, n_head, T, S)


class Encoder(Stack):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, EncoderBlock, config.n_encoder_layer, bidirectional=True)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        """``x (B, S, d)`` embedded source, ``src_mask (B, S)`` 1 = real token -> ``(B, S, d)``."""
        S = x.shape[1]
        bias = self.position_bias(torch.arange(S, device=x.device), S) + _key_mask(src_mask, x)  # (B, h, S, S)
        x = self.dropout(x)
        for block in self.block:
            x = block(x, bias)
        return self.dropout(self.final_layer_norm(x))


class Decoder(Stack):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, DecoderBlock, config.n_layer, bidirectional=False)

    def forward(self, x: torch.Tensor, cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
                src_mask: torch.Tensor | None, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Decode target positions ``start .. start + T - 1`` (see :meth:`corelm.models.bart.Decoder.forward`)."""
        B, T, _ = x.shape
        if cache is None and start:
            raise CorelmError("decoding from a position past 0 needs the KV cache of the earlier positions")
        positions = torch.arange(start, start + T, device=x.device)  # (T,)
        n_keys = start + T
        causal = torch.arange(n_keys, device=x.device)[None, :] <= positions[:, None]  # (T, S_keys)
        self_bias = self.position_bias(positions, n_keys).masked_fill(~causal, float("-inf"))  # (1, h, T, S_keys)
        cross_bias = _key_mask(src_mask, x)
        input_pos = positions[None].expand(B, T)  # (B, T)
        x = self.dropout(x)
        for i, block in enumerate(self.block):
            x = block(x, self_bias, cross_kv[i], cross_bias, cache, i, input_pos)
        return self.dropout(self.final_layer_norm(x))


@torch.no_grad()
def _init_t5_(model: T5) -> None:
    """Mesh TensorFlow's initialisation (as transformers' ``T5PreTrainedModel._init_weights``): each matrix with
    standard deviation ``fan_in ** -0.5`` (the queries also carry the missing ``head_dim ** -0.5`` of the
    unscaled scores), the embedding with 1, norms with ones."""
    c = model.config
    model.shared.weight.normal_(std=1.0)
    if not c.tie_embeddings:
        model.lm_head.weight.normal_(std=c.d_model ** -0.5)
    for module in model.modules():
        if isinstance(module, Attention):
            module.q.weight.normal_(std=(c.d_model * c.head_dim) ** -0.5)
            module.k.weight.normal_(std=c.d_model ** -0.5)
            module.v.weight.normal_(std=c.d_model ** -0.5)
            module.o.weight.normal_(std=(c.n_head * c.head_dim) ** -0.5)
            if hasattr(module, "relative_attention_bias"):
                module.relative_attention_bias.weight.normal_(std=c.d_model ** -0.5)
        elif isinstance(module, DenseReluDense):
            for name in ("wi_0", "wi_1") if module.gated else ("wi",):
                getattr(module, name).weight.normal_(std=c.d_model ** -0.5)
            module.wo.weight.normal_(std=c.d_ff ** -0.5)


class T5(nn.Module):
    """Encoder-decoder with an LM head: ``forward(input_ids, decoder_input_ids) -> logits (B, T, V)``.

    Generation calls the parts (as for :class:`corelm.models.bart.Bart`): :meth:`encode` and
    :meth:`cross_kv` once per source, then :meth:`decode` per step with a
    :class:`~corelm.ops.kv_cache.KVCache` for the decoder's self-attention.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.lm_head = TiedLMHead(self.shared) if config.tie_embeddings else nn.Linear(
            config.d_model, config.vocab_size, bias=False)
        self.output_scale = config.d_model ** -0.5 if config.scale_decoder_outputs else 1.0
        _init_t5_(self)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids ``(B, S)`` and mask ``(B, S)`` (1 = real token) -> encoder output ``(B, S, d)``."""
        return self.encoder(self.shared(input_ids), attention_mask)

    def cross_kv(self, encoder_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder block's cross-attention keys and values ``(B, n_head, S, hd)``: one projection per source."""
        return [block.layer[1].EncDecAttention.project_kv(encoder_out) for block in self.decoder.block]

    def decode(self, decoder_input_ids: torch.Tensor, cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
               attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
               start: int = 0) -> torch.Tensor:
        """Target ids ``(B, T)`` at positions ``start..`` -> logits ``(B, T, V)``."""
        h = self.decoder(self.shared(decoder_input_ids), cross_kv, attention_mask, cache, start)
        # the tied head is the embedding, whose rows have norm ~sqrt(d): rescale so logits start near unit size
        return self.lm_head(h * self.output_scale if self.output_scale != 1.0 else h)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits ``(B, T, V)`` of ``decoder_input_ids`` given the source ``input_ids``."""
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, self.cross_kv(memory), attention_mask)
