"""Structured output outside the server: ``llm.generate(json_schema=/json_object=/regex=/grammar=)``, the
engine's batched, sampled and beam-search paths, speculative decoding and ``corelm generate --json-schema``,
on the embedded SmolLM2-135M (Q4_1, decoding on corelm's C++ step).

Every completed output is checked by an independent reader (``jsonschema``, ``re.fullmatch``); batched
greedy rows equal their lone runs; speculative decoding under a grammar equals plain constrained greedy.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

import corelm
from corelm.cli import main
from corelm.config import ModelConfig
from corelm.errors import CorelmError
from corelm.generate import engine
from corelm.generate.constraints import apply_bitmask, mask_rows, new_bitmask
from corelm.generate.speculative import speculative_generate
from corelm.models import build_model

pytestmark = pytest.mark.slow  # loads the embedded model

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
TOPICS = ["a baker", "a pilot", "a child", "a painter", "a doctor", "a sailor", "a farmer", "a poet", "a judge",
          "a chemist", "a runner", "a singer", "a teacher", "a nurse", "a miner", "a writer", "a dancer", "a cook",
          "a guard", "a tailor"]
PROMPTS = [f"Describe {t} as JSON with a name and an age:" for t in TOPICS]
YES_NO = r" ?(yes|no)\."
GBNF = 'root ::= item "," item "," item\nitem ::= [0-9] [0-9]?'  # three numbers of one or two digits
NUMBERS = r"[0-9]{1,2},[0-9]{1,2},[0-9]{1,2}"


@pytest.fixture(scope="module")
def llm():
    return corelm.load("smollm2-135m-instruct")


def _params(llm, n: int, **kw):
    return llm._params(n, kw.get("temperature", 0.0), kw.get("top_p", 1.0), kw.get("top_k", 0), 1.0,
                       kw.get("seed"), False)


def test_twenty_documents_validate_greedy_and_sampled(llm):
    greedy = llm.generate(PROMPTS, max_new_tokens=40, json_schema=PERSON)
    sampled = llm.generate(PROMPTS, max_new_tokens=40, json_schema=PERSON, temperature=1.0, top_k=50, top_p=0.95,
                           seed=7)
    for text in greedy + sampled:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(sampled)) > 1  # sampled for real
    # a row of a batch is its lone run (greedy), and the schema may come as JSON text
    assert llm.generate(PROMPTS[19], max_new_tokens=40, json_schema=json.dumps(PERSON)) == greedy[19]


def test_the_document_ends_the_generation(llm):
    stats: dict[str, float] = {}  # with ignore_eos only the grammar can end it before max_new_tokens
    text = "".join(llm.stream_ids(llm.encode_prompt("Is the sky green? Answer:"), max_new_tokens=30,
                                  regex=YES_NO, ignore_eos=True, stats=stats))
    assert re.fullmatch(YES_NO, text)
    assert stats["new_tokens"] <= 4


def test_regex_gbnf_and_json_object(llm):
    for prompt in ("Is water wet? Answer:", "Do fish fly? Answer:"):
        assert re.fullmatch(YES_NO, llm.generate(prompt, max_new_tokens=8, regex=YES_NO))
        assert re.fullmatch(YES_NO, llm.generate(prompt, max_new_tokens=8, regex=YES_NO, num_beams=3))
    numbers = llm.generate("Some numbers: ", max_new_tokens=16, grammar=GBNF)
    assert re.fullmatch(NUMBERS, numbers), numbers
    lark = llm.generate("Some numbers: ", max_new_tokens=16, grammar='start: N "," N "," N\nN: /[0-9]{1,2}/')
    assert re.fullmatch(NUMBERS, lark), lark
    obj = llm.generate("A JSON object describing a cat:", max_new_tokens=48, json_object=True, num_beams=2)
    assert isinstance(json.loads(obj), dict)


def test_beam_search_returns_only_valid_documents(llm):
    for prompt in PROMPTS[:3]:
        text = llm.generate(prompt, max_new_tokens=40, json_schema=PERSON, num_beams=3)
        jsonschema.validate(json.loads(text), PERSON)
    # an unbounded integer: beams that run on with digits must not beat the whole document (they did when
    # forbidden tokens were masked after the log-softmax), with or without ignore_eos
    number = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    for ignore_eos in (False, True):
        text = llm.generate("A as JSON:", max_new_tokens=30, json_schema=number, num_beams=2, ignore_eos=ignore_eos)
        jsonschema.validate(json.loads(text), number)
    # too few tokens for any whole document: the best cut-off beam comes back, still a prefix of the grammar
    cut = llm.generate(PROMPTS[0], max_new_tokens=4, json_schema=PERSON, num_beams=3)
    assert cut.startswith("{") and len(llm.tokenizer.encode(cut, add_special_tokens=False)) <= 4


def test_mixed_batch_masks_only_its_constrained_rows(llm):
    ids = [llm.encode_prompt(p) for p in PROMPTS[:2]]
    params = _params(llm, 24)
    free_alone = engine.generate(llm.model, ids[1:], params)[0]
    mixed = engine.generate(llm.model, ids, params, constraints=[llm.constraint(json_schema=PERSON), None])
    assert mixed[1] == free_alone
    jsonschema.validate(json.loads(llm.tokenizer.decode(mixed[0])), PERSON)


def test_bitmask_matches_the_engines_logit_bias(llm):
    """The eager unpacking agrees with llguidance's byte-per-token mask, and None rows are left alone."""
    c = llm.constraint(json_schema=PERSON)
    c.advance(llm.tokenizer.encode("{", add_special_tokens=False)[0])
    bias = torch.frombuffer(bytearray(c.matcher.compute_logit_bias()), dtype=torch.uint8)[:llm.config.vocab_size]
    logits = torch.randn(2, llm.config.vocab_size)
    masked = mask_rows(logits.clone(), [None, c])
    assert torch.equal(masked[0], logits[0])
    assert torch.equal(torch.isfinite(masked[1]), bias > 0) and 0 < int((bias > 0).sum()) < 1000
    assert torch.equal(apply_bitmask(logits.clone(), new_bitmask(2, logits.shape[1])), logits)


def test_bad_structure_is_one_clear_error(llm):
    with pytest.raises(CorelmError, match="json schema cannot be used: Invalid type: foo"):
        llm.generate("x", max_new_tokens=2, json_schema={"type": "foo"})
    with pytest.raises(CorelmError, match=r"regex cannot be used: .*unclosed group"):
        llm.generate("x", max_new_tokens=2, regex="a(")
    with pytest.raises(CorelmError, match="GBNF"):
        llm.generate("x", max_new_tokens=2, grammar="root ::= missing")
    with pytest.raises(CorelmError, match="not json_schema and regex"):
        llm.generate("x", max_new_tokens=2, json_schema=PERSON, regex="a")


def _tiny_draft(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(family="llama", vocab_size=vocab, n_layer=1, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                         max_seq_len=256)
    return build_model(config).eval()


def test_speculative_under_a_schema_equals_constrained_greedy(llm):
    ids = llm.encode_prompt('A baker as JSON: {"name": "Bob", "age": 41}. A pilot as JSON:')
    ref = list(engine.stream(llm.model, ids, _params(llm, 40), constraint=llm.constraint(json_schema=PERSON)))
    jsonschema.validate(json.loads(llm.tokenizer.decode(ref)), PERSON)
    eos = llm.tokenizer.eos_token_id
    for proposer in ({"lookup": 2}, {"draft": llm.model}, {"draft": _tiny_draft(llm.config.vocab_size)}):
        out, stats = speculative_generate(llm.model, ids, 40, k=4, eos_token_id=eos,
                                          constraint=llm.constraint(json_schema=PERSON), **proposer)
        assert (out[:-1] if out[-1:] == [eos] else out) == ref, proposer
        if "draft" in proposer:
            assert stats.drafted > 0
    # sampling under the grammar: still a valid document
    out, _ = speculative_generate(llm.model, ids, 40, draft=_tiny_draft(llm.config.vocab_size), k=3, temperature=0.9,
                                  eos_token_id=eos, generator=torch.Generator().manual_seed(1),
                                  constraint=llm.constraint(json_schema=PERSON))
    jsonschema.validate(json.loads(llm.tokenizer.decode([t for t in out if t != eos])), PERSON)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_schema_prints_valid_json(tmp_path, capsys):
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    code, out, _ = run(["generate", "--json-schema", str(schema), "--max-new-tokens", "40", PROMPTS[0]], capsys)
    assert code == 0
    jsonschema.validate(json.loads(out), PERSON)


@pytest.mark.parametrize("extra, message", [
    (["--json-schema", '{"type": "foo"}'], "the json schema cannot be used: Invalid type: foo"),
    (["--json-schema", "missing.json"], "--json-schema is neither a file nor JSON text"),
    (["--json", "--regex", "a"], "--json and --regex are two ways"),
])
def test_cli_bad_structure_is_exit_2_one_line(extra, message, capsys):
    code, out, err = run(["generate", "--max-new-tokens", "4", *extra, "x"], capsys)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[loaded")]
    assert code == 2 and len(lines) == 1 and message in lines[0] and not out, err


def test_beam_stats_line_reports_the_whole_search(llm):
    from corelm.commands.decoding import format_stats

    stats: dict[str, float] = {}
    text = "".join(llm.stream_ids(llm.encode_prompt("Is water wet? Answer:"), max_new_tokens=8, regex=YES_NO,
                                  num_beams=2, stats=stats))
    assert re.fullmatch(YES_NO, text) and stats["beams"] == 2 and stats["search_s"] > 0
    line = format_stats({**stats, "search_s": 0.5, "new_tokens": 3})  # the search's tokens come out together
    assert line.endswith("beam search, 2 beams: 6 tok/s overall]"), line
