"""The fast decode path (fused projections, static per-layer cache, hand-written GQA attention) gives
the same greedy tokens and logits as the model's own forward, float and quantized."""

import pytest
import torch

from corelm.compress import quant
from corelm.generate.fast import FastDecoder
from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.models import build_model
from tests.helpers import greedy_by_full_forward


def _tiny(seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(family="llama", vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                         max_seq_len=96, rope_theta=10000.0)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return model



@pytest.mark.parametrize("method", [None, "int8", "int4"])
def test_fast_decoder_matches_model(method):
    model = _tiny()
    if method:
        quant.quantize_model(model, method, group_size=32)
    prompt = [5, 17, 3, 88, 41, 9]
    dec = FastDecoder(model, max_seq_len=64, compile=False)
    assert list(dec.generate_ids(prompt, 20)) == greedy_by_full_forward(model, prompt, 20)
    # logits of a prefill + a decode step equal the full forward's
    with torch.inference_mode():
        ids = torch.tensor(prompt + [7])
        dec.forward_tokens(ids[:-1], torch.arange(6), 64)
        step = dec.forward_tokens(ids[-1:], torch.tensor([6]), 64)
        full = model(ids[None])[0, -1].float()
    torch.testing.assert_close(step[-1], full, rtol=1e-4, atol=1e-4 if method is None else 5e-2)


def test_fast_decoder_limits():
    dec = FastDecoder(_tiny(), max_seq_len=16, compile=False)
    with pytest.raises(CorelmError, match="exceeds"):
        list(dec.generate_ids([1, 2, 3], 20))
    with pytest.raises(CorelmError, match="empty"):
        list(dec.generate_ids([], 2))
    assert dec.weight_bytes() > 0


def test_fast_stream_follows_the_engine_contract():
    from corelm.generate.fast import fast_stream
    from corelm.generate.engine import SamplingParams, stream

    model = quant.quantize_model(_tiny(1), "int8")
    prompt = [3, 1, 4, 1, 5]
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert list(fast_stream(model, prompt, greedy)) == list(stream(model, prompt, greedy))
    first = next(iter(fast_stream(model, prompt, greedy)))
    stopped = SamplingParams(max_new_tokens=12, stop_token_ids=[first])
    assert list(fast_stream(model, prompt, stopped)) == []
    sampled = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, seed=7)
    assert list(fast_stream(model, prompt, sampled)) == list(fast_stream(model, prompt, sampled))
