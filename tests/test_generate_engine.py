"""The generation engine against full forwards, against itself in batches, and against transformers."""

from __future__ import annotations

import pytest
import torch
import transformers

from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.generate.engine import SamplingParams, beam_search, generate, generate_stream, sample_next, stream
from corelm.io.hf import config_to_hf, state_dict_to_hf
from corelm.models import build_model
from corelm.ops.sampling import filter_top_k, filter_top_p
from tests.helpers import greedy_by_full_forward

transformers.logging.set_verbosity_error()
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [27, 18], [5, 8, 13, 21, 34, 55, 89, 44, 33, 12, 7]]


def _tiny(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny model with weights large enough that its greedy continuations are not one repeated token."""
    torch.manual_seed(seed)
    config = ModelConfig(family=family, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2 if family == "llama" else None,
                         d_model=64, d_ff=96, max_seq_len=64)
    model = build_model(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 or name.endswith("bias") else p.normal_(1.0, 0.1)
    return model


def _hf_twin(model: torch.nn.Module) -> transformers.PreTrainedModel:
    config = model.config
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(config))
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    hf.load_state_dict(state_dict_to_hf(config, model.state_dict()), strict=False)
    hf.tie_weights()
    return hf


@pytest.fixture(scope="module")
def llama():
    return _tiny("llama")


@pytest.fixture(scope="module")
def llama_hf(llama):
    return _hf_twin(llama)



@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_greedy_equals_alone_equals_full_forward(family):
    model = _tiny(family)
    params = SamplingParams(max_new_tokens=10)
    batch = generate(model, PROMPTS, params)
    alone = [generate(model, [p], params)[0] for p in PROMPTS]
    assert batch == alone
    assert alone[0] == greedy_by_full_forward(model, PROMPTS[0], 10)
    assert len(set(map(tuple, batch))) == 3 and len(set(batch[0])) > 2  # the outputs are not degenerate


def test_batch_mixing_long_prompt_and_long_generation_stays_in_each_rows_window():
    """Row 0 fills its window with the prompt, row 1 with generation: neither runs past 64 positions."""
    model = _tiny("gpt2")  # learned positions: a position >= 64 would be an index error
    long_prompt = [int(t) for t in torch.randint(0, 97, (54,), generator=torch.Generator().manual_seed(1))]
    params = [SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=40)]
    batch = generate(model, [long_prompt, PROMPTS[0]], params)
    assert batch == [generate(model, [long_prompt], params[0])[0], generate(model, [PROMPTS[0]], params[1])[0]]
    assert [len(row) for row in batch] == [10, 40]


def test_greedy_matches_transformers_generate(llama, llama_hf):
    prompt = PROMPTS[2]
    ref = llama_hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert generate(llama, [prompt], SamplingParams(max_new_tokens=12))[0] == ref[0, len(prompt):].tolist()


def test_repetition_penalty_matches_transformers(llama, llama_hf):
    hf = llama_hf
    prompt = PROMPTS[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                      eos_token_id=None, pad_token_id=0)
    ours = generate(llama, [prompt], SamplingParams(max_new_tokens=12, repetition_penalty=1.5))[0]
    assert ours == ref[0, len(prompt):].tolist()
    assert ours != generate(llama, [prompt], SamplingParams(max_new_tokens=12))[0]


def test_beam_search_matches_transformers(llama, llama_hf):
    hf = llama_hf
    prompt = PROMPTS[0]
    params = SamplingParams(max_new_tokens=8)
    ref = hf.generate(torch.tensor([prompt]), num_beams=3, max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    beams = beam_search(llama, prompt, params, num_beams=3)
    assert beams == ref[0, len(prompt):].tolist()
    assert beams != generate(llama, [prompt], params)[0]  # this case is one where beams beat greedy
    assert beam_search(llama, prompt, params, num_beams=1) == generate(llama, [prompt], params)[0]


def test_seeded_sampling_is_reproducible_and_batch_independent(llama):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    first = generate(llama, [PROMPTS[0]], params)[0]
    assert generate(llama, [PROMPTS[0]], params)[0] == first
    others = [SamplingParams(max_new_tokens=5, temperature=0.7, seed=1), SamplingParams(max_new_tokens=12)]
    assert generate(llama, [PROMPTS[1], PROMPTS[0], PROMPTS[2]], [others[0], params, others[1]])[1] == first
    different = generate(llama, [PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))[0]
    assert different != first
    assert generate(llama, [PROMPTS[0]], SamplingParams(max_new_tokens=12, temperature=1.0, top_k=1, seed=3))[0] == \
        generate(llama, [PROMPTS[0]], SamplingParams(max_new_tokens=12))[0]


def test_stop_tokens_eos_and_max_tokens(llama):
    greedy = generate(llama, [PROMPTS[0]], SamplingParams(max_new_tokens=10))[0]
    stop_at = greedy[4]
    cut = greedy[: greedy.index(stop_at)]
    assert generate(llama, [PROMPTS[0]], SamplingParams(max_new_tokens=10, stop_token_ids=[stop_at]))[0] == cut
    assert generate(llama, [PROMPTS[0]], SamplingParams(max_new_tokens=10), eos_token_id=stop_at)[0] == cut
    assert generate(llama, [PROMPTS[0]], SamplingParams(max_new_tokens=10, ignore_eos=True),
                    eos_token_id=stop_at)[0] == greedy
    assert generate(llama, [PROMPTS[0]], SamplingParams(max_new_tokens=3))[0] == greedy[:3]
    assert generate(llama, [PROMPTS[0]], SamplingParams(max_new_tokens=0))[0] == []


def test_streaming_yields_tokens_as_produced_and_can_stop_early(llama):
    params = SamplingParams(max_new_tokens=10)
    expected = generate(llama, [PROMPTS[2]], params)[0]
    it = stream(llama, PROMPTS[2], params)
    assert next(it) == expected[0]
    assert list(it) == expected[1:]
    steps = generate_stream(llama, PROMPTS, params)
    first_step = next(steps)
    steps.close()  # the caller ends generation early (e.g. a stop string was seen)
    assert first_step == [row[0] for row in generate(llama, PROMPTS, SamplingParams(max_new_tokens=1))]
    hooked = generate(llama, PROMPTS, params, should_stop=lambda row, toks: row == 1 and len(toks) == 2)
    assert hooked[1] == generate(llama, [PROMPTS[1]], params)[0][:2] and hooked[0] == expected[:0] + hooked[0]


@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"repetition_penalty": 0.0},
    {"max_new_tokens": -1}, {"temperature": float("nan")}, {"num_beams": 0},
])
def test_invalid_sampling_parameters_are_clear_errors(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(CorelmError, match=name):
        SamplingParams(**kwargs)


def test_prompt_beyond_context_window_is_a_clear_error(llama):
    with pytest.raises(CorelmError, match=r"60 tokens.*max_new_tokens \(10\).*64"):
        generate(llama, [list(range(60))], SamplingParams(max_new_tokens=10))
    with pytest.raises(CorelmError, match="empty"):
        generate(llama, [[]], SamplingParams(max_new_tokens=1))


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_p(logits, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_p(logits, 0.5)).tolist() == [[False, True, True, True]]
    assert torch.isinf(filter_top_p(logits, 0.81)).tolist() == [[False, False, False, True]]
    g = torch.Generator().manual_seed(0)
    draws = [sample_next(logits, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(200)]
    assert set(draws) == {0, 1}
    assert sample_next(logits, SamplingParams(repetition_penalty=10.0), None, history=[0]) == 1
