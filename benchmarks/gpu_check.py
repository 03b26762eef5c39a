"""GPU check: corelm's numerics and speed on a CUDA device, next to transformers, in one run.

Run on a machine with a GPU (it is not part of the test suite, which is CPU-only):

    python benchmarks/gpu_check.py            # parity, cached decoding, decode speed vs transformers

1. Parity: random tiny GPT-2 / Llama (GQA, llama3 RoPE scaling) / BERT (padding mask) on the GPU in
   fp32 against transformers with the same weights (``assert_close``, atol 1e-4 for TF32-free fp32).
2. Cached decoding on the GPU equals a full forward pass (greedy tokens identical).
3. Decode speed: SmolLM2-135M-shaped model with random weights (decode speed does not depend on the
   values) in bf16, corelm's engine vs transformers ``generate`` (greedy, EOS ignored), alternating,
   median of 3, with the memory bandwidth achieved (bytes of weights x tokens/s).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corelm.config import ModelConfig
from corelm.generate.engine import SamplingParams, generate
from corelm.io.hf import config_to_hf, state_dict_to_hf
from corelm.models import build_model
from corelm.presets import preset

DEV = torch.device("cuda")


def hf_twin(model: torch.nn.Module, config: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    """The transformers model with exactly corelm's weights."""
    import transformers

    hf_cfg = config_to_hf(config)
    cls = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForPreTraining"}[config.family]
    cfg_obj = transformers.AutoConfig.for_model(**hf_cfg)
    cfg_obj._attn_implementation = "sdpa"
    twin = getattr(transformers, cls)(cfg_obj)
    state = state_dict_to_hf(config, model.state_dict())
    missing, unexpected = twin.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    twin.tie_weights()
    return twin.to(DEV, dtype).eval()


def parity() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cases = {
        "gpt2": ModelConfig(family="gpt2", vocab_size=97, n_layer=2, n_head=4, d_model=64, max_seq_len=64),
        "llama-gqa-llama3rope": ModelConfig(
            family="llama", vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=160, max_seq_len=64,
            tie_embeddings=False, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}),
        "bert": ModelConfig(family="bert", vocab_size=97, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=64,
                            norm_eps=1e-12),
    }
    for name, cfg in cases.items():
        torch.manual_seed(0)
        ours = build_model(cfg).to(DEV).eval()
        theirs = hf_twin(ours, cfg, torch.float32)
        ids = torch.randint(0, 97, (3, 40), device=DEV)
        with torch.no_grad():
            if cfg.family == "bert":
                mask = torch.ones_like(ids)
                mask[1, 30:] = 0
                mask[2, 11:] = 0
                out = theirs(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                a, b = ours(ids, attention_mask=mask), out.hidden_states[-1]
                a, b = a[mask.bool()], b[mask.bool()]
            else:
                a, b = ours(ids), theirs(input_ids=ids).logits
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        print(f"parity on {DEV}: {name:<22} max |diff| = {(a - b).abs().max().item():.2e}  OK")

    cfg = cases["llama-gqa-llama3rope"]
    torch.manual_seed(0)
    model = build_model(cfg).to(DEV).eval()
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26]]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    batched = generate(model, prompts, params)
    for p, got in zip(prompts, batched):
        ids = list(p)
        with torch.no_grad():
            for _ in range(16):
                ids.append(int(model(torch.tensor([ids], device=DEV))[0, -1].argmax()))
        assert got == ids[len(p):], (got, ids[len(p):])
    print("cached batched greedy decoding == full-forward greedy on the GPU: OK")


def decode_speed(new_tokens: int = 128, repeats: int = 3) -> None:
    import transformers

    cfg = preset("smollm2-135m")
    torch.manual_seed(0)
    ours = build_model(cfg).to(DEV, torch.bfloat16).eval()
    theirs = hf_twin(ours, cfg, torch.bfloat16)
    prompt = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1)).tolist()[0]
    nbytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def run_corelm(compile: bool) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(ours, [prompt], params, compile=compile)
        torch.cuda.synchronize()
        assert len(out[0]) == new_tokens
        return new_tokens / (time.perf_counter() - t0)

    def run_hf(cache: str) -> float:
        ids = torch.tensor([prompt], device=DEV)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = theirs.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  cache_implementation=cache, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] - ids.shape[1] == new_tokens
        return new_tokens / (time.perf_counter() - t0)

    sides = {"corelm eager": lambda: run_corelm(False), "transformers (dynamic cache)": lambda: run_hf("dynamic"),
             "corelm compiled step": lambda: run_corelm(True), "transformers (static cache)": lambda: run_hf("static")}
    for name, fn in sides.items():  # warm-up, compilation included
        t0 = time.perf_counter()
        fn()
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    results: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            results[name].append(fn())
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\ndecode, SmolLM2-135M shapes, random weights, bf16, batch 1, {new_tokens} new tokens, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{'side':<30}{'tok/s (median)':>16}{'spread':>18}{'GB/s achieved':>16}")
    for k, v in results.items():
        print(f"{k:<30}{med[k]:>16.1f}{min(v):>9.1f}-{max(v):<8.1f}{nbytes * med[k] / 1e9:>16.1f}")
    print(f"ratio corelm eager / transformers dynamic: "
          f"{med['corelm eager'] / med['transformers (dynamic cache)']:.2f}x")
    print(f"ratio corelm compiled / transformers static: "
          f"{med['corelm compiled step'] / med['transformers (static cache)']:.2f}x")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name()}", flush=True)
    parity()
    decode_speed()
