"""BART (Lewis et al. 2019) and MarianMT (Junczys-Dowmunt et al. 2018): encoder-decoder Transformers.

The original Transformer of Vaswani et al. (2017): a bidirectional encoder reads the source, a
causal decoder writes the target while cross-attending to the encoder's output. The variants differ
only in details the config names:

- positions: BART learns a table (indexed from 2, an offset fairseq kept), Marian adds fixed
  sinusoids (sines in the first half of the channels, cosines in the second, not interleaved);
- ``scale_embedding``: Marian (and mBART) multiply token embeddings by ``sqrt(d_model)``;
- ``layernorm_embedding``: BART normalises the embedded input, Marian does not;
- ``normalize_before``: mBART's pre-LN blocks with a final LayerNorm after each stack; BART and
  Marian are post-LN (``x = LN(x + sublayer(x))``).

Parameter names are those of Hugging Face ``BartForConditionalGeneration``/``MarianMTModel``:
``model.shared``, ``model.encoder.*``, ``model.decoder.*``, ``lm_head`` and the ``final_logits_bias``
buffer. Encoder, decoder and LM head share ``model.shared`` (untied heads own ``lm_head.weight``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.ops.attention import attention
from corelm.ops.init import init_normal_
from corelm.ops.kv_cache import KVCache
from corelm.ops.norm import LayerNorm
from corelm.ops.tied import TiedLMHead

# fairseq reserved the first two rows of BART's learned position table; position p reads row p + 2.
LEARNED_POSITION_OFFSET = 2


def _activation(name: str) -> nn.Module:
    if name.startswith("gelu"):
        return nn.GELU(approximate="tanh" if name == "gelu_tanh" else "none")
    return nn.SiLU() if name == "silu" else nn.ReLU()


def sinusoidal_positions(positions: torch.Tensor, d_model: int, dtype: torch.dtype) -> torch.Tensor:
    """Marian's fixed position embeddings ``(T, d)``: ``sin(p w_j)`` in the first half, ``cos(p w_j)`` in
    the second, ``w_j = 10000^(-2j/d)``. Computed in fp64 (as transformers builds its table), then cast."""
    half = (d_model + 1) // 2
    inv_freq = 10000.0 ** (-2.0 * torch.arange(half, dtype=torch.float64, device=positions.device) / d_model)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None]  # (T, half)
    return torch.cat([angles.sin(), angles.cos()[:, : d_model // 2]], dim=-1).to(dtype)  # (T, d)


class Attention(nn.Module):
    """Multi-head attention whose keys/values come from the caller: the block's own input (self-attention)
    or the encoder output (cross-attention, projected once per source by :meth:`project_kv`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        inner = config.n_head * config.head_dim
        self.q_proj = nn.Linear(config.d_model, inner, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, inner, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, inner, bias=config.bias)
        self.out_proj = nn.Linear(inner, config.d_model, bias=config.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``x (B, S, d)``, each ``(B, n_head, S, hd)``."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        y = attention(self._heads(self.q_proj(x)), k, v, mask)  # (B, n_head, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, d)


def _sublayer(norm: nn.Module, f, x: torch.Tensor, pre_norm: bool) -> torch.Tensor:
    """One residual sub-layer: ``x + f(LN(x))`` (pre-LN, mBART) or ``LN(x + f(x))`` (post-LN, BART/Marian)."""
    return x + f(norm(x)) if pre_norm else norm(x + f(x))


class EncoderLayer(nn.Module):
    """Bidirectional self-attention, then the MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.normalize_before
        self.self_attn = Attention(config)
        self.self_attn_layer_norm = LayerNorm(config.d_model, eps=config.norm_eps)
        self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc2 = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.final_layer_norm = LayerNorm(config.d_model, eps=config.norm_eps)
        self.act = _activation(config.activation)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = _sublayer(self.self_attn_layer_norm, lambda h: self.self_attn(h, *self.self_attn.project_kv(h), mask),
                      x, self.pre_norm)
        return _sublayer(self.final_layer_norm, self.mlp, x, self.pre_norm)


class DecoderLayer(nn.Module):
    """Causal self-attention (keys/values cached), cross-attention over the encoder output, the MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.normalize_before
        self.self_attn = Attention(config)
        self.self_attn_layer_norm = LayerNorm(config.d_model, eps=config.norm_eps)
        self.encoder_attn = Attention(config)
        self.encoder_attn_layer_norm = LayerNorm(config.d_model, eps=config.norm_eps)
        self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc2 = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.final_layer_norm = LayerNorm(config.d_model, eps=config.norm_eps)
        self.act = _activation(config.activation)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor, cross_kv: tuple[torch.Tensor, torch.Tensor], self_mask: torch.Tensor,
                cross_mask: torch.Tensor | None, cache: KVCache | None, layer: int,
                input_pos: torch.Tensor) -> torch.Tensor:
        def self_attn(h: torch.Tensor) -> torch.Tensor:
            k, v = self.self_attn.project_kv(h)  # (B, n_head, T, hd)
            if cache is not None:  # this step's keys go to their slots; attend every slot written so far
                k, v = cache.update(layer, input_pos, k, v, self_mask.shape[-1])
            return self.self_attn(h, k, v, self_mask)

        x = _sublayer(self.self_attn_layer_norm, self_attn, x, self.pre_norm)
        x = _sublayer(self.encoder_attn_layer_norm, lambda h: self.encoder_attn(h, *cross_kv, cross_mask),
                      x, self.pre_norm)
        return _sublayer(self.final_layer_norm, self.mlp, x, self.pre_norm)


class Positions(nn.Module):
    """Learned (BART: ``embed_positions.weight``, rows offset by 2) or sinusoidal (Marian: no parameter)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.kind, self.d_model, self.max_positions = config.positions, config.d_model, config.max_seq_len
        if self.kind == "learned":
            self.weight = nn.Parameter(torch.empty(config.max_seq_len + LEARNED_POSITION_OFFSET, config.d_model))
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``positions (T,)`` -> embeddings ``(T, d)``."""
        if int(positions.max()) >= self.max_positions:
            raise CorelmError(f"position {int(positions.max())} is past the {self.max_positions} positions this "
                              "model has")
        if self.kind == "learned":
            return F.embedding(positions + LEARNED_POSITION_OFFSET, self.weight)
        return sinusoidal_positions(positions, self.d_model, dtype)


class Stack(nn.Module):
    """What encoder and decoder share: positions, the optional embedding/final LayerNorms, the layers."""

    def __init__(self, config: ModelConfig, layer: type[nn.Module], n_layer: int) -> None:
        super().__init__()
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_positions = Positions(config)
        norm = lambda: LayerNorm(config.d_model, eps=config.norm_eps)
        self.layernorm_embedding = norm() if config.layernorm_embedding else nn.Identity()
        self.layers = nn.ModuleList([layer(config) for _ in range(n_layer)])
        # pre-LN leaves the last residual un-normalised, so mBART normalises each stack's output
        self.layer_norm = norm() if config.normalize_before else nn.Identity()

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``tokens (B, T, d)`` (already looked up) plus positions ``(T,)``, normalised if configured."""
        x = tokens * self.embed_scale + self.embed_positions(positions, tokens.dtype)[None]  # (B, T, d)
        return self.layernorm_embedding(x)


class Encoder(Stack):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, EncoderLayer, config.n_encoder_layer)

    def forward(self, tokens: torch.Tensor, src_mask: torch.Tensor | None) -> torch.Tensor:
        """``tokens (B, S, d)`` embedded source, ``src_mask (B, S)`` 1 = real token -> ``(B, S, d)``."""
        x = self.embed(tokens, torch.arange(tokens.shape[1], device=tokens.device))
        mask = None if src_mask is None else src_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.layers:
            x = layer(x, mask)
        return self.layer_norm(x)


class Decoder(Stack):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, DecoderLayer, config.n_layer)

    def forward(self, tokens: torch.Tensor, cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
                src_mask: torch.Tensor | None, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Decode target positions ``start .. start + T - 1``.

        Args:
            tokens: ``(B, T, d)`` embedded target tokens.
            cross_kv: per layer, the encoder output's keys and values ``(B, n_head, S, hd)``.
            src_mask: ``(B, S)`` 1 = real source token, or None.
            cache: the decoder self-attention cache holding positions ``0 .. start - 1``; None = no cache
                (``start`` must be 0 and every position is computed).
            start: position of the first token.
        Returns:
            hidden states ``(B, T, d)``.
        """
        B, T, _ = tokens.shape
        positions = torch.arange(start, start + T, device=tokens.device)  # (T,)
        x = self.embed(tokens, positions)
        n_keys = start + T if cache is not None else T
        if cache is None and start:
            raise CorelmError("decoding from a position past 0 needs the KV cache of the earlier positions")
        self_mask = torch.arange(n_keys, device=tokens.device)[None, :] <= positions[:, None]  # (T, S_keys)
        self_mask = self_mask[None, None]  # (1, 1, T, S_keys)
        cross_mask = None if src_mask is None else src_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        input_pos = positions[None].expand(B, T)  # (B, T)
        for i, layer in enumerate(self.layers):
            x = layer(x, cross_kv[i], self_mask, cross_mask, cache, i, input_pos)
        return self.layer_norm(x)


class BartModel(nn.Module):
    """``shared`` token embeddings, ``encoder`` and ``decoder`` (HF's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.shared = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_token_id)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)


class Bart(nn.Module):
    """Encoder-decoder with an LM head: ``forward(input_ids, decoder_input_ids) -> logits (B, T, V)``.

    Generation calls the parts: :meth:`encode` once per source, :meth:`cross_kv` once per source,
    then :meth:`decode` per step with a :class:`~corelm.ops.kv_cache.KVCache` for the decoder's
    self-attention (:mod:`corelm.generate.seq2seq`).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = BartModel(config)
        if config.tie_embeddings:
            self.lm_head = TiedLMHead(self.model.shared)
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Not a parameter in HF either (a buffer, saved with the checkpoint): it is not trained.
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        self.apply(init_normal_)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids ``(B, S)`` and mask ``(B, S)`` (1 = real token) -> encoder output ``(B, S, d)``."""
        return self.model.encoder(self.model.shared(input_ids), attention_mask)

    def cross_kv(self, encoder_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention keys and values ``(B, n_head, S, hd)``: one projection per source."""
        return [layer.encoder_attn.project_kv(encoder_out) for layer in self.model.decoder.layers]

    def decode(self, decoder_input_ids: torch.Tensor, cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
               attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
               start: int = 0) -> torch.Tensor:
        """Target ids ``(B, T)`` at positions ``start..`` -> logits ``(B, T, V)`` (see :meth:`Decoder.forward`)."""
        h = self.model.decoder(self.model.shared(decoder_input_ids), cross_kv, attention_mask, cache, start)
        return self.lm_head(h) + self.final_logits_bias

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits ``(B, T, V)`` of ``decoder_input_ids`` given the source ``input_ids``."""
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, self.cross_kv(memory), attention_mask)
