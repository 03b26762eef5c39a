"""``corelm models``: the presets and embedded models, with parameter counts computed from each config."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Literal

from corelm.commands.args import Options, option, options_from, parser_from
from corelm.config import ModelConfig
from corelm.presets import EMBEDDED, PRESETS, preset


def count_params(config: ModelConfig) -> int:
    """Parameters of ``config`` (tied embeddings once), from the planner's formulas when present,
    else by building the model on the meta device (exact, allocates nothing)."""
    try:
        from corelm.plan.formulas import param_count
    except ImportError:
        param_count = None
    if param_count is not None:
        return int(param_count(config))
    import torch

    from corelm.models import build_model
    from corelm.ops.init import skip_init

    with torch.device("meta"), skip_init():
        model = build_model(config)
    return sum(p.numel() for p in model.parameters())


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def rows() -> list[dict]:
    embedded_of = {p: name for name, (_, _, p) in EMBEDDED.items()}
    out = []
    for name in EMBEDDED:
        cfg = preset(EMBEDDED[name][2])
        out.append({"name": name, "kind": "embedded", "family": cfg.family, "params": count_params(cfg),
                    "layers": cfg.n_layer, "d_model": cfg.d_model, "context": cfg.max_seq_len,
                    "weights": f"{EMBEDDED[name][0]} (pip)"})
    for name in PRESETS:
        if name in EMBEDDED:
            continue
        cfg = preset(name)
        weights = f"config only (weights: {embedded_of[name]})" if name in embedded_of else "config only"
        out.append({"name": name, "kind": "preset", "family": cfg.family, "params": count_params(cfg),
                    "layers": cfg.n_layer, "d_model": cfg.d_model, "context": cfg.max_seq_len, "weights": weights})
    return out


@dataclass
class ModelsOptions(Options):
    """What ``corelm models`` lists."""

    family: Literal["gpt2", "llama", "bert"] | None = option(None, "only this family")
    json: bool = option(False, "print JSON instead of a table")


def models(options: ModelsOptions | None = None) -> list[dict]:
    """The embedded models and presets (one dict each: name, kind, family, params, layers, d_model, context,
    weights), of ``options.family`` when given."""
    options = options or ModelsOptions()
    return [r for r in rows() if options.family in (None, r["family"])]


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        ModelsOptions, prog="corelm models",
        description="List embedded models (weights installed with a pip package) and presets (architectures; "
                    "loading one gives random weights). Parameter counts are computed from each config.")


def main(argv: list[str]) -> int:
    args = options_from(ModelsOptions, build_parser().parse_args(argv))
    table = models(args)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    header = ("name", "kind", "family", "params", "layers", "d_model", "context", "weights")
    cells = [[str(r["name"]), r["kind"], r["family"], human(r["params"]), str(r["layers"]), str(r["d_model"]),
              str(r["context"]), r["weights"]] for r in table]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for c in cells:
        print("  ".join(v.ljust(w) if i not in (3, 4, 5, 6) else v.rjust(w)
                        for i, (v, w) in enumerate(zip(c, widths))).rstrip())
    return 0
