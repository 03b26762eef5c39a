"""``corelm serve``: an OpenAI-compatible HTTP server with continuous batching and a web chat page."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from corelm.commands.args import Options, option, options_from, parser_from, set_threads, threads_option
from corelm.commands.decoding import describe_decoder
from corelm.errors import CorelmError
from corelm.presets import DEFAULT_MODEL

if TYPE_CHECKING:
    from corelm.serve.server import ServeOptions

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ADAPTER_PATH = {"pytorch": "decoding through the model's forward",
                "kernels": "every row on the C++ step, each adding its own adapter's update"}


@dataclass
class ServeCommandOptions(Options):
    """What ``corelm serve`` serves, where, and its limits (:meth:`limits` are the server's
    :class:`corelm.serve.server.ServeOptions`)."""

    model: list[str] | None = field(default=None, metadata={
        "help": f"model to serve: an embedded or preset name, an HF directory or a .gguf file; repeat to serve "
                f"several (e.g. a chat model and minilm-l6 for embeddings); default {DEFAULT_MODEL}",
        "metavar": "NAME_OR_PATH"})
    name: list[str] | None = field(default=None, metadata={
        "help": "id clients send as 'model' for the --model at the same position (default: the model name, or the "
                "directory/file name)", "metavar": "ID"})
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes it to the "
                                    "network, so set an API key)")
    port: int = option(8000, "TCP port")
    api_key_file: str | None = option(None, "require 'Authorization: Bearer <key>' on /v1/* and /metrics, with the "
                                            "key on the file's first line (or set $CORELM_API_KEY); /health and the "
                                            "chat page stay public", metavar="FILE")
    max_batch: int = option(8, "requests decoded together in the running batch (rows of the KV cache)")
    max_seq_len: int = option(2048, "tokens per request, prompt + output (caps the context window so the KV cache "
                                    "of max-batch rows fits in memory)")
    max_queue: int = option(64, "requests allowed to wait for a batch row; more get 503 with Retry-After at once")
    prefill_chunk: int = option(128, "prompt tokens prefilled per batch step, all new prompts together: a long "
                                     "prompt comes in over several steps while the running streams keep decoding")
    prefix_cache_mb: int = option(256, "MiB of keys and values kept for prompt heads that later requests share "
                                       "(a system prompt is prefilled once); 0 turns prefix caching off")
    request_timeout: float = option(600.0, "seconds after which a queued or running request is ended with an error")
    max_body_kb: int = option(1024, "largest accepted request body in KiB; larger bodies get 413")
    default_max_tokens: int = option(512, "output limit for requests that give no max_tokens")
    header_timeout: float = option(10.0, "seconds a connection may take to send a request's headers; slower ones "
                                         "are closed")
    body_timeout: float = option(30.0, "seconds a request body may take to arrive after its headers; then 408")
    keep_alive_timeout: float = option(5.0, "seconds an idle kept-alive connection stays open between requests")
    max_connections: int = option(1000, "open connections at once; a request beyond them gets 503")
    max_header_kb: int = option(16, "KiB of request line and headers buffered before they must be complete; more "
                                    "get 400")
    dtype: str | None = option(None, "weights/compute dtype (default: bf16 where the CPU declares bf16 arithmetic, "
                                     "else fp32)", dtype={"auto": False})
    device: str = option("cpu", "where the models run: cpu, cuda, cuda:1, ...")
    quantize: Literal["int8", "int4"] | None = option(None, "weight-only quantization of the decoder(s) at load time")
    threads: int | None = threads_option("CPU threads for the model (default: OMP_NUM_THREADS if set, else the "
                                         "physical cores; the C++ step's pool does not stall when the "
                                         "HTTP side takes a core for a moment)")
    drain_timeout: float = option(30.0, "on SIGTERM or Ctrl-C: stop accepting connections and give the running "
                                        "requests this many seconds to finish; then those left end with a 503 "
                                        "'shutdown' error (in-band for a stream) and the server exits (0 after "
                                        "SIGTERM)")
    access_log: bool = option(False, "log one JSON line per HTTP request on stderr: request id (also the "
                                     "X-Request-Id header), method, path, status, latency, prompt and generated "
                                     "tokens, client")
    lora: list[str] | None = field(default=None, metadata={
        "help": "serve a LoRA run (corelm finetune --method lora --out PATH) over the first decoder as NAME; repeat "
                "for several; requests pick one with model '<base>:NAME' (or 'NAME') and one batch mixes them",
        "metavar": "NAME=PATH", "section": "LoRA adapters"})
    max_loras: int = option(0, "adapter slots (adapters loaded at once, through --lora or POST /v1/adapters); "
                               "0: max(4, number of --lora) when --lora is given, else no adapters",
                            section="LoRA adapters")
    max_lora_rank: int = option(0, "largest LoRA rank a slot holds (0: the largest --lora rank, or 16)",
                                section="LoRA adapters")

    POSITIVE = ("max_batch", "max_seq_len", "max_queue", "request_timeout", "max_body_kb", "default_max_tokens",
                "header_timeout", "body_timeout", "keep_alive_timeout", "max_connections", "max_header_kb", "threads",
                "prefill_chunk")

    def check(self) -> None:
        for name in self.POSITIVE:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise CorelmError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.drain_timeout < 0:
            raise CorelmError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
        if self.prefix_cache_mb < 0:
            raise CorelmError(f"--prefix-cache-mb must be >= 0, got {self.prefix_cache_mb}")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise CorelmError(f"--host must be an IP address (e.g. 127.0.0.1 or 0.0.0.0), got {self.host!r}"
                                  ) from None
        if not 0 < self.port < 65536:
            raise CorelmError(f"--port must be in 1..65535, got {self.port}")
        for name in ("max_loras", "max_lora_rank"):
            if getattr(self, name) < 0:
                raise CorelmError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.lora:
            from corelm.serve.adapters import parse_lora_option

            for spec in self.lora:
                parse_lora_option(spec)
            if self.max_loras and len(self.lora) > self.max_loras:
                raise CorelmError(f"{len(self.lora)} --lora adapters but --max-loras {self.max_loras}")

    def limits(self) -> ServeOptions:
        """The server's limits (:class:`corelm.serve.server.ServeOptions`): the same fields, bodies and headers in
        bytes."""
        from corelm.serve.server import ServeOptions

        same = {f.name: getattr(self, f.name) for f in dataclasses.fields(ServeOptions) if hasattr(self, f.name)}
        return ServeOptions(**same, max_body_bytes=self.max_body_kb * 1024,
                            max_header_bytes=self.max_header_kb * 1024)


def build_parser() -> argparse.ArgumentParser:
    return parser_from(
        ServeCommandOptions, prog="corelm serve",
        description="Serve models over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
                    "/v1/chat/completions, /v1/embeddings, /health, /metrics) with a web chat page at /. "
                    "Decoders run under continuous batching; encoders serve /v1/embeddings.",
        epilog="example: corelm serve --model runs/sft-merged --port 9000 --api-key-file key.txt --max-batch 16\n"
               "         corelm serve --model smollm2-135m-instruct --lora sql=runs/sql --lora chat=runs/chat-lora")


def serve(options: ServeCommandOptions | None = None, **kwargs: Any) -> None:
    """Load the models and serve them until Ctrl-C (blocking); progress and the addresses go to stderr.

    ``serve(model=["runs/sft-merged"], port=9000)`` is ``serve(ServeCommandOptions(model=[...], port=9000))``.
    """
    from corelm.serve import server

    if options is None:
        options = ServeCommandOptions(**kwargs)
    elif kwargs:
        raise TypeError("pass either a ServeCommandOptions or its fields, not both")
    api_key = server.read_api_key(options.api_key_file)
    server.check_port(options.host, options.port)
    if options.host not in LOOPBACK and api_key is None:
        print(f"warning: serving on {options.host} without an API key: anyone who can reach this port can use it",
              file=sys.stderr)
    limits = options.limits()
    import torch

    threads = set_threads(options.threads)
    specs = options.model or [DEFAULT_MODEL]
    print(f"loading {', '.join(specs)} ...", file=sys.stderr)
    app, served = server.build(specs, limits, api_key=api_key, dtype=options.dtype, names=options.name,
                               device=options.device, quantize=options.quantize, loopback_only=options.host in LOOPBACK)
    for m in served:
        if getattr(m, "adapters", None) is not None:
            loaded = ", ".join(f"{m.name}:{a}" for a in m.adapters.by_name) or "none yet"
            multi = m.adapters.multi
            print(f"LoRA adapters on {m.name!r}: {loaded} ({multi.slots} slots, rank <= {multi.rank}, "
                  f"{multi.nbytes() / 2**20:.1f} MiB; {ADAPTER_PATH.get(m.batcher.step.kind, '')})", file=sys.stderr)
        if m.kind == "embed":
            print(f"serving {m.name!r} (/v1/embeddings; up to {m.context_window} tokens per input)", file=sys.stderr)
            continue
        cache = m.batcher.cache
        parts = [cache.k, cache.v] if isinstance(cache.k, torch.Tensor) else [*cache.k, *cache.v]
        gib = sum(t.numel() * t.element_size() for t in parts) / 2**30
        decoder = describe_decoder(m.batcher.model)
        if m.batcher.step.kind == "kernels":  # with adapter slots the wrapped layers no longer look like the C++ step's
            decoder = decoder.replace("PyTorch", "C++ step")
        print(f"serving {m.name!r} ({decoder}; /v1/completions, /v1/chat/completions; "
              f"context {m.context_window} tokens; KV cache {m.batcher.max_batch} rows = {gib:.2f} GiB; "
              f"prefix cache {m.batcher.prefixes.max_blocks * m.batcher.prefixes.block} tokens; "
              f"{threads} thread{'s' * (threads > 1)})", file=sys.stderr)
    print(f"web chat: http://{options.host}:{options.port}/   API: http://{options.host}:{options.port}/v1"
          + ("   (API key required)" if api_key else ""), file=sys.stderr)
    try:
        server.run(app, options.host, options.port, access_log=options.access_log, options=limits, served=served)
    finally:
        server.stop(served)


def main(argv: list[str]) -> int:
    serve(options_from(ServeCommandOptions, build_parser().parse_args(argv)))
    return 0
