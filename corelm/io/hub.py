"""Models named by a Hugging Face Hub repo id: resolved from the local HF cache, downloaded when online.

Spellings (``REPO`` is ``org/name``)::

    org/name                         the repo's HF checkpoint (config.json, safetensors, tokenizer files)
    org/name@REVISION                a branch, tag or commit
    org/name:file.gguf               one GGUF file of the repo (every part of a -00001-of-0000N split)
    org/name:Q4_K_M                  the repo's GGUF file of that quantization (llama.cpp's ``-hf`` tag)
    org/name@REVISION:file.gguf

Only the files corelm reads are fetched (:data:`CHECKPOINT_FILES`; for GGUF, the named file and its
split parts), into the standard cache (``HF_HOME`` / ``HF_HUB_CACHE``), so ``transformers`` and
``llama.cpp -hf`` see the same files and nothing is downloaded twice. ``HF_HUB_OFFLINE=1`` uses the
cache only. The token is huggingface_hub's own (``HF_TOKEN`` or ``hf auth login``).

Loading (:func:`locate`) looks in the cache first and contacts the Hub only for what is missing, so a
cached model loads without a network round trip and never changes under a user between two runs;
``corelm pull`` (:func:`download`) always asks the Hub for the revision's current commit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from corelm.errors import CorelmError

# What corelm reads from an HF checkpoint repo: the rest (pytorch_model.bin, ONNX, GGUF copies,
# original/ consolidated.* weights) would only cost disk and time. pytorch_model.bin is left out on
# purpose: corelm never unpickles files it downloaded.
CHECKPOINT_FILES = [
    "config.json", "generation_config.json",
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.json", "chat_template.jinja",
    # sentence-transformers encoders: pooling and normalization settings
    "modules.json", "sentence_bert_config.json", "1_Pooling/config.json",
]

# org/name: the Hub's own rule (letters, digits, '-', '_', '.'; no '--' or '..', no edge '-'/'.').
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_SPEC = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^:@\s]+))?(?::(?P<file>[^:@\s]+))?$")
# llama.cpp's gguf-split naming (llama_split_path): PREFIX-00001-of-00003.gguf
SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class NotCached(CorelmError):
    """The files of a spec are not (all) in the local cache."""


@dataclass(frozen=True)
class RepoSpec:
    """A parsed ``org/name[@revision][:file]``."""

    repo_id: str
    revision: str | None = None
    filename: str | None = None

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        return self.repo_id + revision + (f":{self.filename}" if self.filename else "")


def parse_spec(text: str) -> RepoSpec | None:
    """``RepoSpec`` for a repo-id spelling, ``None`` for anything else (names, paths).

    A spelling whose last part ends in ``.gguf``/``.safetensors``/``.json`` without a ``:`` is a file path
    (``dir/model.gguf``), not a repo; ``--`` and ``..`` are not allowed in repo names, so ``../x`` is a path.
    """
    match = _SPEC.match(text)
    if match is None:
        return None
    repo = match["repo"]
    looks_like_file = match["file"] is None and repo.endswith((".gguf", ".safetensors", ".json"))
    if "--" in repo or ".." in repo or looks_like_file:
        return None
    return RepoSpec(repo, match["revision"], match["file"])


def split_parts(filename: str) -> list[str]:
    """Every part of a llama.cpp split (``x-00002-of-00003.gguf`` -> parts 1..3), else ``[filename]``."""
    match = SPLIT_NAME.match(filename)
    if match is None:
        return [filename]
    count = int(match["count"])
    return [f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it, looked up now (it reads the variable once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.strip().upper() in ("1", "ON", "YES", "TRUE")


def locate(spec: RepoSpec) -> Path:
    """The local path of ``spec``: the cached files when complete, else downloaded (unless offline).

    Returns:
        the snapshot directory of a checkpoint repo, or the (first) GGUF file of a ``:file`` spec.

    Raises:
        CorelmError: offline and not cached (the message names the ``corelm pull`` command), or a
            download failure (unknown or gated repo, missing file, no network), in one line.
    """
    try:
        return _fetch(spec, local_only=True)
    except NotCached:
        if offline():
            raise CorelmError(f"{spec} is not in the Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE "
                              f"is set: fetch it with `corelm pull {spec}` while online") from None
    if sys.stderr.isatty():  # next to the progress bars; a failure stays the one line of its error
        print(f"corelm: downloading {spec} from the Hugging Face Hub into {_cache_dir()}", file=sys.stderr)
    return _fetch(spec, local_only=False)


def download(spec: RepoSpec) -> Path:
    """``corelm pull``: fetch ``spec`` from the Hub (progress bars on stderr); offline, check the cache."""
    if offline():
        try:
            return _fetch(spec, local_only=True)
        except NotCached:
            raise CorelmError(f"{spec} is not in the Hugging Face cache ({_cache_dir()}) and HF_HUB_OFFLINE is "
                              "set: unset it to download") from None
    return _fetch(spec, local_only=False)


def files_of(path: Path) -> list[Path]:
    """The files a located spec consists of: every split part of a GGUF file, or a snapshot's files."""
    if path.is_file():
        match = SPLIT_NAME.match(path.name)
        return [path.with_name(p) for p in split_parts(path.name)] if match else [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def _cache_dir() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if "HF_HOME" in os.environ
                                               else constants.HF_HUB_CACHE)


def _fetch(spec: RepoSpec, local_only: bool) -> Path:
    with _quiet():
        return _fetch_files(spec, local_only)


def _fetch_files(spec: RepoSpec, local_only: bool) -> Path:
    from huggingface_hub import errors as hub
    from huggingface_hub import hf_hub_download, snapshot_download

    cache = _cache_dir()
    try:
        if spec.filename is not None and "." not in spec.filename:  # a quantization tag: find its file
            spec = dataclasses.replace(spec, filename=_tagged_file(spec, local_only))
        if spec.filename is not None:
            paths = [Path(hf_hub_download(spec.repo_id, name, revision=spec.revision, cache_dir=cache,
                                          local_files_only=local_only, library_name="corelm"))
                     for name in split_parts(spec.filename)]
            return paths[split_parts(spec.filename).index(spec.filename)] if len(paths) > 1 else paths[0]
        snapshot = Path(snapshot_download(spec.repo_id, revision=spec.revision, cache_dir=cache,
                                          allow_patterns=CHECKPOINT_FILES, local_files_only=local_only,
                                          library_name="corelm"))
    except hub.GatedRepoError:
        raise CorelmError(f"{spec.repo_id} is gated: accept its terms on https://huggingface.co/{spec.repo_id} "
                          "and log in (`hf auth login` or HF_TOKEN)") from None
    except hub.RevisionNotFoundError:
        raise CorelmError(f"{spec.repo_id} has no revision {spec.revision!r}") from None
    except hub.RepositoryNotFoundError:
        raise CorelmError(f"no model {spec.repo_id!r} on the Hugging Face Hub (or it is private: log in with "
                          "`hf auth login` or set HF_TOKEN)") from None
    except hub.LocalEntryNotFoundError:
        if local_only:
            raise NotCached(f"{spec} is not cached") from None
        raise CorelmError(f"cannot reach the Hugging Face Hub to download {spec} (no network?)") from None
    except hub.EntryNotFoundError:
        raise CorelmError(f"{spec.repo_id} has no file {spec.filename!r}") from None
    except hub.OfflineModeIsEnabled:
        raise CorelmError(f"{spec} is not in the Hugging Face cache and HF_HUB_OFFLINE is set") from None
    except hub.HFValidationError as exc:
        raise CorelmError(f"{spec}: {str(exc).splitlines()[0]}") from None
    except (hub.HfHubHTTPError, OSError) as exc:  # HTTP errors, connection failures, a full disk
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorelmError(f"downloading {spec} failed: {reason}") from None
    if not _complete(snapshot):
        if local_only and any(snapshot.rglob("*.gguf")):  # a GGUF repo pulled before, named without a file
            cached = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*.gguf")]
            raise CorelmError(_not_a_checkpoint(spec, cached))
        if local_only:
            raise NotCached(f"{spec} is not (completely) cached")
        raise CorelmError(_not_a_checkpoint(spec))
    return snapshot


def _repo_files(spec: RepoSpec, local_only: bool) -> list[str]:
    """The file names of the repo at ``spec.revision``: from the cached snapshot, or listed by the Hub."""
    from huggingface_hub import list_repo_files, snapshot_download

    if local_only:
        snapshot = Path(snapshot_download(spec.repo_id, revision=spec.revision, cache_dir=_cache_dir(),
                                          local_files_only=True, allow_patterns=["*.gguf"]))
        return [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
    return list_repo_files(spec.repo_id, revision=spec.revision)


def _tagged_file(spec: RepoSpec, local_only: bool) -> str:
    """The GGUF file of quantization ``spec.filename`` (``Q4_K_M``): the one whose name ends in the tag,
    before ``.gguf`` or a split suffix (``x-Q4_K_M.gguf``, ``x.q4_k_m-00001-of-00002.gguf``)."""
    tag = spec.filename or ""
    pattern = re.compile(rf"(?:^|[-._]){re.escape(tag)}(?:-00001-of-\d{{5}})?\.gguf$", re.IGNORECASE)
    files = _repo_files(spec, local_only)
    hits = sorted(f for f in files if pattern.search(Path(f).name) and "mmproj" not in Path(f).name)
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise CorelmError(f"{spec.repo_id} has {len(hits)} GGUF files tagged {tag}: name one "
                          f"({', '.join(hits[:6])})")
    if local_only:
        raise NotCached(f"{spec} is not cached")
    raise CorelmError(_not_a_checkpoint(spec, [f for f in files if f.endswith(".gguf")], f"no {tag} file in"))


@contextmanager
def _quiet() -> Iterator[None]:
    """Keep huggingface_hub's retry warnings ("Retrying in 2s [Retry 2/5]") off stderr: a failure is
    still one line, the CorelmError raised from its final exception."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _complete(snapshot: Path) -> bool:
    """A snapshot corelm can load: config.json and every safetensors file it names."""
    import json

    if not (snapshot / "config.json").is_file():
        return False
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            return False
        return all((snapshot / s).is_file() for s in shards)
    return (snapshot / "model.safetensors").is_file()


def _is_first_part(name: str) -> bool:
    """A whole GGUF file, or the first part of a split (the name a user gives for all of them)."""
    match = SPLIT_NAME.match(name)
    return match is None or match["no"] == "00001"


def _not_a_checkpoint(spec: RepoSpec, ggufs: list[str] | None = None, what: str = "") -> str:
    """Say what the repo holds instead: most often GGUF files, which need a ``:file`` to pick one."""
    if ggufs is None:
        try:
            from huggingface_hub import list_repo_files

            ggufs = [f for f in list_repo_files(spec.repo_id, revision=spec.revision) if f.endswith(".gguf")]
        except Exception:  # noqa: BLE001 -- only a hint: the error below stands on its own
            ggufs = []
    firsts = sorted(f for f in ggufs if _is_first_part(Path(f).name))
    head = f"{what} {spec.repo_id}" if what else f"{spec.repo_id} holds GGUF files, not an HF checkpoint"
    if firsts:
        shown = ", ".join(firsts[:6]) + (", ..." if len(firsts) > 6 else "")
        return f"{head}: name one, e.g. `{spec.repo_id}:{firsts[0]}` ({shown})"
    if what:
        return f"{what} {spec.repo_id}, and no GGUF files at all"
    return f"{spec.repo_id} is not a checkpoint corelm reads (no config.json with model.safetensors)"
