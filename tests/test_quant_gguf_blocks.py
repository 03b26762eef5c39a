"""GGUF blocks map onto corelm's int4/int8 layouts exactly, without dequantizing the weights."""

import itertools

import numpy as np
import pytest
import torch

from corelm import kernels
from corelm.quant import layers
from corelm.quant.gguf_blocks import (
    dequantize_gguf_q8_0,
    int4_from_blocks,
    int4_from_gguf,
    int4_linear_from_gguf,
)
from corelm.quant.layers import Int4Linear, Int4PackedLinear
from corelm.quant.transform import quantize_model


@pytest.fixture(params=["kernels", "pytorch"])
def path(request):
    """Layers made in the test run on corelm's C++ kernels, or on PyTorch's packed kernels."""
    if request.param == "kernels":
        assert kernels.load(), kernels.load_error()  # make test builds them: never silently skipped
        yield "kernels"
    else:
        with layers.pytorch_kernels():
            yield "pytorch"


def _q4_1_blocks(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Write GGUF Q4_1 blocks by hand (ggml layout: d, m, 16 bytes; low nibbles are elements 0..15)."""
    n, k = q.shape
    qb = q.reshape(n, k // 32, 32)
    qs = (qb[..., :16] | (qb[..., 16:] << 4)).astype(np.uint8)
    head = np.stack([d.astype(np.float16), m.astype(np.float16)], -1).view(np.uint8).reshape(n, k // 32, 4)
    return np.concatenate([head, qs], -1).reshape(n, -1)


def test_q4_1_blocks_map_to_int4_without_dequantizing(path):
    rng = np.random.default_rng(0)
    n, k = 8, 64
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    d = rng.uniform(0.01, 0.1, (n, k // 32)).astype(np.float16)
    m = rng.uniform(-1, 0, (n, k // 32)).astype(np.float16)
    raw = _q4_1_blocks(q, d, m)
    qt, scales, zeros = int4_from_gguf(raw, "Q4_1", (n, k))
    assert torch.equal(qt, torch.from_numpy(q)), "the 4-bit values are copied as they are"
    d32, m32 = torch.from_numpy(d.astype(np.float32)), torch.from_numpy(m.astype(np.float32))
    assert torch.equal(scales, d32.to(torch.bfloat16)) and torch.equal(zeros, (m32 + 8 * d32).to(torch.bfloat16))
    mod = int4_linear_from_gguf(raw, "Q4_1", (n, k))
    assert type(mod) is (Int4Linear if path == "kernels" else Int4PackedLinear)
    file_w = (q.reshape(n, -1, 32) * d[..., None].astype(np.float32) + m[..., None].astype(np.float32))
    file_w = torch.from_numpy(file_w.reshape(n, k))
    # only d and m + 8d are rounded to bf16: the weight differs by at most that rounding
    bound = (2 ** -8) * (8 * d.astype(np.float32) + np.abs(m) + 8 * d).max()
    assert (mod.dequantize() - file_w).abs().max() <= bound
    x = torch.randn(3, k)
    ref = (x if path == "kernels" else x.to(torch.bfloat16).float()) @ mod.dequantize().t()
    torch.testing.assert_close(mod(x), ref, rtol=2e-2, atol=2e-2)


def test_q8_0_blocks_dequantize():
    rng = np.random.default_rng(1)
    q = rng.integers(-127, 128, (4, 64)).astype(np.int8)
    d = rng.uniform(0.001, 0.01, (4, 2)).astype(np.float16)
    raw = np.concatenate([d[..., None].view(np.uint8).reshape(4, 2, 2),
                          q.reshape(4, 2, 32).view(np.uint8)], -1).reshape(4, -1)
    w = dequantize_gguf_q8_0(raw, (4, 64))
    ref = q.reshape(4, 2, 32).astype(np.float32) * d[..., None].astype(np.float32)
    torch.testing.assert_close(w, torch.from_numpy(ref.reshape(4, 64)))


HELD_OUT = (
    "The Industrial Revolution began in Britain in the late eighteenth century, when new machines for "
    "spinning and weaving cotton were powered first by water and then by steam. Factories grew around coal "
    "fields, canals and later railways connected cities, and millions of people moved from farms into towns. "
    "Historians still debate why it started there: cheap coal, expensive labour, secure property rights and "
    "a culture of tinkering all played a part. def mean(xs):\n    return sum(xs) / len(xs)\n"
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts of "
    "plant cells, and almost every food chain on Earth depends on it. A hash table stores keys in an array "
    "of buckets chosen by a hash function; when two keys land in the same bucket, the table either chains "
    "them in a list or probes for the next free slot, and it grows when the load factor passes a threshold "
    "so that lookups stay constant time on average. The Treaty of Westphalia in 1648 ended the Thirty "
    "Years' War and is often said to mark the beginning of the modern system of sovereign states."
)


@pytest.mark.slow
def test_embedded_int4_from_q4_1_agrees_with_dequantized_model(path):
    from corelm.io import gguf as gguf_io
    from corelm.models import build_model
    from corelm.presets import embedded_path
    from corelm.tokenizer import Tokenizer

    f = gguf_io.read_gguf(embedded_path("smollm2-135m-instruct"))
    config = gguf_io.config_from_gguf(f)
    ids = torch.tensor([Tokenizer.from_gguf(f).encode(HELD_OUT)])
    assert ids.shape[1] > 200

    def fresh():
        with torch.device("meta"):
            model = build_model(config)
        model.load_state_dict(gguf_io.load_gguf_state_dict(f, config), assign=True, strict=False)
        return model.eval()

    with torch.no_grad():
        ref = fresh()(ids).float()
        model = quantize_model(fresh(), "int4", from_gguf=f)
        layer = model.model.layers[3].mlp.up_proj
        assert type(layer) is (Int4Linear if path == "kernels" else Int4PackedLinear)
        # the 4-bit values are the file's; scale/zero differ from d and m + 8d only by bf16 rounding
        qb = gguf_io.quant_blocks(f, "blk.3.ffn_up.weight")
        q, scales, zeros = layer.quantized()
        assert torch.equal(q, int4_from_blocks(qb)[0])
        torch.testing.assert_close(scales.float(), qb.scales.float(), rtol=2**-8, atol=0)
        want_zeros = qb.mins.float() + 8 * qb.scales.float()
        torch.testing.assert_close(zeros.float(), want_zeros, rtol=2**-8, atol=1e-6)
        out = model(ids).float()
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    print(f"int4 (from Q4_1, {path}) vs dequantized fp32: top-1 agreement {agree:.4f}, mean KL {kl:.5f} nats")
    assert agree >= 0.98
    assert kl < 0.01


def test_embedded_q4_1_file_runs_as_stored_on_the_kernel_step():
    """The default load of the embedded Q4_1 file (its Q4_1 matrices, its Q8_0 tied embedding and head, the
    fp16 d and m as stored) on the C++ step against the exact fp32 dequantization of the same file, on 512
    tokens of held-out text (Python standard library source). Measured on AMD EPYC Zen 4 (avx512bf16 build):
    top-1 100.0%, mean KL 7.6e-7, max |logit difference| 0.031 (15-bit activations, fp16 KV cache); the
    int4 layers it replaced (d and m + 8d rounded to bf16) gave 98.2% and 2.3e-4."""
    import fnmatch
    import inspect
    import string
    import textwrap

    import corelm
    from corelm.generate.step import KernelStep, step_for

    ref = corelm.load("smollm2-135m-instruct", dtype="fp32")
    ids = ref.tokenizer.encode("".join(inspect.getsource(m) for m in (textwrap, string, fnmatch)))[:512]
    assert len(ids) == 512
    native = corelm.load("smollm2-135m-instruct")
    step = step_for(native.model)
    assert isinstance(step, KernelStep)
    with torch.inference_mode():
        want = ref.model(torch.tensor([ids]))[0].float()
        got = step.extend(step.new_cache(1, len(ids)), 0, ids, 0)
    logp, logq = torch.log_softmax(want, -1), torch.log_softmax(got, -1)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    gap = (got - want).abs().max().item()
    print(f"embedded Q4_1 as stored, C++ step vs fp32: top-1 {agree:.4f}, mean KL {kl:.2e}, max |dlogit| {gap:.3f}")
    assert agree >= 0.99 and kl < 1e-5 and gap < 0.1


def test_a_native_load_never_dequantizes_the_matrices_its_blocks_run(monkeypatch):
    """The default load of a GGUF file whose matrices all have block kernels reads each projection and the
    head straight into its block layer: the only tensors dequantized are the norms and the token embedding
    (no float copy of the weights, which was the load's peak memory). A load in floats still dequantizes all."""
    import corelm
    from corelm.io import gguf as gguf_io

    seen = []
    dequantize = gguf_io.dequantize
    monkeypatch.setattr(gguf_io, "dequantize", lambda raw, qtype, shape: seen.append(tuple(shape)) or
                        dequantize(raw, qtype, shape))
    native = corelm.load("smollm2-135m-instruct")
    config = native.config
    assert seen and all(len(s) == 1 or s == (config.vocab_size, config.d_model) for s in seen), set(seen)
    assert not any(p.numel() > 1 and 0 in p.stride() for p in native.model.parameters())
    seen.clear()
    corelm.load("smollm2-135m-instruct", dtype="fp32")
    assert (config.d_ff, config.d_model) in seen and (config.d_model, config.d_ff) in seen


@pytest.mark.parametrize("method,qtype", [("int8", "Q8_0"), ("int4", "Q8_0"), ("int4", "Q4_1"), ("int8", "F16")])
@pytest.mark.parametrize("tie", [True, False])
def test_quantize_at_load_from_gguf_reads_one_matrix_at_a_time(method, qtype, tie, tmp_path, monkeypatch):
    """``load_parts(file.gguf, quantize=...)`` leaves every matrix in the file until quantize_model reaches
    it (dequantized, Q/K rows un-permuted, quantized, freed), so the load never holds a float copy of the
    model; the result equals quantizing the model loaded whole in floats."""
    from corelm.config import ModelConfig
    from corelm.io import gguf as gguf_io
    from corelm.io.gguf_export import export_gguf
    from corelm.loading import load_parts
    from corelm.models import build_model
    from corelm.quant import transform

    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                         max_seq_len=64, tie_embeddings=tie, rope_theta=10000.0)
    path = export_gguf(build_model(config).eval(), tmp_path / "m.gguf", qtype)
    events = []
    dequantize, quantize_linear = gguf_io.dequantize, transform.quantize_linear
    monkeypatch.setattr(gguf_io, "dequantize", lambda raw, t, shape: events.append(("read", tuple(shape)))
                        or dequantize(raw, t, shape))
    monkeypatch.setattr(transform, "quantize_linear", lambda linear, *a: events.append(("quantize", None))
                        or quantize_linear(linear, *a))
    streamed = load_parts(path, dtype="fp32", quantize=method).model
    monkeypatch.undo()
    matrices = [e for e in events if e[0] == "quantize" or (len(e[1]) == 2 and e[1][0] != config.vocab_size)]
    if qtype == "Q4_1" and method == "int4":  # the file's blocks are the int4 layers' integers as they are
        assert not any(e[0] == "read" for e in matrices), events
    else:  # each matrix read is quantized before the next is read
        assert matrices and matrices[-1][0] == "quantize", events
        assert all(a[0] != "read" or b[0] == "quantize" for a, b in itertools.pairwise(matrices)), matrices
    reference = load_parts(path, dtype="fp32").model
    transform.quantize_model(reference, method, from_gguf=path)
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.inference_mode():
        torch.testing.assert_close(streamed(ids), reference(ids), rtol=0, atol=0)
