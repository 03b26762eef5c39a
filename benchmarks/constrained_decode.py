"""What a grammar costs on the decode path: free vs JSON-schema decoding, alternating, one process.

Prints, for the embedded SmolLM2-135M (49,152-token vocabulary; GGUF Q4_1 blocks on corelm's C++ step):

- the per-token mask cost of constrained decoding: llguidance's ``compute_mask`` (``Constraint.fill``)
  and the bitmask applied to the logits (``apply_bitmask``), mean and median microseconds per token;
- decode tokens/s of free and schema-constrained generation of the same prompt, alternating A B A B,
  the median of each and their ratio.

Usage: ``python benchmarks/constrained_decode.py [--rounds 5] [--threads 2] [--tokens 48]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import corelm
from corelm.generate import constraints, engine

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "hobbies"],
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "maxLength": 20},
                         "hobbies": {"type": "array", "minItems": 3, "maxItems": 3,
                                     "items": {"type": "string", "maxLength": 16}}}}
PROMPT = "Invent a person who lives in Lyon, with three hobbies, as JSON:"


class Timed:
    """Wraps ``Constraint.fill`` and ``apply_bitmask`` to record each call's nanoseconds."""

    def __init__(self) -> None:
        self.fill: list[int] = []
        self.apply: list[int] = []
        self._fill, self._apply = constraints.Constraint.fill, constraints.apply_bitmask

    def __enter__(self) -> Timed:  # noqa: PYI034
        fill, apply = self._fill, self._apply

        def timed_fill(c, bitmask, row=0):
            t = time.perf_counter_ns()
            fill(c, bitmask, row)
            self.fill.append(time.perf_counter_ns() - t)

        def timed_apply(logits, bitmask):
            t = time.perf_counter_ns()
            out = apply(logits, bitmask)
            self.apply.append(time.perf_counter_ns() - t)
            return out

        constraints.Constraint.fill = timed_fill
        constraints.apply_bitmask = timed_apply  # mask_rows looks it up at call time
        return self

    def __exit__(self, *exc: object) -> None:
        constraints.Constraint.fill, constraints.apply_bitmask = self._fill, self._apply


def decode_rate(llm, ids: list[int], params, constraint) -> tuple[int, float]:
    """(new tokens, decode tokens/s after the first token)."""
    first = None
    n = 0
    for _ in engine.stream(llm.model, ids, params, constraint=constraint):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return n, (n - 1) / (end - first) if n > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = corelm.load("smollm2-135m-instruct")
    ids = llm.encode_prompt(PROMPT)
    free = llm._params(args.tokens, 0.0, 1.0, 0, 1.0, None, True)  # ignore EOS: the same length every round
    t = time.perf_counter()
    llm.constraint(json_schema=SCHEMA)  # the grammar view of the vocabulary: once per model
    print(f"grammar tokenizer + first grammar: {(time.perf_counter() - t) * 1e3:.0f} ms")
    t = time.perf_counter()
    for _ in range(20):
        llm.constraint(json_schema=SCHEMA)
    print(f"one grammar (schema compile): {(time.perf_counter() - t) / 20 * 1e3:.2f} ms")
    decode_rate(llm, ids, free, None)  # warm-up
    rates: dict[str, list[float]] = {"free": [], "json_schema": []}
    lengths = {}
    with Timed() as timed:
        for _ in range(args.rounds):
            n, r = decode_rate(llm, ids, free, None)
            rates["free"].append(r)
            lengths["free"] = n
            n, r = decode_rate(llm, ids, free, llm.constraint(json_schema=SCHEMA))
            rates["json_schema"].append(r)
            lengths["json_schema"] = n
    out = engine.stream(llm.model, ids, free, constraint=llm.constraint(json_schema=SCHEMA))
    text = llm.tokenizer.decode(list(out))
    print(f"constrained output: {text!r}")
    print(f"CPU threads {args.threads}, load average {os.getloadavg()[0]:.2f}")
    for name, ns in (("compute_mask (Constraint.fill)", timed.fill), ("apply_bitmask", timed.apply)):
        print(f"{name:32s} {len(ns):5d} calls  mean {statistics.mean(ns) / 1e3:7.1f} us  "
              f"median {statistics.median(ns) / 1e3:7.1f} us")
    print("| decode | new tokens | tok/s median (min-max) |")
    print("|---|---|---|")
    for name, rs in rates.items():
        print(f"| {name} | {lengths[name]} | {statistics.median(rs):.1f} ({min(rs):.1f}-{max(rs):.1f}) |")
    print(f"ratio json_schema / free: {statistics.median(rates['json_schema']) / statistics.median(rates['free']):.3f}")


if __name__ == "__main__":
    main()
