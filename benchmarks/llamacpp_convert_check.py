"""Dev check (not in the test suite): corelm and llama.cpp read each other's GGUF files.

Two checks per family, on tiny random checkpoints written by transformers
(``AutoModelForCausalLM.from_config(...).save_pretrained(d)``):

1. **llama.cpp writes, corelm reads.** ``convert_hf_to_gguf.py d --outtype f32`` from the llama.cpp
   sources vendored in the ``llama-cpp-python`` sdist, then ``corelm.load(file)``: the max |logit diff|
   against the transformers model, in fp32, on a prompt longer than every sliding window.
2. **corelm writes, llama.cpp reads.** ``export_gguf`` (F32) of the corelm model, then llama.cpp's
   ``llama-server`` (built from the same sources) continues the same token ids greedily (``/completion``,
   ``temperature 0``, ``top_k 1``): its 8 tokens against corelm's greedy tokens, for an F32 and a Q8_0
   export (corelm runs the Q8_0 file dequantized to fp32; llama.cpp multiplies Q8_0 blocks by
   8-bit-quantized activations, so a near-tie may go either way there). Next to the token agreement:
   the largest gap between llama.cpp's log-probabilities of its top 5 tokens at each of the 8 positions
   and corelm's, computed along llama.cpp's tokens (llama.cpp keeps its KV cache in F16, so even the F32
   file differs by ~1e-3; positions whose token is an incomplete UTF-8 character come back from the
   server without probabilities and are left out).

The tokenizer is a small byte-level BPE trained here. Its pre-tokenizer is not one llama.cpp's converter
recognises by hash, so the converter runs in a child process with ``set_vocab`` replaced by its GPT-2
path and the pre-tokenizer named ``gpt-2`` (a tokenizer does not change the weights being compared).

3. (``--kquant Q4_K_M --width 256``) **llama.cpp quantizes, corelm reads.** ``llama-quantize`` turns
   the converter's F32 file into K-quant blocks; corelm loads that file (fp32, and on its own blocks)
   and llama-server runs it: greedy tokens and log-probability gaps as in 2.

Usage::

    .venv/bin/python benchmarks/llamacpp_convert_check.py [--llama-cpp DIR] [--families a,b] [--no-run]
        [--kquant Q4_K_M --width 256] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import torch

LLAMA_CPP = Path("/tmp/kq/llama_cpp_python-0.3.36/vendor/llama.cpp")
VOCAB = 300
WINDOW = 8
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
MOE = {"num_experts_per_tok": 2}
# family name -> (transformers model_type, config overrides)
FAMILIES = {
    "llama": ("llama", {"tie_word_embeddings": False}),
    "llama3-rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 16}}),
    "mistral": ("mistral", {"sliding_window": WINDOW, "head_dim": 16, "tie_word_embeddings": False}),
    "mixtral": ("mixtral", {**MOE, "num_local_experts": 4, "intermediate_size": 48}),
    "qwen2": ("qwen2", {"tie_word_embeddings": False}),
    "qwen3": ("qwen3", {"head_dim": 24, "tie_word_embeddings": True}),
    "qwen2_moe": ("qwen2_moe", {**MOE, "num_experts": 8, "moe_intermediate_size": 16,
                                "shared_expert_intermediate_size": 48, "norm_topk_prob": False}),
    "qwen3_moe": ("qwen3_moe", {**MOE, "num_experts": 8, "moe_intermediate_size": 16, "head_dim": 16,
                                "norm_topk_prob": True}),
    "gemma": ("gemma", {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"}),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
                          "attn_logit_softcapping": 5.0, "final_logit_softcapping": 30.0}),
    # llama.cpp's converter writes no layer pattern: its default (every 6th layer global) is Gemma 3's own
    "gemma3_text": ("gemma3_text", {"head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16,
                                    "num_hidden_layers": 6,
                                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                           "rope_theta": 100000.0},
                                                        "sliding_attention": {"rope_type": "default",
                                                                              "rope_theta": 1000.0}}}),
    "phi3": ("phi3", {"tie_word_embeddings": False, "original_max_position_embeddings": 8,
                      "max_position_embeddings": 64,
                      "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                          "long_factor": [1.0 + 0.2 * i for i in range(6)],
                                          "short_factor": [1.0 + 0.05 * i for i in range(6)]}}),
    "olmo2": ("olmo2", {"tie_word_embeddings": False}),
}
PROMPT_LEN = 3 * WINDOW

# Run inside the child process: llama.cpp's converter, its vocabulary step replaced by the GPT-2 one.
_CONVERT = textwrap.dedent("""
    import sys
    sys.path[:0] = [sys.argv.pop(1), sys.argv.pop(1)]
    import convert_hf_to_gguf as c
    from conversion.base import TextModel
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    _get = c.get_model_class
    def get_model_class(*args, **kwargs):
        cls = _get(*args, **kwargs)
        cls.set_vocab = lambda self: self._set_vocab_gpt2()
        return cls
    c.get_model_class = get_model_class
    c.main()
""")


def tiny_tokenizer(out: Path) -> None:
    """A byte-level BPE of ``VOCAB`` tokens trained on a few sentences, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The quick brown fox jumps over the lazy dog. " * 3, "llama.cpp reads GGUF files; corelm does too.",
            "Sphinx of black quartz, judge my vow! 0123456789"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 3, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)


def hf_checkpoint(family: str, out: Path) -> torch.nn.Module:
    import transformers

    model_type, options = FAMILIES[family]
    rope = options.get("rope_parameters", {})
    if rope.get("rope_type") == "longrope":  # one factor per rotated frequency of this width's heads
        half = int(COMMON["hidden_size"] // COMMON["num_attention_heads"] * rope["partial_rotary_factor"]) // 2
        options = {**options, "rope_parameters": {**rope, "long_factor": [1.0 + 0.2 * i for i in range(half)],
                                                  "short_factor": [1.0 + 0.05 * i for i in range(half)]}}
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **options})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter off its init (norms of 1, zero routers) so each one matters
        for name, p in hf.named_parameters():
            scale = 0.5 if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) else 0.05
            p.add_(torch.randn(p.shape, generator=g) * scale)
    hf.save_pretrained(out)
    tiny_tokenizer(out)
    return hf


def convert(llama_cpp: Path, src: Path, out: Path) -> tuple[bool, str]:
    env = dict(os.environ, NO_LOCAL_GGUF="1")
    cmd = [sys.executable, "-c", _CONVERT, str(llama_cpp / "gguf-py"), str(llama_cpp), str(src),
           "--outtype", "f32", "--outfile", str(out)]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=llama_cpp)
    return proc.returncode == 0, proc.stderr[-2000:]


def logit_diff(path: Path, hf: torch.nn.Module, ids: torch.Tensor) -> float:
    import corelm

    llm = corelm.load(path, dtype="fp32")
    with torch.no_grad():
        return (llm.model(ids) - hf(ids).logits).abs().max().item()


def corelm_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def llama_server_greedy(binary: Path, gguf: Path, prompt: list[int], n: int, port: int) -> tuple[list | None, str]:
    """Greedy continuation of the token ids ``prompt`` by ``llama-server`` (one slot, one thread): the
    tokens and, per position, llama.cpp's top-5 ``{token id: log-probability}``."""
    cmd = [str(binary), "-m", str(gguf), "--port", str(port), "-t", "1", "-c", "128", "-np", "1", "--no-warmup"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to 60 s to load
            if proc.poll() is not None:
                return None, proc.stderr.read().decode("utf-8", "replace")[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        def complete(ids: list[int], n_predict: int) -> dict:
            body = json.dumps({"prompt": ids, "n_predict": n_predict, "temperature": 0.0, "top_k": 1,
                               "ignore_eos": True, "return_tokens": True, "cache_prompt": False, "n_probs": 5}).encode()
            req = urllib.request.Request(f"{url}/completion", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())

        tokens = complete(prompt, n)["tokens"]
        # one position per request: the streamed probabilities of a multi-token reply are grouped by whole
        # UTF-8 characters, so they do not line up with the tokens; a token that is an incomplete UTF-8
        # character comes back without probabilities, and that position is left out (None)
        tops: list[dict | None] = []
        for j in range(n):
            probs = complete(prompt + tokens[:j], 1).get("completion_probabilities") or [{}]
            top = {t["id"]: t["logprob"] for t in probs[0].get("top_logprobs", [])}
            tops.append(top if probs[0].get("id") == tokens[j] else None)
        return [tokens, tops], ""
    except OSError as exc:
        return None, str(exc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--no-run", action="store_true", help="skip the corelm-export -> llama.cpp check")
    parser.add_argument("--keep", type=Path, help="keep the work files in this directory")
    parser.add_argument("--kquant", help="also quantize llama.cpp's F32 file with llama-quantize to this type "
                                         "(e.g. Q4_K_M) and compare corelm with llama-server on that file")
    parser.add_argument("--width", type=int, default=64, help="hidden size (K-quant rows need multiples of 256)")
    args = parser.parse_args()
    COMMON.update(hidden_size=args.width, intermediate_size=2 * args.width)
    rows_k = []
    work = Path(args.keep or tempfile.mkdtemp(prefix="llamacpp_check_"))
    work.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(3, VOCAB, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    rows_in, rows_out = [], []
    server = args.llama_cpp / "build" / "bin" / "llama-server"
    binary = server if server.is_file() else None
    for family in args.families.split(","):
        src = work / family
        hf = hf_checkpoint(family, src)
        out = work / f"{family}.llamacpp.gguf"
        t0 = time.perf_counter()
        ok, log = convert(args.llama_cpp, src, out)
        if not ok:
            rows_in.append((family, "convert failed", log.strip().splitlines()[-1] if log.strip() else ""))
        else:
            try:
                diff = logit_diff(out, hf, ids)
                note = f"{time.perf_counter() - t0:.1f} s"
                if FAMILIES[family][1].get("sliding_window") and FAMILIES[family][0] in ("mistral",):
                    # llama.cpp's llama architecture has no sliding window: the converter drops it
                    note += f"; window dropped by the converter; {WINDOW}-token prompt: "
                    note += f"{logit_diff(out, hf, ids[:, :WINDOW]):.2e}"
                rows_in.append((family, f"{diff:.2e}", note))
            except Exception as exc:  # noqa: BLE001 - a dev check reports every family's failure and goes on
                rows_in.append((family, "corelm load failed", str(exc).splitlines()[0][:160]))
        if args.kquant and ok:
            rows_k.append((family, *kquant_row(args.llama_cpp, out, args.kquant, binary, ids[0].tolist())))
        if args.no_run:
            continue
        rows_out.append((family, *export_and_run(family, src, work, binary, ids[0].tolist())))
    print("\nllama.cpp convert_hf_to_gguf.py (F32) -> corelm.load: max |logit diff| vs transformers, "
          f"fp32, prompt {PROMPT_LEN} tokens (window {WINDOW})")
    print("| family | max abs diff | note |\n|---|---|---|")
    for row in rows_in:
        print("| " + " | ".join(row) + " |")
    if rows_out:
        print(f"\ncorelm export -> llama-server: greedy continuation of the same {PROMPT_LEN} token ids")
        print("| family | llama.cpp loads | F32: greedy equal, max log-p gap | Q8_0: same | differences |")
        print("|---|---|---|---|---|")
        for row in rows_out:
            print("| " + " | ".join(row) + " |")
    if rows_k:
        print(f"\nllama-quantize {args.kquant} of llama.cpp's file -> corelm and llama-server on the same file")
        print("| family | tensor types | greedy equal, max log-p gap (corelm fp32 vs llama.cpp) | "
              "corelm default load (own blocks) vs fp32: max abs logit diff |")
        print("|---|---|---|---|")
        for row in rows_k:
            print("| " + " | ".join(row) + " |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def kquant_row(llama_cpp: Path, f32: Path, qtype: str, binary: Path | None, ids: list[int]) -> tuple[str, ...]:
    """llama.cpp quantizes its own F32 file; corelm reads the result (fp32, and on its own blocks)."""
    import corelm

    out = f32.with_suffix(f".{qtype}.gguf")
    proc = subprocess.run([str(llama_cpp / "build" / "bin" / "llama-quantize"), str(f32), str(out), qtype, "1"],
                          check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        return "llama-quantize failed", (proc.stderr.strip().splitlines() or [""])[-1][:150], "-"
    from corelm.io.gguf import read_gguf

    g = read_gguf(out)
    kinds = sorted({t.qtype.name for n, t in g.tensors.items() if len(t.shape) >= 2})
    g.close()
    fp32 = corelm.load(out, dtype="fp32").model
    native = corelm.load(out).model
    with torch.no_grad():
        ref = fp32(torch.tensor([ids]))
        native_diff = (native(torch.tensor([ids])).float() - ref).abs().max().item()
    method = getattr(native, "corelm_quantization", {}).get("method") or "dequantized"
    if binary is None:
        return ", ".join(kinds), "no llama-server binary", f"{native_diff:.1e} ({method})"
    reply, log = llama_server_greedy(binary, out, ids, 8, port=18500)
    if reply is None:
        return ", ".join(kinds), "llama.cpp failed: " + (log.strip().splitlines() or [""])[-1][:120], "-"
    theirs, tops = reply
    ours = corelm_greedy(fp32, ids, 8)
    with torch.no_grad():
        logp = torch.log_softmax(fp32(torch.tensor([ids + theirs]))[0, len(ids) - 1:-1], -1)
    gaps = [abs(logp[j, t].item() - lp) for j, top in enumerate(tops) if top for t, lp in top.items()]
    gap = f"{max(gaps):.1e} ({sum(t is not None for t in tops)} pos.)" if gaps else "n/a"
    return (", ".join(kinds), f"{sum(a == b for a, b in zip(ours, theirs))}/8, {gap}",
            f"{native_diff:.1e} (max |logit| {ref.abs().max().item():.1f}; {method})")


def export_and_run(family: str, src: Path, work: Path, binary: Path | None, ids: list[int]) -> tuple[str, ...]:
    """corelm export (F32, Q8_0) -> llama-server greedy tokens vs corelm's greedy tokens on the same file."""
    import corelm
    from corelm.errors import CorelmError
    from corelm.io.gguf_export import export_gguf

    llm = corelm.load(src, dtype="fp32")
    n, cells, detail = 8, [], []
    for qtype in ("F32", "Q8_0"):
        out = work / f"{family}.corelm.{qtype}.gguf"
        try:
            export_gguf(llm.model, out, qtype, tokenizer=llm.tokenizer, tokenizer_pre="gpt-2")
        except CorelmError as exc:
            return "export refused", "-", "-", str(exc)[:150]
        if binary is None:
            return "no llama-server binary", "-", "-", ""
        reply, log = llama_server_greedy(binary, out, ids, n, port=18000 + sum(map(ord, family)) % 1000)
        if reply is None:
            lines = [ln for ln in log.strip().splitlines() if "error" in ln.lower()] or log.strip().splitlines()
            return f"no ({qtype})", "-", "-", (lines or [""])[-1][:150]
        theirs, tops = reply
        model = corelm.load(out, dtype="fp32").model  # the file's own (dequantized) weights
        ours = corelm_greedy(model, ids, n)
        with torch.no_grad():  # corelm's log-probabilities along llama.cpp's tokens, at llama.cpp's top 5
            logp = torch.log_softmax(model(torch.tensor([ids + theirs]))[0, len(ids) - 1:-1], -1)
        gaps = [abs(logp[j, t].item() - lp) for j, top in enumerate(tops) if top for t, lp in top.items()]
        compared = sum(top is not None for top in tops)
        gap = f"{max(gaps):.1e} ({compared} pos.)" if gaps else "n/a"
        cells.append(f"{sum(a == b for a, b in zip(ours, theirs))}/{n}, {gap}")
        if ours != theirs:
            detail.append(f"{qtype}: corelm {ours} / llama.cpp {theirs}")
    return "yes", *cells, "; ".join(detail) or "identical"


if __name__ == "__main__":
    sys.exit(main())
