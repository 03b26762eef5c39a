"""Serving throughput, time-to-first-token and time-per-output-token at 1, 8 and 32 concurrent clients.

Starts ``corelm serve`` as a subprocess (the real command, on a free loopback port), then runs
streaming ``/v1/completions`` clients at each concurrency level, alternating the levels round after
round (1, 8, 32, 1, 8, 32, ...) so machine noise hits every level alike, and prints medians.
Every request generates exactly ``--max-tokens`` tokens (``ignore_eos``) so levels are comparable.

Bar (issue 5): aggregate tokens/s at 8 clients >= 3x a single client's.

    .venv/bin/python benchmarks/serve.py                      # embedded SmolLM2, levels 1 8 32
    .venv/bin/python benchmarks/serve.py --levels 1 8 --rounds 3 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
import torch

from corelm.serve.server import free_port

PROMPTS = ["The three laws of thermodynamics are", "Write a haiku about the sea.", "def fibonacci(n):",
           "The capital of France is", "Photosynthesis converts", "Once upon a time, in a small village,",
           "The most important idea in linear algebra is", "To make bread, you need"]


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if first is None and any(c.get("text") for c in event["choices"]):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - t0, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens, "start": t0, "end": end}


async def level(url: str, model: str, clients: int, requests_each: int, max_tokens: int) -> dict:
    """``clients`` concurrent clients, each sending ``requests_each`` requests back to back."""
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def client(i: int) -> list[dict]:
            return [await one_request(http, model, PROMPTS[(i + k) % len(PROMPTS)], max_tokens)
                    for k in range(requests_each)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "req_s": len(results) / wall,
            "ttft": statistics.median(r["ttft"] for r in results),
            "tpot": statistics.median(r["tpot"] for r in results),
            "wall": wall, "requests": len(results)}


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "corelm", "serve", "--model", args.model, "--port", str(port),
           "--max-batch", str(max(args.levels)), "--max-seq-len", str(args.max_seq_len)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    if args.device:
        cmd += ["--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300) -> str:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"corelm serve exited: {proc.stderr.read()}")
        try:
            r = httpx.get(url + "/health", timeout=1)
            if r.status_code == 200:
                return r.json()["models"][0]
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("corelm serve did not become ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="model to serve (default the embedded SmolLM2)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all levels (median reported)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends per round at level 1 "
                                                           "(higher levels send 1 per client)")
    p.add_argument("--max-seq-len", type=int, default=256, help="server --max-seq-len")
    p.add_argument("--threads", type=int, help="server --threads (default: the server's, all cores but one)")
    p.add_argument("--dtype", help="server --dtype (default: corelm's choice for this machine)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="server --quantize (default: none; a Q4 GGUF such as "
                   "the embedded model runs on its own blocks anyway)")
    p.add_argument("--device", help="server --device (default cpu)")
    args = p.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        model = wait_ready(proc, url)
        where = (torch.cuda.get_device_name() if args.device and args.device.startswith("cuda") else
                 f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
                 f"{args.threads or max(1, (os.cpu_count() or 2) - 1)} torch threads")
        print(f"corelm serve {model} ({args.dtype or 'default dtype'}): {where}, {args.max_tokens} tokens/request",
              flush=True)
        asyncio.run(level(url, model, 1, 1, 4))  # warm-up
        runs: dict[int, list[dict]] = {n: [] for n in args.levels}
        for r in range(args.rounds):
            for n in args.levels:
                res = asyncio.run(level(url, model, n, args.requests if n == 1 else 1, args.max_tokens))
                runs[n].append(res)
                print(f"  round {r + 1}/{args.rounds}  {n:>3} clients: {res['tok_s']:7.1f} tok/s  "
                      f"TTFT {res['ttft'] * 1000:7.0f} ms  TPOT {res['tpot'] * 1000:6.0f} ms", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()

    def med(n: int, key: str) -> float:
        return statistics.median(x[key] for x in runs[n])

    print()
    print(f"{'clients':>7} | {'tokens/s':>9} | {'spread':>13} | {'requests/s':>10} "
          f"| {'TTFT ms':>8} | {'TPOT ms':>8} | vs 1 client")
    print("-" * 82)
    base = med(args.levels[0], "tok_s")
    for n in args.levels:
        values = [x["tok_s"] for x in runs[n]]
        print(f"{n:>7} | {med(n, 'tok_s'):9.1f} | {min(values):5.1f}-{max(values):<7.1f} | {med(n, 'req_s'):10.2f} | "
              f"{med(n, 'ttft') * 1000:8.0f} | {med(n, 'tpot') * 1000:8.0f} | {med(n, 'tok_s') / base:5.2f}x")
    if 1 in runs and 8 in runs:
        ratio = med(8, "tok_s") / med(1, "tok_s")
        print(f"\nbar: aggregate tokens/s at 8 clients / 1 client = {ratio:.2f}x (need >= 3x): "
              f"{'PASS' if ratio >= 3 else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
