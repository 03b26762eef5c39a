"""Tokenizers: a thin wrapper over the ``tokenizers`` library, plus jinja2 chat templates.

One :class:`Tokenizer` serves every path that turns text into ids (CLI, API, server, training,
evaluation, GGUF export), so a prompt is tokenized and templated the same way everywhere.

Sources: ``tokenizer.json`` (+ ``tokenizer_config.json``), GGUF metadata (a GPT-2-style byte-level
BPE rebuilt from ``tokenizer.ggml.*``), or training a new byte-level BPE / WordPiece on text files.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from corelm.errors import CorelmError

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by ``tokenizer.ggml.pre``.
# GPT-2's regex is the one built into ``ByteLevel(use_regex=True)``.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# smollm/starcoder split every digit on its own (the "\p{N}" rule) before GPT-2's regex; the
# original SmolLM2 tokenizer.json says the same with Digits(individual_digits=True).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_GPT2_LIKE = ("gpt2", "default", "gpt-2")
_SPLIT_PRE = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
              "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
KNOWN_GGUF_PRE = sorted(set(_DIGITS_THEN_GPT2) | set(_GPT2_LIKE) | set(_SPLIT_PRE))

# GGUF token types (llama.cpp llama_token_type): 3 = control (special), 4 = user defined (added).
_CONTROL, _USER_DEFINED = 3, 4

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_str(value: Any) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids, special tokens and the model's chat template.

    Args:
        backend: A ``tokenizers.Tokenizer`` (padding and truncation are switched off: callers decide).
        special_tokens: ``bos_token``/``eos_token``/``unk_token``/``pad_token``/... -> token string.
        chat_template: A jinja2 chat template (HF format), or ``None``.
        add_bos_token: ``encode(..., add_special_tokens=True)`` prepends BOS (when the backend's
            post-processor does not already add special tokens).
        model_max_length: The longest input the model accepts, when known.
    """

    def __init__(self, backend: Backend, *, special_tokens: dict[str, str | None] | None = None,
                 chat_template: str | None = None, add_bos_token: bool = False,
                 model_max_length: int | None = None, clean_up_tokenization_spaces: bool = False):
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.special_tokens_map = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    # ---- ids -----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Encode text to ids. ``add_special_tokens`` adds what the model expects around one input
        (``[CLS] ... [SEP]`` for BERT, BOS when ``add_bos_token``)."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id if add_special_tokens and self.add_bos_token else None
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode several texts (the backend runs them in parallel)."""
        if self.add_bos_token and add_special_tokens:
            return [self.encode(t, add_special_tokens=True) for t in texts]
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Decode ids to text."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            text = _clean_up_tokenization(text)
        return text

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> list[str]:
        """Every special token string (named ones and the backend's special added tokens)."""
        added = [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]
        return list(dict.fromkeys([*self.special_tokens_map.values(), *added]))

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render a conversation with the model's chat template, as ``transformers`` renders it.

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]``.
            add_generation_prompt: Append the header that starts the assistant's turn.
            **kwargs: Extra template variables (``tools``, ``documents``, ...).

        Returns:
            The prompt text (special tokens are in the text; encode it without adding more).
        """
        if not self.chat_template:
            raise CorelmError("this tokenizer has no chat template; use generate for a raw prompt")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise CorelmError('chat messages must be a list of {"role": ..., "content": ...} dicts')
        import jinja2

        template = _compile_template(self.chat_template)
        # As transformers does: tools/documents are always defined (None when not given; templates test
        # `tools is not none`), the special tokens are variables, and keyword arguments override them.
        variables = {"tools": None, "documents": None, **self.special_tokens_map, **kwargs}
        try:
            return template.render(messages=_chat_messages(messages), add_generation_prompt=add_generation_prompt,
                                   **variables)
        except (jinja2.TemplateError, TypeError, ValueError, LookupError) as exc:
            # the template's own checks (raise_exception) and its failures on a message it cannot render
            # (a missing "content" concatenated to a string, say) are the conversation's fault: one line
            raise CorelmError(f"chat template error: {exc}") from None

    # ---- streaming -----------------------------------------------------------------------------
    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        """An incremental detokenizer: feed ids one by one, get text pieces that are valid UTF-8."""
        return StreamDecoder(self, skip_special_tokens)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, config_path: str | Path | None = None) -> Tokenizer:
        """Load ``tokenizer.json``; settings (special tokens, chat template) come from
        ``tokenizer_config.json`` next to it (or ``config_path``) when present."""
        path = Path(path)
        if not path.is_file():
            raise CorelmError(f"tokenizer file not found: {path}")
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise CorelmError(f"cannot read tokenizer {path}: {str(exc).splitlines()[0]}") from None
        config_path = Path(config_path) if config_path else path.with_name("tokenizer_config.json")
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as exc:
                raise CorelmError(f"cannot parse {config_path}: {exc}") from None
        special = {name: _token_str(config.get(name)) for name in _SPECIAL_NAMES}
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = path.with_name("chat_template.jinja")
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        max_len = config.get("model_max_length")
        return cls(backend, special_tokens=special, chat_template=template,
                   add_bos_token=bool(config.get("add_bos_token", False)),
                   model_max_length=int(max_len) if isinstance(max_len, int) and max_len < 10**9 else None,
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of an HF-layout directory."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CorelmError(f"{path} has no tokenizer.json")
        return cls.from_file(path / "tokenizer.json")

    @classmethod
    def from_gguf(cls, source: Any) -> Tokenizer:
        """Rebuild the byte-level BPE described by a GGUF file's ``tokenizer.*`` metadata.

        Args:
            source: A :class:`corelm.io.gguf.GGUFFile`, a ``gguf.GGUFReader``, or a path to a ``.gguf``.

        The pre-tokenizer follows ``tokenizer.ggml.pre`` (llama.cpp's names): ``smollm``/``starcoder``
        split digits one by one then apply GPT-2's regex, ``gpt2`` uses GPT-2's regex, ``llama-bpe``
        and ``qwen2`` their own regexes. Other values raise: a wrong split silently changes ids.
        """
        md = _gguf_metadata(source)
        model = md.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise CorelmError(f"GGUF tokenizer model {model!r} is not supported; corelm rebuilds byte-level "
                              "BPE ('gpt2') vocabularies")
        pre = md.get("tokenizer.ggml.pre", "default")
        if pre not in KNOWN_GGUF_PRE:
            raise CorelmError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(KNOWN_GGUF_PRE)})")
        tokens: list[str] = md["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                     ignore_merges=pre in _SPLIT_PRE and pre != "qwen2"))
        if pre in _SPLIT_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre in _DIGITS_THEN_GPT2:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, kind in zip(tokens, types) if kind == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, kind in zip(tokens, types) if kind == _USER_DEFINED])

        def token(key: str) -> str | None:
            idx = md.get(f"tokenizer.ggml.{key}")
            return tokens[idx] if isinstance(idx, int) and 0 <= idx < len(tokens) else None

        special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                   "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
        arch = md.get("general.architecture", "llama")
        ctx = md.get(f"{arch}.context_length")
        return cls(backend, special_tokens=special, chat_template=md.get("tokenizer.chat_template"),
                   add_bos_token=bool(md.get("tokenizer.ggml.add_bos_token", False)),
                   model_max_length=int(ctx) if ctx else None)

    def save(self, out_dir: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template),
        a pair ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads as-is."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            # The generic fast class reads tokenizer.json as written, without rebuilding a pipeline.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens_map,
            "add_bos_token": self.add_bos_token,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
        }
        if self.model_max_length:
            config["model_max_length"] = self.model_max_length
        if self.chat_template:
            config["chat_template"] = self.chat_template
        backend = Backend.from_str(self.backend.to_str())
        if self.add_bos_token and self.bos_token_id is not None:
            # Make the BOS rule part of tokenizer.json so every loader applies it.
            bos = self.special_tokens_map["bos_token"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_token_id)])
        _atomic_write(out / "tokenizer.json", backend.to_str(pretty=True))
        _atomic_write(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class StreamDecoder:
    """Incremental detokenization that never emits a broken UTF-8 sequence.

    A multi-byte character (an emoji, a CJK character) may span several byte-level tokens; until
    its last byte arrives, decoding yields U+FFFD. Text is held back while it ends in U+FFFD, and
    decoding restarts from a few tokens back so merges across the boundary (leading spaces,
    WordPiece ``##``) decode the same as a one-shot ``decode``. Same scheme as HF TGI's
    ``decode_token``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the new text it completes (possibly empty)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (incomplete bytes decode to U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


# Names a message's reasoning is passed under; templates read the first (transformers'
# ``_alias_reasoning_fields``: ``thinking`` is filled too, for templates that read that name).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages a template sees, normalised as transformers' ``apply_chat_template`` does: keys whose
    value is None are dropped (OpenAI clients send ``"content": null`` next to ``tool_calls``; templates
    handle a missing key but print "None"), and reasoning under any of its names is readable under all."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    """Compile a chat template in the environment ``transformers`` uses, so output is byte-identical:
    sandboxed, ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, a ``tojson`` that does not
    HTML-escape, and the globals templates call (``raise_exception``, ``strftime_now``, ``dict``, and a
    ``namespace`` that refuses underscore-prefixed attributes)."""
    import jinja2
    import jinja2.exceptions
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class _Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): render the body as-is."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    class Namespace(jinja2.utils.Namespace):
        """``namespace(...)`` refusing underscore-prefixed names (a route to CPython internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # jinja2's signature: ``self`` may be a keyword
            self, args = args[0], args[1:]
            for name in dict(*args, **kwargs):
                check_name(name)
            jinja2.utils.Namespace.__init__(self, *args, **kwargs)

        def __setitem__(self, name: str, value: Any) -> None:
            check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise CorelmError(f"chat template does not parse: {exc}") from None


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (BERT-era detokenization of spaces before punctuation)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _gguf_metadata(source: Any) -> dict[str, Any]:
    """Metadata dict from a GGUFFile, a gguf.GGUFReader or a path."""
    if isinstance(source, (str, Path)):
        from corelm.io.gguf import read_gguf

        source = read_gguf(source)
    if hasattr(source, "metadata"):
        return source.metadata
    if hasattr(source, "fields"):  # gguf.GGUFReader
        return {name: field.contents() for name, field in source.fields.items()}
    raise CorelmError(f"cannot read GGUF metadata from {type(source).__name__}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- training ----------------------------------------------------------------------------------
def train_tokenizer(files: Sequence[str | Path], kind: str = "bpe", vocab_size: int = 8192,
                    min_frequency: int = 2, lowercase: bool = True, show_progress: bool = True) -> Tokenizer:
    """Train a new tokenizer on text files.

    Args:
        files: UTF-8 text files.
        kind: ``bpe`` (GPT-2-style byte-level BPE, special token ``<|endoftext|>``) or ``wordpiece``
            (BERT-style, ``[PAD] [UNK] [CLS] [SEP] [MASK]``, adds ``[CLS] ... [SEP]``).
        vocab_size: Target vocabulary size, special tokens included.
        min_frequency: A merge must occur this often to be learned.
        lowercase: WordPiece only: lowercase and strip accents (uncased BERT).
        show_progress: Show the tokenizers library's progress bar.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise CorelmError("give at least one text file to train a tokenizer on")
    for p in paths:
        if not p.is_file():
            raise CorelmError(f"training file not found: {p}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise CorelmError(f"vocab size must be a positive integer, got {vocab_size!r}")
    if kind == "bpe":
        if vocab_size <= 257:
            raise CorelmError(f"a byte-level BPE needs vocab size > 257 (256 bytes + 1 special), got {vocab_size}")
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=["<|endoftext|>"], show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": None,
                   "pad_token": "<|endoftext|>"}
    elif kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        if vocab_size <= len(specials):
            raise CorelmError(f"a WordPiece vocabulary needs more than {len(specials)} entries, got {vocab_size}")
        backend = Backend(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase or None)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials, show_progress=show_progress)
        special = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                   "mask_token": "[MASK]"}
    else:
        raise CorelmError(f"unknown tokenizer kind {kind!r}; expected 'bpe' or 'wordpiece'")
    try:
        backend.train([str(p) for p in paths], trainer)
    except Exception as exc:  # noqa: BLE001 - e.g. a file that is not UTF-8
        raise CorelmError(f"tokenizer training failed: {str(exc).splitlines()[0]}") from None
    if kind == "wordpiece":
        cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return Tokenizer(backend, special_tokens=special)


def iter_texts(tokenizer: Tokenizer, ids: Iterable[int], skip_special_tokens: bool = True) -> Iterator[str]:
    """Turn a stream of ids into a stream of text pieces (see :class:`StreamDecoder`)."""
    dec = tokenizer.stream_decoder(skip_special_tokens)
    for i in ids:
        piece = dec.push(i)
        if piece:
            yield piece
    tail = dec.flush()
    if tail:
        yield tail
