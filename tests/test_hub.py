"""Hugging Face repo ids as model names, offline: a fake HF cache, split GGUF files, ``corelm pull``.

The cache is laid out as huggingface_hub lays it out on disk
(``hub/models--org--name/{blobs,snapshots/<commit>,refs/main}``, snapshot entries linking into blobs/)
in a temporary ``HF_HOME``, with ``HF_HUB_OFFLINE=1``: huggingface_hub itself resolves the files, so
the test fails if corelm asks for them in a way the real cache does not answer. Nothing touches the
network.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import gguf
import pytest
import torch

import corelm
from corelm.cli import main
from corelm.errors import CorelmError
from corelm.io.gguf import read_gguf
from corelm.io.hub import RepoSpec, parse_spec, split_parts
from corelm.loading import config_for
from corelm.tokenizer import Tokenizer
from tests.test_gguf import CORPUS, write_tiny_gguf

COMMIT = "3b3e2a1c" * 5  # 40 hex digits, like a real commit hash


def cache_repo(hf_home: Path, repo_id: str, files: dict[str, Path], commit: str = COMMIT) -> Path:
    """Put ``files`` (name in the repo -> local file) into the HF cache as huggingface_hub does; the snapshot."""
    root = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for name, src in files.items():
        data = src.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot


def _tiny_tokenizer_dir(d: Path) -> Path:
    from corelm.tokenizer import train_tokenizer

    (d / "corpus.txt").write_text(CORPUS)
    tok = train_tokenizer([d / "corpus.txt"], kind="bpe", vocab_size=400, min_frequency=1, show_progress=False)
    tok.save(d / "tok")
    return d / "tok"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama written by transformers (save_pretrained: config.json, model.safetensors, ...) + tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_dir = _tiny_tokenizer_dir(tmp_path_factory.mktemp("hub-tok"))
    vocab = Tokenizer.from_dir(tok_dir).vocab_size
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                      max_position_embeddings=128, tie_word_embeddings=False))
    path = tmp_path_factory.mktemp("hf-llama")
    hf.save_pretrained(path)
    for f in tok_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- spelling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "spec"), [
    ("Qwen/Qwen2.5-0.5B-Instruct", RepoSpec("Qwen/Qwen2.5-0.5B-Instruct")),
    ("org/name@v1.0", RepoSpec("org/name", "v1.0")),
    ("org/name-GGUF:m-q4_k_m.gguf", RepoSpec("org/name-GGUF", None, "m-q4_k_m.gguf")),
    ("org/name@0123abc:sub/m.gguf", RepoSpec("org/name", "0123abc", "sub/m.gguf")),
    ("org/name-GGUF:Q4_K_M", RepoSpec("org/name-GGUF", None, "Q4_K_M")),
    ("dir/model.gguf", None),  # a file path, not a repo named "model.gguf"
    ("some/dir/model-00001-of-00003.gguf", None),
    ("../x", None), ("./x", None), ("gpt2", None), ("a--b/c", None), ("-a/b", None), ("/abs/path", None),
])
def test_parse_spec(text: str, spec: RepoSpec | None) -> None:
    assert parse_spec(text) == spec
    if spec is not None:
        assert str(spec) == text


def test_split_parts_names_every_part_in_order() -> None:
    assert split_parts("m-Q4_K_M-00002-of-00003.gguf") == [f"m-Q4_K_M-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert split_parts("m.gguf") == ["m.gguf"]


# ---- HF checkpoints by repo id ------------------------------------------------------------------------
def test_repo_id_loads_from_cache_like_the_directory(checkpoint: Path, hf_home: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    files = {f.name: f for f in checkpoint.iterdir() if f.is_file()}
    snapshot = cache_repo(hf_home, "org/name", files)
    by_repo = corelm.load("org/name", dtype="fp32")
    by_dir = corelm.load(str(checkpoint), dtype="fp32")
    assert Path(by_repo.source) == snapshot
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(by_repo.model(ids), by_dir.model(ids), rtol=0, atol=0)
    texts = []
    for model in ("org/name", str(checkpoint), f"org/name@{COMMIT}"):
        code, out, err = run(["generate", "--model", model, "--dtype", "fp32", "--max-new-tokens", "8",
                              "--ignore-eos", "The quick brown"], capsys)
        assert code == 0, err
        texts.append(out)
    assert texts[0] == texts[1] == texts[2] and texts[0].strip()
    assert config_for("org/name", None) == by_dir.config  # plan's path: config.json only


def test_existing_local_path_wins_over_repo_id(checkpoint: Path, hf_home: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").symlink_to(checkpoint)  # nothing is cached: only the local path can load
    loaded = corelm.load("org/name", dtype="fp32")
    assert loaded.config.n_layer == 2


def test_uncached_repo_offline_is_one_line_naming_corelm_pull(hf_home: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CorelmError, match=r"org/missing is not in the Hugging Face cache .*corelm pull org/missing"):
        corelm.load("org/missing")
    code, _, err = run(["generate", "--model", "org/missing", "hi"], capsys)
    assert code == 2 and "corelm pull org/missing" in one_line(err)


def test_incomplete_snapshot_is_not_taken_for_a_model(checkpoint: Path, hf_home: Path) -> None:
    cache_repo(hf_home, "org/partial", {"config.json": checkpoint / "config.json"})  # weights never arrived
    with pytest.raises(CorelmError, match="corelm pull org/partial"):
        corelm.load("org/partial")


# ---- GGUF files by repo:file, split files -------------------------------------------------------------
@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The same tiny llama as one GGUF file and as a two-part split written by gguf's own splitter."""
    d = tmp_path_factory.mktemp("gguf-split")
    write_tiny_gguf(d / "tiny.gguf")
    original = gguf.GGUFWriter
    gguf.GGUFWriter = functools.partial(original, split_max_tensors=11)  # 21 tensors -> 2 files
    (d / "split").mkdir()
    try:
        write_tiny_gguf(d / "split" / "tiny.gguf")
    finally:
        gguf.GGUFWriter = original
    parts = sorted((d / "split").glob("*.gguf"))
    assert [p.name for p in parts] == ["tiny-00001-of-00002.gguf", "tiny-00002-of-00002.gguf"]
    return d / "tiny.gguf", parts


def test_split_gguf_reads_as_the_unsplit_file(ggufs: tuple[Path, list[Path]]) -> None:
    single, parts = ggufs
    whole, split = read_gguf(single), read_gguf(parts[0])
    assert split.metadata["split.count"] == 2 and {t.part for t in split.tensors.values()} == {0, 1}
    assert list(split.tensors) == list(whole.tensors)
    for name in whole.tensors:
        assert split.raw(name).tobytes() == whole.raw(name).tobytes(), name
    assert read_gguf(parts[1]).path == parts[0]  # any part opens the whole split
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        torch.testing.assert_close(corelm.load(str(parts[0]), dtype="fp32").model(ids),
                                   corelm.load(str(single), dtype="fp32").model(ids), rtol=0, atol=0)


def test_split_gguf_with_a_missing_part_names_it(ggufs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    shutil.copy(ggufs[1][0], tmp_path / ggufs[1][0].name)
    with pytest.raises(CorelmError, match="tiny-00002-of-00002.gguf missing"):
        corelm.load(str(tmp_path / ggufs[1][0].name))


def test_repo_file_form_loads_gguf_and_split_gguf(ggufs: tuple[Path, list[Path]], hf_home: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    single, parts = ggufs
    cache_repo(hf_home, "org/tiny-GGUF", {"tiny.gguf": single, **{p.name: p for p in parts}})
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        want = corelm.load(str(single), dtype="fp32").model(ids)
        for spec in ("org/tiny-GGUF:tiny.gguf", "org/tiny-GGUF:tiny-00001-of-00002.gguf"):
            torch.testing.assert_close(corelm.load(spec, dtype="fp32").model(ids), want, rtol=0, atol=0)
    code, out, err = run(["pull", "org/tiny-GGUF:tiny-00001-of-00002.gguf"], capsys)
    assert code == 0, err
    assert out.splitlines()[0].endswith("snapshots/" + COMMIT + "/tiny-00001-of-00002.gguf")
    assert out.splitlines()[1].startswith("2 file(s), ")
    with pytest.raises(CorelmError, match="corelm pull org/tiny-GGUF:other.gguf"):
        corelm.load("org/tiny-GGUF:other.gguf")


def test_quantization_tag_picks_the_gguf_file(ggufs: tuple[Path, list[Path]], hf_home: Path) -> None:
    """``repo:Q8_0`` (llama.cpp's -hf spelling) finds the file whose name ends in the tag, split or not."""
    single, parts = ggufs
    cache_repo(hf_home, "org/tags-GGUF", {"tiny-Q8_0.gguf": single, "tiny.F16.gguf": single,
                                          **{p.name.replace("tiny-", "tiny-Q4_K_M-"): p for p in parts}})
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        want = corelm.load(str(single), dtype="fp32").model(ids)
        for tag in ("Q8_0", "q8_0", "F16", "Q4_K_M"):
            torch.testing.assert_close(corelm.load(f"org/tags-GGUF:{tag}", dtype="fp32").model(ids), want,
                                       rtol=0, atol=0)
    assert "tiny-Q4_K_M-00001-of-00002.gguf" in corelm.load("org/tags-GGUF:Q4_K_M", dtype="fp32").source
    with pytest.raises(CorelmError, match="corelm pull org/tags-GGUF:Q5_K_M"):  # no such file in the cache
        corelm.load("org/tags-GGUF:Q5_K_M")


def test_gguf_repo_named_without_a_file_says_which_files_it_has(ggufs: tuple[Path, list[Path]],
                                                                 hf_home: Path) -> None:
    cache_repo(hf_home, "org/only-GGUF", {"tiny-Q8_0.gguf": ggufs[0]})
    with pytest.raises(CorelmError, match=r"org/only-GGUF holds GGUF files.*`org/only-GGUF:tiny-Q8_0.gguf`"):
        corelm.load("org/only-GGUF")


# ---- corelm pull --------------------------------------------------------------------------------------
def test_pull_offline_prints_the_cached_snapshot(checkpoint: Path, hf_home: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    files = {f.name: f for f in checkpoint.iterdir() if f.is_file()}
    snapshot = cache_repo(hf_home, "org/name", files)
    code, out, err = run(["pull", "org/name"], capsys)
    assert code == 0, err
    path, summary = out.splitlines()
    assert Path(path) == snapshot
    size = sum(f.stat().st_size for f in files.values())
    assert summary.startswith(f"{len(files)} file(s), ") and "corelm generate --model org/name" in summary
    assert f"{size / 1e6:.1f} MB" in summary or f"{size / 1e3:.1f} kB" in summary


def test_pull_uncached_offline_and_bad_spelling_are_one_line(hf_home: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["pull", "org/missing"], capsys)
    assert code == 2 and "org/missing is not in the Hugging Face cache" in one_line(err)
    code, _, err = run(["pull", "not-a-repo"], capsys)
    assert code == 2 and "not a Hugging Face repo id" in one_line(err)


def test_compare_and_quantize_take_repo_ids(checkpoint: Path, hf_home: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """compare sizes a cached repo's files and quantize reads it through the same loader (no raw paths)."""
    cache_repo(hf_home, "org/name", {f.name: f for f in checkpoint.iterdir() if f.is_file()})
    (tmp_path / "held.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    code, out, err = run(["compare", "org/name", "--data", str(tmp_path / "held.txt"), "--tokens", "64",
                          "--decode-tokens", "0", "--json"], capsys)
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert row["variant"] == "org/name" and row["disk_MB"] > 0
    code, out, err = run(["quantize", "org/name", str(tmp_path / "q8"), "--method", "int8"], capsys)
    assert code == 0, err
    assert corelm.load(str(tmp_path / "q8")).model.corelm_quantization["method"] == "int8"
