"""Decode speed of corelm int8/int4 against transformers bf16 and llama.cpp, side by side in one run.

Same weights (the embedded SmolLM2-135M-Instruct Q4_1 GGUF), same prompt, greedy, N new tokens
(EOS ignored), T threads, variants alternating round by round (A B C A B C ...), median reported.
corelm decodes as ``corelm generate`` does (:mod:`corelm.generate.step`): ``int4``/``int8`` on
corelm's C++ step (:mod:`corelm.kernels`: GGUF blocks, integer activations, one call per token);
``int4-aten``/``int8-aten`` the model's own forward over the static cache on PyTorch's packed
kernels (bf16 activations), compiled when ``--compile`` says so. llama.cpp runs through ``llama-cpp-python`` in a
separate virtualenv (``--llama-python``; a benchmark-only dependency, never installed by the tests),
as a worker process fed one command per round.

Also checks that a GGUF exported by corelm (F32) gives llama.cpp the same 32-token greedy
continuation as corelm, when llama.cpp is available.

    python benchmarks/decode_quant.py                      # corelm int4/int8 vs transformers bf16
    python benchmarks/decode_quant.py --llama-python /work/bench-venv/bin/python
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/decode_quant.py ...   # AVX2 kernels on an AVX-512 CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "Explain how a CPU cache works."

LLAMA_WORKER = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
load_s = time.perf_counter() - t0
print(json.dumps({"load_s": load_s}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd.get("model") and cmd["model"] != path:
        path = cmd["model"]
        llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    prompt = llm.tokenize(cmd["prompt"].encode(), add_bos=cmd.get("bos", False), special=True)
    if cmd.get("ids"):
        prompt = cmd["ids"]
    want = cmd.get("n", n)
    llm.reset()
    out, t_first = [], None
    t0 = time.perf_counter()
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if t_first is None:
            t_first = time.perf_counter()
        out.append(int(tok))
        if len(out) == want:
            break
    end = time.perf_counter()
    print(json.dumps({"ids": out, "ttft_s": t_first - t0, "decode_s": end - t_first, "n": len(out)}), flush=True)
"""


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def random_smollm2(device: str) -> torch.nn.Module:
    """SmolLM2-135M's shapes with random weights (for machines without the embedded model)."""
    from corelm.models import build_model
    from corelm.presets import preset

    torch.manual_seed(0)
    with torch.device(device):
        return build_model(preset("smollm2-135m")).eval()


class CorelmRunner:
    """corelm as ``corelm generate`` decodes: the engine on the step :func:`step_for` picks."""

    def __init__(self, method: str, compile_mode: str, max_len: int, random: bool = False,
                 device: str = "cpu", kernels: bool = True) -> None:
        from corelm.generate.step import KernelStep, step_for, weight_bytes
        from corelm.loading import quantize_model

        t0 = time.perf_counter()
        if random:
            model, gguf = random_smollm2(device), None
        else:
            import corelm
            from corelm.commands.quantize import gguf_source

            model, gguf = corelm.load("smollm2-135m-instruct", dtype="fp32").model, gguf_source("smollm2-135m-instruct")
        if method != "fp32":
            from corelm.quant.layers import pytorch_kernels

            with pytorch_kernels() if not kernels else contextlib.nullcontext():
                quantize_model(model, method, from_gguf=gguf)
        self.model, self.compiled = model, compile_mode == "yes"
        if isinstance(step_for(model, compile=self.compiled), KernelStep):
            from corelm import kernels as ext

            self.name = f"corelm {method} C++"
            self.build_s = ext._state["build_seconds"]  # None: loaded from this machine's cache
        else:
            self.name = f"corelm {method} aten{'' if self.compiled else ' eager'}"
        self.load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.run(list(range(1, 9)), 4)  # warm-up (and, compiled, the compile)
        self.warm_s = time.perf_counter() - t0
        self.bytes = weight_bytes(model)

    def run(self, ids: list[int], n: int) -> dict:
        from corelm.generate.engine import SamplingParams, stream

        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        out, t_first = [], None
        for tok in stream(self.model, ids, params, compile=self.compiled):
            if t_first is None:
                t_first = time.perf_counter()
            out.append(tok)
        end = time.perf_counter()
        return {"ids": out, "ttft_s": t_first - t0, "decode_s": end - t_first, "n": len(out)}


class HFRunner:
    def __init__(self, dtype: torch.dtype, random: bool = False, device: str = "cpu") -> None:
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        t0 = time.perf_counter()
        if random:
            cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                              rope_theta=100000.0, tie_word_embeddings=True)
            torch.manual_seed(0)
            self.model = LlamaForCausalLM(cfg).to(device, dtype).eval()
        else:
            from corelm.presets import embedded_path

            path = embedded_path("smollm2-135m-instruct")
            self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=dtype).eval()
        self.device = device
        self.load_s = time.perf_counter() - t0
        dtype_name = str(dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")
        self.name = f"transformers {dtype_name}"
        self.bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.compiled, self.warm_s = False, 0.0

    @torch.inference_mode()
    def run(self, ids: list[int], n: int) -> dict:
        from transformers import TextStreamer  # noqa: F401 - imported for parity of import cost

        x = torch.tensor([ids], device=self.device)
        times = []

        class Clock:
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        t0 = time.perf_counter()
        out = self.model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=Clock())
        end = time.perf_counter()
        t_first = times[1] if len(times) > 1 else end  # put() #0 is the prompt
        return {"ids": out[0, len(ids):].tolist(), "ttft_s": t_first - t0, "decode_s": end - t_first,
                "n": out.shape[1] - len(ids)}


class LlamaCppRunner:
    def __init__(self, python: str, gguf: Path, threads: int, n: int) -> None:
        self.proc = subprocess.Popen([python, "-c", LLAMA_WORKER, str(gguf), str(threads), str(n)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.load_s = json.loads(self.proc.stdout.readline())["load_s"]
        self.name, self.bytes, self.compiled, self.warm_s = "llama.cpp", gguf.stat().st_size, False, 0.0

    def run(self, ids: list[int], n: int, model: Path | None = None) -> dict:
        self.proc.stdin.write(json.dumps({"prompt": "", "ids": ids, "n": n,
                                          "model": str(model) if model else None}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def build_runners(args: argparse.Namespace, max_len: int) -> list:
    """One runner per ``--variants`` entry, then llama.cpp's when ``--llama-python`` is given."""
    runners = []
    for v in args.variants.split(","):
        v = v.strip()
        print(f"loading {v} ...", file=sys.stderr, flush=True)
        if v.removesuffix("-aten") in ("int4", "int8", "fp32"):
            runners.append(CorelmRunner(v.removesuffix("-aten"), args.compile, max_len, args.random, args.device,
                                        kernels=not v.endswith("-aten")))
        elif v in ("hf-bf16", "hf-fp32"):
            runners.append(HFRunner(torch.bfloat16 if v == "hf-bf16" else torch.float32, args.random,
                                    args.device))
        else:
            raise SystemExit(f"unknown variant {v}")
    if args.llama_python:
        from corelm.presets import embedded_path

        runners.append(LlamaCppRunner(args.llama_python, embedded_path("smollm2-135m-instruct"), args.threads,
                                      args.tokens))
    return runners


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per run (EOS ignored)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every variant")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    ap.add_argument("--variants", default="int4,int8,hf-bf16",
                    help="comma list of int4, int8 (corelm C++ step), int4-aten, int8-aten, fp32 (corelm on "
                         "PyTorch kernels), hf-bf16, hf-fp32 (transformers)")
    ap.add_argument("--compile", default="no", choices=["yes", "no"],
                    help="for the PyTorch-kernel variants: compile the model's decode step (yes; minutes cold) "
                         "or stay eager (no)")
    ap.add_argument("--random", action="store_true",
                    help="SmolLM2-135M shapes with random weights (no embedded model needed; speed only)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--llama-python", default=None,
                    help="python of a virtualenv with llama-cpp-python (adds the llama.cpp peer)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from corelm.generate.step import cpu_capability

    if args.random:
        ids = list(range(1000, 1008))  # 8 prompt tokens, like the chat prompt's length
    else:
        import corelm

        ids = corelm.load("smollm2-135m-instruct", dtype="fp32").tokenizer.encode(PROMPT)
    max_len = len(ids) + args.tokens + 8
    from corelm import kernels

    kernels.load()  # build now if this machine has no library for this instruction set (timed below)
    runners = build_runners(args, max_len)
    for r in runners:  # warm-up run each
        r.run(ids, 8)
    results: dict[str, list[dict]] = {r.name: [] for r in runners}
    for i in range(args.rounds):
        for r in runners:
            results[r.name].append(r.run(ids, args.tokens))
        print(f"round {i + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    cap = cpu_capability() if args.device == "cpu" else torch.cuda.get_device_name()
    weights = "random weights of SmolLM2-135M's shapes" if args.random else "SmolLM2-135M-Instruct"
    print(f"\n{weights}, prompt {len(ids)} tokens, {args.tokens} new tokens, {args.threads} threads, "
          f"median of {args.rounds} alternating rounds; device {args.device} ({cap}); torch {torch.__version__}")
    print(f"{'variant':<20} {'load s':>7} {'compile s':>9} {'TTFT ms':>8} {'decode tok/s':>12} "
          f"{'weights MB':>10} {'GB/s':>6}")
    rates = {}
    for r in runners:
        rs = results[r.name]
        rate = _median([(x["n"] - 1) / x["decode_s"] for x in rs])
        rates[r.name] = rate
        ttft = _median([x["ttft_s"] for x in rs]) * 1e3
        comp = f"{r.warm_s:.1f}" if getattr(r, "compiled", False) else "eager"
        print(f"{r.name:<20} {r.load_s:>7.1f} {comp:>9} {ttft:>8.0f} {rate:>12.1f} {r.bytes / 1e6:>10.0f} "
              f"{r.bytes * rate / 1e9:>6.1f}")
    base = [n for n in rates if n.startswith("transformers")]
    for name, rate in rates.items():
        for b in base + (["llama.cpp"] if "llama.cpp" in rates else []):
            if name != b:
                print(f"  {name} / {b}: {rate / rates[b]:.2f}x")

    if "llama.cpp" in results:  # same GGUF, same arithmetic family: how often do greedy tokens agree?
        ref = results["llama.cpp"][0]["ids"]
        for name, rs in results.items():
            if name.startswith("corelm"):
                got = rs[0]["ids"]
                first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
                print(f"  {name} greedy tokens equal to llama.cpp's: first {first} of {len(ref)}")
    built = [f"{r.name} {r.build_s:.1f} s" for r in runners if getattr(r, "build_s", None)]
    print(f"  C++ kernels: {'compiled in this run: ' + ', '.join(built) if built else 'loaded from the cache'}"
          f" ({__import__('corelm.kernels', fromlist=['isa']).isa()})")

    if args.llama_python:
        import corelm
        from corelm.io.gguf_export import export_gguf
        from corelm.quant.transform import is_quantized

        llm = corelm.load("smollm2-135m-instruct", dtype="fp32")
        assert not is_quantized(llm.model)
        with torch.inference_mode():
            ref = llm.generate_ids(ids, 32, ignore_eos=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = export_gguf(llm.model, Path(tmp) / "smollm2-f32.gguf", "F32", tokenizer=llm.tokenizer)
            got = runners[-1].run(ids, 32, model=path)["ids"]
        same = sum(a == b for a, b in zip(ref, got))
        print(f"\nGGUF export (F32) -> llama.cpp, 32 greedy tokens: {'identical' if got == ref else 'DIFFERENT'} "
              f"({same}/32 positions equal)")
        runners[-1].close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
