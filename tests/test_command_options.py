"""Every converted command is a library function over an options dataclass; its parser is built from the
dataclass (corelm.commands.args.parser_from), so a field's documentation is its --help text."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from corelm.cli import main
from corelm.commands.args import Options, option, options_from, parser_from
from corelm.errors import CorelmError

# command -> (options dataclass, library function), both in corelm.commands.<command>
CONVERTED = {
    "models": ("ModelsOptions", "models"),
    "convert": ("ConvertOptions", "convert"),
    "predict": ("PredictOptions", "predict"),
    "prepare": ("PrepareOptions", "prepare"),
    "merge": ("MergeOptions", "merge"),
    "tokenizer": ("TrainTokenizerOptions", "tokenizer"),
    "plan": ("PlanOptions", "plan"),
    "bench": ("BenchOptions", "bench"),
    "pretrain": ("PretrainOptions", "pretrain"),
    "quantize": ("QuantizeOptions", "quantize"),
    "export": ("ExportOptions", "export"),
    "compare": ("CompareOptions", "compare"),
    "prune": ("PruneOptions", "prune"),
    "generate": ("GenerateOptions", "generate"),
    "chat": ("ChatOptions", "chat"),
    "pull": ("PullOptions", "pull"),
    "serve": ("ServeCommandOptions", "serve"),
    "finetune": ("FinetuneOptions", "finetune"),
    "distill": ("DistillOptions", "distill"),
    "evaluate": ("EvaluateOptions", "evaluate"),
}


def _help(command: str, capsys: pytest.CaptureFixture[str], *sub: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([command, *sub, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", sorted(CONVERTED))
def test_parser_is_built_from_the_options_dataclass(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"corelm.commands.{command}")
    cls_name, fn_name = CONVERTED[command]
    cls, fn = getattr(module, cls_name), getattr(module, fn_name)
    assert dataclasses.is_dataclass(cls) and callable(fn)
    sub = getattr(module, "SUBCOMMANDS", {None: cls})
    for action, options_cls in sub.items():
        out = _help(command, capsys, *([action] if action else []))
        for f in dataclasses.fields(options_cls):
            text = " ".join(f.metadata.get("help", "").split())
            assert text, f"{options_cls.__name__}.{f.name} has no help"
            assert text[:60] in out, (command, f.name, text)
            if not f.metadata.get("positional"):
                flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
                assert flag in out or flag.replace("--", "--no-") in out, (command, f.name)


@pytest.mark.parametrize("command", sorted(CONVERTED))
def test_every_argument_is_a_field(command: str) -> None:
    """No argument is added beside the dataclass: the parser's destinations are exactly the fields."""
    import argparse

    module = importlib.import_module(f"corelm.commands.{command}")
    ap = module.build_parser()
    subs = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = {None: ap} if not subs else dict(subs[0].choices)
    classes = getattr(module, "SUBCOMMANDS", {None: getattr(module, CONVERTED[command][0])})
    assert set(parsers) == set(classes)
    for action, parser in parsers.items():
        dests = {a.dest for a in parser._actions if a.dest != "help"}
        assert dests == {f.name for f in dataclasses.fields(classes[action])}, (command, action)


def test_help_works_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    from corelm.cli import COMMANDS

    for command in COMMANDS:
        if importlib.util.find_spec(f"corelm.commands.{COMMANDS[command][0]}") is None:
            continue  # a command being written
        assert f"corelm {command}" in _help(command, capsys)


# ---- the builder on a small dataclass ----------------------------------------------------------------

@dataclass(kw_only=True)
class Toy(Options):
    source: str = option(help="what to read", positional=True)
    files: list[str] = field(default_factory=list, metadata={"help": "more inputs", "positional": True})
    out: str = option(help="where to write")
    max_steps: int = option(10, "steps to run")
    lr: float = option(1e-3, "learning rate, 5% warmup")
    kind: Literal["a", "b"] = option("a", "which kind")
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings"})
    progress: bool = option(True, "a progress bar")
    json: bool = option(False, "print JSON")
    dtype: str = option("fp32", "weight dtype", dtype={"auto": False})
    device: str = option("auto", "where to run", device=True)
    qtype: str | None = option(None, "tensor type", flag="--type", choices=["F16", "Q8_0"])
    model: str | None = option(None, "a model name", group="source")
    config: str | None = option(None, "a config file", group="source")

    def check(self) -> None:
        if self.max_steps < 1:
            raise CorelmError(f"--max-steps must be >= 1, got {self.max_steps}")


def test_builder_flags_types_defaults_and_round_trip() -> None:
    ap = parser_from(Toy, prog="toy")
    opts = options_from(Toy, ap.parse_args(["in.txt", "--out", "o"]))
    assert opts == Toy(source="in.txt", out="o")
    opts = options_from(Toy, ap.parse_args([
        "in.txt", "x", "y", "--out", "o", "--max-steps", "3", "--lr", "0.5", "--kind", "b", "--stop", "s1",
        "--stop", "s2", "--no-progress", "--json", "--dtype", "bf16", "--device", "cuda:1", "--type", "Q8_0"]))
    assert opts == Toy(source="in.txt", files=["x", "y"], out="o", max_steps=3, lr=0.5, kind="b", stop=["s1", "s2"],
                       progress=False, json=True, dtype="bf16", device="cuda:1", qtype="Q8_0")
    for argv, needle in ((["in", "--out", "o", "--kind", "c"], "invalid choice"), (["in"], "--out"),
                         (["in", "--out", "o", "--dtype", "auto"], "invalid choice"),
                         (["in", "--out", "o", "--lr", "nan"], "finite"),
                         (["in", "--out", "o", "--device", "tpu"], "cuda:N"),
                         (["in", "--out", "o", "--model", "m", "--config", "c"], "not allowed with")):
        with pytest.raises(CorelmError, match=needle):
            ap.parse_args(argv)
    with pytest.raises(CorelmError, match="--max-steps must be >= 1"):
        options_from(Toy, ap.parse_args(["in", "--out", "o", "--max-steps", "0"]))
    with pytest.raises(CorelmError, match="--kind: invalid choice 'c'"):
        Toy(source="in", out="o", kind="c")  # type: ignore[arg-type]
    with pytest.raises(CorelmError, match="--device"):
        Toy(source="in", out="o", device="tpu")


def test_builder_help_is_the_field_documentation() -> None:
    text = " ".join(parser_from(Toy, prog="toy").format_help().split())
    assert "--no-progress turn off: a progress bar (on by default)" in text
    assert "learning rate, 5% warmup (default: 0.001)" in text
    assert "--type {F16,Q8_0} tensor type" in text and "(default: None)" not in text
    assert "--json print JSON" in text and "(default: False)" not in text


# ---- Python and the command line are the same function ------------------------------------------------

def test_models_from_python_equals_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from corelm.commands.models import ModelsOptions, models

    assert main(["models", "--json", "--family", "llama"]) == 0
    assert json.loads(capsys.readouterr().out) == models(ModelsOptions(family="llama"))
    with pytest.raises(CorelmError, match="--family: invalid choice"):
        ModelsOptions(family="t5")  # type: ignore[arg-type]


def test_plan_from_python_equals_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from corelm.commands.plan import PlanOptions, plan

    argv = ["--model", "smollm2-135m", "--task", "infer", "--context", "2048", "--batch", "4", "--hardware", "l4"]
    assert main(["plan", *argv, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    python = plan(PlanOptions(model="smollm2-135m", task="infer", context=2048, batch=4, hardware="l4"))
    assert json.loads(json.dumps(python.to_dict(), default=str)) == cli
    assert main(["plan", "--model", "llama-3-8b", "--config", "c.json"]) == 2  # one of the two, never both
    with pytest.raises(CorelmError, match="--model or --config, not both"):
        PlanOptions(model="llama-3-8b", config="c.json")


def test_generate_from_python_equals_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from corelm.commands.decoding import SamplingOptions
    from corelm.commands.generate import GenerateOptions, generate

    argv = ["--model", "llama-tiny", "--dtype", "fp32", "--max-new-tokens", "5", "--threads", "1"]
    assert main(["generate", *argv, "Once upon"]) == 0
    cli = capsys.readouterr().out
    stats: dict[str, float] = {}
    text = generate("Once upon", model="llama-tiny", dtype="fp32", max_new_tokens=5, threads=1, stats=stats)
    assert cli == text + "\n" and stats["new_tokens"] == 5
    with pytest.raises(CorelmError, match="--top-p must be in"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(CorelmError, match="--draft and --lookup"):
        GenerateOptions("x", draft="llama-tiny", lookup=2)


def test_chat_keeps_the_shared_options_and_its_own_default() -> None:
    from corelm.commands.chat import ChatOptions
    from corelm.commands.decoding import SamplingOptions

    assert ChatOptions().max_new_tokens == 512 and SamplingOptions().max_new_tokens == 256
    assert [f.metadata for f in dataclasses.fields(ChatOptions) if f.name == "max_new_tokens"] == \
        [f.metadata for f in dataclasses.fields(SamplingOptions) if f.name == "max_new_tokens"]
    with pytest.raises(CorelmError, match="--once needs a non-empty message"):
        ChatOptions(once=" ")


def test_pull_options_refuse_what_is_not_a_repo_id() -> None:
    from corelm.commands.pull import PullOptions

    assert PullOptions("org/name@main:model.gguf", progress=False).repo == "org/name@main:model.gguf"
    with pytest.raises(CorelmError, match="'not-a-repo' is not a Hugging Face repo id"):
        PullOptions("not-a-repo")


def test_serve_options_check_on_construction_and_give_the_server_limits() -> None:
    from corelm.commands.serve import ServeCommandOptions
    from corelm.serve.server import ServeOptions

    limits = ServeCommandOptions(max_batch=4, max_body_kb=2, max_header_kb=8, request_timeout=5.0).limits()
    assert limits == ServeOptions(max_batch=4, max_body_bytes=2048, max_header_bytes=8192, request_timeout=5.0)
    assert ServeCommandOptions().limits() == ServeOptions()  # the command's defaults are the server's
    for kwargs, message in (({"max_batch": 0}, "--max-batch must be positive, got 0"),
                            ({"body_timeout": -1.0}, "--body-timeout must be positive"),
                            ({"host": "my-laptop"}, "--host must be an IP address"),
                            ({"port": 70000}, "--port must be in 1..65535")):
        with pytest.raises(CorelmError, match=message):
            ServeCommandOptions(**kwargs)
    assert main(["serve", "--max-queue", "0"]) == 2


def test_pretrain_options_carry_every_training_loop_option() -> None:
    from corelm.commands.pretrain import PretrainOptions
    from corelm.train.loop import TrainConfig

    ours = {f.name for f in dataclasses.fields(PretrainOptions)}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= ours
    cfg = PretrainOptions(model="gpt2-tiny", data="d", out="o", max_steps=200).train_config()
    assert (cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.eval_every, cfg.out) == (200, 1e-3, 10, 20, "o")
    with pytest.raises(CorelmError, match="max_steps"):
        PretrainOptions(model="gpt2-tiny", data="d", max_steps=0)


def test_pretrain_from_python_equals_the_cli(tmp_path) -> None:
    from corelm.commands.pretrain import PretrainOptions, pretrain
    from tests.test_pretrain_cli import make_tiny_data

    tiny = make_tiny_data(tmp_path)
    common = {"model": str(tiny / "gpt2.json"), "data": str(tiny / "data"), "seq_len": 32, "batch_size": 4,
              "max_steps": 3, "eval_every": 0, "eval_batches": 2}
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    assert main(["pretrain", *argv, "--out", str(tmp_path / "cli"), "--no-progress", "--no-tensorboard",
                 "--no-measure-mfu"]) == 0
    result = pretrain(PretrainOptions(**common, out=str(tmp_path / "py"), progress=False, tensorboard=False,
                                      measure_mfu=False))
    assert result.step == 3 and result.stopped == "done"

    def losses(run):
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    assert losses(tmp_path / "py") == losses(tmp_path / "cli") and len(losses(tmp_path / "py")) == 3


def test_evaluate_from_python_equals_the_cli(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from corelm.commands.evaluate import EvaluateOptions, evaluate

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    common = {"model": "llama-tiny", "task": "perplexity", "data": str(text), "window": 32, "stride": 16}
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    assert main(["evaluate", *argv, "--json", "--no-progress", "--out", str(tmp_path / "r.json")]) == 0
    cli = json.loads(capsys.readouterr().out)
    python = evaluate(EvaluateOptions(**common, progress=False))
    assert cli.pop("seconds") >= 0 and python.pop("seconds") >= 0
    assert python == cli and cli["tokens"] > 32
    assert json.loads((tmp_path / "r.json").read_text())["perplexity"] == cli["perplexity"]
    assert EvaluateOptions(model="m", task="ner", data="d", scheme="bio").scheme == "iob2"  # as on the command line
    with pytest.raises(CorelmError, match="--task: invalid choice 'qa'"):
        EvaluateOptions(model="m", task="qa", data="d")


def test_finetune_and_distill_options_check_on_construction() -> None:
    from corelm.commands.distill import DistillOptions
    from corelm.commands.finetune import FinetuneArgs, FinetuneOptions

    assert FinetuneArgs is FinetuneOptions  # the name Python users know, and the commands' naming
    opts = FinetuneOptions(model="minilm-l6", task="ner", data="d", out="o", scheme="bio")
    assert opts.scheme == "iob2" and opts.method == "lora"
    with pytest.raises(CorelmError, match="--method: invalid choice 'qlora'"):
        FinetuneOptions(model="m", task="classify", data="d", out="o", method="qlora")
    with pytest.raises(CorelmError, match="alpha must be in"):
        DistillOptions(teacher="t", data="d", out="o", alpha=1.5)
