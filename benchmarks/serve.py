"""Serving side by side: ``corelm serve`` against llama.cpp's ``llama-server`` on the same GGUF file.

Starts both servers (the real commands, defaults, on free loopback ports): ``corelm serve --model M``
and ``llama-server -m FILE -np 8`` (llama.cpp's continuous batching over 8 slots). Then, round after
round, each concurrency level runs on one server and then the other (the order flips every round),
so machine noise hits both alike. Every client streams ``/v1/completions`` requests that generate
exactly ``--max-tokens`` tokens (``ignore_eos``). Reported per level: aggregate tokens/s (median of
the rounds, with the spread) and time to first token (median and p90 of every request), and the
ratio corelm / llama-server.

A second table measures structured output's cost on corelm: ``/v1/chat/completions`` with
``response_format: json_schema`` next to the same chat requests without it, at the same levels
(the schema asks for a long array, so both kinds generate ``--max-tokens`` tokens).

With ``--adapters N`` a third table measures multi-LoRA serving: a second ``corelm serve`` started with
N random rank-8 LoRA adapters (``--lora``, attention projections, non-zero ``B``) answers completions
whose ``model`` cycles through the base model and ``<base>:a1`` .. ``aN`` (one batch mixes them), next
to plain completions on the server without adapters.

Bar (issue 15): corelm's aggregate tokens/s >= llama-server's at 1 and at 8 clients.

    .venv/bin/python benchmarks/serve.py                       # embedded SmolLM2 Q4_1, levels 1 8 32
    .venv/bin/python benchmarks/serve.py --levels 1 8 --rounds 2 --no-json
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
from pathlib import Path

import httpx
import torch

from corelm.serve.server import free_port

LLAMA_SERVER = "/tmp/kq/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"
PROMPTS = ["The three laws of thermodynamics are", "Write a haiku about the sea.", "def fibonacci(n):",
           "The capital of France is", "Photosynthesis converts", "Once upon a time, in a small village,",
           "The most important idea in linear algebra is", "To make bread, you need"]
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"},
    "facts": {"type": "array", "items": {"type": "string"}, "minItems": 40}}, "required": ["title", "facts"]}


ADAPTER_MODELS: list[str] = []  # --adapters: the model ids mixed-adapter requests cycle through
SHARED = [0]  # --shared-prefix: the shared system prompt's length in tokens (about)
SYSTEM = ("You are the assistant of a public library. Answer questions about opening hours, loans, renewals, "
          "fines, inter-library requests, reading rooms, printing, study spaces, events and the catalogue. ")


def body_for(kind: str, model: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    if kind == "adapters":  # the base model and each adapter in turn, by prompt
        kind, model = "plain", ADAPTER_MODELS[PROMPTS.index(prompt) % len(ADAPTER_MODELS)]
    common = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
              "stream_options": {"include_usage": True}}
    if kind == "plain":
        return "/v1/completions", {**common, "prompt": prompt}
    if kind == "shared":  # one long system prompt that every request shares (the prefix cache's case)
        system = (SYSTEM * (1 + SHARED[0] // 30))[: SHARED[0] * 5]  # about SHARED[0] tokens (~5 characters each)
        return "/v1/chat/completions", {**common, "messages": [{"role": "system", "content": system},
                                                               {"role": "user", "content": prompt}]}
    ask = "List facts about this" if kind == "chat" else "Give a title and facts, as JSON, about this"
    messages = [{"role": "user", "content": f"{ask}: {prompt}"}]  # not the other kind's prompt (prefix cache)
    extra = {} if kind == "chat" else {"response_format": {"type": "json_schema", "json_schema": {
        "name": "facts", "schema": SCHEMA, "strict": True}}}
    return "/v1/chat/completions", {**common, "messages": messages, **extra}


RETRIES: dict[str, int] = {}  # server -> requests resent after the connection closed before any response


async def one_request(http: httpx.AsyncClient, path: str, body: dict) -> dict:
    for attempt in range(3):
        try:
            return await _one_request(http, path, body)
        except httpx.RemoteProtocolError:  # a kept-alive connection closed under the request: send it again
            RETRIES[str(http.base_url)] = RETRIES.get(str(http.base_url), 0) + 1
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _one_request(http: httpx.AsyncClient, path: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first, pieces, tokens = None, 0, None
    async with http.stream("POST", path, json=body) as r:
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
            texts = [c.get("text") or (c.get("delta") or {}).get("content") for c in event.get("choices", [])]
            if any(texts):
                pieces += 1
                first = first or time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "tokens": tokens if tokens is not None else pieces}


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far; 0 when unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def level(url: str, model: str, kind: str, clients: int, requests_each: int, max_tokens: int,
                pid: int | None = None) -> dict:
    """``clients`` concurrent clients, each sending ``requests_each`` requests back to back; ``pid``: the
    server's process, whose CPU time per generated token is measured (a figure the machine's load
    changes much less than tokens/s)."""
    cpu0 = cpu_seconds(pid)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def client(i: int) -> list[dict]:
            return [await one_request(http, *body_for(kind, model, PROMPTS[(i + k) % len(PROMPTS)], max_tokens))
                    for k in range(requests_each)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"tok_s": tokens / wall, "ttfts": [r["ttft"] for r in results], "tokens": tokens / len(results),
            "cpu_ms": (cpu_seconds(pid) - cpu0) * 1000 / max(tokens, 1)}


def wait_ready(proc: subprocess.Popen, url: str, what: str, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} did not become ready")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def p90(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(0.9 * (len(values) - 1)))]


def table(title: str, names: tuple[str, str], runs: dict, levels: list[int]) -> None:
    """One row per level: both servers' tokens/s (median, spread), TTFT median/p90, and the ratio."""
    a, b = names
    print(f"\n{title}")
    print(f"{'clients':>7} | {a + ' tok/s':>18} | {b + ' tok/s':>18} | {'ratio':>6} | "
          f"{a + ' TTFT med/p90 ms':>26} | {b + ' TTFT med/p90 ms':>26} | CPU ms/token {a} / {b}")
    print("-" * 150)
    for n in levels:
        cells = []
        for name in names:
            rates = [r["tok_s"] for r in runs[name, n]]
            ttfts = [t for r in runs[name, n] for t in r["ttfts"]]
            cells.append((statistics.median(rates), min(rates), max(rates),
                          statistics.median(ttfts) * 1000, p90(ttfts) * 1000,
                          statistics.median(r["cpu_ms"] for r in runs[name, n])))
        (ra, lo_a, hi_a, ma, pa, ca), (rb, lo_b, hi_b, mb, pb, cb) = cells
        print(f"{n:>7} | {ra:7.1f} ({lo_a:4.0f}-{hi_a:4.0f}) | {rb:7.1f} ({lo_b:4.0f}-{hi_b:4.0f}) | {ra / rb:5.2f}x | "
              f"{ma:12.0f} / {pa:11.0f} | {mb:12.0f} / {pb:11.0f} | {ca:5.2f} / {cb:5.2f}")


def start_servers(args: argparse.Namespace, gguf: Path | None) -> tuple[dict, dict]:
    """``corelm serve`` and (when its binary and a GGUF file are there) ``llama-server -np 8``."""
    procs, urls = {}, {}
    corelm_port, llama_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "corelm", "serve", "--model", args.model, "--port", str(corelm_port),
           *args.corelm_arg]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    procs["corelm"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    urls["corelm"] = f"http://127.0.0.1:{corelm_port}"
    use_llama = not args.no_llama and gguf is not None and Path(args.llama_server).is_file()
    if use_llama:
        ctx = 8 * 512  # 8 slots of 512 tokens: prompt + output fit in each
        cmd = [args.llama_server, "-m", str(gguf), "-np", "8", "-c", str(ctx), "--port", str(llama_port),
               "--host", "127.0.0.1", "--log-disable"]
        if args.threads:
            cmd += ["-t", str(args.threads)]
        procs["llama-server"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        urls["llama-server"] = f"http://127.0.0.1:{llama_port}"
    elif not args.no_llama:
        print(f"llama-server not run (binary {args.llama_server} missing or no GGUF file for {args.model})")
    return procs, urls


def start_lora_server(args: argparse.Namespace, procs: dict, urls: dict) -> None:
    """``corelm serve --lora a1=... --lora aN=...`` with random LoRA runs over ``args.model`` (rank 8, the
    attention projections, A and B ~ N(0, 0.02^2): non-zero, so each adapter changes the computation)."""
    if not args.adapters:
        return
    import tempfile

    from safetensors.torch import save_file

    import corelm

    model = corelm.load(args.model, dtype="fp32").model
    root = Path(tempfile.mkdtemp(prefix="corelm-bench-lora-"))
    lora = []
    for i in range(1, args.adapters + 1):
        gen, tensors = torch.Generator().manual_seed(i), {}
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") and hasattr(m, "in_features"):
                tensors[f"{name}.lora_A"] = torch.randn(8, m.in_features, generator=gen) * 0.02
                tensors[f"{name}.lora_B"] = torch.randn(m.out_features, 8, generator=gen) * 0.02
        run = root / f"a{i}"
        run.mkdir()
        save_file(tensors, str(run / "adapter.safetensors"))
        (run / "corelm_task.json").write_text(json.dumps({"task": "sft", "method": "lora", "base": args.model,
                                                          "method_config": {"rank": 8, "alpha": 16.0}}))
        lora += ["--lora", f"a{i}={run}"]
    port = free_port()
    cmd = [sys.executable, "-m", "corelm", "serve", "--model", args.model, "--port", str(port), *lora,
           *args.corelm_arg, *(["--threads", str(args.threads)] if args.threads else [])]
    procs["corelm+lora"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    urls["corelm+lora"] = f"http://127.0.0.1:{port}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="model to serve (default the embedded SmolLM2); "
                   "its GGUF file is what llama-server loads")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all levels and servers (median reported)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--requests", type=int, default=4, help="requests each client sends per round at level 1 "
                                                           "(higher levels send 1 per client)")
    p.add_argument("--threads", type=int, help="threads for both servers (default: each server's own default)")
    p.add_argument("--llama-server", default=LLAMA_SERVER, help="llama.cpp's llama-server binary")
    p.add_argument("--no-llama", action="store_true", help="corelm only")
    p.add_argument("--no-json", action="store_true", help="skip the JSON-schema rows")
    p.add_argument("--shared-prefix", type=int, default=0, help="also run chat requests that share a system prompt "
                   "of about this many tokens, on both servers (prefix caching's case; 0: skip)")
    p.add_argument("--corelm-arg", action="append", default=[], help="extra corelm serve argument (repeatable)")
    p.add_argument("--adapters", type=int, default=0, help="also measure mixed-adapter traffic: a second corelm "
                   "server with this many random rank-8 LoRA adapters, requests cycling base and adapters")
    args = p.parse_args()

    from corelm.commands.quantize import gguf_source

    gguf = gguf_source(args.model)
    procs, urls = start_servers(args, gguf)
    names = tuple(procs)
    start_lora_server(args, procs, urls)
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        for name, proc in procs.items():
            wait_ready(proc, urls[name], name)
        model = httpx.get(urls["corelm"] + "/v1/models").json()["data"][0]["id"]
        print(f"model {args.model} ({gguf}), CPU capability {torch.backends.cpu.get_cpu_capability()}, "
              f"{os.cpu_count()} cores, threads: {args.threads or 'each server default'}, "
              f"{args.max_tokens} tokens/request; load average {os.getloadavg()[0]:.2f} at start", flush=True)
        series = [(name, "plain") for name in names] + ([] if args.no_json else
                                                         [("corelm", "chat"), ("corelm", "json")])
        ADAPTER_MODELS[:] = [model] + [f"{model}:a{i}" for i in range(1, args.adapters + 1)]
        series += [("corelm+lora", "adapters")] * bool(args.adapters)
        SHARED[0] = args.shared_prefix
        series += [(name, "shared") for name in names] if args.shared_prefix else []
        for name, kind in series:  # warm-up (llguidance builds its tokenizer tables on the first schema)
            asyncio.run(level(urls[name], model, kind, 1, 1, 4))
        for r in range(args.rounds):
            order = series if r % 2 == 0 else series[::-1]
            for n in args.levels:
                for name, kind in order:
                    res = asyncio.run(level(urls[name], model, kind, n, args.requests if n == 1 else 1,
                                            args.max_tokens, procs[name].pid))
                    key = name if kind == "plain" else f"{name} {kind}" if kind == "shared" else f"corelm {kind}"
                    runs.setdefault((key, n), []).append(res)
                    print(f"  round {r + 1}/{args.rounds} {key:>13} {n:>3} clients: {res['tok_s']:7.1f} tok/s  "
                          f"TTFT median {statistics.median(res['ttfts']) * 1000:6.0f} ms  "
                          f"CPU {res['cpu_ms']:5.2f} ms/token  "
                          f"({res['tokens']:.0f} tokens/request)", flush=True)
    finally:
        for proc in procs.values():
            stop(proc)
    print(f"\nload average at end {os.getloadavg()[0]:.2f} (a shared machine: figures are noisy)")
    for name, url in urls.items():
        if RETRIES.get(url + "/") or RETRIES.get(url):
            print(f"{name}: {RETRIES.get(url + '/', 0) + RETRIES.get(url, 0)} requests resent (connection closed "
                  f"before any response)")
    if len(names) == 2:
        table("plain completions: corelm serve vs llama-server -np 8", names, runs, args.levels)
        for n in (1, 8):
            if n in args.levels:
                ratio = (statistics.median(x["tok_s"] for x in runs["corelm", n])
                         / statistics.median(x["tok_s"] for x in runs["llama-server", n]))
                print(f"bar: {n} client(s) corelm / llama-server = {ratio:.2f}x (need >= 1.0x): "
                      f"{'PASS' if ratio >= 1 else 'MISS'}")
    if args.adapters:
        table(f"mixed-adapter traffic (base + {args.adapters} LoRA adapters, one batch) vs plain traffic on a server "
              "without adapters", ("corelm adapters", "corelm"), runs, args.levels)
    if args.shared_prefix and len(names) == 2:
        table(f"chat sharing a ~{args.shared_prefix}-token system prompt: corelm (prefix cache) vs llama-server "
              "(its slots' prompt cache)", tuple(f"{n} shared" for n in names), runs, args.levels)
    if not args.no_json:
        table("structured output on corelm: json_schema chat vs plain chat (ratio = grammar's throughput cost)",
              ("corelm json", "corelm chat"), runs, args.levels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
