"""Turn text into packed, memory-mapped token shards plus a JSON manifest.

Output directory (``corelm prepare ... --out data/tok``)::

    manifest.json                 format, tokenizer, vocab size, dtype, EOS and special ids, split counts
    tokenizer.json, tokenizer_config.json
    train-00000.bin ...           flat token ids (uint16 when the vocabulary fits, else uint32)
    val-00000.bin

Documents are tokenized in batches (the ``tokenizers`` library spreads a batch over all cores),
each followed by EOS, and appended to the shard of their split; a document goes to ``val`` when a
fixed hash of its index falls under ``val_fraction``, so the split is reproducible. Everything is
written into a hidden temporary sibling of ``<out>`` and renamed into place at the end
(:func:`corelm.io.atomic.atomic_dir`): a failed, interrupted (SIGINT/SIGTERM) or disk-full run leaves
neither a directory that looks complete nor the temporary one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from corelm.data.text import read_lines, read_text
from corelm.errors import CorelmError
from corelm.io.atomic import atomic_dir

FORMAT = "corelm-tokens-v1"
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".py"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
PARQUET_SUFFIXES = {".parquet"}
MLM_SPECIALS = {"pad_token": "<pad>", "mask_token": "<mask>", "cls_token": "<cls>", "sep_token": "<sep>"}


@dataclass
class Document:
    text: str
    source: str  # "file" or "file:line", for error messages


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named directly, plus the text/JSONL/Parquet files found under named directories (sorted)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and f.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES | PARQUET_SUFFIXES)
            if not found:
                raise CorelmError(f"{p} contains no .txt/.md/.jsonl/.parquet files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise CorelmError(f"input not found: {p}")
    return files


def read_documents(files: list[Path], field: str = "text") -> Iterator[Document]:
    """Documents of each file: a whole text file, one JSONL line's ``field``, one Parquet row's ``field``.

    Raises:
        CorelmError: naming the file (and line) of unreadable or malformed input.
    """
    for path in files:
        suffix = path.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            yield from _parquet(path, field)
        elif suffix in JSONL_SUFFIXES:
            yield from _jsonl(path, field)
        else:
            text = read_text(path)
            if text.strip():
                yield Document(text, str(path))


def _jsonl(path: Path, field: str) -> Iterator[Document]:
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorelmError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise CorelmError(f"{path}:{lineno}: invalid JSON (nested too deeply)") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise CorelmError(f"{path}:{lineno}: invalid JSON ({str(exc).split(';')[0]})") from None
        if not isinstance(record, dict) or field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise CorelmError(f"{path}:{lineno}: no field {field!r} (has: {keys}); choose it with --field")
        text = record[field]
        if not isinstance(text, str):
            raise CorelmError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise CorelmError(f"{path}:{lineno}: field {field!r} holds a lone surrogate escape "
                              "(\\ud800-\\udfff), which is not Unicode text") from None
        if text.strip():
            yield Document(text, f"{path}:{lineno}")


def _parquet(path: Path, field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise CorelmError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    if field not in pf.schema_arrow.names:
        raise CorelmError(f"{path}: no column {field!r} (has: {', '.join(pf.schema_arrow.names)}); "
                          "choose it with --field")
    row = 0
    batches = pf.iter_batches(columns=[field])
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # noqa: BLE001 - a corrupt page deep in the file, in pyarrow's many types
            raise CorelmError(f"{path}: unreadable Parquet data after row {row} ({str(exc).splitlines()[0]})") from None
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str) and text.strip():
                yield Document(text, f"{path}:row {row}")


def load_tokenizer(spec: str) -> Any:
    """A corelm Tokenizer from an embedded model name, a model/tokenizer directory or a ``tokenizer.json``."""
    from corelm.presets import EMBEDDED, embedded_path
    from corelm.tokenizer import Tokenizer

    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return Tokenizer.from_gguf(path)
    if path.is_file():
        return Tokenizer.from_file(path)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if spec in EMBEDDED:
        weights = embedded_path(spec)
        return Tokenizer.from_gguf(weights) if weights.suffix == ".gguf" else Tokenizer.from_dir(weights)
    from corelm.errors import close_names

    raise CorelmError(f"tokenizer {spec!r} is neither a file, a directory nor an embedded model"
                      f"{close_names(spec, list(EMBEDDED))}")


def train_default_tokenizer(texts: Iterable[str], vocab_size: int, work_dir: Path) -> Any:
    """Byte-level BPE trained on the corpus, with BERT-style specials added for masked LM.

    The vocabulary is exactly ``vocab_size``: BPE learns ``vocab_size - 4`` entries, then ``<pad>``,
    ``<mask>``, ``<cls>``, ``<sep>`` are appended (``<|endoftext|>`` is the EOS).
    """
    from corelm.tokenizer import Tokenizer, train_tokenizer

    sample = work_dir / "tokenizer-train.txt"
    with open(sample, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(text)
            f.write("\n\n")
    tok = train_tokenizer([sample], kind="bpe", vocab_size=vocab_size - len(MLM_SPECIALS), show_progress=False)
    sample.unlink()
    tok.backend.add_special_tokens(list(MLM_SPECIALS.values()))
    special = {**tok.special_tokens_map, **MLM_SPECIALS}
    return Tokenizer(tok.backend, special_tokens=special)


def _is_val(index: int, val_fraction: float) -> bool:
    # Knuth's multiplicative hash (offset so document 0 is not always held out): a fixed, well-spread
    # pseudo-random split of document indices.
    return (((index + 1) * 2654435761) % 2**32) / 2**32 < val_fraction


class _ShardWriter:
    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._f = None
        self._n = 0

    def add(self, ids: list[int]) -> None:
        if self._f is None or self._n >= self.shard_tokens:
            self._open()
        # file.write, not ndarray.tofile: a full disk then raises OSError(ENOSPC), which names the cause
        self._f.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self._n += len(ids)
        self.shards[-1]["tokens"] = self._n
        self.documents += 1

    def _open(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._f = open(self.out / name, "wb")  # noqa: SIM115 - stays open across add() calls
        self._n = 0
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def _check_prepare_args(out: Path, inputs: list[str] | None, corpus: str | None, val_fraction: float,
                        overwrite: bool) -> None:
    """Fail before any work on arguments that cannot give a prepared directory."""
    if not inputs and not corpus:
        raise CorelmError("nothing to prepare: give input files/directories or --corpus NAME")
    if not 0.0 <= val_fraction < 1.0:
        raise CorelmError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if out.exists():
        if not (out / "manifest.json").is_file() and any(out.iterdir()):
            raise CorelmError(f"{out} exists and is not a prepared data directory; choose another --out")
        if (out / "manifest.json").is_file() and not overwrite:
            raise CorelmError(f"{out} already holds prepared data; pass --overwrite to replace it")


def _tokenizer(spec: str | None, texts: Iterable[str], vocab_size: int, work_dir: Path,
               progress: bool) -> tuple[Any, str]:
    """The tokenizer ``spec`` names, or a byte-level BPE trained on ``texts``; with where it came from."""
    if spec:
        return load_tokenizer(spec), spec
    if progress:
        print(f"training a byte-level BPE tokenizer ({vocab_size} entries) on the corpus...",
              file=sys.stderr, flush=True)
    tok = train_default_tokenizer(texts, vocab_size, work_dir)
    return tok, f"byte-level BPE trained on this corpus ({vocab_size})"


def prepare(
    out: str | Path,
    *,
    inputs: list[str] | None = None,
    corpus: str | None = None,
    tokenizer: str | None = None,
    train_tokenizer_vocab: int = 8192,
    field: str = "text",
    val_fraction: float = 0.01,
    shard_tokens: int = 100_000_000,
    batch_docs: int = 512,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize ``inputs`` (files/dirs) or an embedded ``corpus`` into shards under ``out``.

    Args:
        out: output directory (must not exist, or be a previous prepared directory with ``overwrite``).
        inputs: text/JSONL/Parquet files or directories.
        corpus: an embedded corpus name instead of (or besides) ``inputs``.
        tokenizer: embedded model name, directory or ``tokenizer.json``; ``None`` trains a byte-level
            BPE of ``train_tokenizer_vocab`` entries on the corpus.
        field: JSONL key / Parquet column holding the text.
        val_fraction: share of documents held out for validation.
        shard_tokens: tokens per shard file.
        batch_docs: documents per tokenizer batch.
        progress: show a progress bar.
        overwrite: replace an existing prepared directory.

    Returns:
        The manifest.
    """
    from tqdm.auto import tqdm

    from corelm.data.corpus import corpus_description, corpus_documents

    out = Path(out)
    _check_prepare_args(out, inputs, corpus, val_fraction, overwrite)
    files = expand_inputs(inputs or [])
    sources = [corpus_description(corpus)] if corpus else []
    sources += [str(f) for f in files]

    # An embedded corpus is small (a few MB): extract it once, then stream the files.
    corpus_docs = list(corpus_documents(corpus)) if corpus else []

    def documents() -> Iterator[Document]:
        for i, text in enumerate(corpus_docs):
            yield Document(text, f"{corpus}#{i}")
        yield from read_documents(files, field)

    total_bytes = sum(f.stat().st_size for f in files) + sum(len(t.encode("utf-8")) for t in corpus_docs) or None
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:  # renamed into place at the end, removed on any failure or interrupt
        tok, tok_source = _tokenizer(tokenizer, (d.text for d in documents()), train_tokenizer_vocab, tmp, progress)
        eos = tok.eos_token_id
        if eos is None:
            raise CorelmError(f"tokenizer {tok_source!r} has no EOS token to separate documents")
        vocab = tok.vocab_size
        dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress,
                   dynamic_ncols=True)
        index = 0
        batch: list[Document] = []

        def flush() -> None:
            nonlocal index
            for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
                writers["val" if _is_val(index, val_fraction) else "train"].add(ids + [eos])
                index += 1
                bar.update(len(doc.text.encode("utf-8")) if total_bytes else 0)
            if not total_bytes:
                bar.update(0)
                bar.set_postfix(docs=index, refresh=False)
            batch.clear()

        for doc in documents():
            batch.append(doc)
            if len(batch) >= batch_docs:
                flush()
        if batch:
            flush()
        if total_bytes:  # JSONL/Parquet bytes include keys and markup that are not document text
            bar.update(max(0, total_bytes - bar.n))
        bar.close()
        for w in writers.values():
            w.close()
        if writers["train"].tokens == 0:
            if writers["val"].tokens:
                raise CorelmError("every document went to the validation split; lower --val-fraction")
            raise CorelmError("the corpus is empty: no non-blank document was found in the inputs")
        specials = {k: tok.token_to_id(v) for k, v in tok.special_tokens_map.items()}
        manifest = {
            "format": FORMAT,
            "tokenizer": "tokenizer.json",
            "tokenizer_source": tok_source,
            "vocab_size": vocab,
            "dtype": dtype.name,
            "eos_token_id": eos,
            "special_token_ids": specials,
            "splits": {s: {"tokens": w.tokens, "documents": w.documents, "shards": w.shards}
                       for s, w in writers.items()},
            "val_fraction": val_fraction,
            "sources": sources,
            "field": field,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        tok.save(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory, with a clear error when it is not one."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise CorelmError(f"{data_dir} is not prepared data (no manifest.json); run corelm prepare first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CorelmError(f"{path} is corrupt: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise CorelmError(f"{path}: unknown format {manifest.get('format')!r}")
    return manifest
