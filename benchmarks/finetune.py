"""LoRA fine-tuning: corelm vs transformers + peft, same model, LoRA config, data and optimizer, one run.

Model: SmolLM2-135M-Instruct (the embedded GGUF, dequantized to fp32; the transformers side loads the very
same weights from an HF directory corelm writes). LoRA r=8, alpha=16, no dropout, on q/k/v/o of every layer.
Data: the demo chat set (stdlib docstring Q&A) rendered through the chat template, loss on assistant
tokens only, B sequences padded to T tokens -- identical tensors on both sides. Step: forward, loss,
backward, clip 1.0, AdamW (torch, foreach), zero grads.

* corelm runs its real fine-tuning path: ``apply_lora`` + ``sft_loss`` + THE training loop
  (``corelm.train.train``); step times come from when the loop asks for each batch.
* transformers + peft runs ``get_peft_model(LlamaForCausalLM)`` with ``model(input_ids, attention_mask,
  labels).loss`` in a plain loop (no Trainer overhead).

Each side runs in its own process (peak memory is per process), alternating A B A B for ``--rounds``
rounds. Peak memory is the highest resident set size sampled every 2 ms *during the training steps*, above
the resident size just before the first step (weights are the same on both sides; this isolates activations,
gradients, optimizer state and logits). Tokens/s is B*T over the median step time (first step is warm-up).

    python benchmarks/finetune.py                       # SmolLM2-135M, B=4, T=128, 2 rounds of 4 steps
    python benchmarks/finetune.py --batch 2 --seq 64 --steps 3 --rounds 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class PeakRSS:
    """Samples this process's resident set size in a thread; ``peak - start`` is the training footprint."""

    def __init__(self) -> None:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:  # noqa: PYI034
        self.start = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def make_batches(tokenizer, batch: int, seq: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of B chat examples, right-padded/truncated to exactly T tokens."""
    from corelm.data import tasks
    from corelm.data.demo import resolve

    chats = tasks.read_chat(resolve("demo:chat:train")).items
    pad = tokenizer.pad_token_id or 0
    out = []
    for s in range(steps):
        items = [tasks.encode_chat(tokenizer, chats[(s * batch + i) % len(chats)], seq) for i in range(batch)]
        for it in items:  # pad every row to T so both sides see identical shapes
            it["input_ids"] += [pad] * (seq - len(it["input_ids"]))
            it["labels"] += [tasks.IGNORE] * (seq - len(it["labels"]))
        b = tasks.collate(items, pad)
        b["attention_mask"] = (torch.tensor([[1] * seq] * batch))  # padding sits at the end of causal rows
        out.append(b)
    return out


def run_corelm(args: argparse.Namespace, batches: list[dict[str, torch.Tensor]]) -> dict:
    import corelm
    from corelm.finetune.lora import apply_lora
    from corelm.finetune.run import sft_loss
    from corelm.train import TrainConfig, train

    model = corelm.load(MODEL, dtype="fp32").model
    apply_lora(model, TARGETS, rank=8, alpha=16)
    stamps: list[tuple[float, float]] = []

    def timed():
        for b in batches:
            stamps.append((time.perf_counter(), time.process_time()))
            yield b

    cfg = TrainConfig(max_steps=len(batches), lr=2e-4, warmup_steps=0, weight_decay=0.0, beta2=0.999,
                      progress=False, tensorboard=False, measure_mfu=False)
    with PeakRSS() as mem:
        train(model, sft_loss, timed(), cfg)
        stamps.append((time.perf_counter(), time.process_time()))
    return {"step_s": [b[0] - a[0] for a, b in itertools.pairwise(stamps)],
            "cpu_s": [b[1] - a[1] for a, b in itertools.pairwise(stamps)], "peak_bytes": mem.peak - mem.start}


def run_peft(args: argparse.Namespace, batches: list[dict[str, torch.Tensor]], hf_dir: str) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), weight_decay=0.0, foreach=True)
    times, cpu = [], []
    with PeakRSS() as mem:
        for b in batches:
            t0, c0 = time.perf_counter(), time.process_time()
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"step_s": times, "cpu_s": cpu, "peak_bytes": mem.peak - mem.start}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    from corelm.api import gguf_tokenizer
    from corelm.presets import embedded_path

    tok = gguf_tokenizer(str(embedded_path(MODEL)))
    batches = make_batches(tok, args.batch, args.seq, args.steps)
    result = run_corelm(args, batches) if args.side == "corelm" else run_peft(args, batches, args.hf_dir)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=4, help="steps per run (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (A B A B ...)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    ap.add_argument("--side", choices=("corelm", "peft"), help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return child(args)

    import corelm
    from corelm.io.hf import save_hf_dir

    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads; torch {torch.__version__}; "
          f"model {MODEL} fp32, LoRA r=8 on {'/'.join(TARGETS)}, B={args.batch}, T={args.seq}", flush=True)
    with tempfile.TemporaryDirectory() as hf_dir:
        llm = corelm.load(MODEL, dtype="fp32")
        save_hf_dir(llm.model, llm.config, hf_dir, llm.tokenizer)  # the same weights for transformers
        del llm
        results: dict[str, list[dict]] = {"corelm": [], "peft": []}
        for r in range(args.rounds):
            for side in ("corelm", "peft"):
                cmd = [sys.executable, __file__, "--side", side, "--hf-dir", hf_dir, "--batch", str(args.batch),
                       "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
                results[side].append(json.loads(line[len("RESULT "):]))
                print(f"round {r + 1} {side}: steps " + " ".join(f"{s:.2f}s" for s in results[side][-1]["step_s"]),
                      flush=True)

    tokens = args.batch * args.seq
    rows = {}
    for side, runs in results.items():
        steps = [s for run in runs for s in run["step_s"][1:]]  # drop each run's warm-up step
        med = statistics.median(steps)
        cpu = [s for run in runs for s in run["cpu_s"][1:]]
        rows[side] = {"tok_s": tokens / med, "spread": (tokens / max(steps), tokens / min(steps)),
                      "cpu_s": statistics.median(cpu),
                      "peak_mib": statistics.median(run["peak_bytes"] for run in runs) / 2**20}
    print()
    print(f"{'':<20} {'tokens/s (median)':>18} {'min..max':>16} {'CPU s/step':>11} {'peak training memory':>22}")
    for side, name in (("corelm", "corelm"), ("peft", "transformers+peft")):
        row = rows[side]
        print(f"{name:<20} {row['tok_s']:>18.1f} {row['spread'][0]:>7.1f}..{row['spread'][1]:<8.1f} "
              f"{row['cpu_s']:>11.1f} {row['peak_mib']:>18.0f} MiB")
    speed = rows["corelm"]["tok_s"] / rows["peft"]["tok_s"]
    print(f"CPU time per step, peft / corelm: {rows['peft']['cpu_s'] / rows['corelm']['cpu_s']:.2f}x "
          "(less sensitive to other jobs on a shared machine than wall time)")
    memory = rows["corelm"]["peak_mib"] / max(rows["peft"]["peak_mib"], 1e-9)
    print(f"\ncorelm / peft: speed {speed:.2f}x (bar >= 1.0), peak memory {memory:.2f}x (bar <= 1.0)")


if __name__ == "__main__":
    main()
