"""GGUF block matrices kept only repacked (corelm/kernels/repack.h ``unpack_group``, qlinear.h
``as_matrix_packed``/``panel_rows``; :class:`corelm.quant.kquant.GGUFBlockLinear` with ``repack``): the
records give back the file's bytes bit for bit, the matmul on them equals the one on the file's rows (the
few-row kernels and the panel GEMM, on every instruction set this CPU runs), and a natively loaded GGUF
model holds one copy of its weights, decodes on the C++ step exactly as with the rows, and saves and loads
``blocks`` as before."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corelm import kernels
from corelm.quant import kquant
from tests.test_kquants import Q4_K_M, TYPES, random_blocks, write_tiny_llama

CHECK = r"""
import os
import torch
from corelm import kernels
from tests.test_kquants import TYPES, random_blocks

assert kernels.load(), kernels.load_error()
print(torch.ops.corelm.isa())
x = torch.randn(70, 256, generator=torch.Generator().manual_seed(0))
for kind, t in TYPES.items():
    b = random_blocks(kind, 37, 256, seed=t)  # 37 rows: a last group of five, a last panel of five
    p = torch.ops.corelm.repack_blocks(b, t)
    assert p.numel() == 5 * p.numel() // 5 > 0, kind
    assert torch.equal(torch.ops.corelm.unpack_blocks(p, t, 37, 256), b), kind
    for rows, pf in ((1, "0"), (1, "4096"), (5, "0"), (5, "64"), (70, "0")):  # 70: the panel GEMM on unpacked
        os.environ["CORELM_PREFETCH"] = pf  # panels; fewer: the records themselves, prefetching or not
        y = torch.ops.corelm.qlinear_packed(x[:rows], p, t, 37)
        want = (torch.ops.corelm.qlinear_blocks(x[:rows], b, t) if rows >= 64
                else torch.ops.corelm.qlinear_repacked(x[:rows], b, torch.tensor([t])))
        assert torch.equal(y, want), (kind, rows, pf, (y - want).abs().max().item())
# corelm's own int4 (groups of 32 and 128) and int8 (per channel, per 32) matrices, kept as records
from corelm.quant.layers import quantize_int4_groupwise, quantize_int8_per_channel
w = torch.randn(37, 256, generator=torch.Generator().manual_seed(1))
q4 = [(kernels.pack_blocks(q), torch.stack([s, z], -1).contiguous(), g)
      for g in (32, 128) for q, s, z in [quantize_int4_groupwise(w, g)]]
q8, s8 = quantize_int8_per_channel(w)
q8 = [(q8, s8, 256), (q8, s8[:, None].expand(37, 8).contiguous(), 32)]
for t, mats in ((1004, q4), (1008, q8)):
    for q, s, g in mats:
        p = torch.ops.corelm.repack_rows(q, s)
        rows = torch.ops.corelm.unpack_blocks(p, t, 37, 256)  # values, then each block's scales
        n = q.shape[1]
        assert torch.equal(rows[:, :n], q.view(torch.uint8)), (t, g)
        per_block = rows[:, n:].contiguous().view(torch.bfloat16).reshape(37, 8, -1)
        assert torch.equal(per_block[:, ::g // 32].reshape(s.shape), s), (t, g)
        for r, pf in ((1, "0"), (1, "4096"), (5, "64"), (70, "0")):
            os.environ["CORELM_PREFETCH"] = pf
            y = torch.ops.corelm.qlinear_packed(x[:r], p, t, 37)
            want = torch.ops.corelm.qlinear(x[:r], q, s) if r >= 64 else torch.ops.corelm.qlinear_repacked(x[:r], q, s)
            assert torch.equal(y, want), (t, g, r, (y - want).abs().max().item())
print("ok")
"""


DEFAULT = r"""
import torch
from corelm import kernels
from tests.test_kquants import random_blocks, TYPES
assert kernels.load(), kernels.load_error()
print(torch.ops.corelm.isa(), torch.ops.corelm.repack_blocks(random_blocks("Q4_1", 16, 256), TYPES["Q4_1"]).numel())
"""


@pytest.mark.parametrize("level", kernels.runnable_builds())
def test_builds_with_vectors_repack_by_default_and_the_generic_build_does_not(level):
    """Unset CORELM_REPACK: AVX2 and AVX-512 builds keep the records, the generic build its rows (its scalar
    record loops are slower than its row kernels); CORELM_REPACK=0 turns repacking off everywhere."""
    for setting, repacks in ((None, level != "generic"), ("0", False)):
        env = {k: v for k, v in os.environ.items() if k != "CORELM_REPACK"} | {"CORELM_KERNELS_ISA": level}
        if setting is not None:
            env["CORELM_REPACK"] = setting
        out = subprocess.run([sys.executable, "-c", DEFAULT], env=env, capture_output=True, text=True, timeout=600,
                             cwd=Path(__file__).resolve().parents[1], check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        isa, size = out.stdout.split()
        assert isa == level and (int(size) > 0) == repacks, (setting, out.stdout)


@pytest.fixture(autouse=True)
def _built():
    assert kernels.load(), kernels.load_error()


@pytest.mark.parametrize("level", kernels.runnable_builds())
def test_unpack_inverts_repack_and_packed_matmul_equals_rows_on_every_build(level):
    env = dict(os.environ, CORELM_KERNELS_ISA=level, CORELM_REPACK="1")  # the generic build too
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1], check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [level, "ok"]


# The arithmetics each build has: int16, int8 and amx-emulated need AVX-512 VNNI, bf16 the avx512bf16 build.
_VNNI = ("avx512vnni", "avx512bf16")
_GEMMS = {"fp32": None, "int16": _VNNI, "int8": _VNNI, "amx-emulated": _VNNI, "bf16": ("avx512bf16",), "aten": None}


@pytest.mark.parametrize("gemm", list(_GEMMS))
def test_every_panel_arithmetic_reads_unpacked_panels(gemm, monkeypatch):
    monkeypatch.setenv("CORELM_GEMM", gemm)
    x = torch.randn(67, 512)
    if _GEMMS[gemm] is not None and kernels.isa() not in _GEMMS[gemm]:  # asked of a build without it: refused
        p = torch.ops.corelm.repack_blocks(random_blocks("Q4_K", 45, 512, seed=1), TYPES["Q4_K"])
        with pytest.raises(RuntimeError, match=f"the {gemm} panel GEMM needs"):
            torch.ops.corelm.qlinear_packed(x, p, TYPES["Q4_K"], 45)
        return
    for kind in ("Q4_K", "Q5_0", "Q6_K", "IQ4_XS"):
        b = random_blocks(kind, 45, 512, seed=1)
        p = torch.ops.corelm.repack_blocks(b, TYPES[kind])
        y = torch.ops.corelm.qlinear_packed(x, p, TYPES[kind], 45)
        assert torch.equal(y, torch.ops.corelm.qlinear_blocks(x, b, TYPES[kind])), (gemm, kind)


def test_repacking_turned_off_keeps_the_rows_and_bad_bytes_are_refused(monkeypatch):
    b = random_blocks("Q4_K", 8, 768, seed=2)
    monkeypatch.setenv("CORELM_REPACK", "0")
    assert torch.ops.corelm.repack_blocks(b, TYPES["Q4_K"]).numel() == 0
    layer = kquant.GGUFBlockLinear(b, TYPES["Q4_K"], 768, repack=True)
    assert layer.packed is None and layer.blocks is layer.raw  # kept as it is
    monkeypatch.delenv("CORELM_REPACK")
    p = torch.ops.corelm.repack_blocks(random_blocks("Q8_0", 8, 64), TYPES["Q8_0"])
    with pytest.raises(RuntimeError, match="repacked bytes"):
        torch.ops.corelm.qlinear_packed(torch.randn(1, 64), p[:-1], TYPES["Q8_0"], 8)


def test_layer_keeps_only_the_records_and_round_trips_its_state_dict():
    b, bias = random_blocks("Q5_K", 21, 256, seed=4), torch.randn(21)
    layer = kquant.GGUFBlockLinear(b, TYPES["Q5_K"], 256, bias, repack=True)
    assert layer.raw is None and layer.packed is not None
    assert torch.equal(layer.blocks, b)
    values, fmt = layer.kernel_weights()
    assert values is layer.packed and fmt.tolist() == [TYPES["Q5_K"], 21]
    x = torch.randn(3, 256)
    plain = kquant.GGUFBlockLinear(b, TYPES["Q5_K"], 256, bias)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
    state = layer.state_dict()
    assert sorted(state) == ["bias", "blocks"] and torch.equal(state["blocks"], b)
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())
    other = kquant.GGUFBlockLinear(random_blocks("Q5_K", 21, 256, seed=5), TYPES["Q5_K"], 256, torch.zeros(21),
                                   repack=True)
    other.load_state_dict(state)
    assert other.raw is None and torch.equal(other.blocks, b) and torch.equal(other(x), layer(x))
    with pytest.raises(RuntimeError, match="blocks"):
        other.load_state_dict({"blocks": b[:20], "bias": bias})


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "tiny.gguf"
    write_tiny_llama(path, {**Q4_K_M, "attn_k": "Q5_1", "ffn_up": "Q4_0", "output": "Q8_0"})
    return path


def test_native_gguf_load_holds_one_copy_and_decodes_as_before(tiny_gguf, monkeypatch):
    from corelm.generate.step import KernelStep
    from corelm.loading import load_parts

    model = load_parts(tiny_gguf, dtype="fp32", quantize="gguf").model
    before = load_parts(tiny_gguf, dtype="fp32", quantize="gguf").model
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, kquant.GGUFBlockLinear)]
    assert len(layers) == 2 * 7 + 1
    for name, m in before.named_modules():  # the rows as the layers held them before: the step repacks them
        if isinstance(m, kquant.GGUFBlockLinear):
            parent, _, child = name.rpartition(".")
            setattr(before.get_submodule(parent) if parent else before, child,
                    kquant.GGUFBlockLinear(m.blocks, m.ggml_type, m.in_features, m.bias))
    quantized = 0
    for name, m in layers:
        assert m.raw is None and m.packed is not None, name  # no unpacked copy
        assert torch.equal(m.blocks, before.get_submodule(name).raw), name
        quantized += m.packed.numel()
    held = sum(t.numel() * t.element_size() for t in model.buffers() if t.dtype == torch.uint8)
    assert held == quantized  # (an fp32 token embedding here: no GGUF blocks besides the matrices)
    monkeypatch.setenv("CORELM_GEMM_ROWS", "32")  # the file's context is 64: a 40-token prefill on panels
    ids = torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    out = []
    with torch.inference_mode():
        for m in (model, before):
            step = KernelStep(m, kv_dtype=torch.float32)
            cache = step.new_cache(1, 64)
            prefill = step.extend(cache, 0, ids, 0)
            decode = torch.cat([step.extend(cache, 0, [t], 40 + i) for i, t in enumerate(ids[:5])])
            out.append((prefill, decode, m(torch.tensor([ids[:5]]))[0]))
    (prefill, decode, forward), (prefill0, decode0, forward0) = out
    assert torch.equal(prefill, prefill0) and torch.equal(decode, decode0)  # bit for bit
    # the layers' own forward now runs the records' kernels (the step's), before the row kernels: rounding
    torch.testing.assert_close(forward, forward0, rtol=1e-4, atol=1e-4)


def test_model_state_dict_holds_blocks_and_loads_back(tiny_gguf):
    from corelm.loading import load_parts

    model = load_parts(tiny_gguf, dtype="fp32", quantize="gguf").model
    state = model.state_dict()
    q = "model.layers.0.self_attn.q_proj.blocks"
    assert torch.equal(state[q], model.model.layers[0].self_attn.q_proj.blocks)
    assert not any(k.endswith((".packed", ".raw")) for k in state)
    fresh = load_parts(tiny_gguf, dtype="fp32", quantize="gguf").model
    for m in fresh.modules():
        if isinstance(m, kquant.GGUFBlockLinear):
            m._keep(None, torch.ops.corelm.repack_blocks(torch.zeros_like(m.blocks), m.ggml_type))
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    assert fresh.model.layers[1].mlp.down_proj.raw is None


def test_a_tied_head_and_its_embedding_share_one_repacked_copy(tmp_path):
    from corelm.generate.step import KernelStep
    from corelm.loading import load_parts

    path = tmp_path / "tied.gguf"
    write_tiny_llama(path, Q4_K_M, tied="Q8_0")
    model = load_parts(path, dtype="fp32", quantize="gguf").model
    head, embed = model.lm_head, model.model.embed_tokens
    assert isinstance(embed, kquant.GGUFBlockEmbedding) and head.packed is embed.packed is not None
    assert head.raw is None and embed.raw is None
    rows = head.blocks  # the file's rows, unpacked
    plain = kquant.GGUFBlockEmbedding(rows, TYPES["Q8_0"], 256, torch.float32)
    ids = torch.tensor([[0, 7, 95, 8, 8], [3, 1, 2, 64, 63]])
    assert torch.equal(embed.rows(ids), plain.rows(ids)) and torch.equal(embed.blocks, rows)
    assert torch.equal(model.state_dict()["model.embed_tokens.blocks"], rows)
    with torch.inference_mode():
        step = KernelStep(model, kv_dtype=torch.float32)
        cache = step.new_cache(1, 64)
        got = torch.cat([step.extend(cache, 0, [t], i) for i, t in enumerate(ids[0].tolist())])
    model.lm_head = kquant.GGUFBlockLinear(rows, TYPES["Q8_0"], 256)  # as before: rows, repacked by the step
    model.model.embed_tokens = plain
    with torch.inference_mode():
        step = KernelStep(model, kv_dtype=torch.float32)
        cache = step.new_cache(1, 64)
        want = torch.cat([step.extend(cache, 0, [t], i) for i, t in enumerate(ids[0].tolist())])
    assert torch.equal(got, want)


def test_released_file_pages_read_back_the_same(tiny_gguf):
    import numpy as np

    from corelm.io.gguf import read_gguf

    f = read_gguf(tiny_gguf)
    try:
        before = f.raw("blk.0.attn_q.weight").copy()
        f.release("blk.0.attn_q.weight")  # dropped from this process's memory, not from the map
        assert np.array_equal(f.raw("blk.0.attn_q.weight"), before)
    finally:
        f.close()


def test_prefetch_follows_the_cpu_vendor_and_bad_kernel_settings_are_one_line(monkeypatch):
    """The decode kernels prefetch 4096 bytes ahead on Intel CPUs (where it was measured) and not at all
    elsewhere; CORELM_PREFETCH overrides it, and junk in any of the kernels' settings is refused up front."""
    from corelm.errors import CorelmError

    vendor = next(line.split(":")[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("vendor_id"))
    monkeypatch.delenv("CORELM_PREFETCH", raising=False)
    assert kernels.prefetch() == (4096 if vendor == "GenuineIntel" else 0)
    monkeypatch.setenv("CORELM_PREFETCH", "2048")
    assert kernels.prefetch() == 2048
    kernels.check_settings()
    for name, value in (("CORELM_PREFETCH", "4k"), ("CORELM_PREFETCH", "-64"), ("CORELM_GEMM", "int3"),
                        ("CORELM_GEMM_ROWS", "many")):
        monkeypatch.setenv(name, value)
        with pytest.raises(CorelmError, match=f"^{name}"):
            kernels.check_settings()
        monkeypatch.delenv(name)
