"""Decode benchmark: corelm vs transformers on the same SmolLM2-135M weights, side by side in one run.

Both sides read the embedded Q4_1 GGUF (dequantized), run the same prompt in the same dtype with the
same number of threads, alternating corelm / transformers, and the table reports medians of the
repeats: load time, prefill tokens/s, decode tokens/s and the memory bandwidth decoding achieves
(bytes of weights read per token x tokens/s; decode is bandwidth-bound). Ratios are corelm / peer.

    .venv/bin/python benchmarks/decode.py                     # fp32 and bf16, 3 repeats
    .venv/bin/python benchmarks/decode.py --dtypes fp32 --new-tokens 32 --repeats 5

Not a test: it asserts nothing, it measures. The CPU is named next to the figures.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

PROMPT = ("You are reading a short technical note. Thermodynamics is the branch of physics that deals with heat, "
          "work and temperature, and their relation to energy, entropy and the physical properties of matter. "
          "The behaviour of these quantities is governed by four laws. Summarise the three best known laws of "
          "thermodynamics in plain words, one sentence each, and give an everyday example for every law:")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decoded token: every parameter once (a tied embedding is read by the LM head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def run_corelm(llm, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 steps) with corelm's engine."""
    from corelm.generate.engine import SamplingParams, stream

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    first = None
    n = 0
    for _ in stream(llm.model, ids, params):
        n += 1
        if first is None:
            first, c1 = time.perf_counter(), time.process_time()
    end, c2 = time.perf_counter(), time.process_time()
    assert n == new_tokens, n
    return first - t0, end - first, c1 - c0, c2 - c1


class _Clock:
    """A transformers streamer that records when each new token arrives (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.calls = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_hf(model, ids: list[int], new_tokens: int) -> tuple[float, float]:
    clock = _Clock()
    x = torch.tensor([ids])
    t0, c0 = time.perf_counter(), time.process_time()
    model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                   pad_token_id=0)
    end, c2 = time.perf_counter(), time.process_time()
    assert len(clock.times) == new_tokens, len(clock.times)
    return clock.times[0] - t0, end - clock.times[0], clock.cpu[0] - c0, c2 - clock.cpu[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run (EOS ignored)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per side (median reported)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import corelm
    from corelm.presets import embedded_path

    path = embedded_path("smollm2-135m-instruct")
    print(f"CPU: {cpu_name()} | torch {torch.__version__} | capability {torch.backends.cpu.get_cpu_capability()} "
          f"| {args.threads} threads | {args.new_tokens} new tokens | median of {args.repeats}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        # -- load times: corelm (median of repeats) and transformers' GGUF loader (once: ~15-30 s) --
        loads = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            llm = corelm.load("smollm2-135m-instruct", dtype=dtype)
            loads.append(time.perf_counter() - t0)
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
        hf_load = time.perf_counter() - t0
        ids = llm.tokenizer.encode(PROMPT)
        # warm-up both (first calls pick kernels, allocate caches)
        run_corelm(llm, ids, 4)
        run_hf(hf, ids, 4)
        ours, theirs = [], []
        print(f"[{dtype_name}] load: corelm {statistics.median(loads):.2f} s, transformers (GGUF) {hf_load:.1f} s",
              flush=True)
        for i in range(args.repeats):  # alternate: A B A B ...
            ours.append(run_corelm(llm, ids, args.new_tokens))
            theirs.append(run_hf(hf, ids, args.new_tokens))
            print(f"[{dtype_name}] run {i + 1}: decode tok/s corelm {(args.new_tokens - 1) / ours[-1][1]:.1f} "
                  f"({(args.new_tokens - 1) / ours[-1][3]:.1f}/CPU-s), transformers "
                  f"{(args.new_tokens - 1) / theirs[-1][1]:.1f} ({(args.new_tokens - 1) / theirs[-1][3]:.1f}/CPU-s)",
                  flush=True)
        for name, load_s, runs, model in (("corelm", statistics.median(loads), ours, llm.model),
                                          ("transformers", hf_load, theirs, hf)):
            prefill = statistics.median(len(ids) / r[0] for r in runs)
            decode = [(args.new_tokens - 1) / r[1] for r in runs]
            decode_cpu = statistics.median((args.new_tokens - 1) / r[3] for r in runs)
            rows.append({"side": name, "dtype": dtype_name, "load": load_s, "prefill": prefill,
                         "decode": statistics.median(decode), "spread": (min(decode), max(decode)),
                         "decode_cpu": decode_cpu, "gbps": weight_bytes(model) * statistics.median(decode) / 1e9})
        del hf, llm
    print(f"prompt: {len(ids)} tokens\n")
    header = f"{'dtype':<5} {'side':<13} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} " \
             f"{'(min-max)':>13} {'GB/s':>6} {'decode tok/CPU-s':>17}"
    print(header)
    print("-" * len(header))
    for r in rows:
        lo, hi = r["spread"]
        print(f"{r['dtype']:<5} {r['side']:<13} {r['load']:>7.2f} {r['prefill']:>14.0f} {r['decode']:>13.1f} "
              f"{f'({lo:.1f}-{hi:.1f})':>13} {r['gbps']:>6.1f} {r['decode_cpu']:>17.1f}")
    print("\nratios corelm / transformers (>1 = corelm better; load: transformers time / corelm time):")
    for dtype_name in args.dtypes.split(","):
        a, b = (next(r for r in rows if r["dtype"] == dtype_name and r["side"] == s)
                for s in ("corelm", "transformers"))
        print(f"  {dtype_name}: load {b['load'] / a['load']:.1f}x faster | prefill {a['prefill'] / b['prefill']:.2f}x "
              f"| decode {a['decode'] / b['decode']:.2f}x "
              f"| decode per CPU-second {a['decode_cpu'] / b['decode_cpu']:.2f}x")
    print("(tok/CPU-s = tokens per second of CPU time the process got: on a shared, oversubscribed machine it is "
          "the steadier figure; with one thread it approximates the uncontended single-core rate)")


if __name__ == "__main__":
    main()
