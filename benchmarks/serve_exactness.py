"""Greedy text under load equals the lone request's, on the real embedded SmolLM2 (too slow for the tests).

Serves the model in-process with 16 batch rows, asks each distinct (question, max_tokens) alone, then
sends 32 concurrent streaming chat requests (16 run, 16 wait and join as others leave; three
different lengths) and counts how many texts equal their lone run.

    .venv/bin/python benchmarks/serve_exactness.py [--dtype fp32]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch
from openai import OpenAI

import corelm
from corelm.serve.app import create_app
from corelm.serve.server import ServeOptions, ServerThread, wrap

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
             "List three fruits.", "What is 12 times 7?", "Who wrote Hamlet?", "Give me a tip for sleeping well.",
             "Translate 'good morning' to Spanish."]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 (default fp32)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    served = wrap("model", corelm.load(args.model, dtype=args.dtype), ServeOptions(max_batch=16, max_seq_len=512))
    served.batcher.start()
    jobs = [(QUESTIONS[i % len(QUESTIONS)], 16 + (i % 3) * 4) for i in range(args.clients)]
    with ServerThread(create_app([served])) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=1200)

        def ask(question: str, n: int, **kw):
            return client.chat.completions.create(model="model", messages=[{"role": "user", "content": question}],
                                                  max_tokens=n, temperature=0, **kw)

        t0 = time.time()
        alone = {job: ask(*job).choices[0].message.content for job in sorted(set(jobs))}
        print(f"{len(alone)} distinct requests alone: {time.time() - t0:.0f} s", flush=True)
        out: list[str | None] = [None] * len(jobs)

        def run(i: int) -> None:
            out[i] = "".join(c.choices[0].delta.content or "" for c in ask(*jobs[i], stream=True) if c.choices)

        t0 = time.time()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"{len(jobs)} concurrent streaming clients: {time.time() - t0:.0f} s")
    served.batcher.stop()
    same = sum(out[i] == alone[job] for i, job in enumerate(jobs))
    for i, job in enumerate(jobs):
        if out[i] != alone[job]:
            print(f"DIFFERENT {job}: {out[i]!r} vs alone {alone[job]!r}")
    print(f"{args.model} ({args.dtype}): {same}/{len(jobs)} texts identical to the lone request's")
    return 0 if same == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
