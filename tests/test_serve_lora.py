"""Multi-LoRA serving: adapters chosen per request, rows of different adapters in one batch.

The base is the tiny random Llama of ``test_serve_api`` (2 layers, width 64, SmolLM2 vocabulary).
Two LoRA runs are written as ``corelm finetune --method lora`` writes them (``corelm_task.json`` +
``adapter.safetensors``) with random, non-zero ``A`` and ``B`` large enough to change greedy output:
``sql`` (rank 4, attention q/v) and ``chat`` (rank 8, attention output and the MLP), so the stacks
hold two ranks (``sql`` is rank-padded) and layers only one adapter targets. Every adapter's greedy
text is checked against the *merged* model (``W + (alpha/r) B A``, a plain model, full forward
passes), against itself served alone, and inside a mixed batch of both adapters and the base model.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import torch
from openai import NotFoundError, OpenAI
from safetensors.torch import save_file

from corelm.errors import CorelmError
from corelm.finetune.multi_lora import AdapterRows, MultiLoRALinear, apply_multi_lora, read_lora
from corelm.generate import engine
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.server import ServeOptions, ServerThread, wrap
from tests.test_serve_api import WINDOW, greedy_reference, tiny_llm

pytestmark = pytest.mark.slow  # spawns a server

PROMPTS = ["The cat sat", "Once upon a time", "1 2 3"]
N_TOKENS = 10


def write_run(path: Path, model: torch.nn.Module, targets: tuple[str, ...], rank: int, alpha: float,
              seed: int) -> Path:
    """A LoRA run directory over ``model`` with random non-zero A and B on the ``targets`` layers."""
    gen = torch.Generator().manual_seed(seed)
    tensors, modules = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            modules.append(name)
            tensors[f"{name}.lora_A"] = torch.randn(rank, module.in_features, generator=gen) * 0.3
            tensors[f"{name}.lora_B"] = torch.randn(module.out_features, rank, generator=gen) * 0.3
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter.safetensors"))
    task = {"task": "sft", "method": "lora", "base": "tiny", "family": "llama",
            "method_config": {"modules": modules, "rank": rank, "alpha": alpha, "dropout": 0.0}}
    (path / "corelm_task.json").write_text(json.dumps(task))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tiny_llm().model
    return {"sql": write_run(root / "sql", base, ("q_proj", "v_proj"), rank=4, alpha=8.0, seed=1),
            "chat": write_run(root / "chat", base, ("o_proj", "gate_proj", "down_proj"), rank=8, alpha=8.0, seed=2),
            "root": root}


def merged_llm(run: Path):
    """The tiny base with the run's update folded into its weights: an ordinary model, no adapter code."""
    llm = tiny_llm()
    weights = read_lora(run)
    with torch.no_grad():
        for name in weights.layers:
            layer = llm.model.get_submodule(name)
            layer.weight += weights.delta(name).to(layer.weight.dtype)
    return llm


@pytest.fixture(scope="module")
def server(runs):
    llm = tiny_llm()
    options = ServeOptions(max_batch=12, max_seq_len=WINDOW, default_max_tokens=16,
                           lora=[f"sql={runs['sql']}", f"chat={runs['chat']}"], max_loras=4)
    with pytest.MonkeyPatch.context() as env:  # the PyTorch adapter path (a float model's C++ step with
        env.setenv("CORELM_STEP", "pytorch")  # adapters: tests/test_lora_kernel_step.py)
        model = wrap("tiny", llm, options, with_adapters=True)
    # a sampler that takes a little time: a long stream is surely still running when it is unloaded
    model.batcher._sample = lambda *a: (threading.Event().wait(0.002), engine.sample_next(*a))[1]
    app = create_app([model], ServerConfig(max_body_bytes=64 * 1024, loopback_only=True))
    model.batcher.start()
    with ServerThread(app) as srv:
        srv.model = model
        yield srv
    model.batcher.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def complete(client, model: str, prompt: str, n: int = N_TOKENS) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


@pytest.fixture(scope="module")
def alone(client):
    """Every (model, prompt) served alone: one request at a time."""
    return {(m, p): complete(client, m, p) for m in ("tiny", "tiny:sql", "tiny:chat") for p in PROMPTS}


def test_each_adapter_equals_its_merged_model_and_changes_the_output(alone, runs):
    base = tiny_llm()
    for name in ("sql", "chat"):
        merged = merged_llm(runs[name])
        for prompt in PROMPTS:
            ids = merged.encode_prompt(prompt)
            want = merged.tokenizer.decode(greedy_reference(merged, ids, N_TOKENS), skip_special_tokens=True)
            assert alone["tiny:" + name, prompt] == want
        plain = [base.tokenizer.decode(greedy_reference(base, base.encode_prompt(p), N_TOKENS),
                                       skip_special_tokens=True) for p in PROMPTS]
        assert [alone["tiny", p] for p in PROMPTS] == plain  # rows without an adapter: the plain model
        assert [alone["tiny:" + name, p] for p in PROMPTS] != plain, f"adapter {name} changes nothing"
    assert [alone["tiny:sql", p] for p in PROMPTS] != [alone["tiny:chat", p] for p in PROMPTS]


def test_mixed_adapter_batch_equals_each_alone(server, client, alone):
    jobs = [(m, p) for m in ("tiny", "tiny:sql", "tiny:chat", "sql") for p in PROMPTS] * 2  # 24 requests, 12 rows
    results: list[str | None] = [None] * len(jobs)
    steps = server.model.batcher.steps
    rows = server.model.adapters.multi.rows
    seen: list[set[int]] = []  # the adapter slots of each forward
    record = rows.set
    rows.set = lambda ids, device="cpu": (seen.append(set(ids or [])), record(ids, device))[1]

    def run(i: int) -> None:
        results[i] = complete(client, *jobs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows.set = record
    assert max(len(s) for s in seen) == 3  # some decode steps ran base, sql and chat rows together
    assert results == [alone["tiny:sql" if m == "sql" else m, p] for m, p in jobs]
    # shared decode steps: far fewer than one pass per request and token
    assert server.model.batcher.steps - steps < len(jobs) * N_TOKENS // 2


def test_models_lists_the_base_and_its_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "tiny:sql", "tiny:chat"}
    assert models["tiny:sql"].model_extra["parent"] == "tiny" and models["tiny:chat"].model_extra["rank"] == 8
    out = client.completions.create(model="sql", prompt="hi", max_tokens=2, temperature=0)
    assert out.model == "tiny:sql"


def test_unknown_adapters_are_404_and_bad_loads_400(server, client, runs, tmp_path):
    for name in ("tiny:nope", "nope", "other:sql"):
        with pytest.raises(NotFoundError) as err:
            client.completions.create(model=name, prompt="hi", max_tokens=2)
        assert err.value.body["code"] == "model_not_found"
    post = lambda body: httpx.post(server.url + "/v1/adapters", json=body, timeout=30)
    wide = write_run(tmp_path / "wide", torch.nn.Sequential(), (), rank=2, alpha=2, seed=0)
    save_file({"model.layers.0.self_attn.q_proj.lora_A": torch.ones(2, 32),
               "model.layers.0.self_attn.q_proj.lora_B": torch.ones(64, 2)}, str(wide / "adapter.safetensors"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "corelm_task.json").write_text(json.dumps({"task": "sft", "method": "lora"}))
    (tmp_path / "broken" / "adapter.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases = [({"name": "x", "path": str(tmp_path / "missing")}, 400, "no corelm_task.json"),
             ({"name": "x", "path": "x" * 5000}, 400, "no corelm_task.json"),
             ({"name": "x", "path": str(tmp_path / "broken")}, 400, "adapter.safetensors cannot be read"),
             ({"name": "x", "path": str(wide)}, 400, "maps 32 -> 64 features but the base model's maps 64 -> 64"),
             ({"name": "a:b", "path": str(runs["sql"])}, 400, "must be 1-64 letters"),
             ({"name": "x"}, 400, "'path' must be a non-empty string"),
             ({"name": "sql", "path": str(runs["sql"])}, 409, "already loaded"),
             ({"name": "x", "path": str(runs["sql"]), "model": "nope"}, 404, "serves no adapters")]
    for body, status, message in cases:
        r = post(body)
        assert r.status_code == status and message in r.json()["error"]["message"], (body, r.text)
    r = httpx.delete(server.url + "/v1/adapters/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


def test_load_and_unload_at_run_time_leave_running_requests_alone(server, client, runs, alone):
    adapters = server.model.adapters
    r = httpx.post(server.url + "/v1/adapters", json={"name": "sql2", "path": str(runs["sql"])}, timeout=30)
    assert r.status_code == 200 and r.json()["id"] == "tiny:sql2"
    assert [complete(client, "sql2", p) for p in PROMPTS] == [alone["tiny:sql", p] for p in PROMPTS]
    long_alone = complete(client, "tiny:sql2", PROMPTS[0], 200)

    slot = adapters.slot("sql2")
    stream = client.completions.create(model="tiny:sql2", prompt=PROMPTS[0], max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    pieces = [next(iter(stream)).choices[0].text]
    assert httpx.delete(server.url + "/v1/adapters/sql2").json() == {"id": "tiny:sql2", "object": "model",
                                                                    "deleted": True}
    with pytest.raises(NotFoundError):  # gone for new requests at once
        client.completions.create(model="tiny:sql2", prompt="hi", max_tokens=2)
    # the running stream still holds its slot: a new adapter takes another one
    r = httpx.post(server.url + "/v1/adapters", json={"name": "chat2", "path": str(runs["chat"])}, timeout=30)
    assert r.status_code == 200 and adapters.slot("chat2") != slot
    pieces += [chunk.choices[0].text for chunk in stream]
    assert "".join(pieces) == long_alone  # the unloaded adapter's stream finished as it started
    assert complete(client, "chat2", PROMPTS[1]) == alone["tiny:chat", PROMPTS[1]]
    assert httpx.delete(server.url + "/v1/adapters/tiny:chat2").status_code == 200
    assert server.model.batcher.adapters_in_use() == set()


def test_admin_needs_the_api_key_and_a_key_on_open_servers(runs):
    llm = tiny_llm()
    model = wrap("tiny", llm, ServeOptions(max_batch=2, max_seq_len=64, max_loras=1), with_adapters=True)
    body = {"name": "sql", "path": str(runs["sql"])}
    with ServerThread(create_app([model], ServerConfig(api_key="k"))) as srv:
        assert httpx.post(srv.url + "/v1/adapters", json=body).status_code == 401
        ok = httpx.post(srv.url + "/v1/adapters", json=body, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200 and model.adapters.slot("sql") == 1
        full = httpx.post(srv.url + "/v1/adapters", json={**body, "name": "b"}, headers={"Authorization": "Bearer k"})
        assert full.status_code == 409 and "all 1 adapter slots are in use" in full.json()["error"]["message"]
    with ServerThread(create_app([model], ServerConfig(api_key=None, loopback_only=False))) as srv:
        r = httpx.delete(srv.url + "/v1/adapters/sql")
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_needs_api_key"


def test_start_adapters_are_checked_with_one_line_errors(runs, tmp_path):
    llm = tiny_llm()
    adalora = tmp_path / "ada"
    adalora.mkdir()
    (adalora / "corelm_task.json").write_text(json.dumps({"task": "sft", "method": "adalora"}))
    cases = [(["sql"], "--lora wants NAME=PATH"), ([f"a={runs['sql']}", f"a={runs['chat']}"], "given twice"),
             ([f"a={adalora}"], "only LoRA runs"), ([f"a={tmp_path}"], "no corelm_task.json")]
    for lora, message in cases:
        with pytest.raises(CorelmError, match=message):
            wrap("tiny", llm, ServeOptions(lora=lora, max_seq_len=64), with_adapters=True)
    with pytest.raises(CorelmError, match="rank up to 8, above --max-lora-rank 4"):
        wrap("tiny", llm, ServeOptions(lora=[f"c={runs['chat']}"], max_lora_rank=4), with_adapters=True)


def test_gathered_update_is_per_row_and_exact_for_rows_without_adapter():
    """The layer alone: each row's update is ``x A[s]^T B[s]^T`` of its own slot and the same numbers
    alone as among other rows (a zero base layer exposes the update bit for bit); a row with slot 0
    gets the base layer's output untouched."""
    torch.manual_seed(0)
    rows = AdapterRows()
    zero = torch.nn.Linear(16, 24)
    torch.nn.init.zeros_(zero.weight), torch.nn.init.zeros_(zero.bias)
    layer = MultiLoRALinear(zero, slots=3, rank=4, rows=rows, dtype=torch.float32)
    with torch.no_grad():
        for slot, r in ((1, 4), (3, 2)):  # slot 3 rank-padded
            layer.lora_A[slot, :r].normal_()
            layer.lora_B[slot, :, :r].normal_()
            layer.used.add(slot)
    x = torch.randn(5, 3, 16)
    ids = [0, 1, 3, 1, 0]
    with torch.no_grad():
        rows.set(ids)
        y = layer(x)
        for b, s in enumerate(ids):
            torch.testing.assert_close(y[b], x[b] @ layer.lora_A[s].T @ layer.lora_B[s].T)
            rows.set([s])
            assert torch.equal(layer(x[b:b + 1])[0], y[b])  # alone: the same numbers
        base = torch.nn.Linear(16, 24)
        layer.base = base
        rows.set(ids)
        y, want = layer(x), base(x)
        assert torch.equal(y[0], want[0]) and torch.equal(y[4], want[4]) and not torch.equal(y[1], want[1])
        rows.set(None)
        assert torch.equal(layer(x), want)


def test_wrapping_without_adapters_keeps_the_model_exact():
    llm = tiny_llm()
    x = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        want = llm.model(x)
        multi = apply_multi_lora(llm.model, slots=2, rank=4)
        assert len(multi.layers) == 2 * 7 and torch.equal(llm.model(x), want)


def test_quantized_model_serves_every_row_on_the_cpp_step(tmp_path):
    """A model on corelm's C++ step: every row runs there, in one cache; rows without an adapter give the plain
    server's exact tokens, adapter rows their adapter's; a mixed batch equals each alone."""
    import asyncio

    from corelm.generate.engine import SamplingParams
    from corelm.generate.step import KernelStep, kernel_step_supported
    from corelm.serve.adapters import start_adapters
    from corelm.serve.batcher import Batcher
    from tests.test_generate_step import _tiny

    if kernel_step_supported(_tiny("int8")) is not None:
        pytest.skip("corelm's C++ kernels are not built here")
    plain_model, model = _tiny("int8"), _tiny("int8")
    lora = []
    for name, seed in (("a", 1), ("b", 2)):
        gen, tensors = torch.Generator().manual_seed(seed), {}
        for layer, m in model.named_modules():
            if layer.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj"):
                tensors[f"{layer}.lora_A"] = torch.randn(4, m.in_features, generator=gen) * 0.5
                tensors[f"{layer}.lora_B"] = torch.randn(m.out_features, 4, generator=gen) * 0.5
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "adapter.safetensors"))
        (tmp_path / name / "corelm_task.json").write_text(json.dumps(
            {"task": "sft", "method": "lora", "method_config": {"rank": 4, "alpha": 4.0}}))
        lora.append(f"{name}={tmp_path / name}")
    started = start_adapters(model, lora)
    assert isinstance(started.step, KernelStep)
    plain = Batcher(plain_model, max_batch=8, max_seq_len=64)
    assert isinstance(plain.step, KernelStep)
    split = Batcher(model, max_batch=8, max_seq_len=64, step=started.step)
    adapters = started.attach(split)
    prompts = [[5, 17, 3, 44], [9, 9, 1], [60, 2, 33, 7, 12]]
    jobs = [(p, s) for s in (0, adapters.slot("a"), adapters.slot("b")) for p in prompts]

    async def run(batcher: Batcher, batch: list) -> list[list[int]]:
        spec = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
        handles = [batcher.submit(p, spec, adapter=s) for p, s in batch]
        out = []
        for h in handles:
            out.append([e.token async for e in h if e.kind == "token"])
        return out

    for b in (plain, split):
        b.start()
    try:
        alone = [asyncio.run(run(split, [job]))[0] for job in jobs]
        mixed = asyncio.run(run(split, jobs))
        on_cpp = [asyncio.run(run(plain, [(p, 0)]))[0] for p in prompts]
    finally:
        for b in (plain, split):
            b.stop()
    assert mixed == alone
    assert alone[:3] == on_cpp  # plain rows: the C++ step's tokens
    assert alone[3:6] != on_cpp and alone[6:] != alone[3:6]  # the adapters change the output
