"""Weight pruning as a model transform: magnitude and Wanda, unstructured or N:M semi-structured.

- magnitude: remove the weights of smallest ``|W|`` (Han et al. 2015).
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  ``|W_ij| * ||X_j||_2``, where ``||X_j||`` is the norm of input feature ``j`` over calibration
  tokens, and compare weights *within each output row*. No retraining, one forward pass.
- N:M (e.g. 2:4, Mishra et al. 2021): in every group of M consecutive input weights keep the N of
  highest score. The pattern NVIDIA sparse tensor cores accelerate; on CPU (and in PyTorch's CPU
  kernels) sparse weights are not faster than dense, so here it is a quality experiment, and the
  table corelm prints says so.

Pruning zeroes weights in place: the result is an ordinary dense model that saves, loads, exports
and quantizes like any other. Every row gets exactly ``floor(sparsity * in_features)`` zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from corelm.errors import CorelmError

METHODS = ("magnitude", "wanda")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); ``None`` -> unstructured."""
    if pattern is None:
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise CorelmError(f"pattern must look like N:M (e.g. 2:4), got {pattern!r}") from None
    if not 0 < n < m:
        raise CorelmError(f"pattern N:M needs 0 < N < M, got {pattern!r}")
    return n, m


def prune_mask(score: torch.Tensor, sparsity: float = 0.5, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean keep-mask ``(N, K)`` from a score: lowest scores pruned, per row or per N:M group."""
    rows, cols = score.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise CorelmError(f"pattern {n}:{m} needs the layer width {cols} to be a multiple of {m}")
        groups = score.reshape(rows, cols // m, m)
        keep_idx = groups.topk(n, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep_idx, True).reshape(rows, cols)
    k = int(sparsity * cols)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=score.device)
    if k:
        drop = score.topk(k, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask


def _targets(model: nn.Module, skip: Iterable[str]) -> dict[str, nn.Linear]:
    skip = tuple(skip)
    return {name: m for name, m in model.named_modules()
            if type(m) is nn.Linear and not any(name == s or name.startswith(s + ".") for s in skip)}


@torch.no_grad()
def input_norms(
    model: nn.Module, layers: dict[str, nn.Linear], batches: Iterable[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` of each layer's input features over all calibration tokens (Wanda's statistic)."""
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in layers.items()}
    hooks = []
    for name, module in layers.items():
        def hook(mod, args, out, name=name):
            x = args[0].detach().reshape(-1, mod.in_features).double()
            sums[name] += x.pow(2).sum(0).cpu()
        hooks.append(module.register_forward_hook(hook))
    try:
        seen = 0
        for ids in batches:
            model(ids)
            seen += 1
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise CorelmError("Wanda needs calibration text (got no batches)")
    return {name: s.sqrt().float() for name, s in sums.items()}


@torch.no_grad()
def prune_model(model: nn.Module, method: str = "wanda", sparsity: float = 0.5, pattern: str | None = None,
                calibration: Iterable[torch.Tensor] | None = None, skip: Iterable[str] = ("lm_head",)) -> dict:
    """Zero weights of every ``nn.Linear`` of ``model`` in place.

    Args:
        model: a float corelm model (quantized models are refused: prune first, then quantize).
        method: ``magnitude`` or ``wanda``.
        sparsity: fraction of each row to remove, in [0, 1) (ignored with ``pattern``).
        pattern: ``"N:M"`` for semi-structured sparsity, or ``None``.
        calibration: batches of input ids ``(B, T)`` for Wanda.
        skip: modules left dense (the LM head by default: it is shared with the embedding).

    Returns:
        ``{"method", "sparsity", "pattern", "layers", "zeros", "weights"}`` — what was done.
    """
    from corelm.quant.transform import is_quantized

    if method not in METHODS:
        raise CorelmError(f"unknown pruning method {method!r}; expected one of {', '.join(METHODS)}")
    if not (0.0 <= sparsity < 1.0):
        raise CorelmError(f"sparsity must be in [0, 1), got {sparsity}")
    if is_quantized(model):
        raise CorelmError("the model is quantized; prune the float model, then quantize it")
    if getattr(getattr(model, "config", None), "family", None) == "moe":
        raise CorelmError("pruning a sparse MoE is not supported: its routed experts are stacked tensors this "
                          "pruner does not reach, and zeroing router weights would change which experts run")
    nm = parse_pattern(pattern)
    layers = _targets(model, skip)
    if not layers:
        raise CorelmError("the model has no linear layers to prune")
    if nm is not None:
        for name, m in layers.items():
            if m.in_features % nm[1]:
                raise CorelmError(f"pattern {pattern} needs {name}'s width {m.in_features} to be a multiple of {nm[1]}")
    norms = input_norms(model, layers, calibration or []) if method == "wanda" else None
    zeros = total = 0
    for name, module in layers.items():
        w = module.weight
        score = w.abs().float()
        if norms is not None:
            score = score * norms[name].to(w.device)[None, :]
        mask = prune_mask(score, sparsity, nm)
        w.mul_(mask.to(w.dtype))
        zeros += int((~mask).sum())
        total += mask.numel()
    return {"method": method, "sparsity": sparsity if nm is None else 1 - nm[0] / nm[1], "pattern": pattern,
            "layers": len(layers), "zeros": zeros, "weights": total}


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())


def satisfies_pattern(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive input weights has at most ``n`` non-zeros."""
    groups = weight.reshape(weight.shape[0], -1, m)
    return bool(((groups != 0).sum(-1) <= n).all())


# --------------------------------------------------------------------------------------------
# structured pruning: a smaller dense model
# --------------------------------------------------------------------------------------------
# Zeros in a dense matrix do not make a CPU matmul faster; removing whole rows and columns does.
# Each structure below is scored on calibration tokens by the L2 norm of what it adds to the
# residual stream, and the same number is removed from every layer, so the result is an ordinary
# llama config (uniform n_head / n_kv_head / d_ff / n_layer) that every corelm path can load.
#
# - channels: MLP channel j adds ``h_j * W_down[:, j]`` (``h = silu(gate x) * up x``); summed over
#   tokens its norm is exactly ``||h_j||_2 * ||W_down[:, j]||_2`` -- Wanda's |W| * ||X|| on the
#   down projection's columns, taken as a whole structure (the "Wanda-sp" variant of Sun et al. 2023,
#   and the channel criterion of FLAP, An et al. 2024).
# - heads: query heads within each KV group, the same number from every group (so n_head stays a
#   multiple of n_kv_head); a head adds ``W_o[:, head] y_head``, scored by that output's norm.
# - kv-groups: a key/value head with all its query heads, scored by the norm of the group's summed
#   output ``sum_h W_o[:, h] y_h``; removes k/v projections and KV-cache too.
# - layers: whole blocks, scored by Block Influence ``1 - cos(x_in, x_out)`` averaged over tokens
#   (Men et al. 2024, "ShortGPT"): a block that barely turns the residual stream goes first.

STRUCTURES = ("layers", "kv-groups", "heads", "channels")


def _units(config, structure: str) -> tuple[int, str]:
    """How many units of ``structure`` one layer (or the model, for layers) has, and their name."""
    return {"layers": (config.n_layer, "layers"),
            "kv-groups": (config.n_kv_head, "KV groups per layer"),
            "heads": (config.n_head // config.n_kv_head, "query heads per KV group"),
            "channels": (config.d_ff, "MLP channels per layer")}[structure]


def units_to_keep(config, structure: str, sparsity: float, multiple_of: int = 1) -> int:
    """Units kept per layer (per KV group for heads) when removing ``sparsity`` of them.

    ``round(sparsity * n)`` units are removed; MLP channels kept are rounded to a multiple of
    ``multiple_of`` (so int4 groups of 32/64/128 still divide the down projection's width).

    Raises:
        CorelmError: a structure name corelm does not know, a sparsity outside [0, 1), or a
            ratio that would remove nothing or everything.
    """
    if structure not in STRUCTURES:
        raise CorelmError(f"unknown structure {structure!r}; expected one of {', '.join(STRUCTURES)}")
    if not (0.0 <= sparsity < 1.0):
        raise CorelmError(f"sparsity must be in [0, 1), got {sparsity}")
    n, what = _units(config, structure)
    if structure == "heads" and n == 1:
        raise CorelmError(f"each KV group has one query head ({config.n_head} heads, {config.n_kv_head} KV heads); "
                          "remove kv-groups instead")
    keep = n - round(sparsity * n)
    if structure == "channels" and multiple_of > 1:
        keep = max(multiple_of, round(keep / multiple_of) * multiple_of)
    if keep >= n:
        multiple = (f" (kept channels are a multiple of {multiple_of})"
                    if structure == "channels" and multiple_of > 1 else "")
        raise CorelmError(f"sparsity {sparsity} removes none of the {n} {what}; "
                          f"the smallest step is {1 / n:.3g}" + multiple)
    if keep <= 0:
        raise CorelmError(f"sparsity {sparsity} would remove all {n} {what}")
    return keep


def _calibrate(model: nn.Module, batches: list[torch.Tensor], hooks: list[tuple[nn.Module, object]]) -> None:
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def structure_importance(model: nn.Module, structure: str, calibration: Iterable[torch.Tensor]) -> torch.Tensor:
    """Importance of every unit of ``structure`` in a llama model, from calibration activations.

    Args:
        model: a float corelm llama model.
        structure: one of :data:`STRUCTURES`.
        calibration: batches of input ids ``(B, T)``.
    Returns:
        ``(n_layer,)`` for layers, else ``(n_layer, units)``: kv-groups ``n_kv_head``, heads
        ``n_head`` (grouped by KV head, as in ``q_proj``), channels ``d_ff``. Higher = keep.
    """
    batches = list(calibration)
    if not batches:
        raise CorelmError("structured pruning needs calibration text (got no batches)")
    config, blocks = model.config, model.layers
    H, KV, hd = config.n_head, config.n_kv_head, config.head_dim
    if structure == "layers":
        bi = torch.zeros(len(blocks), dtype=torch.float64)
        tokens = [0]

        def layer_hook(i):
            def hook(mod, args, out):
                x_in, x_out = args[0].flatten(0, -2).double(), out.flatten(0, -2).double()
                bi[i] += (1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)).sum()
                if i == 0:
                    tokens[0] += x_in.shape[0]
            return hook
        _calibrate(model, batches, [(b, layer_hook(i)) for i, b in enumerate(blocks)])
        return (bi / tokens[0]).float()
    if structure == "channels":
        sq = torch.zeros(len(blocks), config.d_ff, dtype=torch.float64)

        def channel_hook(i):
            def hook(mod, args, out):
                sq[i] += args[0].flatten(0, -2).double().pow(2).sum(0)
            return hook
        _calibrate(model, batches, [(b.mlp.down_proj, channel_hook(i)) for i, b in enumerate(blocks)])
        w_norm = torch.stack([b.mlp.down_proj.weight.double().norm(dim=0) for b in blocks])  # (L, d_ff)
        return (sq.sqrt() * w_norm).float()
    if structure not in ("heads", "kv-groups"):
        raise CorelmError(f"unknown structure {structure!r}; expected one of {', '.join(STRUCTURES)}")
    n_units = H if structure == "heads" else KV
    sq = torch.zeros(len(blocks), n_units, dtype=torch.float64)

    def head_hook(i):
        def hook(mod, args, out):
            y = args[0].flatten(0, -2).float().view(-1, H, hd)  # (N, H, hd): each head's attention output
            w = mod.weight.float().view(-1, H, hd)  # (d, H, hd): o_proj columns of each head
            contrib = torch.einsum("nhk,dhk->hnd", y, w)  # (H, N, d): what each head adds to the stream
            if structure == "kv-groups":
                contrib = contrib.view(KV, H // KV, *contrib.shape[1:]).sum(1)  # (KV, N, d)
            sq[i] += contrib.double().pow(2).sum((1, 2))
        return hook
    _calibrate(model, batches, [(b.self_attn.o_proj, head_hook(i)) for i, b in enumerate(blocks)])
    return sq.sqrt().float()


def _rows(hd: int, units: list[int]) -> torch.Tensor:
    """Row indices of whole heads ``units`` in a projection with ``hd`` rows per head."""
    return torch.cat([torch.arange(u * hd, (u + 1) * hd) for u in units])


def _select(state: dict[str, torch.Tensor], prefix: str, idx: torch.Tensor, dim: int) -> None:
    """Keep entries ``idx`` along ``dim`` of ``prefix.weight`` (and of its bias, for output rows)."""
    state[prefix + ".weight"] = state[prefix + ".weight"].index_select(dim, idx).contiguous()
    if dim == 0 and prefix + ".bias" in state:
        state[prefix + ".bias"] = state[prefix + ".bias"].index_select(0, idx).contiguous()


@torch.no_grad()
def remove_structures(model: nn.Module, structure: str, keep: int, importance: torch.Tensor) -> nn.Module:
    """A new, smaller llama model without the lowest-``importance`` units of ``structure``.

    Args:
        model: a float corelm llama model (left unchanged).
        structure: one of :data:`STRUCTURES`.
        keep: units kept per layer (layers: in the model; heads: per KV group).
        importance: from :func:`structure_importance`.
    Returns:
        A model with a new :class:`ModelConfig` (``model.config``) whose shapes are smaller;
        kept units stay in their original order.
    """
    from corelm.io.hf import model_from_state_dict

    config = model.config
    state = dict(model.state_dict())
    L, H, KV, hd = config.n_layer, config.n_head, config.n_kv_head, config.head_dim
    new = _shrunk(config, structure, keep)
    if structure == "layers":
        kept = sorted(importance.topk(keep).indices.tolist())
        renamed = {}
        for name, t in state.items():
            if name.startswith("model.layers."):
                i, rest = name[len("model.layers."):].split(".", 1)
                if int(i) in kept:
                    renamed[f"model.layers.{kept.index(int(i))}.{rest}"] = t
            else:
                renamed[name] = t
        return model_from_state_dict(new, renamed)
    if structure == "channels":
        for i in range(L):
            idx = importance[i].topk(keep).indices.sort().values
            p = f"model.layers.{i}.mlp."
            _select(state, p + "gate_proj", idx, 0)
            _select(state, p + "up_proj", idx, 0)
            _select(state, p + "down_proj", idx, 1)
        return model_from_state_dict(new, state)
    G = H // KV
    for i in range(L):
        if structure == "heads":
            # the same number from every group, so head h still reads KV head h // (new group size)
            per_group = importance[i].view(KV, G)
            q_heads = sorted(g * G + int(j) for g in range(KV) for j in per_group[g].topk(keep).indices)
            kv_heads = list(range(KV))
        else:
            kv_heads = sorted(importance[i].topk(keep).indices.tolist())
            q_heads = [g * G + j for g in kv_heads for j in range(G)]
        p = f"model.layers.{i}.self_attn."
        q_idx, kv_idx = _rows(hd, q_heads), _rows(hd, kv_heads)
        _select(state, p + "q_proj", q_idx, 0)
        _select(state, p + "k_proj", kv_idx, 0)
        _select(state, p + "v_proj", kv_idx, 0)
        _select(state, p + "o_proj", q_idx, 1)
    return model_from_state_dict(new, state)


def parse_structures(spec: str, sparsity: float) -> dict[str, float]:
    """``"channels"`` -> ``{"channels": sparsity}``; ``"channels=0.25,kv-groups=0.34"`` -> per structure."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, ratio = part.partition("=")
        if name not in STRUCTURES:
            raise CorelmError(f"unknown structure {name!r}; expected one of {', '.join(STRUCTURES)}")
        if name in out:
            raise CorelmError(f"structure {name!r} is given twice")
        try:
            out[name] = float(ratio) if ratio else sparsity
        except ValueError:
            raise CorelmError(f"structure ratio must be a number, got {part!r}") from None
    if not out:
        raise CorelmError("no structure given; expected e.g. channels or channels=0.25,kv-groups=0.34")
    return out


@torch.no_grad()
def prune_structured(model: nn.Module, structures: dict[str, float], calibration: Iterable[torch.Tensor],
                     multiple_of: int = 1, progress=None) -> tuple[nn.Module, dict]:
    """Remove whole layers / KV groups / query heads / MLP channels: a smaller dense llama model.

    Structures are removed in the order of :data:`STRUCTURES` (layers first), each scored by a fresh
    calibration pass through the model pruned so far.

    Args:
        model: a float corelm llama model (left unchanged).
        structures: ``{structure: fraction removed}``.
        calibration: batches of input ids ``(B, T)``.
        multiple_of: MLP channels kept are a multiple of this.
        progress: optional ``callable(str)`` told what is being done.
    Returns:
        ``(pruned model, report)``; the report holds the parameter counts and each step's shapes.
    """
    from corelm.quant.transform import is_quantized

    if getattr(getattr(model, "config", None), "family", None) != "llama":
        raise CorelmError("structured pruning supports llama-family models (Llama, SmolLM2, Mistral)")
    if is_quantized(model):
        raise CorelmError("the model is quantized; prune the float model, then quantize it")
    extras = llama_extras(model.config)
    if extras:  # the structure surgery slices bias-free projections of one plain layout
        raise CorelmError(f"structured pruning handles plain llama blocks; this model has {', '.join(extras)}")
    calibration = list(calibration)
    planned_config(model.config, structures, multiple_of)  # every ratio checked before any calibration pass
    before = sum(p.numel() for p in model.parameters())
    steps = []
    for name in (s for s in STRUCTURES if s in structures):
        n, what = _units(model.config, name)
        keep = units_to_keep(model.config, name, structures[name], multiple_of)
        if progress:
            progress(f"scoring {n} {what} on {sum(b.numel() for b in calibration)} calibration tokens, keeping {keep}")
        importance = structure_importance(model, name, calibration)
        step = {"structure": name, "sparsity": structures[name], "units": n, "kept": keep}
        if name == "layers":
            step["removed_layers"] = sorted(set(range(n)) - set(importance.topk(keep).indices.tolist()))
        model = remove_structures(model, name, keep, importance)
        steps.append(step)
    after = sum(p.numel() for p in model.parameters())
    c = model.config
    return model, {"steps": steps, "params_before": before, "params_after": after,
                   "config": {"n_layer": c.n_layer, "n_head": c.n_head, "n_kv_head": c.n_kv_head,
                              "d_ff": c.d_ff, "head_dim": c.head_dim}}


def planned_config(config, structures: dict[str, float], multiple_of: int = 1):
    """The config :func:`prune_structured` will produce; raises :class:`CorelmError` on a ratio it cannot take."""
    for name in structures:
        if name not in STRUCTURES:
            raise CorelmError(f"unknown structure {name!r}; expected one of {', '.join(STRUCTURES)}")
    for name in (s for s in STRUCTURES if s in structures):
        config = _shrunk(config, name, units_to_keep(config, name, structures[name], multiple_of))
    return config


def _shrunk(config, structure: str, keep: int):
    """``config`` with ``keep`` units of ``structure`` (per layer / per KV group)."""
    if structure == "layers":
        return dataclasses.replace(config, n_layer=keep)
    if structure == "channels":
        return dataclasses.replace(config, d_ff=keep)
    if structure == "heads":
        return dataclasses.replace(config, n_head=keep * config.n_kv_head, head_dim=config.head_dim)
    return dataclasses.replace(config, n_head=keep * (config.n_head // config.n_kv_head), n_kv_head=keep,
                               head_dim=config.head_dim)


def llama_extras(config) -> list[str]:
    """What a llama-family config has beyond plain Llama blocks (Qwen2/3, Phi-3, windows), by name."""
    checks = (("biases", config.bias or config.qkv_bias), ("QK norms", config.qk_norm),
              ("a sliding window", config.sliding_window),
              ("partial rotary", getattr(config, "rotary_dim", None) not in (None, config.head_dim)))
    return [name for name, present in checks if present]


def llama_param_count(config) -> int:
    """Parameters of a llama config, by arithmetic (for checking what pruning produced)."""
    d, hd, L = config.d_model, config.head_dim, config.n_layer
    attn = d * hd * (2 * config.n_head + 2 * config.n_kv_head)  # q, o: n_head heads; k, v: n_kv_head
    mlp = 3 * d * config.d_ff
    per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
    head = 0 if config.tie_embeddings else config.vocab_size * d
    return config.vocab_size * d + L * per_layer + d + head


def recover(model: nn.Module, teacher: nn.Module, token_ids: list[int], steps: int, *, seq_len: int = 256,
            batch_size: int = 4, lr: float = 1e-4, precision: str = "fp32", alpha: float = 1.0, seed: int = 0,
            progress: bool = True) -> dict:
    """A short recovery fine-tune of a pruned model, distilling the unpruned one, in the one training loop.

    The pruned model learns the teacher's next-token distribution (KL at T = 1) on windows of
    ``token_ids`` -- distillation from the parent is how pruned models are usually healed
    (Muralidharan et al. 2024, "Minitron", found it better than the next-token loss). Pure
    distillation (``alpha = 1``) also keeps a small calibration text from being memorised.

    Args:
        model: the pruned model (trained in place).
        teacher: the model before pruning (frozen).
        token_ids: the training text, tokenized (e.g. the calibration file).
        steps: optimizer steps; ``batch_size`` windows of ``seq_len`` tokens each.
        lr: peak learning rate (warmup then cosine, AdamW without weight decay).
        precision: a policy of ``corelm.train.precision``.
        alpha: weight of the distillation term; ``1 - alpha`` goes to the next-token loss.
    Returns:
        ``{"steps", "tokens", "first_loss", "last_loss"}``.
    """
    from corelm.compress.distill import distill_loss_fn
    from corelm.train.loader import ResumableLoader
    from corelm.train.loop import TrainConfig, train

    if steps <= 0:
        raise CorelmError(f"recovery steps must be positive, got {steps}")
    ids = torch.tensor(token_ids, dtype=torch.long)
    windows = [ids[i:i + seq_len + 1] for i in range(0, len(ids) - seq_len, seq_len)]  # (seq_len + 1,) each
    if len(windows) < batch_size:
        raise CorelmError(f"recovery needs at least {batch_size} windows of {seq_len + 1} tokens; "
                          f"the text has {len(ids)} tokens")
    batches = ResumableLoader(windows, batch_size, seed=seed)
    cfg = TrainConfig(max_steps=steps, lr=lr, warmup_steps=max(1, steps // 10), weight_decay=0.0,
                      precision=precision, seed=seed, progress=progress, tensorboard=False, measure_mfu=False)
    for p in model.parameters():
        p.requires_grad_(True)
    result = train(model, distill_loss_fn(teacher, temperature=1.0, alpha=alpha), batches, cfg)
    # the loop stops cleanly on Ctrl-C/SIGTERM; a half-healed model is not the output
    if result.stopped == "interrupted":
        raise KeyboardInterrupt
    model.eval()
    losses = [loss for _, loss in result.losses]
    return {"steps": result.step, "tokens": result.step * batch_size * seq_len,
            "first_loss": losses[0] if losses else float("nan"), "last_loss": losses[-1] if losses else float("nan")}
