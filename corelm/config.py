"""Model configuration as data.

One dataclass describes every family corelm builds (GPT-2, Llama, BERT). Importing this module must
not import torch: the planner and the CLI read configs without loading a model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corelm.errors import CorelmError

FAMILIES = ("gpt2", "llama", "bert")


@dataclass
class ModelConfig:
    """Shape and numerics of a Transformer.

    Attributes:
        family: Architecture family: ``gpt2``, ``llama`` or ``bert``.
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
        activation: MLP nonlinearity: ``gelu`` (erf), ``gelu_tanh`` or ``silu`` (SwiGLU gate).
        rope_theta: RoPE base frequency (Llama only).
        rope_scaling: RoPE scaling, e.g. Llama 3's ``{"rope_type": "llama3", "factor": 8.0, ...}``.
        type_vocab_size: Segment (token type) embeddings (BERT only).
        pad_token_id: Padding id used by encoders for masks; optional.
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
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    type_vocab_size: int = 2
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
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
            self.bias = self.family != "llama"
        if self.activation is None:
            self.activation = {"gpt2": "gelu_tanh", "llama": "silu", "bert": "gelu"}[self.family]

    @property
    def is_encoder(self) -> bool:
        """True for bidirectional encoders (BERT), which return hidden states, not next-token logits."""
        return self.family == "bert"

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
