"""Fine-tuning and evaluating encoder-decoders: ``finetune --task translate|summarize``, ``evaluate --task translate``,
``corelm translate``, parallel data and BLEU's tokenizer per language."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from corelm.cli import main as cli
from corelm.errors import CorelmError

transformers = pytest.importorskip("transformers")

PAIRS = [("one", "eins"), ("two", "zwei"), ("three", "drei"), ("four", "vier"), ("five", "fünf"), ("six", "sechs"),
         ("seven", "sieben"), ("eight", "acht"), ("nine", "neun"), ("ten", "zehn"), ("twenty one", "einundzwanzig"),
         ("twenty two", "zweiundzwanzig"), ("thirty", "dreißig"), ("forty", "vierzig"), ("fifty", "fünfzig"),
         ("sixty", "sechzig")]
T5_TINY = {"family": "t5", "name": "t5-test", "vocab_size": 300, "n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 48,
           "max_seq_len": 32, "gated_mlp": True, "activation": "gelu_tanh", "decoder_start_token_id": 0,
           "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Pairs as JSONL, a byte-level BPE trained on both sides by corelm, and a tiny T5 config file."""
    from corelm.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("seq2seq-data")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n" for s, t in PAIRS),
                    encoding="utf-8")
    text = root / "text.txt"
    text.write_text("".join(f"{s}\n{t}\n" for s, t in PAIRS) * 4, encoding="utf-8")
    train_tokenizer([text], vocab_size=300, show_progress=False).save(root / "tok")
    (root / "t5.json").write_text(json.dumps(T5_TINY))
    return {"data": data, "tok": root / "tok", "config": root / "t5.json", "root": root}


def _finetune(files, out: Path, *extra: str) -> dict:
    argv = ["finetune", "--model", str(files["config"]), "--tokenizer", str(files["tok"]), "--task", "translate",
            "--data", str(files["data"]), "--val", str(files["data"]), "--method", "full", "--batch-size", "8",
            "--lr", "3e-3", "--no-progress", "--json", "--out", str(out), *extra]
    assert cli(argv) == 0
    return json.loads((out / "finetune_summary.json").read_text())


@pytest.fixture(scope="module")
def t5_run(files):
    out = files["root"] / "run"
    summary = _finetune(files, out, "--steps", "40", "--save-every", "20")
    return out, summary


def test_read_parallel_formats(tmp_path):
    from corelm.data.parallel import read_parallel

    (tmp_path / "a.csv").write_text("id,text,summary\n1,long text,short\n2,\"a, b\",c\n")
    (tmp_path / "b.tsv").write_text("Hello\tHallo\nGood night\tGute Nacht\n")
    (tmp_path / "c.tsv").write_text("en\tde\nHello\tHallo\n")
    (tmp_path / "d.jsonl").write_text('{"src": "x", "tgt": "y"}\n{"src": "x"}\n')
    assert read_parallel(tmp_path / "a.csv").items == [("long text", "short"), ("a, b", "c")]
    assert read_parallel(tmp_path / "b.tsv").items == [("Hello", "Hallo"), ("Good night", "Gute Nacht")]
    assert read_parallel(tmp_path / "c.tsv", "en", "de").items == [("Hello", "Hallo")]
    with pytest.raises(CorelmError, match=r"d.jsonl:2: missing field 'target/summary/label/tgt'"):
        read_parallel(tmp_path / "d.jsonl")
    rows = read_parallel(tmp_path / "d.jsonl", skip_bad=True)
    assert rows.items == [("x", "y")] and rows.skipped == 1


def test_bleu_tokenizer_per_language():
    import sacrebleu

    from corelm.eval.bleu_rouge import bleu, bleu_tokenizer

    mecab = {lang: bleu_tokenizer(lang) for lang in ("ja", "ko")}
    assert mecab["ja"] in ("ja-mecab", "char") and mecab["ko"] in ("ko-mecab", "13a")
    assert [bleu_tokenizer(x) for x in ("de", "zh_Hant", "th", "en-US")] == ["13a", "zh", "char", "13a"]
    assert bleu_tokenizer(None, ["我喜欢猫"]) == "zh" and bleu_tokenizer(None, ["ภาษาไทย"]) == "char"
    assert bleu_tokenizer(None, ["猫が好きです"]) == mecab["ja"]
    hyps, refs = ["我 喜欢 猫", "今天 天气 很好"], ["我喜欢猫", "今天天气很好"]
    ours = bleu(hyps, refs, target_lang="zh")
    assert ours["tokenize"] == "zh"
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score)
    assert ours["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_loss_is_transformers_teacher_forced_loss(family, tmp_path):
    """The task's loss on a padded batch (label padding -100, decoder inputs shifted behind the start token) equals
    the loss transformers computes from ``labels``."""
    from corelm.finetune.tasks import TASKS
    from corelm.io.hf import load_hf_model

    torch.manual_seed(0)
    if family == "t5":
        cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0)
    else:
        cfg = transformers.BartConfig(vocab_size=50, d_model=16, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=24,
                                      decoder_ffn_dim=24, max_position_embeddings=32)
    hf = transformers.AutoModelForSeq2SeqLM.from_config(cfg).eval()
    hf.save_pretrained(tmp_path)
    _, model = load_hf_model(tmp_path)
    task = TASKS["translate"]
    items = [{"input_ids": [5, 6, 7, 8, 1], "labels": [9, 10, 1]},
             {"input_ids": [11, 12, 1], "labels": [13, 14, 15, 16, 1]}]
    batch = task.collate(items, pad_id=0)
    assert batch["labels"].tolist() == [[9, 10, 1, -100, -100], [13, 14, 15, 16, 1]]
    assert task.decoder_inputs(model, batch["labels"])[0].tolist() == [cfg.decoder_start_token_id, 9, 10, 1,
                                                                       cfg.pad_token_id]
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        ours, info = task.loss(model, batch)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert info["n_tokens"] == 8


def test_translate_run_learns_and_loads(files, t5_run, capsys):
    """A tiny T5 trained from scratch on the pairs (40 steps, batch 8) fits them: the teacher-forced loss falls
    and most greedy outputs match; corelm.load reads the run as a Seq2Seq; translate and evaluate run on it."""
    import corelm

    out, summary = t5_run
    assert summary["val_loss"] < 0.5 * summary["val_loss_before"]
    assert summary["val_exact_before"] == 0.0 and summary["val_exact"] >= 0.5
    s2s = corelm.load(out)
    assert type(s2s).__name__ == "Seq2Seq" and s2s.config.family == "t5"
    greedy = s2s.translate([s for s, _ in PAIRS], num_beams=1, max_new_tokens=16)
    assert sum(g == t for g, (_, t) in zip(greedy, PAIRS)) / len(PAIRS) == pytest.approx(summary["val_exact"])
    capsys.readouterr()
    assert cli(["translate", "--model", str(out), "--json", "--num-beams", "2", "one", "sixty"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["source"] for x in lines] == ["one", "sixty"]
    assert [x["translation"] for x in lines] == s2s.translate(["one", "sixty"], num_beams=2, max_new_tokens=32)
    assert cli(["evaluate", "--model", str(out), "--task", "translate", "--data", str(files["data"]),
                "--target-lang", "de", "--num-beams", "2", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    hyps = s2s.translate([s for s, _ in PAIRS], num_beams=2, max_new_tokens=32)
    from corelm.eval.bleu_rouge import bleu

    assert report["bleu"] == pytest.approx(bleu(hyps, [t for _, t in PAIRS], target_lang="de")["bleu"])
    assert report["tokenize"] == "13a" and report["n"] == len(PAIRS) and report["num_beams"] == 2
    assert report["exact"] == pytest.approx(sum(h == t for h, (_, t) in zip(hyps, PAIRS)) / len(PAIRS))
    assert report["copy_baseline"]["exact"] == 0.0  # no English number word is its German one


def test_untrained_model_evaluates_as_the_run_started(files, t5_run, capsys):
    """``evaluate --tokenizer`` scores the random-init model finetune --seed 0 starts from (the "before")."""
    from corelm.api import wrap
    from corelm.loading import fresh_model

    assert cli(["evaluate", "--model", str(files["config"]), "--tokenizer", str(files["tok"]), "--task", "translate",
                "--data", str(files["data"]), "--num-beams", "1", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    torch.manual_seed(0)
    s2s = wrap(fresh_model(str(files["config"]), files["tok"]))
    assert [e["output"] for e in report["examples"]] == s2s.translate([s for s, _ in PAIRS[:5]], num_beams=1,
                                                                      max_new_tokens=32)


def test_translate_run_resumes_bit_exactly(files, t5_run, tmp_path):
    """40 steps straight == 20 steps, then --resume from that checkpoint to 40 (the whole model, bit for bit)."""
    from safetensors.torch import load_file

    straight, _ = t5_run
    resumed = tmp_path / "b"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-000020", resumed / "checkpoints" / "step-000020")
    _finetune(files, resumed, "--steps", "40", "--save-every", "20", "--resume")
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_on_a_bart_checkpoint(files, tmp_path, capsys):
    """--method lora over an HF BART directory: only the adapters train (attention, self and cross), the base file is
    untouched, and corelm.load of the run (base + adapters) translates like the trained model."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    import corelm

    torch.manual_seed(0)
    tok = Tokenizer.from_file(str(files["tok"] / "tokenizer.json"))
    cfg = transformers.BartConfig(vocab_size=tok.get_vocab_size(), d_model=32, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=48,
                                  decoder_ffn_dim=48, max_position_embeddings=32, pad_token_id=0, bos_token_id=0,
                                  eos_token_id=0, decoder_start_token_id=0, forced_eos_token_id=None)
    base = tmp_path / "bart"
    transformers.BartForConditionalGeneration(cfg).save_pretrained(base)
    shutil.copy(files["tok"] / "tokenizer.json", base / "tokenizer.json")
    shutil.copy(files["tok"] / "tokenizer_config.json", base / "tokenizer_config.json")
    before = load_file(str(base / "model.safetensors"))
    out = tmp_path / "lora"
    assert cli(["finetune", "--model", str(base), "--task", "translate", "--data", str(files["data"]), "--val",
                str(files["data"]), "--method", "lora", "--rank", "4", "--steps", "6", "--batch-size", "8", "--lr",
                "1e-2", "--no-progress", "--json", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["val_loss"] < summary["val_loss_before"]
    info = json.loads((out / "corelm_task.json").read_text())
    modules = info["method_config"]["modules"]
    assert any("encoder_attn.q_proj" in m for m in modules) and any("self_attn.out_proj" in m for m in modules)
    after = load_file(str(base / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    adapter = load_file(str(out / "adapter.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    s2s = corelm.load(out)
    assert type(s2s).__name__ == "Seq2Seq"
    assert cli(["translate", "--model", str(out), "--num-beams", "2", "three", "four"]) == 0
    assert capsys.readouterr().out.splitlines() == s2s.translate(["three", "four"], num_beams=2, max_new_tokens=32)
    assert cli(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0  # the adapters folded into the base
    merged = corelm.load(tmp_path / "merged", dtype="fp32")
    settings = {"num_beams": 2, "max_new_tokens": 16}
    assert merged.translate(["three", "four"], **settings) == s2s.translate(["three", "four"], **settings)


def test_refusals(files, tmp_path):
    from corelm.finetune.run import FinetuneArgs
    from corelm.finetune.tasks import TASKS
    from corelm.presets import preset

    with pytest.raises(CorelmError, match="--tokenizer trains a new model from random weights: use --method full"):
        FinetuneArgs(model=str(files["config"]), task="translate", data=str(files["data"]), out=str(tmp_path / "x"),
                     tokenizer=str(files["tok"]), method="lora")
    with pytest.raises(CorelmError, match="--task translate needs an encoder-decoder"):
        TASKS["translate"].check_model(preset("llama-tiny"))


def test_marian_sentencepiece_only_repo_is_refused_in_one_line(tmp_path):
    """A Marian directory with source.spm/target.spm and no tokenizer.json loads (ids work), text is refused."""
    import corelm

    cfg = transformers.MarianConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                    decoder_ffn_dim=16, max_position_embeddings=16, pad_token_id=39,
                                    decoder_start_token_id=39)
    transformers.MarianMTModel(cfg).save_pretrained(tmp_path)
    for name in ("source.spm", "target.spm"):
        (tmp_path / name).write_bytes(b"\x00")
    s2s = corelm.load(tmp_path)
    assert len(s2s.generate_ids([[5, 6, 0]], max_new_tokens=3)[0]) <= 3
    with pytest.raises(CorelmError, match="ships Marian's SentencePiece source.spm/target.spm"):
        s2s.translate(["Hello"])


def test_summarize_with_an_encoder_decoder_reports_rouge(files, t5_run, tmp_path, capsys):
    """evaluate --task summarize on an encoder-decoder run decodes by beam search (not a chat prompt), ROUGE first."""
    out, _ = t5_run
    data = tmp_path / "sum.jsonl"
    data.write_text("".join(json.dumps({"text": s, "summary": t}) + "\n" for s, t in PAIRS[:4]))
    assert cli(["evaluate", "--model", str(out), "--task", "summarize", "--data", str(data), "--num-beams", "2",
                "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("metric   precision  recall      f1\nrouge1") and "BLEU" in table
    assert "source:    one\nreference: eins" in table


def test_generate_points_an_encoder_decoder_to_translate(t5_run, capsys):
    out, _ = t5_run
    assert cli(["generate", "--model", str(out), "one"]) == 2
    assert "is an encoder-decoder (t5); use corelm translate" in capsys.readouterr().err
    assert cli(["predict", "--model", str(out), "one"]) == 2
    assert "is a translate run; use corelm translate --model" in capsys.readouterr().err
