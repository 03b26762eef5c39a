"""Metrics equal their reference libraries (scikit-learn, seqeval, sacrebleu) and hand-checked values."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

from corelm.eval.bleu_rouge import bleu, lcs_length, rouge, rouge_pair, tokenize
from corelm.eval.metrics import accuracy, classification_report, confusion_matrix
from corelm.eval.ner import entities, entity_report, iob1_to_iob2


def _random_labels(seed: int, n: int = 200) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    classes = ["cat", "dog", "eel", "fox"]
    y_true = [rng.choice(classes) for _ in range(n)]
    # a predictor that is right 60% of the time and never predicts "fox"
    y_pred = [t if rng.random() < 0.6 and t != "fox" else rng.choice(classes[:3]) for t in y_true]
    return y_true, y_pred


def test_classification_report_equals_sklearn() -> None:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    from sklearn.metrics import confusion_matrix as sk_confusion

    y_true, y_pred = _random_labels(0)
    labels = sorted(set(y_true))
    report = classification_report(y_true, y_pred, labels=labels)
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for avg in ("micro", "macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        assert (report[avg]["precision"], report[avg]["recall"], report[avg]["f1"]) == pytest.approx((p, r, f))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        row = report["per_class"][label]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert report["per_class"]["fox"]["precision"] == 0.0  # never predicted: 0, not NaN
    assert confusion_matrix(y_true, y_pred, labels) == sk_confusion(y_true, y_pred, labels=labels).tolist()
    assert accuracy(["a", "b"], ["a", "a"]) == 0.5


def _random_tags(rng: random.Random, n: int) -> list[str]:
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    return [rng.choice(tags) for _ in range(n)]


@pytest.mark.parametrize("strict", [False, True])
def test_entity_report_equals_seqeval(strict: bool) -> None:
    from seqeval.metrics import classification_report as seq_report
    from seqeval.scheme import IOB2

    rng = random.Random(7)
    y_true = [_random_tags(rng, rng.randint(1, 12)) for _ in range(60)]
    y_pred = [_random_tags(rng, len(s)) for s in y_true]
    kwargs = {"mode": "strict", "scheme": IOB2} if strict else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = seq_report(y_true, y_pred, output_dict=True, zero_division=0, **kwargs)
    ours = entity_report(y_true, y_pred, strict=strict)
    assert set(ours["per_class"]) == {k for k in ref if not k.endswith(" avg")}
    for kind, row in ours["per_class"].items():
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (ref[kind]["precision"], ref[kind]["recall"], ref[kind]["f1-score"], ref[kind]["support"]))
    for avg in ("micro", "macro", "weighted"):
        assert (ours[avg]["precision"], ours[avg]["recall"], ours[avg]["f1"]) == pytest.approx(
            (ref[f"{avg} avg"]["precision"], ref[f"{avg} avg"]["recall"], ref[f"{avg} avg"]["f1-score"]))


def test_strict_and_lenient_differ_on_a_stray_inside_tag() -> None:
    tags = ["O", "I-LOC", "I-LOC", "O", "B-PER", "I-PER"]
    assert entities(tags) == [(0, "LOC", 1, 2), (0, "PER", 4, 5)]
    assert entities(tags, strict=True) == [(0, "PER", 4, 5)]
    assert iob1_to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC"]) == ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]


def test_bleu_equals_sacrebleu_and_uses_zh_tokenizer_for_chinese() -> None:
    import sacrebleu

    hyps = ["the cat sat on the mat", "a quick brown fox jumps", "hello there world"]
    refs = ["the cat is on the mat", "the quick brown fox jumped", "hello world"]
    assert bleu(hyps, refs)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    zh_h, zh_r = ["猫坐在垫子上。"], ["猫在垫子上。"]
    ours = bleu(zh_h, zh_r)
    assert ours["tokenize"] == "zh"
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(zh_h, [zh_r], tokenize="zh").score)
    assert ours["bleu"] > 0


def test_rouge_hand_checked_english() -> None:
    # hyp "the cat sat on the mat" / ref "the cat is on the mat"
    # unigrams: overlap the,cat,on,the,mat = 5 of 6 / 6; bigrams: the-cat, on-the, the-mat = 3 of 5 / 5;
    # LCS: the cat on the mat = 5
    r = rouge_pair("The cat sat on the mat.", "the cat is on the mat")
    assert r["rouge1"]["f1"] == pytest.approx(5 / 6)
    assert r["rouge2"]["f1"] == pytest.approx(3 / 5)
    assert r["rougeL"]["f1"] == pytest.approx(5 / 6)


def test_rouge_chinese_is_character_level_and_hand_checked() -> None:
    # hyp 猫坐在垫子上 (6 chars) vs ref 猫在垫子上 (5 chars):
    # ROUGE-1: overlap 5 -> P 5/6, R 5/5; ROUGE-2: hyp bigrams 猫坐 坐在 在垫 垫子 子上, ref 猫在 在垫 垫子 子上,
    # overlap 3 -> P 3/5, R 3/4; ROUGE-L: LCS 猫在垫子上 = 5.
    r = rouge(["猫坐在垫子上。"], ["猫在垫子上。"])
    assert r["rouge1"]["precision"] == pytest.approx(5 / 6) and r["rouge1"]["recall"] == pytest.approx(1.0)
    assert r["rouge2"]["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert r["rougeL"]["f1"] == pytest.approx(2 * (5 / 6) / (5 / 6 + 1))
    assert rouge(["今天天气很好"], ["明日下雨"])["rouge1"]["f1"] == 0.0  # no shared character


def test_tokenize_keeps_non_latin_scripts() -> None:
    assert tokenize("Hello, 世界!") == ["hello", "世", "界"]
    assert tokenize("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # vowel signs stay inside the word
    assert tokenize("Привет МИР") == ["привет", "мир"]
    assert tokenize("ที่นี่") == ["ที่", "นี่"]  # Thai: one token per base character, its marks attached
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4


def _tiny_lm() -> torch.nn.Module:
    from corelm.config import ModelConfig
    from corelm.models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                      max_seq_len=64)
    return build_model(cfg).eval()


def test_perplexity_sliding_window_matches_explicit_contexts() -> None:
    from corelm.eval.perplexity import perplexity, windows

    model = _tiny_lm()
    ids = torch.randint(0, 50, (30,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(ids[None])[0, :-1], ids[1:])
    # one window covering everything = the plain causal-LM loss
    one = perplexity(model, ids, window=64)
    assert one["tokens"] == 29 and one["nll"] == pytest.approx(float(full), rel=1e-5)
    # window 8, stride 4: each token t is scored with the context the window schedule gives it
    spans = windows(30, 8, 4)
    assert spans[0][1] == 1 and spans[-1][2] == 30
    assert sum(end - first for _, first, end in spans) == 29  # every token after the first, once
    total = 0.0
    with torch.no_grad():
        for begin, first, end in spans:
            for t in range(first, end):  # score token t from ids[begin:t] alone
                logits = model(ids[None, begin:t])[0, -1]
                total += float(torch.nn.functional.cross_entropy(logits[None], ids[t:t + 1]))
    slid = perplexity(model, ids, window=8, stride=4)
    assert slid["tokens"] == 29
    assert slid["perplexity"] == pytest.approx(math.exp(total / 29), rel=1e-4)
    assert slid["perplexity"] != pytest.approx(one["perplexity"], rel=1e-6)  # context length matters


def test_a_quantized_decoder_is_scored_on_the_cpp_step(monkeypatch) -> None:
    """An int8 decoder's perplexity comes from its C++ step (window by window, only the scored positions
    through the head) and equals the PyTorch forward of the same quantized layers up to the kernels' fp32
    summation order; with the step unavailable, the PyTorch forward gives it."""
    import importlib

    from corelm import kernels
    from corelm.generate.step import KernelStep
    from corelm.quant.transform import quantize_model

    assert kernels.load(), kernels.load_error()
    ppl = importlib.import_module("corelm.eval.perplexity")  # the module (corelm.eval exports the function)
    model = quantize_model(_tiny_lm(), "int8")
    ids = torch.randint(0, 50, (60,), generator=torch.Generator().manual_seed(2))
    calls = []
    extend = KernelStep.extend
    monkeypatch.setattr(KernelStep, "extend", lambda self, *a, **k: calls.append(k["at"]) or extend(self, *a, **k))
    on_step = ppl.perplexity(model, ids, window=16, stride=8)
    assert [len(at) for at in calls] == [15, 8, 8, 8, 8, 8, 4]  # the scored positions of each window
    monkeypatch.setattr(ppl, "_kernel_step", lambda model: None)
    on_torch = ppl.perplexity(model, ids, window=16, stride=8)
    assert on_step["tokens"] == on_torch["tokens"] == 59
    assert on_step["perplexity"] == pytest.approx(on_torch["perplexity"], rel=1e-4)
