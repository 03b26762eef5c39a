"""GGUF block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS) on corelm's C++ kernels: the
kernel equals the PyTorch statement of its integer arithmetic, and stays within 1e-3 of fp32 against gguf-py's own
dequantizer (an independent reading of the layouts), on every instruction set this CPU runs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from corelm import kernels
from corelm.errors import CorelmError
from corelm.quant import kquant

TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "IQ4_NL": 20,
         "IQ4_XS": 23}


def random_blocks(kind: str, n: int, k: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """(n, row bytes) uint8 of valid blocks: random integer fields, fp16 scales of realistic size
    (gguf-py has no K-quant quantizer, so the blocks are built byte-wise)."""
    g = np.random.default_rng(seed)
    _, per, nbytes = kquant.FORMATS[TYPES[kind]]
    b = g.integers(0, 256, size=(n, k // per, nbytes), dtype=np.uint8)

    def half(lo: float, hi: float) -> np.ndarray:
        return g.uniform(lo * scale, hi * scale, size=(n, k // per, 1)).astype(np.float16).view(np.uint8)

    if kind in ("Q8_0", "Q5_0", "Q4_0", "IQ4_NL"):
        b[..., 0:2] = half(1e-4, 2e-3)
    elif kind == "IQ4_XS":  # d (times sub-block scales -32..31 and levels up to 127), random scales and codes
        b[..., 0:2] = half(2e-5, 2e-4)
    elif kind in ("Q5_1", "Q4_1"):
        b[..., 0:2], b[..., 2:4] = half(1e-4, 2e-3), half(-2e-2, 0)
    elif kind == "Q6_K":
        b[..., 208:210] = half(1e-4, 5e-4)
    else:  # d, dmin
        b[..., 0:2], b[..., 2:4] = half(1e-4, 5e-4), half(1e-4, 5e-4)
    return torch.from_numpy(b.reshape(n, -1))


def gguf_matrix(blocks: torch.Tensor, kind: str, k: int) -> torch.Tensor:
    w = gguf_dequantize(blocks.numpy(), GGMLQuantizationType[kind])
    return torch.from_numpy(np.ascontiguousarray(w)).reshape(blocks.shape[0], k)


@pytest.fixture(autouse=True)
def _built():
    assert kernels.load(), kernels.load_error()


@pytest.mark.parametrize("kind", list(TYPES))
def test_unpacking_matches_gguf_py(kind):
    blocks = random_blocks(kind, 7, 512)
    torch.testing.assert_close(kquant.dequantize_blocks(blocks, TYPES[kind], 512), gguf_matrix(blocks, kind, 512),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(TYPES))
@pytest.mark.parametrize("t", [1, 3, 6])
def test_kernel_equals_reference_and_fp32(kind, t):
    n, k = 40, 768
    blocks = random_blocks(kind, n, k, seed=t)
    torch.manual_seed(t)
    x = torch.randn(t, k)
    y = torch.ops.corelm.qlinear_blocks(x, blocks, TYPES[kind])
    ref = kquant.reference_qlinear_blocks(x, blocks, TYPES[kind])
    exact = x.double() @ gguf_matrix(blocks, kind, k).double().t()
    scale = exact.abs().max().item()
    # same integers, fp32 summation in another order
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6 * scale)
    assert (y.double() - exact).abs().max().item() < 1e-3 * scale
    # a row's result does not depend on how many rows come with it
    for i in range(t):
        assert torch.equal(torch.ops.corelm.qlinear_blocks(x[i:i + 1], blocks, TYPES[kind]), y[i:i + 1])


@pytest.mark.parametrize("kind", list(TYPES))
def test_gemm_path_dequantizes_exactly(kind, monkeypatch):
    monkeypatch.setenv("CORELM_GEMM", "fp32")  # the other arithmetics: tests/test_gemm.py
    blocks = random_blocks(kind, 40, 256, seed=3)  # 40 rows: a full and a partial panel of 32
    x = torch.randn(131, 256)  # >= 64 rows: dequantized panels and the fp32 panel GEMM (131: a partial tile)
    w = gguf_matrix(blocks, kind, 256)
    torch.testing.assert_close(torch.ops.corelm.qlinear_blocks(x, blocks, TYPES[kind]), x @ w.t(),
                               rtol=1e-5, atol=1e-5)


def test_layer_forward_and_fallback():
    blocks = random_blocks("Q4_K", 24, 512)
    layer = kquant.GGUFBlockLinear(blocks, TYPES["Q4_K"], 512)
    x = torch.randn(2, 3, 512)
    y = layer(x)
    assert y.shape == (2, 3, 24) and layer.kernel
    values, fmt = layer.kernel_weights()
    assert values is layer.blocks and fmt.tolist() == [12]
    layer.kernel = False  # the dequantized fallback, as without the kernels
    torch.testing.assert_close(layer(x), y, rtol=1e-3, atol=1e-3 * y.abs().max().item())


def test_block_embedding_rows_are_the_files_values():
    """A GGUF block embedding looks rows up as ggml dequantizes them: fp32 from :meth:`rows` (what the C++
    step reads), the model's dtype from ``forward``; blocks of the wrong width are refused."""
    blocks = random_blocks("Q8_0", 10, 64)
    emb = kquant.GGUFBlockEmbedding(blocks, TYPES["Q8_0"], 64, torch.bfloat16)
    ids = torch.tensor([[3, 0, 9], [3, 3, 1]])
    want = gguf_matrix(blocks, "Q8_0", 64)[ids]  # (2, 3, 64)
    torch.testing.assert_close(emb.rows(ids), want, rtol=0, atol=0)
    assert emb(ids).dtype == torch.bfloat16 and torch.equal(emb(ids), want.to(torch.bfloat16))
    torch.testing.assert_close(emb.dequantize(), gguf_matrix(blocks, "Q8_0", 64), rtol=0, atol=0)
    with pytest.raises(CorelmError, match="width 96"):
        kquant.GGUFBlockEmbedding(blocks, TYPES["Q8_0"], 96, torch.float32)


def test_layer_bias_is_added_in_fp32():
    """A biased layer (Qwen2's q/k/v) adds its fp32 bias on the kernel and on the fallback; a bias of the
    wrong length is refused."""
    blocks = random_blocks("Q8_0", 24, 64)
    bias = torch.randn(24, dtype=torch.bfloat16)
    plain, biased = (kquant.GGUFBlockLinear(blocks, TYPES["Q8_0"], 64, b) for b in (None, bias))
    assert biased.bias.dtype == torch.float32
    x = torch.randn(3, 64)
    for kernel in (True, False):
        plain.kernel = biased.kernel = kernel
        torch.testing.assert_close(biased(x), plain(x) + bias.float(), rtol=0, atol=1e-5)
    with pytest.raises(CorelmError, match="24 output rows"):
        kquant.GGUFBlockLinear(blocks, TYPES["Q8_0"], 64, torch.zeros(23))


def test_bad_shapes_are_refused():
    blocks = random_blocks("Q6_K", 4, 256)
    with pytest.raises(RuntimeError, match="210"):
        torch.ops.corelm.qlinear_blocks(torch.randn(1, 512), blocks, 14)
    with pytest.raises(RuntimeError, match="no kernel"):
        torch.ops.corelm.qlinear_blocks(torch.randn(1, 256), blocks, 10)  # Q2_K
    with pytest.raises(RuntimeError, match="no kernel"):
        torch.ops.corelm.qlinear_blocks(torch.randn(1, 96), random_blocks("Q8_0", 4, 96)[:, :0], 14)


def _supported():
    return kernels.runnable_builds()


CHECK = r"""
import os, torch
from corelm import kernels
from corelm.quant import kquant
from tests.test_kquants import random_blocks, TYPES
assert kernels.load(), kernels.load_error()
print(torch.ops.corelm.isa())
torch.manual_seed(0)
x = torch.randn(8, 512)
many = torch.randn(70, 512)  # from 64 rows: the fp32 panel GEMM on dequantized weights
os.environ["CORELM_GEMM"] = "fp32"  # the other arithmetics: tests/test_gemm.py
for kind, t in TYPES.items():
    b = random_blocks(kind, 40, 512, seed=t)
    for rows in (5, 8):  # the batched-row kernels (4 + 1, 6 with a repeated row; 8)
        y = torch.ops.corelm.qlinear_blocks(x[:rows], b, t)
        ref = kquant.reference_qlinear_blocks(x[:rows], b, t)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
        for i in range(rows):
            assert torch.equal(torch.ops.corelm.qlinear_blocks(x[i:i + 1], b, t), y[i:i + 1]), kind
    w = kquant.dequantize_blocks(b, t, 512)
    torch.testing.assert_close(torch.ops.corelm.qlinear_blocks(many, b, t), many @ w.t(), rtol=1e-5,
                               atol=1e-5 * w.abs().max().item())
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("level", _supported())
def test_every_instruction_set_build_equals_reference(level):
    env = dict(os.environ, CORELM_KERNELS_ISA=level)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300,
                         check=False, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [level, "ok"]


def write_tiny_llama(path, kinds: dict[str, str], d: int = 256, d_ff: int = 512, vocab: int = 96,
                     n_layer: int = 2, seed: int = 0, tied: str | None = None) -> None:
    """A llama GGUF whose matrices are random valid blocks of ``kinds[gguf suffix]`` (``output``: the head);
    ``tied``: no head, the token embedding in that type instead of fp32 (a tied head)."""
    from gguf import GGUFWriter

    g = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    n_head, n_kv, hd = 4, 2, d // 4
    w.add_block_count(n_layer)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(15)  # MOSTLY_Q4_K_M

    def matrix(name, n, k, kind):
        # small scales: a smooth model, whose logits do not amplify rounding differences
        b = random_blocks(kind, n, k, seed=int(g.integers(1 << 30)), scale=0.2).numpy()
        w.add_tensor(name, b, raw_shape=b.shape, raw_dtype=GGMLQuantizationType[kind])

    if tied:
        matrix("token_embd.weight", vocab, d, tied)
    else:
        w.add_tensor("token_embd.weight", g.normal(0, 1, (vocab, d)).astype(np.float32))
    shapes = {"attn_q": (d, d), "attn_k": (n_kv * hd, d), "attn_v": (n_kv * hd, d), "attn_output": (d, d),
              "ffn_gate": (d_ff, d), "ffn_up": (d_ff, d), "ffn_down": (d, d_ff)}
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        for name, (n, k) in shapes.items():
            matrix(f"blk.{i}.{name}.weight", n, k, kinds[name])
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    if not tied:
        matrix("output.weight", vocab, d, kinds["output"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


Q4_K_M = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
          "ffn_up": "Q4_K", "ffn_down": "Q6_K", "output": "Q6_K"}


@pytest.mark.parametrize("kinds", [Q4_K_M, {**Q4_K_M, "attn_q": "Q5_K", "ffn_up": "Q5_0", "attn_k": "Q5_1",
                                            "output": "Q8_0"},
                                   {**Q4_K_M, "attn_q": "Q4_0", "attn_k": "Q4_1", "ffn_gate": "Q4_1", "ffn_up": "Q4_0",
                                    "output": "Q8_0"},
                                   {**Q4_K_M, "attn_q": "IQ4_XS", "attn_k": "IQ4_NL", "attn_output": "IQ4_XS",
                                    "ffn_gate": "IQ4_XS", "ffn_up": "IQ4_NL", "ffn_down": "IQ4_XS",
                                    "output": "IQ4_XS"}])
def test_tiny_gguf_decodes_on_the_kernel_step_like_its_floats(tmp_path, kinds):
    from corelm.generate.step import KernelStep, step_for
    from corelm.loading import load_parts, stored_quantization

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, kinds)
    assert stored_quantization(path) == "gguf"
    floats = load_parts(path, dtype="fp32").model  # dequantized by corelm's reader
    default = load_parts(path).model  # the default: each matrix on its own blocks
    assert isinstance(default.model.layers[0].self_attn.q_proj, kquant.GGUFBlockLinear)
    assert isinstance(default.lm_head, kquant.GGUFBlockLinear)
    assert default.model.layers[0].self_attn.q_proj.ggml_type == kquant.TYPE_IDS[kinds["attn_q"]]  # its stored type
    assert default.lm_head.ggml_type == kquant.TYPE_IDS[kinds["output"]]
    model = load_parts(path, dtype="fp32", quantize="gguf").model  # fp32 embeddings and norms, as `floats`
    assert isinstance(step_for(model), KernelStep)
    step = KernelStep(model, kv_dtype=torch.float32)  # the blocks alone (fp16 cache: test_quant_kernel_step)
    ids = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        cache = step.new_cache(1, 64)
        steps = torch.cat([step.extend(cache, 0, [t], i) for i, t in enumerate(ids)])
        layers = model(torch.tensor([ids]))[0].float()  # the layers' own forward, op by op
        want = floats(torch.tensor([ids]))[0].float()
    # 15-bit activations: ~1e-4 relative per matmul
    assert (steps - want).norm() / want.norm() < 1e-3
    assert (steps - layers).norm() / want.norm() < 1e-4
    assert torch.equal(steps.argmax(-1), want.argmax(-1))
