"""corelm's GGUF block quantizer (corelm.quant.gguf_quantize) and the mixes `corelm quantize --method Q4_K_M` writes.

Per block type: the quantize -> dequantize error is within the type's resolution; gguf-py reads the
bytes back to the values corelm's own readers give (and its quantizer writes the same bytes, where
gguf-py has one); the K types equal llama-quantize's bytes on a SmolLM2 matrix. Per mix: each
tensor's type is llama-quantize's. End to end: a `corelm quantize --method Q4_K_M` file loads on
corelm's block kernels.

Top-1 agreement with fp32 on held-out text (256 tokens of Python standard library source), per block
type, on the C++ step. The fp32 reference is the embedded SmolLM2-135M dequantized from its Q4_1 file,
so the float weights already sit on a 4-bit grid; requantizing them to another grid adds rounding noise
(the 31 levels of a 5-bit 32-value block do not line up with the 15 steps of the Q4_1 block; Q4_K's
scale search finds them, Q4_1 keeps them), and on this text even Q8_0 flips
near-tied predictions (35 of the first 512 positions have their top two fp32 logits within 0.1; Q8_0's
dequantized weights in an fp32 forward flip the same tokens as the kernels). Only Q4_1, which keeps the
reference's own grid and, on its blocks as stored, its fp16 scales, reaches the issue's bar, top-1 >= 99%
(100%: only the 15-bit activations and fp32 summation differ); each other type is held to a floor a little
under its measured value instead (docs/compression.md lists the figures); the bar needs a reference with
unquantized weights. What the kernels add to the file's own rounding is held to the bar: against an fp32
forward of each type's own dequantized weights they agree on >= 99% of top-1 tokens (measured: 100% for
every type; max logit difference 0.03-0.07).
"""

import copy
import fnmatch
import hashlib
import inspect
import string
import textwrap

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from corelm.errors import CorelmError
from corelm.quant import kquant
from corelm.quant.gguf_blocks import int4_linear_from_gguf
from corelm.quant.gguf_quantize import BLOCK_SIZE, BLOCK_TYPES, MIXES, quantize_blocks, tensor_type

BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8, "IQ4_NL": 4,
        "IQ4_XS": 4}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210,
               "IQ4_NL": 18, "IQ4_XS": 136}
LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # gguf-py quantizes these itself


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(64, 512) * 0.02
    w[torch.rand_like(w) < 0.002] *= 8  # a few outliers, as trained weights have
    return w


def _gguf_dequantize(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(blocks.numpy(), getattr(GGMLQuantizationType, qtype)))


@pytest.mark.parametrize("qtype", BLOCK_TYPES)
def test_round_trip_error_is_within_the_types_resolution(gaussian, qtype):
    blocks = quantize_blocks(gaussian, qtype)
    assert blocks.dtype == torch.uint8 and blocks.shape == (64, 512 // BLOCK_SIZE[qtype] * BLOCK_BYTES[qtype])
    err = _gguf_dequantize(blocks, qtype) - gaussian
    rel_rms = (err.square().mean().sqrt() / gaussian.square().mean().sqrt()).item()
    # uniform rounding of a 32-value block spanning ~4 sigma leaves ~2^-bits of the RMS; twice that is the bound
    assert 2.0 ** -BITS[qtype] / 4 < rel_rms < 2 * 2.0 ** -BITS[qtype], rel_rms
    if qtype in LEGACY:  # one scale per 32 values: the step is the block's extreme over the codes' half-range
        x = gaussian.reshape(64, -1, 32)
        amax, span = x.abs().amax(-1, keepdim=True), x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)
        step, worst = {"Q4_0": (amax / 8, 1.05), "Q5_0": (amax / 16, 1.05),  # the far end clamps by one step
                       "Q8_0": (amax / 127, 0.55), "Q4_1": (span / 15, 0.55), "Q5_1": (span / 31, 0.55)}[qtype]
        assert (err.reshape(64, -1, 32).abs() <= worst * step).all()


def test_k_types_are_at_least_as_accurate_as_the_32_value_types_of_their_width(gaussian):
    def rms(qtype: str) -> float:
        return (_gguf_dequantize(quantize_blocks(gaussian, qtype), qtype) - gaussian).square().mean().item()

    assert rms("Q4_K") < rms("Q4_1") < rms("Q4_0")
    assert rms("Q5_K") < rms("Q5_1") < rms("Q5_0")
    assert rms("Q8_0") < rms("Q6_K") < rms("Q5_K")


@pytest.mark.parametrize("qtype", LEGACY)
def test_legacy_bytes_equal_gguf_pys_quantizer(gaussian, qtype):
    ours = quantize_blocks(gaussian, qtype).numpy()
    theirs = quants.quantize(gaussian.numpy(), getattr(GGMLQuantizationType, qtype))
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("qtype", [t for t in BLOCK_TYPES if t in kquant.TYPE_IDS])
def test_corelm_reads_the_blocks_to_gguf_pys_values(gaussian, qtype):
    blocks = quantize_blocks(gaussian, qtype)
    ours = kquant.dequantize_blocks(blocks, kquant.TYPE_IDS[qtype], 512)
    torch.testing.assert_close(ours, _gguf_dequantize(blocks, qtype), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_int4_layers_take_the_blocks_to_gguf_pys_values(gaussian, qtype):
    blocks = quantize_blocks(gaussian, qtype)
    layer = int4_linear_from_gguf(blocks, qtype, (64, 512))
    # the 4-bit codes are copied; the int4 layers hold d and m + 8d in bf16 (8 bits): |m| + 8d + 15d <= 4 amax
    zero_bf16 = 2.0 ** -9 * 4 * gaussian.abs().reshape(64, -1, 32).amax(-1).repeat_interleave(32, -1)
    diff = (layer.dequantize().float() - _gguf_dequantize(blocks, qtype)).abs()
    assert (diff <= zero_bf16 + 1e-6).all() and diff.mean() < 5e-5


def test_edge_blocks():
    w = torch.zeros(2, 256)
    w[1, :32] = 0.5  # one value throughout a sub-block; the rest zero
    for qtype in BLOCK_TYPES:
        back = _gguf_dequantize(quantize_blocks(w, qtype), qtype)
        torch.testing.assert_close(back, w, rtol=0, atol=2e-3, msg=qtype)
    with pytest.raises(CorelmError, match="whole blocks of 256"):
        quantize_blocks(torch.zeros(2, 576), "Q4_K")
    with pytest.raises(CorelmError, match="unknown GGUF block type"):
        quantize_blocks(w, "Q3_K")


# --------------------------------------------------------------------------------------------------
# SmolLM2: llama-quantize's bytes, its mixes, and top-1 agreement on the C++ kernels
# --------------------------------------------------------------------------------------------------

# sha256 of blk.0.ffn_down.weight as llama-quantize --pure writes it from an F32 export of the embedded
# SmolLM2 (corelm export smollm2-135m-instruct f32.gguf --type F32; llama.cpp's reference quantizers)
# (IQ4_NL / IQ4_XS: every one of the file's 211 / 30 tensors of that type was byte-identical, 2026-12-06)
LLAMA_QUANTIZE_SHA256 = {
    "Q4_K": "7a46652ed272410d01ed18e54a6e4fd92f5dfbc8788dbcd688bedca169f49bde",
    "Q6_K": "1d8054fa97a5b0a307b9911370f84d9ddea525f779030f32b062b4b8590c8be5",
    "IQ4_NL": "b48fdc0aaf8a7396972232b8e4cb4588e3a8e76cd178e361d99affe525afd410",
    "IQ4_XS": "203fd12f4ec62534b476e88f22c54541eb9b10ed038b210fa263ea70afb499c4",
}
N_TOKENS = 256
NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2 in fp32, a fixed slice of held-out text, and its fp32 log-probabilities."""
    import corelm

    llm = corelm.load("smollm2-135m-instruct", dtype="fp32")
    text = "".join(inspect.getsource(m) for m in (textwrap, string, fnmatch))
    ids = llm.tokenizer.encode(text)[:N_TOKENS]
    assert len(ids) == N_TOKENS
    with torch.inference_mode():
        logp = torch.log_softmax(llm.model(torch.tensor([ids]))[0].float(), -1)
    head = _layer(llm.model.model.embed_tokens.weight.detach(), "Q8_0")  # Q8_0 as in llama.cpp's files; shared
    return llm.model, ids, logp, head


@pytest.mark.slow
@pytest.mark.parametrize("qtype", sorted(LLAMA_QUANTIZE_SHA256))
def test_k_bytes_equal_llama_quantize(smollm2, qtype):
    model = smollm2[0]
    blocks = quantize_blocks(model.model.layers[0].mlp.down_proj.weight.detach(), qtype)
    assert hashlib.sha256(blocks.numpy().tobytes()).hexdigest() == LLAMA_QUANTIZE_SHA256[qtype]


def _smollm2_types(mix: str) -> dict[str, str]:
    """The type of every SmolLM2 matrix in ``mix`` (576 wide, 1536 for ffn_down; the head is the tied embedding)."""
    out = {"token_embd.weight": tensor_type("token_embd.weight", mix, 576, 30, tied=True)}
    for i in range(30):
        for gg in NAMES.values():
            name = f"blk.{i}.{gg}.weight"
            out[name] = tensor_type(name, mix, 1536 if gg == "ffn_down" else 576, 30)
    return out


def test_mix_types_are_llama_quantizes():
    # llama-quantize on SmolLM2 (its Q4_K_M file's tensor types): 576 columns are no whole super-block
    from collections import Counter

    q4km = _smollm2_types("Q4_K_M")
    assert q4km["token_embd.weight"] == "Q8_0"
    assert Counter(t for n, t in q4km.items() if "attn_v" in n) == {"Q5_0": 16, "Q8_0": 14}
    assert Counter(t for n, t in q4km.items() if "ffn_down" in n) == {"Q4_K": 16, "Q6_K": 14}
    assert {t for n, t in q4km.items() if any(g in n for g in ("attn_q", "attn_k.", "attn_output", "gate", "up"))} \
        == {"Q5_0"}
    more = [i for i in range(30) if q4km[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert set(_smollm2_types("Q6_K").values()) == {"Q8_0", "Q6_K"}
    assert set(_smollm2_types("Q4_0").values()) == {"Q4_0", "Q8_0"}  # the head: Q6_K, which falls back
    # llama-quantize's IQ4 mixes of SmolLM2 (no importance matrix): ffn_down of the first eighth of the layers at
    # Q5_K, IQ4_XS's 576-wide rows at IQ4_NL (no whole super-block), the head Q8_0
    for mix, counts in (("IQ4_NL", {"IQ4_NL": 207, "Q5_K": 3, "Q8_0": 1}),
                        ("IQ4_XS", {"IQ4_NL": 180, "IQ4_XS": 27, "Q5_K": 3, "Q8_0": 1})):
        types = _smollm2_types(mix)
        assert Counter(types.values()) == counts, mix
        assert [n for n, t in types.items() if t == "Q5_K"] == [f"blk.{i}.ffn_down.weight" for i in range(3)]
    assert tensor_type("blk.0.attn_v.weight", "IQ4_XS", 4096, 32, n_gqa=4) == "Q5_K"  # GQA of 4 and more
    assert tensor_type("blk.0.attn_v.weight", "IQ4_XS", 4096, 32, n_gqa=3) == "IQ4_XS"
    # a 4096-wide, 32-layer model (Llama 2 7B): llama.cpp's Q4_K_M gives Q6_K to 16 attn_v / ffn_down and the head
    v = [i for i in range(32) if tensor_type(f"blk.{i}.attn_v.weight", "Q4_K_M", 4096, 32) == "Q6_K"]
    assert v == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert tensor_type("output.weight", "Q4_K_M", 4096, 32) == "Q6_K"
    assert tensor_type("token_embd.weight", "Q4_K_M", 4096, 32) == "Q4_K"
    assert tensor_type("blk.3.ffn_up.weight", "Q5_K_M", 4096, 32) == "Q5_K"
    assert tensor_type("blk.4.ffn_down.weight", "Q5_K_M", 11008, 32) == "Q5_K"
    assert tensor_type("blk.3.ffn_down.weight", "Q5_K_M", 11008, 32) == "Q6_K"
    with pytest.raises(CorelmError, match="unknown GGUF mix"):
        tensor_type("output.weight", "Q3_K_M", 4096, 32)


def _layer(weight: torch.Tensor, qtype: str) -> torch.nn.Module:
    """The layer corelm's GGUF loader builds for a matrix stored as ``qtype`` blocks (every type, Q4_0/Q4_1
    included, on its blocks as stored)."""
    return kquant.GGUFBlockLinear(quantize_blocks(weight, qtype), kquant.TYPE_IDS[qtype], weight.shape[1])


def _agreement(smollm2, qtype: str) -> tuple[float, float]:
    """Every matrix whose rows are whole ``qtype`` blocks in ``qtype`` (the others Q8_0: SmolLM2's 576
    columns hold no K super-block, so a K type is measured on the 30 ffn_down matrices), the head Q8_0
    as in llama.cpp's files; run on the C++ step. Returns (top-1 agreement, mean KL(fp32 || quantized))."""
    from corelm.generate.step import KernelStep, step_for

    reference, ids, logp, head = smollm2
    model = copy.deepcopy(reference)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name in NAMES:
                if (linear := getattr(parent, name, None)) is not None:
                    w = linear.weight.detach()
                    setattr(parent, name, _layer(w, qtype if w.shape[1] % BLOCK_SIZE[qtype] == 0 else "Q8_0"))
    model.lm_head = head
    model.corelm_quantization = {"method": "gguf"}
    step = step_for(model)
    assert isinstance(step, KernelStep)
    with torch.inference_mode():
        logits = step.extend(step.new_cache(1, len(ids)), 0, ids, 0)
    logq = torch.log_softmax(logits, -1)
    agree = (logits.argmax(-1) == logp.argmax(-1)).float().mean().item()
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    own = _dequantized_forward(reference, model, ids)  # the same blocks' weights in an fp32 forward
    kernel_agree = (logits.argmax(-1) == own.argmax(-1)).float().mean().item()
    print(f"{qtype}: top-1 {agree:.2%}, mean KL {kl:.5f}; kernels against the fp32 forward of the blocks' own "
          f"weights: top-1 {kernel_agree:.2%}, max |logit diff| {(logits - own).abs().max():.3f}")
    return agree, kl, kernel_agree


def _dequantized_forward(reference, quantized, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) of ``reference`` with every matrix ``quantized`` holds in blocks replaced by the
    blocks' dequantized fp32 weights, head included: the kernels' model in floats."""
    model = copy.deepcopy(reference)
    for ours, theirs in zip(model.model.layers, quantized.model.layers):
        for parent, qparent in ((ours.self_attn, theirs.self_attn), (ours.mlp, theirs.mlp)):
            for name in NAMES:
                if (linear := getattr(parent, name, None)) is not None:
                    linear.weight.data = getattr(qparent, name).dequantize().float()
    head = quantized.lm_head.dequantize().float()
    model.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False)
    model.lm_head.weight.data = head
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0].float()


# measured on this text (256 tokens; AMD EPYC Zen 4, AVX-512 VNNI kernels): top-1 agreement / mean KL were
# Q8_0 96.5% / 0.0015, Q6_K 97.3% / 0.0062, Q5_K 94.5% / 0.0059, Q5_1 82.4% / 0.133, Q5_0 82.8% / 0.089,
# Q4_K 95.3% / 0.0054, Q4_1 100% / 8.6e-7 (98.8% / 1.2e-4 when it ran as int4 layers with bf16 d and m + 8d),
# Q4_0 76.6% / 0.271, IQ4_NL 77.0% / 0.193, IQ4_XS 85.2% / 0.074 (its ffn_down only; the 576-wide matrices Q8_0).
# Floors sit ~1.5 points (and 1.5x KL) away; Q4_1's at the bar. (SmolLM2's weights are the Q4_1 file's: a 4-bit
# type on another grid, Q4_0 or IQ4_NL, rounds them a second time.) IQ4_NL and IQ4_XS are measured, not kept
# here: their scale search over SmolLM2 takes 40 s / 12 s of the suite (their kernels: 100% top-1 against the fp32
# forward of the same blocks then; tests/test_kquants.py checks them on every build, and their bytes equal
# llama-quantize's above).
FLOORS = {"Q8_0": (0.95, 0.003), "Q6_K": (0.955, 0.01), "Q5_K": (0.93, 0.01), "Q5_1": (0.80, 0.2),
          "Q5_0": (0.80, 0.14), "Q4_K": (0.93, 0.01), "Q4_1": (0.99, 1e-5), "Q4_0": (0.73, 0.4)}


@pytest.fixture(scope="module", params=list(FLOORS))
def agreement(request, smollm2):
    return request.param, *_agreement(smollm2, request.param)


@pytest.mark.slow
def test_top1_agreement_floor(agreement):
    qtype, agree, kl, _ = agreement
    floor, max_kl = FLOORS[qtype]
    assert agree >= floor and kl <= max_kl, (qtype, agree, kl)


@pytest.mark.slow
def test_kernels_agree_with_the_fp32_forward_of_their_own_weights(agreement):
    """Each block type's kernels (15/16-bit integer activations, fp16 KV cache, the model's fp32 norms) against
    an fp32 forward of the same blocks dequantized: what running a file on corelm's kernels costs, apart from
    the file's own rounding. Top-1 >= 99% on the held-out text, per block type."""
    qtype, _, _, kernel_agree = agreement
    assert kernel_agree >= 0.99, (qtype, kernel_agree)


# --------------------------------------------------------------------------------------------------
# corelm quantize --method Q4_K_M: a file corelm runs on its block kernels
# --------------------------------------------------------------------------------------------------

def test_quantize_command_writes_a_mix_corelm_runs(tmp_path):
    import corelm
    from corelm.commands.decoding import describe_decoder
    from corelm.commands.quantize import QuantizeOptions, quantize
    from corelm.config import ModelConfig
    from corelm.io import gguf as gguf_io
    from corelm.io.gguf_export import export_gguf
    from corelm.models import build_model

    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=256, d_ff=512,
                         max_seq_len=64, tie_embeddings=True, rope_theta=10000.0)
    model = build_model(config).eval()
    src = export_gguf(model, tmp_path / "f32.gguf", "F32")
    out = quantize(QuantizeOptions(str(src), tmp_path / "q.gguf", method="Q4_K_M"))
    f = gguf_io.read_gguf(out)
    kinds = {n: t.qtype.name for n, t in f.tensors.items() if len(t.shape) == 2}
    assert f.metadata["general.file_type"] == MIXES["Q4_K_M"][0]
    f.close()
    assert kinds["token_embd.weight"] == "Q6_K"  # the tied head
    assert kinds["blk.0.attn_v.weight"] == "Q4_K" and kinds["blk.1.attn_v.weight"] == "Q6_K"  # use_more_bits
    assert kinds["blk.0.ffn_down.weight"] == "Q4_K" and kinds["blk.1.ffn_down.weight"] == "Q6_K"
    llm = corelm.load(out)
    assert llm.model.corelm_quantization["file_type"] == "Q4_K_M"
    assert describe_decoder(llm.model).startswith("Q4_K_M, GGUF blocks as stored")
    q8 = corelm.load(quantize(QuantizeOptions(str(src), tmp_path / "q8.gguf", method="Q8_0")))
    ids = torch.randint(0, 96, (1, 12))

    def rel(m: torch.nn.Module) -> float:
        with torch.inference_mode():
            ref = model(ids)
            return ((m(ids).float() - ref).norm() / ref.norm()).item()

    # random Gaussian weights: ~8% RMS error per 4-bit matrix, ~0.7% at 8 bits
    assert rel(q8.model) < 0.03 < rel(llm.model) < 0.2, (rel(q8.model), rel(llm.model))
    with pytest.raises(CorelmError, match="name it"):
        quantize(QuantizeOptions(str(src), tmp_path / "q.bin", method="Q4_K_M"))
    with pytest.raises(CorelmError, match="GGUF method"):
        quantize(QuantizeOptions(str(src), tmp_path / "q2.gguf", method="int4"))
    with pytest.raises(CorelmError, match="exists"):
        quantize(QuantizeOptions(str(src), out, method="Q8_0"))


def test_quantize_command_lists_every_mix():
    from typing import get_args, get_type_hints

    from corelm.commands.quantize import QuantizeOptions

    methods = get_args(get_type_hints(QuantizeOptions)["method"])
    assert set(methods) == {"int8", "int4", *MIXES}
