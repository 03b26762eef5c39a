"""Per-row LoRA adapters inside corelm's C++ step (``KernelStep.attach_lora``).

A tiny quantized Llama (2 layers, width 64) wrapped by ``apply_multi_lora`` with two random adapters of
different ranks on different projections (slot 1: rank 4 on q/v/down; slot 2: rank 8 on k/o/gate/up, so
every projection kind is exercised and slot 1 is rank-padded). The reference is what the server computed
for adapter rows before: the model's own forward over the same quantized layers plus the gathered PyTorch
update (``MultiLoRALinear``). An fp32 cache and the integer kernels for every token count hold the C++ step
to that forward at 1e-4 (as tests/test_generate_step.py does for the plain step).
"""

import asyncio

import pytest
import torch

from corelm import kernels
from corelm.finetune.multi_lora import LoRAWeights, apply_multi_lora
from corelm.generate.engine import SamplingParams
from corelm.generate.step import KernelStep
from tests.test_generate_step import _tiny

SLOTS = {0: 0, 1: 1, 2: 2, 3: 1}  # cache row -> adapter slot (two rows share slot 1)
PROMPTS = [[5, 17, 3, 88, 41, 9, 2], [7, 7, 1, 30], [60, 61, 62, 63, 64], [11, 4, 90, 2, 2, 8]]
TARGETS = {1: (("q_proj", "v_proj", "down_proj"), 4), 2: (("k_proj", "o_proj", "gate_proj", "up_proj"), 8)}


@pytest.fixture(autouse=True)
def _integer_kernels(monkeypatch):
    monkeypatch.setenv("CORELM_GEMM_ROWS", "100000")


def random_lora(multi, targets: tuple[str, ...], rank: int, seed: int, scale: float = 0.3) -> LoRAWeights:
    gen = torch.Generator().manual_seed(seed)
    layers = {name: (torch.randn(rank, m.in_features, generator=gen) * scale,
                     torch.randn(m.out_features, rank, generator=gen) * scale)
              for name, m in multi.layers.items() if name.rsplit(".", 1)[-1] in targets}
    return LoRAWeights(rank, 2.0, layers)


def lora_model(method: str, dtype: torch.dtype = torch.float32):
    """(model, its C++ step with the stacks attached, the stacks) with TARGETS installed."""
    model = _tiny(method, sharpen=False)
    step = KernelStep(model, kv_dtype=torch.float32)  # built from the unwrapped layers
    multi = apply_multi_lora(model, slots=3, rank=8, dtype=dtype)
    assert step.attach_lora(SLOTS.get) == 2 * 7
    for slot, (targets, rank) in TARGETS.items():
        multi.install(slot, random_lora(multi, targets, rank, seed=slot))
    return model, step, multi


@pytest.fixture(scope="module")
def built():
    assert kernels.load(), kernels.load_error()  # `make test` builds them; a failure is a failure


@pytest.fixture(scope="module", params=["int4", "int8", None], ids=["int4", "int8", "fp32"])
def setup(request, built):
    model, step, multi = lora_model(request.param)
    plain = KernelStep(_tiny(request.param, sharpen=False), kv_dtype=torch.float32)  # the same weights, no adapters
    return model, step, multi, plain


def reference(model, multi, seqs: list[list[int]], slots: list[int]) -> list[torch.Tensor]:
    """Each sequence's logits at every position, through the model's forward with its adapter slot."""
    out = []
    with torch.inference_mode():
        for ids, slot in zip(seqs, slots):
            multi.rows.set([slot])
            try:
                out.append(model(torch.tensor([ids]))[0].float())
            finally:
                multi.rows.set(None)
    return out


def test_adapter_rows_equal_the_model_forward_with_its_adapter(setup):
    """A mixed prefill and three batched decode steps of rows with slots 0, 1, 2, 1 match the model's forward
    with each row's adapter (the old path's numbers); the adapters change the logits."""
    model, step, multi, _ = setup
    rows = [0, 1, 2, 3]
    seqs = [list(p) for p in PROMPTS]
    got = [[] for _ in rows]
    with torch.inference_mode():
        cache = step.new_cache(4, 32)
        logits = step.prefill(cache, PROMPTS, rows=rows)
        for _ in range(3):
            tokens = logits.argmax(-1)
            for b, t in enumerate(tokens.tolist()):
                got[b].append(logits[b])
                seqs[b].append(t)
            pos = torch.tensor([len(s) - 1 for s in seqs])
            logits = step.decode(cache, tokens, pos, rows=rows)
    want = reference(model, multi, seqs, [SLOTS[r] for r in rows])
    for b, s in enumerate(seqs):
        n = len(PROMPTS[b])
        torch.testing.assert_close(torch.stack(got[b]), want[b][n - 1:len(s) - 1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[b], want[b][-1], rtol=1e-4, atol=1e-4)
    base = reference(model, multi, [PROMPTS[1]], [0])[0]
    assert (want[1][len(PROMPTS[1]) - 1] - base[-1]).abs().max() > 0.1  # slot 1 changes the output


def test_rows_are_exact_in_any_company_and_plain_rows_equal_the_plain_step(setup):
    """One call of decode rows and prefill chunks of every slot: each run's logits equal the same run alone,
    bit for bit, and rows without an adapter equal the plain C++ step's bit for bit."""
    _, step, _, plain = setup
    with torch.inference_mode():
        cache, pcache = step.new_cache(4, 32), plain.new_cache(4, 32)
        step.prefill(cache, PROMPTS, rows=[0, 1, 2, 3])
        plain.prefill(pcache, PROMPTS, rows=[0, 1, 2, 3])
        runs = [(0, [9], 7), (1, [3, 8, 21], 4), (2, [40], 5), (3, [1, 2], 6)]  # decode rows and chunks
        together = step.mixed(cache, runs)
        for i, (row, tokens, pos0) in enumerate(runs):
            alone = step.new_cache(4, 32)
            step.prefill(alone, [PROMPTS[row]], rows=[row])
            assert torch.equal(step.mixed(alone, [(row, tokens, pos0)])[0], together[i]), row
        plain_logits = plain.mixed(pcache, runs)
    assert torch.equal(together[0], plain_logits[0])  # row 0 has no adapter: today's step exactly
    assert not torch.equal(together[1], plain_logits[1]) and not torch.equal(together[2], plain_logits[2])


def test_loading_and_clearing_slots_apply_from_the_next_call(setup):
    """The step reads the stacks in place: a slot refilled with another adapter computes the new one, a
    cleared slot the base model exactly (no stale adapter)."""
    model, step, multi, plain = setup
    ids = PROMPTS[0]
    try:
        multi.install(1, random_lora(multi, ("gate_proj", "k_proj"), 2, seed=9))
        multi.clear(2)
        with torch.inference_mode():
            refilled = step.extend(step.new_cache(4, 16), 1, ids, 0)  # row 1: slot 1
            cleared = step.extend(step.new_cache(4, 16), 2, ids, 0)   # row 2: slot 2, now empty
            base = plain.extend(plain.new_cache(4, 16), 2, ids, 0)
        torch.testing.assert_close(refilled, reference(model, multi, [ids], [1])[0], rtol=1e-4, atol=1e-4)
        assert torch.equal(cleared, base)
    finally:
        for slot, (targets, rank) in TARGETS.items():
            multi.install(slot, random_lora(multi, targets, rank, seed=slot))


def test_bf16_stacks_compute_as_their_fp32_values(built):
    """bf16 stacks are read as fp32: the same logits as fp32 stacks holding the same (rounded) values."""
    _, step16, multi16 = lora_model("int4", torch.bfloat16)
    _, step32, multi32 = lora_model("int4")
    with torch.no_grad():
        for name, layer in multi32.layers.items():
            layer.lora_A.copy_(multi16.layers[name].lora_A.float())
            layer.lora_B.copy_(multi16.layers[name].lora_B.float())
    with torch.inference_mode():
        a = step16.prefill(step16.new_cache(4, 16), PROMPTS, rows=[0, 1, 2, 3])
        b = step32.prefill(step32.new_cache(4, 16), PROMPTS, rows=[0, 1, 2, 3])
    assert torch.equal(a, b)


def test_bad_slots_and_stacks_are_refused(setup):
    _, step, multi, _ = setup
    x = torch.zeros(1, 64)
    cache = step.new_cache(1, 8)
    with pytest.raises(RuntimeError, match="LoRA slot 4 of 4"):
        step.op.forward_lora(x, torch.tensor([0]), torch.tensor([0]), cache.k, cache.v, torch.tensor([0]),
                             torch.tensor([4]))
    layer = multi.layers["model.layers.0.self_attn.q_proj"]
    with pytest.raises(RuntimeError, match="do not fit"):
        step.op.set_lora(0, "k_proj", layer.lora_A, layer.lora_B, layer.used_mask)  # q's stacks on k (64 -> 32)


def test_adapter_row_with_nan_logits_fails_alone_and_its_cache_row_is_zeroed(built):
    """The batcher's failed-row handling with adapters on the C++ step: an adapter row whose logits come out
    NaN (and whose keys and values are NaN: simulated, since the step's int8 activations turn a NaN hidden
    state into finite numbers) fails with model_output_invalid and its row of the one cache is zeroed; the
    adapter row beside it and the next (plain) request in its row are unaffected."""
    from corelm.serve.batcher import Batcher

    model, step, _ = lora_model("int8")
    batcher = Batcher(model, max_batch=2, max_seq_len=64, step=step, prefix_cache_mib=0)
    step.slot_of = batcher.adapter_of
    mixed = step.mixed

    def poisoned(cache, runs):  # slot 1's rows: NaN logits and NaN keys and values over the whole row
        logits = mixed(cache, runs)
        for i, (row, _, _) in enumerate(runs):
            if step.slot_of(row) == 1:
                cache.k[:, row], cache.v[:, row], logits[i] = float("nan"), float("nan"), float("nan")
        return logits

    step.mixed = poisoned
    spec = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)

    async def run(jobs: list[tuple[list[int], int]]) -> list[list]:
        handles = [batcher.submit(p, spec, adapter=s) for p, s in jobs]
        out = []
        for h in handles:
            out.append([e async for e in h])
        return out

    batcher.start()
    try:
        alone = asyncio.run(run([(PROMPTS[0], 0)]))[0]
        alone2 = asyncio.run(run([(PROMPTS[2], 2)]))[0]
        together = asyncio.run(run([(PROMPTS[1], 1), (PROMPTS[2], 2)]))  # rows 0 and 1
        scrubbed = [torch.count_nonzero(t[:, 0]).item() for t in (batcher.cache.k, batcher.cache.v)]
        after = asyncio.run(run([(PROMPTS[0], 0)]))[0]  # row 0 again
    finally:
        batcher.stop()
    failed = together[0][-1]
    assert failed.kind == "error" and failed.error.code == "model_output_invalid"
    assert scrubbed == [0, 0]
    assert [e.token for e in together[1]] == [e.token for e in alone2]
    assert [e.token for e in after] == [e.token for e in alone]


def test_unloading_mid_stream_and_reusing_the_slot_on_the_cpp_step(built):
    """Through the server's AdapterSet: an adapter unloaded while its stream runs keeps its slot until the
    stream ends (the stream equals the adapter served alone); a later adapter then refills that slot and
    computes only itself (no stale update), each equal to a fresh server holding just that adapter."""
    from corelm.serve.adapters import AdapterSet
    from corelm.serve.batcher import Batcher

    def served():
        model = _tiny("int8", sharpen=False)
        step = KernelStep(model)
        multi = apply_multi_lora(model, slots=2, rank=8)
        step.attach_lora()
        batcher = Batcher(model, max_batch=4, max_seq_len=96, step=step, prefix_cache_mib=0)
        step.slot_of = batcher.adapter_of
        return batcher, AdapterSet(multi, batcher.adapters_in_use), multi

    batcher, adapters, multi = served()
    weights = {"x": random_lora(multi, ("q_proj", "down_proj"), 4, seed=11),
               "y": random_lora(multi, ("v_proj", "up_proj"), 8, seed=12),
               "z": random_lora(multi, ("o_proj", "gate_proj"), 2, seed=13)}
    long = SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True)

    async def tokens(b: Batcher, slot: int) -> list[int]:
        return [e.token async for e in b.submit(PROMPTS[3], long, adapter=slot) if e.kind == "token"]

    def alone(name: str) -> list[int]:
        b, s, _ = served()
        b.start()
        try:
            return asyncio.run(tokens(b, s.add(name, weights[name], name).slot))
        finally:
            b.stop()

    async def scenario() -> tuple[list[int], int, int]:
        x = adapters.add("x", weights["x"], "x").slot
        stream = batcher.submit(PROMPTS[3], long, adapter=x).__aiter__()
        got = [(await stream.__anext__()).token]
        adapters.remove("x")
        z = adapters.add("z", weights["z"], "z").slot  # x's slot is still held by the stream
        got += [e.token async for e in stream if e.kind == "token"]
        return got, x, z

    batcher.start()
    try:
        streamed, x, z = asyncio.run(scenario())
        y = adapters.add("y", weights["y"], "y").slot  # x's slot, free again: cleared and refilled
        with_y, with_z = asyncio.run(tokens(batcher, y)), asyncio.run(tokens(batcher, z))
    finally:
        batcher.stop()
    assert z != x and y == x
    assert streamed == alone("x") and with_y == alone("y") and with_z == alone("z")
    assert len({tuple(streamed), tuple(with_y), tuple(with_z)}) == 3


@pytest.mark.parametrize("case", ["olmo2", "gemma2", "qwen2_moe"])
def test_families_apply_the_adapters_or_refuse_them(built, case, tmp_path):
    """OLMo 2 (no pre-norms: a projection reads the residual itself), Gemma 2 (its own norms and caps): the
    adapters on all seven projections match the model's forward. Qwen2-MoE: when the adapters wrap layers
    the step has no hook for (experts), attach_lora registers nothing, so the server keeps the model's
    forward rather than silently dropping an update."""
    import corelm
    from tests.test_kernel_step_families import ATOL, LONG, _write_checkpoint

    _write_checkpoint(case, tmp_path)
    model = corelm.load(tmp_path, dtype="fp32", quantize="int8").model
    step = KernelStep(model, kv_dtype=torch.float32)
    multi = apply_multi_lora(model, slots=2, rank=4)
    n = step.attach_lora(lambda row: row)  # row r uses slot r
    wrapped = len(multi.layers)
    if case == "qwen2_moe":
        assert n == 0 and wrapped > 0
        return
    assert n == wrapped == 7 * model.config.n_layer
    multi.install(1, random_lora(multi, tuple(name.rsplit(".", 1)[-1] for name in multi.layers), 4, seed=5, scale=0.1))
    ids = LONG[:12]
    with torch.inference_mode():
        got = torch.stack([step.extend(step.new_cache(2, 32), row, ids, 0)[-1] for row in (0, 1)])
    want = torch.stack([reference(model, multi, [ids], [slot])[0][-1] for slot in (0, 1)])
    torch.testing.assert_close(got, want, rtol=ATOL, atol=ATOL)
    assert (want[1] - want[0]).abs().max() > 10 * ATOL  # the adapter changes the logits
