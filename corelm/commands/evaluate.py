"""``corelm evaluate``: perplexity, classification, NER, summarization and translation reports (tables + JSON).

Examples::

    corelm evaluate --model runs/ner --task ner --data test.conll            # entity- and tag-level reports
    corelm evaluate --model runs/cls --task classify --data test.csv         # accuracy, P/R/F1, confusion
    corelm evaluate --model smollm2-135m-instruct --task perplexity --data some.txt --json
    corelm evaluate --model smollm2-135m-instruct --task summarize --data pairs.jsonl --limit 20
    corelm evaluate --model runs/en-de --task translate --data test.jsonl --target-lang de --num-beams 4

``--task perplexity --json`` prints one JSON object with at least ``perplexity`` and ``tokens``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from corelm.commands.args import Options, as_options, option, options_from, parser_from, set_threads, threads_option
from corelm.errors import CorelmError

TASKS = ("classify", "ner", "regression", "perplexity", "summarize", "translate")
SUMMARIZE_PROMPT = "Summarize the following text in one sentence.\n\n{text}"


@dataclass
class EvaluateOptions(Options):
    """What ``corelm evaluate`` scores (a model or fine-tuning run on a data file) and how it reports."""

    model: str = option(help="a fine-tuning run directory (classify/ner; sft runs for perplexity/summarize), or any "
                             "model name/path corelm.load accepts (perplexity/summarize)")
    task: str = option(help="which evaluation to run", choices=TASKS)
    data: str = option(help="classify: CSV/JSONL; ner: CoNLL; perplexity: a UTF-8 text file; summarize: JSONL "
                            "pairs; translate: source/target pairs (JSONL, CSV, TSV). demo:<set>[:<split>] names "
                            "the built-in data (e.g. demo:packages:test)")
    json: bool = option(False, "print the report as one JSON object instead of tables")
    out: str | None = option(None, "also save the JSON report to this file")
    strict: bool = option(False, "ner: strict IOB2 entity matching (a stray I- tag starts no entity); default is "
                                 "the lenient conlleval/seqeval reading")
    window: int | None = option(None, "perplexity: tokens per forward pass (default: min(1024, context))")
    stride: int | None = option(None, "perplexity: distance between window starts (default: window/2; = window "
                                      "for disjoint chunks)")
    quantize: Literal["int8", "int4"] | None = option(
        None, "load the model with weight-only quantization (corelm.load(..., quantize=...))")
    dtype: str = option("fp32", "weight dtype (fp32 by default: metrics at reference precision)", dtype=True)
    max_len: int | None = option(None, "classify/ner: tokens per example (default: the run's)")
    batch_size: int = option(32, "classify/ner: examples per forward pass")
    text_field: str | None = option(None, "classify: text column (default: the run's); summarize: source field "
                                          "(default: text)")
    label_field: str | None = option(None, "classify: label column (default: the run's); summarize: reference "
                                           "field (default: summary)")
    scheme: Literal["iob2", "bio", "iob1"] = option("iob2", "ner: tagging scheme of the file (bio = iob2)")
    limit: int | None = option(None, "score only the first N examples")
    max_new_tokens: int = option(48, "summarize/translate: tokens generated per output")
    num_beams: int = option(4, "translate/summarize with an encoder-decoder: beam width (1 = greedy)")
    target_lang: str | None = option(None, "translate: the references' language (de, zh, ja, ...), which picks "
                                           "sacrebleu's tokenizer (default: guessed from their script)")
    tokenizer: str | None = option(None, "translate/summarize: --model is a preset or config file and this its "
                                         "tokenizer: score the untrained model (random weights, seed 0), the "
                                         "'before' of corelm finetune --tokenizer")
    skip_bad: bool = option(False, "skip malformed rows (reporting how many) instead of stopping")
    progress: bool = option(True, "progress bars")
    threads: int | None = threads_option()

    def check(self) -> None:
        if self.scheme == "bio":  # the same tags under their other name
            self.scheme = "iob2"


def build_parser() -> argparse.ArgumentParser:
    return parser_from(EvaluateOptions, prog="corelm evaluate", description=__doc__.split("\n\n")[0].strip("`"))


def evaluate(options: EvaluateOptions | str, *values: Any, **named: Any) -> dict[str, Any]:
    """Score ``options.model`` on ``options.data`` for ``options.task``; returns the report (what ``--json`` prints)
    and, with ``options.out``, saves it there too. ``evaluate(model, task, data, ...)`` is
    ``evaluate(EvaluateOptions(...))``."""
    return _evaluate(as_options(EvaluateOptions, options, values, named))[0]


def _evaluate(options: EvaluateOptions) -> tuple[dict[str, Any], str]:
    """The report and its tables as text."""
    from corelm.data.demo import resolve

    args = dataclasses.replace(options, data=resolve(options.data))
    set_threads(options.threads)
    start = time.perf_counter()
    if args.task in ("classify", "ner", "regression"):
        report = _labelled(args)
    elif args.task == "perplexity":
        report = _perplexity(args)
    elif args.task == "translate" or args.tokenizer or _is_seq2seq(args.model):
        report = _seq2seq(args)
    else:
        report = _summarize(args)
    report["seconds"] = round(time.perf_counter() - start, 2)
    table = report.pop("_table")
    if args.out:
        from corelm.io.atomic import atomic_file

        with atomic_file(args.out) as tmp:
            tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report, table


def main(argv: list[str]) -> int:
    args = options_from(EvaluateOptions, build_parser().parse_args(argv))
    report, table = _evaluate(args)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(table)
        if args.out:
            print(f"report saved to {args.out}")
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _limit(items: list, n: int | None) -> list:
    return items[:n] if n else items


def _labelled(args: EvaluateOptions) -> dict[str, Any]:
    """classify / ner / regression: run a fine-tuned model over a labelled file and score it (the task's own report)."""
    from corelm.finetune.methods import TASK_FILE
    from corelm.finetune.tasks import DataOptions, get_task
    from corelm.loading import is_run, load_run

    if not is_run(args.model):
        raise CorelmError(f"--task {args.task} needs a fine-tuning run directory (corelm finetune --out DIR); "
                          f"{args.model} is not one")
    try:
        info = json.loads((Path(args.model) / TASK_FILE).read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise CorelmError(f"{Path(args.model) / TASK_FILE} is unreadable ({exc})") from None
    kind = info.get("task") if isinstance(info, dict) else None
    if kind != args.task:
        raise CorelmError(f"{args.model} was fine-tuned for {kind}, not {args.task}")
    task = get_task(args.task)
    # the data before the model: a bad file fails in a moment, not after loading the weights
    fields = info.get("fields") or {}
    options = DataOptions(args.text_field or fields.get("text", "text"),
                          args.label_field or fields.get("label", "label"),
                          args.scheme, args.skip_bad)
    rows = task.read(args.data, options)
    if rows.skipped:
        _say(rows.note())
    run = load_run(args.model, dtype=args.dtype, quantize=args.quantize)
    items = _limit(rows.items, args.limit)
    report, table = task.report(run, items, args.max_len or run.task["max_len"], source=args.data,
                                batch_size=args.batch_size, progress=args.progress, strict=args.strict)
    report.update({"task": args.task, "model": str(args.model), "data": args.data, "n": len(items),
                   "method": run.task["method"], "quantize": args.quantize})
    report["_table"] = table
    return report


def _load_lm(args: EvaluateOptions) -> Any:
    """An LLM from a name/path or an sft run directory."""
    import corelm
    from corelm.api import wrap
    from corelm.loading import is_run, load_run

    if is_run(args.model):
        run = load_run(args.model, dtype=args.dtype, quantize=args.quantize)
        if run.task["task"] != "sft":
            raise CorelmError(f"{args.model} is a {run.task['task']} run; --task {args.task} needs a language model")
        return wrap(run.parts())
    llm = corelm.load(args.model, dtype=args.dtype, quantize=args.quantize)
    if llm.config.is_encoder:
        raise CorelmError(f"{args.model} is an encoder; --task {args.task} needs a decoder (causal LM)")
    return llm


def _perplexity(args: EvaluateOptions) -> dict[str, Any]:
    from corelm.data.tasks import read_text
    from corelm.eval.perplexity import perplexity

    text = read_text(args.data)
    llm = _load_lm(args)
    ids = llm.tokenizer.encode(text)
    if args.limit:
        ids = ids[:args.limit]
    if len(ids) < 2:
        raise CorelmError(f"{args.data} has fewer than 2 tokens")
    window = args.window or min(1024, llm.config.max_seq_len)
    if window > llm.config.max_seq_len:
        raise CorelmError(f"--window {window} exceeds the model's context of {llm.config.max_seq_len} tokens")
    stride = args.stride or max(1, window // 2)
    if not 1 <= stride <= window:
        raise CorelmError(f"--stride must be between 1 and --window ({window}), got {stride}")
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ids) - 1, unit="tok", desc="perplexity", file=sys.stderr, leave=False)
    llm.model.eval()
    result = perplexity(llm.model, ids, window, stride, progress=bar.update if bar else None)
    if bar:
        bar.close()
    result.update({"model": str(args.model), "data": args.data, "quantize": args.quantize,
                   "dtype": str(next(llm.model.parameters()).dtype).removeprefix("torch.")})
    result["_table"] = (f"perplexity {result['perplexity']:.4f} (mean NLL {result['nll']:.4f} nats) over "
                        f"{result['tokens']} tokens, window {window}, stride {stride}")
    return result


def _is_seq2seq(model: str) -> bool:
    """True when ``model`` names an encoder-decoder (read from its config, or its run's task, without weights)."""
    from corelm.finetune.methods import TASK_FILE
    from corelm.loading import config_for, is_run

    try:
        if is_run(model) and not (Path(model) / "config.json").is_file():
            return json.loads((Path(model) / TASK_FILE).read_text(encoding="utf-8")).get("task") in (
                "translate", "summarize")
        return config_for(model, None).is_seq2seq
    except (CorelmError, ValueError, OSError):
        return False  # the loader will say what is wrong with it


def _seq2seq(args: EvaluateOptions) -> dict[str, Any]:
    """translate / summarize with an encoder-decoder: beam-search outputs scored with BLEU, chrF and ROUGE,
    next to the copy baseline (each source as its own output)."""
    import torch

    import corelm
    from corelm.data.parallel import read_parallel
    from corelm.eval.bleu_rouge import bleu, format_generation_report, format_translation_report, generation_report
    from corelm.generate.seq2seq import Seq2Seq, decoding_overrides

    rows = read_parallel(args.data, args.text_field, args.label_field, args.skip_bad)
    if rows.skipped:
        _say(rows.note())
    pairs = _limit(rows.items, args.limit)
    if args.tokenizer:
        from corelm.api import wrap
        from corelm.loading import fresh_model

        torch.manual_seed(0)  # corelm finetune --seed 0 draws the same initial weights
        s2s = wrap(fresh_model(args.model, args.tokenizer))
        s2s.model.eval()
    else:
        s2s = corelm.load(args.model, dtype=args.dtype, quantize=args.quantize)
    if not isinstance(s2s, Seq2Seq):
        raise CorelmError(f"--task {args.task} with a {s2s.config.family} model: translation needs an encoder-decoder "
                          "(T5, BART, Marian); summarize a decoder's way with an instruction model")
    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), unit="text", desc=args.task, file=sys.stderr, leave=False)
    overrides = decoding_overrides(s2s, args.num_beams, min(args.max_new_tokens, s2s.config.max_seq_len))
    hyps = s2s.translate([src for src, _ in pairs], batch_size=args.batch_size,
                         progress=bar.update if bar else None, **overrides)
    if bar:
        bar.close()
    refs = [ref for _, ref in pairs]
    report = generation_report(hyps, refs, target_lang=args.target_lang)
    copy = bleu([src for src, _ in pairs], refs, tokenize=report["tokenize"])
    # exact match: the share of outputs equal to their reference (surrounding spaces aside)
    exact, copy_exact = (sum(a.strip() == r.strip() for a, r in zip(outs, refs)) / len(refs)
                         for outs in (hyps, [src for src, _ in pairs]))
    report.update({"task": args.task, "model": str(args.model), "data": args.data, **overrides,
                   "target_lang": args.target_lang, "exact": exact,
                   "copy_baseline": {"bleu": copy["bleu"], "chrf": copy["chrf"], "exact": copy_exact},
                   "examples": [{"source": s, "reference": r, "output": h}
                                for (s, r), h in list(zip(pairs, hyps))[:5]]})
    table = format_translation_report(report) if args.task == "translate" else format_generation_report(report)
    table += (f"\nexact    {exact:.1%} of the outputs equal their reference\ncopy baseline (each source as its "
              f"output): BLEU {copy['bleu']:.2f}, chrF {copy['chrf']:.2f}, exact {copy_exact:.1%}")
    for ex in report["examples"]:
        table += f"\n\nsource:    {ex['source']}\nreference: {ex['reference']}\noutput:    {ex['output']}"
    report["_table"] = table
    return report


def _summarize(args: EvaluateOptions) -> dict[str, Any]:
    from corelm.data.tasks import read_pairs
    from corelm.eval.bleu_rouge import format_generation_report, generation_report

    rows = read_pairs(args.data, args.text_field or "text", args.label_field or "summary", args.skip_bad)
    if rows.skipped:
        _say(rows.note())
    pairs = _limit(rows.items, args.limit)
    llm = _load_lm(args)
    hyps = []
    iterator = pairs
    if args.progress:
        from tqdm import tqdm

        iterator = tqdm(pairs, unit="doc", desc="summarize", file=sys.stderr, leave=False)
    for source, _ in iterator:
        messages = [{"role": "user", "content": SUMMARIZE_PROMPT.format(text=source)}]
        out = llm.chat(messages, max_new_tokens=args.max_new_tokens, temperature=0.0)
        hyps.append(out.strip().split("\n")[0].strip())
    report = generation_report(hyps, [ref for _, ref in pairs])
    report.update({"task": "summarize", "model": str(args.model), "data": args.data,
                   "prompt": SUMMARIZE_PROMPT, "examples": [{"reference": r, "generated": h}
                                                            for (_, r), h in list(zip(pairs, hyps))[:3]]})
    table = format_generation_report(report)
    for ex in report["examples"]:
        table += f"\n\nreference: {ex['reference']}\ngenerated: {ex['generated']}"
    report["_table"] = table
    return report
