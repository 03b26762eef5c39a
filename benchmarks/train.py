"""Training throughput of corelm's GPT-2 against transformers' ``GPT2LMHeadModel``, side by side in one run.

Same config (6 layers x 384, 6 heads, vocab 8192, no dropout), same batch (B=8, T=256), same
precision (fp32 by default), same optimizer (torch AdamW, foreach) and the same step: forward, fp32
cross-entropy, backward, clip to 1.0, AdamW step. The two models alternate round by round
(A B A B ...), a few steps each; the median step time gives tokens/s. MFU is model FLOPs
(6N + 12·L·d·T per token, PaLM appendix B, from ``corelm.plan.formulas``) over the fp32 matmul peak
measured in this same run. A third row runs corelm's own loop (``corelm.train.train``) on the same
model and data, so the loop's overhead is visible too.

    python benchmarks/train.py                 # eager, fp32
    python benchmarks/train.py --compile       # both models under torch.compile
    python benchmarks/train.py --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def build_pair(
    vocab: int, n_layer: int, d: int, n_head: int, ctx: int
) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from corelm.config import ModelConfig
    from corelm.models import build_model

    cfg = ModelConfig(family="gpt2", vocab_size=vocab, n_layer=n_layer, n_head=n_head, d_model=d, max_seq_len=ctx)
    torch.manual_seed(0)
    ours = build_model(cfg)
    hf_cfg = GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=d, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                        bos_token_id=0, eos_token_id=0)
    hf_cfg._attn_implementation = "sdpa"
    theirs = GPT2LMHeadModel(hf_cfg)
    return ours, theirs, cfg


def make_step(model: torch.nn.Module, forward, precision: str):
    from corelm.train.optim import build_optimizer
    from corelm.train.precision import Precision

    policy = Precision(precision)
    policy.apply(model)
    model.train()
    opt = build_optimizer(model, lr=3e-4, weight_decay=0.1)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with policy.autocast():
            logits = forward(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16-mixed", "bf16-true"))
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    ap.add_argument("--steps", type=int, default=3, help="steps per model per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--no-loop", action="store_true", help="skip the corelm.train.train row")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from corelm.plan.formulas import train_flops_per_token
    from corelm.train.precision import Precision
    from corelm.train.tracking import measure_matmul_peak

    ours, theirs, cfg = build_pair(args.vocab, args.layers, args.width, args.heads, args.seq)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    dev = torch.device(args.device)
    ours.to(dev)
    theirs.to(dev)
    data = data.to(dev)
    x, y = data[:, :-1], data[:, 1:]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
    f_ours = torch.compile(ours) if args.compile else ours
    f_theirs = torch.compile(theirs) if args.compile else theirs
    steps = {"corelm": make_step(ours, f_ours, args.precision),
             "transformers": make_step(theirs, lambda ids: f_theirs(input_ids=ids).logits, args.precision)}
    peak_dtype = Precision(args.precision).compute_dtype
    peak_n = 1024 if dev.type == "cpu" else 8192
    peaks = [measure_matmul_peak(peak_dtype, n=peak_n, seconds=1.0, device=dev.type)]
    for name, step in steps.items():  # warm-up (and compilation)
        t0 = time.perf_counter()
        for _ in range(2):
            step(x, y)
        sync()
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step(x, y)
                sync()
                times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {statistics.median(v):.3f} s/step"
                                                            for k, v in times.items()), flush=True)
    peaks.append(measure_matmul_peak(peak_dtype, n=peak_n, seconds=1.0, device=dev.type))
    peak = max(peaks)

    if not args.no_loop:  # corelm's own loop on a fresh corelm model, same data and batch
        from corelm.config import ModelConfig
        from corelm.models import build_model
        from corelm.objectives import causal_lm_loss
        from corelm.train import TrainConfig, train

        torch.manual_seed(0)
        model = build_model(ModelConfig(**{**cfg.to_dict(), "extra": {}}))
        batches = iter(lambda: data, None)
        n = args.rounds * args.steps + 2
        from corelm.train.distributed import DistInfo

        info = DistInfo(device=dev)
        res = train(model, causal_lm_loss, batches,
                    TrainConfig(max_steps=n, precision=args.precision, compile=args.compile,
                                progress=False, tensorboard=False, measure_mfu=False),
                    dist=info)
        del res
        times["corelm loop"] = []  # filled below from a second, timed call on the warm model
        t_steps = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            train(model, causal_lm_loss, batches,
                  TrainConfig(max_steps=args.steps, precision=args.precision, compile=args.compile,
                              progress=False, tensorboard=False, measure_mfu=False),
                  dist=info)
            sync()
            t_steps.append((time.perf_counter() - t0) / args.steps)
        times["corelm loop"] = t_steps

    fpt = train_flops_per_token(cfg, args.seq)
    tokens = args.batch * args.seq
    cpu = (f"CPU capability {torch.backends.cpu.get_cpu_capability()}" if dev.type == "cpu"
           else torch.cuda.get_device_name())
    print(f"\nGPT-2 {args.layers}x{args.width}, vocab {args.vocab}, B={args.batch}, T={args.seq}, {args.precision}, "
          f"AdamW, {'compiled' if args.compile else 'eager'}, {args.threads} threads, {cpu}")
    print(f"measured {peak_dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s; model FLOPs/token {fpt / 1e6:.1f} M")
    print(f"{'':14} {'s/step (median)':>16} {'spread':>14} {'tokens/s':>10} {'MFU':>7}")
    base = statistics.median(times["transformers"])
    for name, v in times.items():
        med = statistics.median(v)
        tps = tokens / med
        print(f"{name:14} {med:16.3f} {min(v):6.3f}-{max(v):6.3f} {tps:10.0f} {tps * fpt / peak:7.1%}")
    print(f"\ncorelm / transformers: {base / statistics.median(times['corelm']):.2f}x tokens/s")


if __name__ == "__main__":
    main()
