"""Everything in corelm works with every family it loads: the capabilities behind docs/families.md.

Per family (a tiny random checkpoint written by transformers, fp32): chat templates (the families'
real templates, copied from llama.cpp's tree into tests/data/chat_templates) render byte-identical to
transformers, tools and tool turns included; LoRA trains, merges to the same outputs and leaves the
base weights untouched; AdaLoRA and bottleneck adapters train a step; int8/int4 quantization keeps the
logits close; static-cache, beam and speculative generation agree with greedy decoding; pruning and
``corelm compare`` run (or refuse in one line).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

import corelm
from corelm.errors import CorelmError
from corelm.tokenizer import Tokenizer

transformers.logging.set_verbosity_error()
TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
VOCAB = 128

# ---- chat templates ----------------------------------------------------------------------------
# template file -> (families whose instruct checkpoints ship it, special tokens, renders tools itself)
CHAT_TEMPLATES = {
    "meta-llama-Llama-3.1-8B-Instruct": ("llama", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                                         True),
    "meta-llama-Llama-3.2-3B-Instruct": ("llama", {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                                         True),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("llama", {"bos_token": "<|begin_of_text|>",
                                                              "eos_token": "<|im_end|>"}, True),
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": ("llama", {"bos_token": "<｜begin▁of▁sentence｜>",
                                                           "eos_token": "<｜end▁of▁sentence｜>"}, False),
    "mistralai-Mistral-Nemo-Instruct-2407": ("mistral", {"bos_token": "<s>", "eos_token": "</s>"}, True),
    "mistralai-Mistral-7B-Instruct-v0.2-v1": ("mixtral", {"bos_token": "<s>", "eos_token": "</s>"}, False),
    "Qwen-Qwen2.5-7B-Instruct": ("qwen2, qwen2_moe", {"eos_token": "<|im_end|>"}, True),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("qwen2", {"bos_token": "<｜begin▁of▁sentence｜>",
                                                           "eos_token": "<｜end▁of▁sentence｜>"}, False),
    "Qwen-Qwen3-0.6B": ("qwen3, qwen3_moe", {"eos_token": "<|im_end|>"}, True),
    "google-gemma-2-2b-it": ("gemma, gemma2, gemma3_text", {"bos_token": "<bos>", "eos_token": "<eos>"}, False),
    "microsoft-Phi-3.5-mini-instruct": ("phi3", {"bos_token": "<s>", "eos_token": "<|endoftext|>"}, False),
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
CALL = {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS = {  # name -> (messages, tools)
    "plain": ([SYSTEM, {"role": "user", "content": "Hi  there "}, {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": "2+2?"}], None),
    "no_system": ([{"role": "user", "content": "Hello"}], None),
    "tools": ([{"role": "user", "content": "Weather in Zürich?"}], [WEATHER]),
    # a call, its tool turn, and the answer
    "tool_turns": ([SYSTEM, {"role": "user", "content": "Weather in Zürich?"},
                    {"role": "assistant", "content": "", "tool_calls": [CALL]},
                    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather",
                     "content": '{"temperature": 18, "unit": "°C"}'},
                    {"role": "assistant", "content": "18 °C."}, {"role": "user", "content": "Thanks"}], [WEATHER]),
    # content None next to tool_calls, as OpenAI clients send it: transformers drops None-valued keys
    "null_content": ([{"role": "user", "content": "Weather in Zürich?"},
                      {"role": "assistant", "content": None, "tool_calls": [CALL]},
                      {"role": "tool", "tool_call_id": "call12345", "content": "18"}], [WEATHER]),
    # two calls in one turn, the second's arguments as a JSON string (as OpenAI clients send them)
    "parallel_calls": ([{"role": "user", "content": "Zürich and Oslo?"},
                        {"role": "assistant", "content": "", "tool_calls": [
                            CALL, {"id": "call67890", "type": "function",
                                   "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                        {"role": "tool", "tool_call_id": "call12345", "content": "18"},
                        {"role": "tool", "tool_call_id": "call67890", "content": "-3"}], [WEATHER]),
    "reasoning": ([{"role": "user", "content": "Why?"},
                   {"role": "assistant", "content": "Because.", "reasoning_content": "Think first."},
                   {"role": "user", "content": "Sure?"}], None),
}


def _word_backend(specials: list[str]) -> Backend:
    """A word-level tokenizer over ``VOCAB`` ids: ``<unk>``, the special tokens, then w0, w1, ..."""
    vocab = {"<unk>": 0, **{t: i + 1 for i, t in enumerate(specials)}}
    vocab.update({f"w{i}": len(vocab) + i for i in range(VOCAB - len(vocab))})
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return backend


def _transformers_render(backend: Backend, special: dict, template: str, messages: list, tools: list | None) -> str:
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Backend.from_str(backend.to_str()), **special)
    tok.chat_template = template
    return tok.apply_chat_template(copy.deepcopy(messages), tools=copy.deepcopy(tools), tokenize=False,
                                   add_generation_prompt=True)


@pytest.mark.parametrize("name", list(CHAT_TEMPLATES))
def test_chat_template_renders_as_transformers(name):
    """Byte-identical to ``apply_chat_template(..., tokenize=False, add_generation_prompt=True)``; where
    transformers' rendering raises (a template refusing a role), corelm raises its one-line error."""
    _, special, renders_tools = CHAT_TEMPLATES[name]
    template = (TEMPLATES / f"{name}.jinja").read_text()
    backend = _word_backend(list(special.values()))
    ours = Tokenizer(backend, special_tokens=special, chat_template=template)
    rendered = {}
    for case, (messages, tools) in CONVERSATIONS.items():
        extra = {"tools": tools} if tools else {}
        try:
            ref = _transformers_render(backend, special, template, messages, tools)
        except Exception:  # noqa: BLE001 - the template's own refusal (raise_exception or a type error)
            with pytest.raises(CorelmError, match="chat template error"):
                ours.apply_chat_template(copy.deepcopy(messages), add_generation_prompt=True, **extra)
            continue
        got = ours.apply_chat_template(copy.deepcopy(messages), add_generation_prompt=True, **extra)
        assert got == ref, f"{name}: {case}"
        rendered[case] = got
    assert "no_system" in rendered or name.endswith("tool_use")  # a tool_use template needs tools=
    if renders_tools:
        assert "get_weather" in rendered["tools"] and "18" in rendered["tool_turns"]


def test_chat_template_namespace_is_sandboxed():
    tok = Tokenizer(_word_backend([]), chat_template="{% set ns = namespace(x=1) %}{% set ns._y = 2 %}{{ ns.x }}")
    with pytest.raises(CorelmError, match="chat template error"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ---- tiny checkpoints of every family ----------------------------------------------------------------
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 8},
    "gemma2": {"head_dim": 8, "sliding_window": 8, "query_pre_attn_scalar": 8, "attn_logit_softcapping": 20.0,
               "final_logit_softcapping": 30.0},
    "gemma3_text": {"head_dim": 8, "sliding_window": 8, "query_pre_attn_scalar": 8,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {"tie_word_embeddings": False},
    "olmo2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16,
                  "norm_topk_prob": True},
}
PROMPT = [5, 17, 3, 99, 42, 7, 1, 100, 64, 33, 12]  # longer than every sliding window


def _ids(seed: int, shape: tuple[int, int] = (2, 16)) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _write_checkpoint(model_type: str, path: Path, chat_template: str | None = None) -> None:
    """A random transformers checkpoint of ``model_type`` with a word-level tokenizer, in ``path``."""
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type]})
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off transformers' init (zero routers, unit norms), so every weight matters
        for name, p in hf.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("gate.weight") else 0.05))
    hf.save_pretrained(path)
    special = {"bos_token": "<s>", "eos_token": "<|im_end|>"}
    Tokenizer(_word_backend(list(special.values())), special_tokens=special, chat_template=chat_template).save(path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    """(model_type, directory) of one family."""
    path = tmp_path_factory.mktemp(request.param)
    _write_checkpoint(request.param, path)
    return request.param, path


@pytest.fixture(scope="module")
def llm(checkpoint):
    return corelm.load(checkpoint[1], dtype="fp32")


def test_hf_directory_loads_and_exports(checkpoint, llm, tmp_path):
    """corelm's logits equal transformers' for the family's directory, and ``save_hf_dir`` writes one that
    transformers reads back as the same model class with the same logits."""
    from corelm.io.hf import save_hf_dir

    _, path = checkpoint
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    save_hf_dir(llm.model, llm.config, tmp_path, llm.tokenizer)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        ref = hf(_ids(5)).logits
        torch.testing.assert_close(llm.model(_ids(5)), ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(back(_ids(5)).logits, ref, atol=2e-5, rtol=1e-5)


# ---- LoRA, AdaLoRA, adapters -------------------------------------------------------------------
def _lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _train(model: torch.nn.Module, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = _lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_lora_trains_and_merges(checkpoint):
    """The family's attention and MLP layers (a MoE's stacked experts too) take LoRA: the loss falls, the
    base weights stay bit-identical, and merging gives the adapted model's logits with the base's names."""
    from corelm.finetune.lora import apply_lora, find_experts, find_linears, merge_lora, resolve_targets

    model_type, path = checkpoint
    llm = corelm.load(path, dtype="fp32")
    model = llm.model
    every = find_linears(model, "all-linear") + find_experts(model, "all-linear")  # routers are not in all-linear
    routers = [n for n, m in model.named_modules() if n.endswith(("mlp.gate", "shared_expert_gate"))]
    assert not set(routers) & set(every) and bool(routers) == (llm.config.family == "moe")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    targets = resolve_targets(llm.config.family, ["attention", "mlp"])
    names = apply_lora(model, targets, rank=4, alpha=8.0)
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= leaves
    assert ("experts" in leaves) == (llm.config.family == "moe")
    assert all(not n.endswith(("mlp.gate", "shared_expert_gate")) for n in names)  # routers stay as they are
    ids = _ids(0, (4, 16))
    losses = _train(model, ids, steps=6)
    assert losses[-1] < losses[0] - 0.05, (model_type, losses)
    state = model.state_dict()
    for k, v in base.items():
        assert torch.equal(state[k], v), f"{model_type}: base weight {k} changed"
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)
        merged = model(ids)
    torch.testing.assert_close(merged, adapted, atol=2e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(base)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and all(any(k.startswith(n + ".") for n in names) for k in changed)
    assert any(".experts." in k for k in changed) == (llm.config.family == "moe")  # the experts' LoRA trained


@pytest.mark.parametrize("method", ["adalora", "adapter"])
def test_adalora_and_adapters_train_a_step(checkpoint, method):
    """apply_method with the family's defaults: a training step moves only the new weights; AdaLoRA merges
    to the same logits, an adapter (not foldable) starts as the identity."""
    from corelm.finetune.lora import merge_lora
    from corelm.finetune.methods import apply_method

    _, path = checkpoint
    llm = corelm.load(path, dtype="fp32")
    model, ids = llm.model, _ids(1)
    with torch.no_grad():
        before = model(ids)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    info = apply_method(model, llm.config, method, {"init_rank": 4, "target_rank": 2, "alpha": 8.0, "size": 8})
    assert info["modules"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before)  # every update starts at zero
    _train(model, ids, steps=1, lr=1e-2)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    trained = [k for k in state if k not in base]
    assert trained and all(("lora_" in k) if method == "adalora" else ("adapter_" in k) for k in trained)
    with torch.no_grad():
        adapted = model(ids)
        assert not torch.allclose(adapted, before)
        if method == "adalora":
            merge_lora(model)
            torch.testing.assert_close(model(ids), adapted, atol=2e-5, rtol=1e-5)


# ---- quantization and generation -------------------------------------------------------------------
# Random tiny checkpoints have flat logits (std ~0.3), so closeness to fp32 is stated as cosine
# similarity, with floors under the measured values (int8 >= 0.9996, int4 group 32 >= 0.918; top-1
# agreement int8 0.88-1.0, int4 0.47-1.0). The tight check is the other one: the quantized model
# computes exactly what the float model computes with the quantizer's rounded weights.
QUANT_COSINE = {"int8": 0.999, "int4": 0.9}


def _twin_weight(modules: dict[str, torch.nn.Module], name: str) -> torch.Tensor:
    """The float twin's weight behind quantized layer ``name``: its own, or for a MoE's quantized expert
    ``...experts.{e}.gate_proj`` the rows of expert e in the float stacks (gate rows, then up rows)."""
    parts = name.rsplit(".", 3)
    if len(parts) == 4 and parts[1] == "experts" and parts[2].isdigit():
        stacks, e, matrix = modules[f"{parts[0]}.experts"], int(parts[2]), parts[3]
        f = stacks.down_proj.shape[2]
        if matrix == "down_proj":
            return stacks.down_proj.data[e]
        return stacks.gate_up_proj.data[e, :f] if matrix == "gate_proj" else stacks.gate_up_proj.data[e, f:]
    return modules[name].weight


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_logits_stay_close(checkpoint, llm, method, tmp_path):
    """``quantize=`` at load: the rounded weights' exact computation, close to fp32; the quantized model
    saved as ``corelm quantize`` writes it loads back to the same logits."""
    from corelm.quant.io import save_quantized_dir
    from corelm.quant.transform import is_quantized

    _, path = checkpoint
    quant = corelm.load(path, dtype="fp32", quantize=method)
    assert is_quantized(quant.model)
    ids = _ids(2)
    twin = corelm.load(path, dtype="fp32").model  # fp32, with every quantized weight's rounded values
    float_modules = dict(twin.named_modules())
    with torch.no_grad():
        rounded = 0
        for name, module in quant.model.named_modules():
            if hasattr(module, "dequantize"):
                weight = _twin_weight(float_modules, name)
                weight.copy_(module.dequantize().reshape(weight.shape))
                rounded += 1
        ref, got = llm.model(ids), quant.model(ids)
        torch.testing.assert_close(got, twin(ids), atol=1e-3, rtol=1e-3)
    # every block linear is quantized (a MoE's routed experts too, each expert's matrices on their own)
    assert rounded >= 4 * llm.config.n_layer + 1 + 3 * (llm.config.n_experts or 0) * llm.config.n_layer
    cosine = F.cosine_similarity(got.flatten(1), ref.flatten(1), dim=-1).min().item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{checkpoint[0]} {method}: cosine {cosine:.5f}, top-1 agreement {agree:.2f}")
    assert cosine > QUANT_COSINE[method]
    assert not torch.equal(got, ref)
    save_quantized_dir(quant.model, quant.config, tmp_path / "q", quant.tokenizer)
    with torch.no_grad():
        assert torch.equal(corelm.load(tmp_path / "q").model(ids), got)


def test_engine_paths_agree_with_greedy(llm):
    """Static-cache greedy (alone and batched with a shorter prompt), beam search of width 1 and speculative
    decoding with the model as its own draft give the same tokens; a width-3 beam runs to the end."""
    from corelm.generate.engine import SamplingParams, beam_search, generate
    from corelm.generate.speculative import speculative_generate

    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    greedy = generate(llm.model, [PROMPT], params)[0]
    with torch.no_grad():  # the static cache against a full forward over the greedy continuation
        full = llm.model(torch.tensor([PROMPT + greedy[:-1]]))[0, len(PROMPT) - 1:].argmax(-1).tolist()
    assert full == greedy
    short = PROMPT[3:8]  # a batch of different lengths decodes each row as it decodes alone
    assert generate(llm.model, [short, PROMPT], params) == [generate(llm.model, [short], params)[0], greedy]
    assert beam_search(llm.model, PROMPT, params, num_beams=1) == greedy
    assert len(beam_search(llm.model, PROMPT, params, num_beams=3)) == 6
    spec, stats = speculative_generate(llm.model, PROMPT, 6, draft=llm.model, k=3)
    assert spec == greedy and stats.acceptance_rate == 1.0


def test_fast_path_decodes_as_the_model(checkpoint):
    """Every family's int4 model runs on the C++ KernelStep, whose logits follow the Python step's. The
    Gemma, OLMo 2, LongRoPE and MoE cases in depth: tests/test_kernel_step_families.py."""
    from corelm.generate.step import KernelStep, ModelStep, kernel_step_supported, step_for

    _, path = checkpoint
    quant = corelm.load(path, dtype="fp32", quantize="int4")
    why = kernel_step_supported(quant.model)
    assert why is None, why
    assert isinstance(step_for(quant.model), KernelStep)
    # an fp32 cache: the Python step's; the default fp16 cache is held to a tolerance in test_quant_kernel_step
    kernel, python = KernelStep(quant.model, kv_dtype=torch.float32), ModelStep(quant.model)
    caches = kernel.new_cache(1, 32), python.new_cache(1, 32)
    torch.testing.assert_close(kernel.prefill(caches[0], [PROMPT]), python.prefill(caches[1], [PROMPT]),
                               atol=1e-3, rtol=1e-3)
    for pos, token in enumerate([3, 8, 90], start=len(PROMPT)):
        args = torch.tensor([token]), torch.tensor([pos])
        torch.testing.assert_close(kernel.decode(caches[0], *args), python.decode(caches[1], *args),
                                   atol=1e-3, rtol=1e-3)


# ---- prune and compare ---------------------------------------------------------------------------
def test_prune_and_compare(checkpoint, tmp_path):
    """magnitude pruning writes a checkpoint of the same family that corelm and transformers reload;
    a sparse MoE is refused in one line. ``compare`` measures the family's checkpoint."""
    from corelm.commands.compare import CompareOptions, compare
    from corelm.commands.prune import PruneOptions, prune

    model_type, path = checkpoint
    options = PruneOptions(model=str(path), method="magnitude", sparsity=0.5, out=str(tmp_path / "pruned"))
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        with pytest.raises(CorelmError, match="experts"):
            prune(options)
    else:
        report = prune(options)
        assert report["zeros"] / report["weights"] == pytest.approx(0.5, abs=0.02)
        back = corelm.load(tmp_path / "pruned", dtype="fp32")
        assert back.config.extra.get("model_type") == json.loads((path / "config.json").read_text())["model_type"]
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
        with torch.no_grad():
            torch.testing.assert_close(back.model(_ids(3)), hf(_ids(3)).logits, atol=2e-5, rtol=1e-5)
    data = tmp_path / "heldout.txt"
    data.write_text(" ".join(f"w{i % 90}" for i in range(200)))
    rows = compare(CompareOptions(variants=[str(path)], data=str(data), tokens=64, window=32, decode_tokens=0))
    assert rows[0]["perplexity"] > 1 and rows[0]["tokens"] > 16


def test_finetune_cli_lora_on_a_moe(tmp_path, capsys):
    """``corelm finetune --method lora`` on Qwen3-MoE with its real chat template, adapting attention and
    MLP (the routed experts included); ``corelm merge`` writes a checkpoint equal to the adapted model."""
    from corelm.cli import main as cli
    from corelm.loading import load_run

    base, run_dir, merged_dir = tmp_path / "base", tmp_path / "run", tmp_path / "merged"
    _write_checkpoint("qwen3_moe", base, chat_template=(TEMPLATES / "Qwen-Qwen3-0.6B.jinja").read_text())
    assert cli(["finetune", "--model", str(base), "--task", "sft", "--data", "demo:chat", "--method", "lora",
                "--targets", "attention,mlp", "--rank", "4", "--steps", "2", "--batch-size", "4", "--max-len", "48",
                "--lr", "1e-2", "--out", str(run_dir), "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    modules = json.loads((run_dir / "corelm_task.json").read_text())["method_config"]["modules"]
    assert "model.layers.1.mlp.experts" in modules and not any(m.endswith("mlp.gate") for m in modules)
    assert cli(["merge", str(run_dir), "--out", str(merged_dir)]) == 0
    adapted = load_run(run_dir).model
    merged = corelm.load(merged_dir, dtype="fp32").model
    before = corelm.load(base, dtype="fp32").model
    with torch.no_grad():
        torch.testing.assert_close(merged(_ids(4)), adapted(_ids(4)), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(merged(_ids(4)), before(_ids(4)), atol=1e-4)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert "model.layers.1.mlp.experts.down_proj" in changed


def test_finetune_cli_adapter_run_on_a_moe_loads_back(tmp_path):
    """An adapter run on a MoE (adapters after each routed sub-layer) is saved and read back by load_run."""
    from safetensors.torch import load_file

    from corelm.cli import main as cli
    from corelm.loading import load_run

    base, run_dir = tmp_path / "base", tmp_path / "run"
    _write_checkpoint("qwen2_moe", base, chat_template=(TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text())
    assert cli(["finetune", "--model", str(base), "--task", "sft", "--data", "demo:chat", "--method", "adapter",
                "--adapter-size", "8", "--steps", "2", "--batch-size", "4", "--max-len", "48", "--lr", "1e-2",
                "--out", str(run_dir), "--no-progress", "--json"]) == 0
    saved = load_file(str(run_dir / "adapter.safetensors"))
    assert {"model.layers.1.mlp.adapter_up.weight", "model.layers.1.self_attn.o_proj.adapter_up.weight"} <= set(saved)
    run = load_run(run_dir).model
    with torch.no_grad():
        assert torch.equal(run.get_parameter("model.layers.1.mlp.adapter_up.weight"),
                           saved["model.layers.1.mlp.adapter_up.weight"])
        assert not torch.allclose(run(_ids(6)), corelm.load(base, dtype="fp32").model(_ids(6)))
