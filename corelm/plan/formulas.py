"""What a Transformer costs, as pure functions of its :class:`~corelm.config.ModelConfig`.

No torch here: the planner answers "will it fit, how long, how much" before any tensor exists.
Every formula cites where it comes from; the numbers they give are checked in ``tests/test_plan_formulas.py``
against hand-computed and published figures (GPT-2 124.4M parameters, GPT-3 175B ≈ 3.14e23 training FLOPs,
Llama-2-7B KV cache = 2 GiB at 4096 tokens, ...).

Sources:
    [Kaplan]  Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1 (C ≈ 6N per token).
    [PaLM]    Chowdhery et al. 2022, "PaLM", appendix B (6N + 12·L·H·Q·T model FLOPs per token, MFU).
    [Korth]   Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
              section 4 (activation bytes per layer sbh(34 + 5as/h); selective/full recomputation; TP/SP).
    [ZeRO]    Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
              Models", section 3 (2 + 2 + K bytes/param with K = 12 for mixed-precision Adam; stages 1-3).
    [LoRA]    Hu et al. 2021, "LoRA", section 4 (r·(d_in + d_out) trainable parameters per adapted matrix).
    [QLoRA]   Dettmers et al. 2023, "QLoRA" (4-bit NF4 base weights, block 64, double-quantized scales).
    [Adam8]   Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization" (2 bytes/param + scales).
"""

from __future__ import annotations

from dataclasses import dataclass

from corelm.config import ModelConfig
from corelm.errors import CorelmError

GiB = 1024**3

# Bytes per element of each storage dtype.
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1,
                                 "int4": 0.5, "nf4": 0.5}


# --------------------------------------------------------------------------------------------------
# Parameters


def param_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per component, counted exactly as the Hugging Face checkpoints of each family hold them.

    Returns:
        ``embedding`` (token + learned position + segment embeddings and BERT's embedding LayerNorm),
        ``attention``, ``mlp``, ``norms`` (all blocks + final norm), ``lm_head`` (0 when tied),
        ``pooler`` (BERT only).
    """
    d, L, V = cfg.d_model, cfg.n_layer, cfg.vocab_size
    if cfg.family == "bart":
        return _seq2seq_breakdown(cfg)
    if cfg.family == "t5":
        return _t5_breakdown(cfg)
    q_width = cfg.n_head * cfg.head_dim
    kv_width = cfg.n_kv_head * cfg.head_dim
    bias = bool(cfg.bias)
    layernorm = cfg.family in ("gpt2", "bert")  # LayerNorm has weight and bias, RMSNorm only a weight
    norm = 2 * d if layernorm else d

    embedding = V * d
    if cfg.family in ("gpt2", "bert") and cfg.positions == "learned":  # RoPE and sinusoids have no parameters
        embedding += cfg.max_seq_len * d
    if cfg.family == "bert":
        embedding += cfg.type_vocab_size * d + norm  # segment embeddings and the embedding LayerNorm

    attention = d * q_width + 2 * d * kv_width + q_width * d  # W_q, W_k, W_v, W_o
    if bias:
        attention += q_width + 2 * kv_width + d
    elif cfg.qkv_bias:  # Qwen2: biases on q, k and v only
        attention += q_width + 2 * kv_width
    if cfg.family == "olmo2":  # OLMo 2 normalizes the whole q and k projections
        attention += q_width + kv_width
    elif cfg.qk_norm:  # Qwen3, Gemma 3: one RMSNorm weight per head width, shared by the heads
        attention += 2 * cfg.head_dim
    # gated MLPs (SwiGLU, Shazeer 2020; Gemma's GeGLU): gate, up and down projections
    gated = is_gated(cfg)
    dense_mlp = (3 if gated else 2) * d * cfg.d_ff
    if bias:
        dense_mlp += cfg.d_ff * (2 if gated else 1) + d
    mlp = L * dense_mlp
    if cfg.family == "moe":  # each sparse layer: the router, every expert, and Qwen2-MoE's gated shared expert
        sparse = d * cfg.n_experts + cfg.n_experts * 3 * d * cfg.moe_d_ff
        if cfg.shared_expert_d_ff:
            sparse += 3 * d * cfg.shared_expert_d_ff + d
        n_dense = len(cfg.dense_layers or ())
        mlp = n_dense * dense_mlp + (L - n_dense) * sparse
    per_layer_norms = 4 if cfg.sandwich_norm else 2  # Gemma 2/3: a norm before and after each sub-layer
    norms = L * per_layer_norms * norm + (0 if cfg.family == "bert" else norm)  # BERT is post-LN: no final norm
    return {
        "embedding": embedding,
        "attention": L * attention,
        "mlp": mlp,
        "norms": norms,
        "lm_head": 0 if (cfg.tie_embeddings or cfg.is_encoder) else V * d,
        "pooler": d * d + d if cfg.family == "bert" else 0,
    }


def is_gated(cfg: ModelConfig) -> bool:
    """A gated MLP (gate, up, down: SwiGLU in Llama, GeGLU in Gemma) is the family's, whatever the activation."""
    return cfg.family in ("llama", "gemma", "moe", "olmo2")


def _seq2seq_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """BART/Marian/mBART [Lewis et al. 2020; Vaswani et al. 2017]: encoder blocks (self-attention, MLP, two
    LayerNorms), decoder blocks (self- and cross-attention, MLP, three LayerNorms), biases everywhere, one
    shared token embedding, learned positions (BART; Marian's sinusoids are not parameters)."""
    d, V, ff = cfg.d_model, cfg.vocab_size, cfg.d_ff
    enc, dec = cfg.n_encoder_layer, cfg.n_layer
    attn = 4 * d * d + 4 * d  # q, k, v, o with biases
    positions = 2 * (cfg.max_seq_len + 2) * d if cfg.positions == "learned" else 0  # BART's offset of 2
    stack_norms = 2 * 2 * d * (int(cfg.layernorm_embedding) + int(cfg.normalize_before))
    return {
        "embedding": V * d + positions,
        "attention": enc * attn + dec * 2 * attn,
        "mlp": (enc + dec) * (2 * d * ff + ff + d),
        "norms": enc * 2 * 2 * d + dec * 3 * 2 * d + stack_norms,
        "lm_head": 0 if cfg.tie_embeddings else V * d,
        "pooler": 0,
    }


def _t5_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """T5 / T5 v1.1 [Raffel et al. 2020]: no biases, RMS norms (a weight only), one relative-position bias table
    ``(buckets, n_head)`` per stack (counted with the embeddings), gated MLPs with three matrices in v1.1."""
    d, V, ff, inner = cfg.d_model, cfg.vocab_size, cfg.d_ff, cfg.n_head * cfg.head_dim
    enc, dec = cfg.n_encoder_layer, cfg.n_layer
    attn = 4 * d * inner  # q, k, v, o
    return {
        "embedding": V * d + 2 * cfg.relative_attention_num_buckets * cfg.n_head,
        "attention": enc * attn + dec * 2 * attn,
        "mlp": (enc + dec) * (3 if cfg.gated_mlp else 2) * d * ff,
        "norms": enc * 2 * d + dec * 3 * d + 2 * d,  # + each stack's final norm
        "lm_head": 0 if cfg.tie_embeddings else V * d,
        "pooler": 0,
    }


def param_count(cfg: ModelConfig) -> int:
    """Total parameters (tied embeddings counted once), e.g. GPT-2 small = 124,439,808."""
    return sum(param_breakdown(cfg).values())


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix multiply for every token: the blocks plus the LM head.

    Embedding lookups are gathers, not matmuls, so they are excluded [Kaplan, table 1]; the LM head
    (d × V) is a matmul even when its weight is tied to the embedding. For GPT-3 175B this is 174.6e9.
    A mixture-of-experts layer counts the router, the ``n_experts_per_tok`` experts a token is routed
    to and the shared expert: the *active* parameters [Fedus et al. 2022, Switch Transformer §2].
    """
    p = param_breakdown(cfg)
    head = 0 if cfg.is_encoder else cfg.vocab_size * cfg.d_model
    mlp = p["mlp"]
    if cfg.family == "moe":
        d, n_dense = cfg.d_model, len(cfg.dense_layers or ())
        active = d * cfg.n_experts + cfg.n_experts_per_tok * 3 * d * cfg.moe_d_ff
        if cfg.shared_expert_d_ff:
            active += 3 * d * cfg.shared_expert_d_ff + d
        mlp = n_dense * 3 * d * cfg.d_ff + (cfg.n_layer - n_dense) * active
    return p["attention"] + mlp + p["pooler"] + head


# --------------------------------------------------------------------------------------------------
# FLOPs


def attention_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs of the score and value matmuls (QKᵀ and A·V) for one token attending ``context`` keys.

    2 FLOPs per multiply-add, two matmuls of width ``n_head·head_dim`` per layer [PaLM, appendix B].
    """
    return 4.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * context


def forward_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs per token: 2N for the weight matmuls plus the attention term [Kaplan §2.1; PaLM app. B].

    ``context`` is the number of keys a token attends. PaLM counts the full sequence length T for every
    token (no causal discount), which is also what dense attention kernels compute.
    """
    return 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, context)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, recompute: str = "none") -> float:
    """FLOPs per trained token: backward = 2 × forward, so 6N + 12·L·H·Q·T [PaLM, appendix B].

    Args:
        recompute: ``none`` gives *model* FLOPs (what MFU counts); ``full`` adds the re-run forward of
            activation checkpointing (*hardware* FLOPs, 8N + 16·L·H·Q·T) [Korth §5]; ``selective``
            re-runs only the attention core (QKᵀ, softmax, A·V) [Korth §4.2].
    """
    fwd = forward_flops_per_token(cfg, seq_len)
    extra = {"none": 0.0, "selective": attention_flops_per_token(cfg, seq_len), "full": fwd}
    if recompute not in extra:
        raise CorelmError(f"unknown recompute mode {recompute!r}; expected none, selective or full")
    return 3.0 * fwd + extra[recompute]


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation [PaLM, appendix B]: model FLOPs per wall-clock second over the device's peak.

    The one definition corelm uses (the training loop's log, ``corelm bench --train``, the planner):
    ``flops_per_token`` are *model* FLOPs (:func:`train_flops_per_token` with ``recompute="none"``:
    recomputation does not count), ``tokens_per_s`` is wall-clock throughput, ``peak_flops`` the
    measured matmul rate of the device in the compute dtype.
    """
    if peak_flops <= 0:
        raise CorelmError(f"peak FLOP/s must be > 0, got {peak_flops:g}")
    return flops_per_token * tokens_per_s / peak_flops


def train_flops(cfg: ModelConfig, tokens: float, seq_len: int, *, attention: bool = True) -> float:
    """Total training FLOPs for ``tokens`` tokens in sequences of ``seq_len``.

    ``attention=False`` is the 6·N·D of [Kaplan §2.1] used by the GPT-3 paper (Brown et al. 2020,
    appendix D: 175B on 300B tokens = 3.14e23), which leaves out the attention matmuls.
    """
    if tokens < 0:
        raise CorelmError(f"tokens must be >= 0, got {tokens:g}")
    per_token = 6.0 * matmul_params(cfg)
    if attention:
        per_token += 3.0 * attention_flops_per_token(cfg, seq_len)
    return per_token * tokens


def prefill_flops(cfg: ModelConfig, prompt_len: int, batch: int = 1) -> float:
    """Forward FLOPs of a causal prefill: each token ``t`` attends ``t + 1`` keys (the mean is (T+1)/2)."""
    mean_context = (prompt_len + 1) / 2
    return batch * prompt_len * forward_flops_per_token(cfg, mean_context)


def decode_flops_per_token(cfg: ModelConfig, position: int) -> float:
    """Forward FLOPs to generate one token at ``position`` (it attends ``position + 1`` cached keys)."""
    return forward_flops_per_token(cfg, position + 1)


# --------------------------------------------------------------------------------------------------
# Bytes: weights, gradients, optimizer states


@dataclass(frozen=True)
class Precision:
    """Storage of one training precision policy (the strings of ``corelm.train.precision``).

    Attributes:
        weights: bytes per persistent parameter (fp32 master weights under mixed precision).
        grads: bytes per gradient element.
        activations: bytes per saved activation element.
        compute_copy: bytes per parameter of the low-precision copy the matmuls read under mixed
            precision (autocast's weight cache, FSDP's unsharded bf16 params); 0 when weights are used as is.
        optimizer_scale: optimizer state bytes relative to fp32 states (0.5 when states follow bf16 params).
        master: bytes per parameter of an fp32 master copy kept *by the optimizer* (DeepSpeed/Megatron
            style, so ZeRO shards it with the optimizer states).
        residual: bytes per element of the residual stream, which the norms save. Under torch autocast
            the weights stay fp32, so the residual stream and the norms stay fp32 (4) while matmul inputs
            are saved as their bf16 copies (2).
    """

    weights: float
    grads: float
    activations: float
    compute_copy: float
    optimizer_scale: float
    master: float = 0.0
    residual: float | None = None  # bytes of the residual stream (norm inputs); default = activations


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(4, 4, 4, 0, 1.0),
    # [ZeRO §3.1]: mixed precision keeps fp32 master weights; with torch autocast the fp32 weights
    # *are* the master copy, gradients are fp32, and a bf16/fp16 copy of each weight lives during the step.
    "bf16-mixed": Precision(4, 4, 2, 2, 1.0, residual=4),
    "fp16-mixed": Precision(4, 4, 2, 2, 1.0, residual=4),
    # Pure bf16: params, grads and (torch) optimizer states all in bf16.
    "bf16-true": Precision(2, 2, 2, 0, 0.5),
    # [ZeRO §3.1] accounting (DeepSpeed, Megatron): 16-bit params and grads (2 + 2), and K = 12 bytes
    # of optimizer state = fp32 master weights + Adam moments, which ZeRO-1 shards together.
    "bf16-mixed-master": Precision(2, 2, 2, 0, 1.0, master=4),
}

# Optimizer state bytes per trainable parameter with fp32 states.
OPTIMIZER_BYTES: dict[str, float] = {
    "adamw": 8.0,  # first and second moments, fp32 [ZeRO §3.1: K = 12 counts these 8 + 4 master bytes]
    "adamw-8bit": 2.0 + 8.0 / 2048,  # two int8 moments + one fp32 absmax per 2048-block [Adam8 §2]
    "sgd": 4.0,  # momentum buffer
    "sgd-nomomentum": 0.0,
}


def check_precision(precision: str) -> Precision:
    if precision not in PRECISIONS:
        raise CorelmError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def check_optimizer(optimizer: str) -> float:
    if optimizer not in OPTIMIZER_BYTES:
        raise CorelmError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZER_BYTES)}")
    return OPTIMIZER_BYTES[optimizer]


def bytes_per_param_training(precision: str = "bf16-mixed", optimizer: str = "adamw") -> float:
    """Persistent bytes per fully trained parameter before activations: weights + grads + optimizer.

    Mixed precision with AdamW gives 4 + 4 + 8 = 16 bytes, the same total as ZeRO's 2 + 2 + 12 [ZeRO §3.1].
    """
    p = check_precision(precision)
    return p.weights + p.grads + check_optimizer(optimizer) * p.optimizer_scale + p.master


def weight_bytes(cfg: ModelConfig, dtype: str = "bf16") -> float:
    """Bytes of all weights stored in ``dtype`` (Llama-2-7B in fp16: 13.5e9 bytes)."""
    if dtype not in DTYPE_BYTES:
        raise CorelmError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
    n = param_count(cfg)
    if dtype == "nf4":  # 4-bit codes + one fp8 scale per 64 and one fp32 per 256 scales [QLoRA §3]
        return n * (0.5 + 1 / 64 + 4 / (64 * 256))
    if dtype == "int4":  # group-wise asymmetric, group 32: fp16 scale and zero per group
        return n * (0.5 + 4 / 32)
    return n * DTYPE_BYTES[dtype]


# --------------------------------------------------------------------------------------------------
# KV cache


def kv_cache_bytes(cfg: ModelConfig, tokens: int, batch: int = 1, dtype: str = "bf16") -> float:
    """Bytes of the K and V caches: 2 · L · n_kv_head · head_dim · tokens · batch · bytes.

    Grouped-query attention (Ainslie et al. 2023) stores ``n_kv_head`` heads, not ``n_head``: Llama-3-8B
    keeps 8 of its 32. Llama-2-7B at 4096 tokens, batch 1, fp16: exactly 2 GiB.
    """
    if cfg.is_encoder:
        return 0.0
    return 2.0 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * tokens * batch * DTYPE_BYTES[dtype]


# --------------------------------------------------------------------------------------------------
# Activations


RECOMPUTE_MODES = ("none", "selective", "full")


def activation_elements_per_layer(cfg: ModelConfig, seq_len: int, batch: int, *, fused_attention: bool = True,
                                  dropout: bool = False, fused_norms: bool = True) -> dict[str, float]:
    """Elements one block saves for its backward pass, component by component [Korth §4.1].

    Korthikanti et al. count, for GPT with 16-bit activations, ``sbh(34 + 5as/h)`` bytes per layer.
    Written per tensor so it follows GQA, SwiGLU and fused attention:

    - two norms save their inputs: 2·sbh (a fused LayerNorm/RMSNorm kernel; an unfused RMSNorm written
      as ``w * (x * rsqrt(mean(x²)))`` also keeps the normalized x for the weight gradient: 4·sbh)
    - attention: the QKV matmul input sbh; Q, K, V for the score/value matmuls sb(q + 2kv); the
      softmax output a·s²·b (absent with fused attention, which recomputes it from a per-row
      log-sum-exp); the output-projection input sb·q
    - MLP: its input sbh; GELU MLP keeps the activation input and output 2·sbf; SwiGLU keeps gate,
      up, silu(gate) and their product 4·sbf (the down-projection input)
    - dropout keeps 1-byte masks: sbh after attention and MLP, a·s²·b on the probabilities (the masks
      are returned in bytes under ``dropout_mask_bytes``).

    With GPT-2 shapes, 16-bit activations and dropout this is exactly ``sbh(34 + 5as/h)`` bytes.
    """
    s, b, h = seq_len, batch, cfg.d_model
    q, kv, f, a = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff, cfg.n_head
    sb = s * b
    scores = 0.0 if fused_attention else a * s * s * b
    out = {
        "norm_inputs": (2 if fused_norms else 4) * sb * h,
        "attention": sb * h + sb * (q + 2 * kv) + sb * q + scores,
        "mlp": sb * h + (4 if is_gated(cfg) else 2) * sb * f,
        # Korthikanti's 5as²b counts the dropout output too: 2 bytes more per score element.
        "dropout_output": scores if dropout else 0.0,
        "dropout_mask_bytes": (2 * sb * h + (a * s * s * b if not fused_attention else 0.0)) if dropout else 0.0,
    }
    return out


def activation_bytes_per_layer(cfg: ModelConfig, seq_len: int, batch: int, *, act_bytes: float = 2,
                               recompute: str = "none", fused_attention: bool = True, dropout: bool = False,
                               tp: int = 1, sequence_parallel: bool = True, fused_norms: bool = True,
                               residual_bytes: float | None = None) -> float:
    """Activation bytes one block holds between its forward and backward pass.

    Args:
        act_bytes: bytes per activation element (2 under bf16/fp16, 4 in fp32).
        recompute: ``none``; ``selective`` drops the a·s²·b score tensors and recomputes them [Korth §4.2];
            ``full`` keeps only the block input, 2·sbh bytes in 16-bit, and re-runs the block [Korth §5].
        tp: tensor-parallel degree; with sequence parallelism every term shards by ``tp``, without it
            the norm and dropout terms (10·sbh in GPT) stay replicated [Korth eq. 3-4].
        residual_bytes: bytes per element of the norm inputs (the residual stream); default ``act_bytes``.
    """
    res_bytes = act_bytes if residual_bytes is None else residual_bytes
    if recompute not in RECOMPUTE_MODES:
        raise CorelmError(f"unknown recompute mode {recompute!r}; expected {', '.join(RECOMPUTE_MODES)}")
    if recompute == "full":
        return seq_len * batch * cfg.d_model * res_bytes / (tp if sequence_parallel else 1)
    fused = fused_attention or recompute == "selective"
    e = activation_elements_per_layer(cfg, seq_len, batch, fused_attention=fused, dropout=dropout,
                                      fused_norms=fused_norms)
    sbh = seq_len * batch * cfg.d_model
    # Without sequence parallelism the norm inputs, the two block inputs to the column-parallel
    # matmuls and the sbh dropout masks stay whole on every TP rank: Korthikanti's "10sbh" [Korth eq. 3].
    replicated = e["norm_inputs"] * res_bytes + 2 * sbh * act_bytes + (2 * sbh if dropout else 0.0)
    sharded = (e["attention"] + e["mlp"] + e["dropout_output"] - 2 * sbh) * act_bytes
    sharded += e["dropout_mask_bytes"] - (2 * sbh if dropout else 0.0)
    return sharded / tp + replicated / (tp if sequence_parallel else 1)


def logits_bytes(cfg: ModelConfig, seq_len: int, batch: int, *, logit_bytes: float = 4) -> float:
    """Bytes of the training loss head at its peak: the logits, the saved log-softmax and one gradient.

    Cross-entropy upcasts to fp32 (exp of bf16 logits loses the small probabilities), so three
    (b, s, V) fp32 tensors are alive at the start of the backward pass: the logits, the log-softmax the
    backward needs, and the gradient flowing back. This is the term estimators skip and evaluation OOMs on.
    """
    if cfg.is_encoder:
        return 0.0
    return 3.0 * batch * seq_len * cfg.vocab_size * logit_bytes


# --------------------------------------------------------------------------------------------------
# Sharding: ZeRO / FSDP and tensor parallelism


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Tensor parallelism splits heads and the MLP width across ``tp`` devices (Shoeybi et al. 2019)."""
    if tp < 1:
        raise CorelmError(f"tensor-parallel degree must be >= 1, got {tp}")
    if cfg.n_head % tp or cfg.n_kv_head % tp:
        raise CorelmError(f"tensor-parallel degree {tp} does not divide the model's heads "
                          f"(n_head={cfg.n_head}, n_kv_head={cfg.n_kv_head})")
    if cfg.d_ff % tp:
        raise CorelmError(f"tensor-parallel degree {tp} does not divide d_ff={cfg.d_ff}")


def sharded_state_bytes(n_params: float, trainable: float, *, precision: str, optimizer: str, zero: int,
                        dp: int, tp: int = 1, frozen_dtype: str = "bf16") -> dict[str, float]:
    """Per-device weights, gradients and optimizer states under ZeRO stage ``zero`` [ZeRO §5.1].

    Stage 1 shards optimizer states across the ``dp`` data-parallel ranks, stage 2 also gradients,
    stage 3 (FSDP FULL_SHARD) also parameters. Tensor parallelism first splits every matrix by ``tp``.

    Args:
        n_params: all parameters; trainable: those with gradients and optimizer states (LoRA: few).
        frozen_dtype: storage of the frozen base weights (``bf16``; ``nf4`` for QLoRA).

    Returns:
        bytes per device of ``weights`` (trainable, at the policy's master precision), ``frozen``
        (non-trainable weights), ``grads``, ``optimizer`` and ``compute_copy`` (the low-precision working
        copy of trainable weights under mixed precision; under stage 3 only about one block is
        gathered at a time, so it is sharded like the weights).
    """
    if zero not in (0, 1, 2, 3):
        raise CorelmError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero}")
    p = check_precision(precision)
    opt = check_optimizer(optimizer) * p.optimizer_scale + p.master
    out = {
        "weights": trainable * p.weights / tp,
        "frozen": (n_params - trainable) * DTYPE_BYTES[frozen_dtype] / tp,
        "grads": trainable * p.grads / tp,
        "optimizer": trainable * opt / tp,
        "compute_copy": trainable * p.compute_copy / tp,
    }
    if zero >= 1:
        out["optimizer"] /= dp
    if zero >= 2:
        out["grads"] /= dp
    if zero >= 3:
        for key in ("weights", "frozen", "compute_copy"):
            out[key] /= dp
    return out


# --------------------------------------------------------------------------------------------------
# LoRA / adapters


LORA_TARGETS = {"attention": ("q", "k", "v", "o"), "all": ("q", "k", "v", "o", "gate", "up", "down")}


def lora_params(cfg: ModelConfig, rank: int = 8, targets: str = "attention") -> int:
    """Trainable LoRA parameters: r·(d_in + d_out) for every adapted matrix of every block [LoRA §4].

    Args:
        targets: ``attention`` (q, k, v, o projections, the paper's setting) or ``all`` linear layers.
    """
    if rank < 1:
        raise CorelmError(f"LoRA rank must be >= 1, got {rank}")
    if targets not in LORA_TARGETS:
        raise CorelmError(f"unknown LoRA targets {targets!r}; expected {', '.join(LORA_TARGETS)}")
    d, f = cfg.d_model, cfg.d_ff
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}
    if not is_gated(cfg):
        shapes.pop("gate")
    per_layer = sum(rank * (i + o) for name, (i, o) in shapes.items() if name in LORA_TARGETS[targets])
    return cfg.n_layer * per_layer


def adapter_params(cfg: ModelConfig, bottleneck: int = 64) -> int:
    """Houlsby adapters: two bottleneck MLPs per block, each d·r + r + r·d + d (Houlsby et al. 2019 §2)."""
    d = cfg.d_model
    return cfg.n_layer * 2 * (2 * d * bottleneck + bottleneck + d)
