"""Speculative decoding and prompt lookup against plain greedy decoding, side by side in one run.

Same model, same prompt, greedy, N new tokens; the outputs must be token-identical (checked), and
the table reports acceptance rate, tokens per target forward pass and the wall-clock speedup.
The prompt asks the model to edit a code snippet -- the case prompt lookup is for (the answer
copies long spans of the input).

    python benchmarks/speculative.py                       # prompt lookup on the embedded SmolLM2 (int4)
    python benchmarks/speculative.py --draft runs/kd       # plus a draft model (same tokenizer)
    python benchmarks/speculative.py --quantize none       # the float model on the generic engine

With ``--quantize int4``/``int8`` (default int4) the baseline is corelm's fast path (C++ decode
step) and the verify passes run on the same kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

CODE = '''def moving_average(values, window):
    """Return the moving averages of values over a sliding window."""
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''
PROMPT = ("<|im_start|>user\nRename the function moving_average to rolling_mean and keep everything else the same:\n"
          f"```python\n{CODE}```<|im_end|>\n<|im_start|>assistant\n```python\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default=None, help="draft model (same tokenizer) for speculative decoding")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4, help="tokens proposed per round")
    ap.add_argument("--lookup", type=int, default=3, help="n-gram length for prompt lookup")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantize", default="int4", choices=["int4", "int8", "none"],
                    help="target (and draft) weights: int4/int8 run on the C++ step; none = fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import corelm
    from corelm.generate.engine import SamplingParams, stream
    from corelm.generate.speculative import speculative_generate

    quantize = None if args.quantize == "none" else args.quantize
    llm = corelm.load(args.model, dtype="fp32", quantize=quantize)
    draft = corelm.load(args.draft, dtype="fp32", quantize=quantize).model if args.draft else None
    ids = llm.tokenizer.encode(PROMPT)
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)
    runs = {"greedy": lambda: (list(stream(llm.model, ids, params)), None),
            f"lookup n={args.lookup} k={args.k}": lambda: speculative_generate(llm.model, ids, args.tokens,
                                                                                lookup=args.lookup, k=args.k)}
    if draft is not None:
        runs[f"draft k={args.k}"] = lambda: speculative_generate(llm.model, ids, args.tokens, draft=draft, k=args.k)
    times = {name: [] for name in runs}
    outputs, stats = {}, {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, fn in runs.items():  # alternating
                t0 = time.perf_counter()
                out, st = fn()
                times[name].append(time.perf_counter() - t0)
                outputs[name], stats[name] = out, st
    base = statistics.median(times["greedy"])
    print(f"{args.model} ({args.quantize}), prompt {len(ids)} tokens, {args.tokens} greedy tokens, "
          f"{args.threads} threads, median of {args.rounds}")
    print(f"{'method':<22} {'s':>6} {'tok/s':>6} {'speedup':>7} {'accept':>7} {'tok/call':>8} identical")
    for name in runs:
        t = statistics.median(times[name])
        st = stats[name]
        acc = f"{st.acceptance_rate:.0%}" if st else "-"
        per = f"{st.tokens_per_target_call:.2f}" if st else "1.00"
        same = outputs[name] == outputs["greedy"]
        print(f"{name:<22} {t:>6.2f} {args.tokens / t:>6.1f} {base / t:>6.2f}x {acc:>7} {per:>8} {same}")
    print("\n" + llm.tokenizer.decode(outputs["greedy"])[:400])
    return 0 if all(outputs[n] == outputs["greedy"] for n in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
