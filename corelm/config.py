"""Model configuration as data.

One dataclass describes every family corelm builds (GPT-2, Llama, BERT, Gemma, BART). Importing this module must
not import torch: the planner and the CLI read configs without loading a model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corelm.errors import CorelmError

FAMILIES = ("gpt2", "llama", "bert", "gemma", "moe", "olmo2", "bart", "t5")
POSITIONS = ("learned", "sinusoidal")
LAYER_TYPES = ("full_attention", "sliding_attention")
# MLP nonlinearities corelm implements (corelm/ops/activation.py), and which each family's MLP honours:
# BERT's has no SiLU, the MoE and OLMo 2 MLPs are SwiGLU only.
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
_FAMILY_ACTIVATIONS = {"bert": ("relu", "gelu", "gelu_tanh"), "moe": ("silu",), "olmo2": ("silu",)}
# Families whose blocks apply ``dropout``/``attn_dropout`` (the others would ignore them silently).
DROPOUT_FAMILIES = ("gpt2", "llama", "gemma", "t5")
# Weight initialisation schemes (corelm/ops/init.py) and the families whose constructors take the choice.
INITS = ("normal", "uniform")
INIT_FAMILIES = ("gpt2", "llama", "gemma")


@dataclass
class ModelConfig:
    """Shape and numerics of a Transformer.

    Attributes:
        family: Architecture family: ``gpt2``, ``llama`` (also Mistral, Qwen2, Qwen3), ``bert`` or
            ``gemma`` (Gemma 1, 2 and 3) or ``moe`` (Mixtral, Qwen2-MoE, Qwen3-MoE: Llama attention,
            mixture-of-experts MLPs) or ``olmo2`` (OLMo 2: norms after the sub-layers, QK norm) or ``bart``
            (encoder-decoders: BART, mBART, MarianMT; ``n_layer`` counts the decoder's blocks) or ``t5``
            (T5, T5 v1.1, mT5: RMS norms before the sub-layers, relative-position buckets, no biases).
        name: Preset or checkpoint name, for display only.
        vocab_size: Number of token embeddings.
        n_layer: Number of Transformer blocks.
        n_head: Number of query heads.
        d_model: Residual stream width.
        n_kv_head: Key/value heads (grouped-query attention); defaults to ``n_head``.
        d_ff: Hidden width of the MLP; defaults to ``4 * d_model``.
        head_dim: Width of one head; defaults to ``d_model // n_head``.
        max_seq_len: Context window (positions the model was trained for).
        norm_eps: Epsilon of LayerNorm/RMSNorm.
        bias: Linear layers carry biases (GPT-2 and BERT do, Llama does not).
        tie_embeddings: The LM head shares the token embedding matrix.
        activation: MLP nonlinearity: ``relu``, ``gelu`` (erf), ``gelu_tanh`` or ``silu``; in the gated MLPs
            of Llama and Gemma it is the gate's (``silu``: SwiGLU, ``gelu_tanh``: GeGLU, ``relu``: ReGLU).
        dropout: Dropout probability on the embeddings and on each sub-layer's output before the residual
            add (Srivastava et al. 2014; GPT-2's ``embd_pdrop``/``resid_pdrop``); active only in train mode.
            gpt2, llama, gemma and t5 (T5's ``dropout_rate``, also on the MLP's hidden units).
        attn_dropout: Dropout probability on the attention probabilities (``attn_pdrop``,
            ``attention_dropout``); active only in train mode. gpt2, llama, gemma and t5.
        init: Initial weights of a model built from scratch: ``normal`` N(0, 0.02^2) or ``uniform``
            U(-0.0346, 0.0346) (the same standard deviation, ``sqrt(3) * 0.02``); see corelm/ops/init.py.
            gpt2, llama and gemma. GPT-2's residual projections are scaled by ``1/sqrt(2 n_layer)`` in both.
        rope_theta: RoPE base frequency (Llama only).
        rope_scaling: RoPE scaling, e.g. Llama 3's ``{"rope_type": "llama3", "factor": 8.0, ...}``.
        type_vocab_size: Segment (token type) embeddings (BERT only).
        pad_token_id: Padding id used by encoders for masks; optional.
        qkv_bias: Only the query/key/value projections carry biases (Qwen2), whatever ``bias`` says.
        qk_norm: RMSNorm over each head of the queries and keys before RoPE (Qwen3, Gemma 3).
        sliding_window: Keys further than this many positions back are not attended (Mistral,
            Gemma 2/3 local layers); None = full causal attention.
        layer_types: Per layer, ``full_attention`` or ``sliding_attention``; None = every layer
            slides when ``sliding_window`` is set (Mistral), else every layer is global.
        sandwich_norm: Gemma 2/3: RMSNorms after attention and after the MLP too, before the residual add.
        attn_softcap: Attention logits become ``cap * tanh(logits / cap)`` (Gemma 2); None = off.
        final_softcap: The same on the output logits (Gemma 2); None = off.
        query_pre_attn_scalar: Attention scores are scaled by its ``-1/2`` power instead of
            ``head_dim ** -0.5`` (Gemma 2/3); None = ``head_dim``.
        rope_local_theta: RoPE base of the sliding-window layers (Gemma 3); None = ``rope_theta``.
        rotary_dim: Channels of a head that RoPE rotates (partial rotary, Phi-4-mini); None = ``head_dim``.
        n_experts: ``moe``: routed experts per sparse layer.
        n_experts_per_tok: ``moe``: experts each token is routed to (top-k).
        moe_d_ff: ``moe``: hidden width of one routed expert; defaults to ``d_ff``.
        shared_expert_d_ff: ``moe``: width of the always-on shared expert with its sigmoid gate
            (Qwen2-MoE); None = no shared expert.
        norm_topk_prob: ``moe``: renormalise the top-k router probabilities to sum to 1 (Mixtral,
            Qwen3-MoE checkpoints) instead of keeping their full-softmax values (Qwen2-MoE).
        dense_layers: ``moe``: layers whose MLP is a dense SwiGLU of width ``d_ff`` (Qwen's
            ``mlp_only_layers``/``decoder_sparse_step``); None = every layer is sparse.
        n_encoder_layer: ``bart``: encoder blocks (``n_layer`` counts the decoder's); defaults to ``n_layer``.
        decoder_start_token_id: ``bart``: the token the decoder starts from (Marian: the pad id).
        scale_embedding: ``bart``: token embeddings are multiplied by ``sqrt(d_model)`` (Marian).
        positions: ``learned`` position table or fixed ``sinusoidal`` encodings (Vaswani et al. 2017,
            section 3.5): ``gpt2`` (for training from scratch) and ``bart`` (BART offset 2, Marian sinusoidal).
        normalize_before: ``bart``: pre-LN blocks plus a final LayerNorm after each stack (mBART);
            False = post-LN blocks (BART, Marian).
        layernorm_embedding: ``bart``: a LayerNorm over the embeddings (BART, mBART; not Marian).
        relative_attention_num_buckets: ``t5``: buckets of the learned relative-position attention bias.
        relative_attention_max_distance: ``t5``: distances at or beyond this share the last bucket.
        gated_mlp: ``t5``: the MLP is ``wo(act(wi_0 x) * wi_1 x)`` (T5 v1.1's gated-gelu) instead of
            ``wo(act(wi x))`` (T5's relu).
        scale_decoder_outputs: ``t5``: the decoder output is multiplied by ``d_model ** -0.5`` before the LM
            head (the original T5, whose head is the embedding); None = exactly when ``tie_embeddings``.
        extra: Anything the source checkpoint carried that corelm does not interpret.
    """

    family: str
    vocab_size: int
    n_layer: int
    n_head: int
    d_model: int
    name: str = ""
    n_kv_head: int | None = None
    d_ff: int | None = None
    head_dim: int | None = None
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    bias: bool | None = None
    tie_embeddings: bool = True
    activation: str | None = None
    dropout: float = 0.0
    attn_dropout: float = 0.0
    init: str = "normal"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    type_vocab_size: int = 2
    pad_token_id: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    sandwich_norm: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    rope_local_theta: float | None = None
    rotary_dim: int | None = None
    n_experts: int | None = None
    n_experts_per_tok: int | None = None
    moe_d_ff: int | None = None
    shared_expert_d_ff: int | None = None
    norm_topk_prob: bool = True
    dense_layers: list[int] | None = None
    # encoder-decoder (family ``bart``) only
    n_encoder_layer: int | None = None
    decoder_start_token_id: int | None = None
    scale_embedding: bool = False
    positions: str = "learned"
    normalize_before: bool = False
    layernorm_embedding: bool = True
    # encoder-decoder (family ``t5``) only; n_encoder_layer and decoder_start_token_id apply too
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    gated_mlp: bool = False
    scale_decoder_outputs: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # C901: derived fields, then one check per field in declaration order; the families' groups are helpers
    def __post_init__(self) -> None:  # noqa: C901
        if self.family not in FAMILIES:
            raise CorelmError(f"unknown model family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        for key in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise CorelmError(f"model config field {key!r} must be a positive integer, got {value!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise CorelmError(
                    f"d_model={self.d_model} is not divisible by n_head={self.n_head}; set head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise CorelmError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.bias is None:
            self.bias = self.family not in ("llama", "gemma", "moe", "olmo2", "t5")
        if self.activation is None:
            self.activation = {"gpt2": "gelu_tanh", "llama": "silu", "bert": "gelu", "gemma": "gelu_tanh",
                               "moe": "silu", "olmo2": "silu", "bart": "gelu", "t5": "relu"}[self.family]
        self._check_options()
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise CorelmError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if len(self.layer_types) != self.n_layer or any(t not in LAYER_TYPES for t in self.layer_types):
                raise CorelmError(f"layer_types must list {self.n_layer} entries of {', '.join(LAYER_TYPES)}, "
                                  f"got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise CorelmError("layer_types has sliding_attention layers but sliding_window is not set")

        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise CorelmError(f"rotary_dim must be even and in 1..head_dim={self.head_dim}, got {self.rotary_dim!r}")

        if self.family == "moe":
            self._check_moe()
        if self.family in ("bart", "t5"):
            self._check_bart()
        if self.family == "t5":
            self._check_t5()

    def _check_options(self) -> None:
        """Activation, dropout and position kind: each one this family's model implements."""
        allowed = _FAMILY_ACTIVATIONS.get(self.family, ACTIVATIONS)
        if self.activation not in allowed:
            raise CorelmError(f"activation {self.activation!r} is not implemented for family {self.family}; "
                              f"expected one of {', '.join(allowed)}")
        for key in ("dropout", "attn_dropout"):
            p = getattr(self, key)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise CorelmError(f"{key} must be a probability in [0, 1), got {p!r}")
            if p and self.family not in DROPOUT_FAMILIES:
                raise CorelmError(f"{key} is implemented for {', '.join(DROPOUT_FAMILIES)}, not {self.family}")
        if self.init not in INITS:
            raise CorelmError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init != "normal" and self.family not in INIT_FAMILIES:
            raise CorelmError(f"init={self.init!r} is implemented for {', '.join(INIT_FAMILIES)}, not {self.family}")
        if self.positions not in POSITIONS:
            raise CorelmError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if self.positions != "learned" and self.family not in ("gpt2", "bart"):
            raise CorelmError(f"positions={self.positions!r} is implemented for gpt2 and bart; "
                              f"{self.family} encodes positions its own way")

    def _check_moe(self) -> None:
        """Mixture-of-experts fields: required for ``moe``, each within range."""
        E, k = self.n_experts, self.n_experts_per_tok
        if not isinstance(E, int) or E <= 0:
            raise CorelmError(f"a moe model needs n_experts, a positive integer, got {E!r}")
        if not isinstance(k, int) or not 0 < k <= E:
            raise CorelmError(f"n_experts_per_tok must be an integer in 1..n_experts={E}, got {k!r}")
        if self.moe_d_ff is None:
            self.moe_d_ff = self.d_ff
        if self.dense_layers is not None:
            self.dense_layers = sorted(set(self.dense_layers))
            if any(not isinstance(i, int) or not 0 <= i < self.n_layer for i in self.dense_layers):
                raise CorelmError(f"dense_layers must be layer indices in 0..{self.n_layer - 1}, "
                                  f"got {self.dense_layers!r}")

    def _check_bart(self) -> None:
        """Encoder-decoder fields: layer count, position kind, start token."""
        if self.n_encoder_layer is None:
            self.n_encoder_layer = self.n_layer
        if not isinstance(self.n_encoder_layer, int) or self.n_encoder_layer <= 0:
            raise CorelmError(f"n_encoder_layer must be a positive integer, got {self.n_encoder_layer!r}")
        if self.positions not in POSITIONS:
            raise CorelmError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        start = self.decoder_start_token_id
        if not isinstance(start, int) or not 0 <= start < self.vocab_size:
            raise CorelmError(f"a {self.family} model needs decoder_start_token_id, a token id in "
                              f"0..{self.vocab_size - 1}, got {start!r}")
        if self.n_kv_head != self.n_head:
            raise CorelmError(f"{self.family} models have no grouped-query attention: n_kv_head must equal n_head")

    def _check_t5(self) -> None:
        """T5's relative-position buckets; whether the decoder output is rescaled."""
        buckets, distance = self.relative_attention_num_buckets, self.relative_attention_max_distance
        if not isinstance(buckets, int) or buckets < 4:
            raise CorelmError(f"relative_attention_num_buckets must be an integer of at least 4, got {buckets!r}")
        if not isinstance(distance, int) or distance <= buckets // 4:
            raise CorelmError(f"relative_attention_max_distance must be an integer above "
                              f"relative_attention_num_buckets // 4 = {buckets // 4}, got {distance!r}")
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_embeddings

    def is_sliding(self, layer: int) -> bool:
        """True when ``layer`` attends only the last ``sliding_window`` positions."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    @property
    def is_encoder(self) -> bool:
        """True for bidirectional encoders (BERT), which return hidden states, not next-token logits."""
        return self.family == "bert"

    @property
    def is_seq2seq(self) -> bool:
        """True for encoder-decoder models (BART, Marian, T5), which map a source sequence to a target one."""
        return self.family in ("bart", "t5")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from a dict of dataclass fields; unknown keys go to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        missing = [k for k in ("family", "vocab_size", "n_layer", "n_head", "d_model") if k not in known]
        if missing:
            raise CorelmError(f"model config is missing required field(s): {', '.join(missing)}")
        known.setdefault("extra", {}).update(extra)
        return cls(**known)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """Read a corelm config from JSON or YAML (fields of this dataclass)."""
        path = Path(path)
        if not path.is_file():
            raise CorelmError(f"config file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
            raise CorelmError(f"cannot parse config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise CorelmError(f"config {path} must be a mapping of fields")
        return cls.from_dict(data)
