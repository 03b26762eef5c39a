"""``corelm serve``: an OpenAI-compatible HTTP server with continuous batching and a web chat page."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from corelm.commands.args import Parser
from corelm.commands.decoding import describe_decoder
from corelm.errors import CorelmError
from corelm.presets import DEFAULT_MODEL


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="corelm serve",
        description="Serve models over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, "
                    "/v1/chat/completions, /v1/embeddings, /health, /metrics) with a web chat page at /. "
                    "Decoders run under continuous batching; encoders serve /v1/embeddings.",
        epilog="example: corelm serve --model runs/sft-merged --port 9000 --api-key-file key.txt --max-batch 16")
    p.add_argument("--model", action="append", metavar="NAME_OR_PATH",
                   help=f"model to serve: an embedded or preset name, an HF directory or a .gguf file; repeat to "
                        f"serve several (e.g. a chat model and minilm-l6 for embeddings); default {DEFAULT_MODEL}")
    p.add_argument("--name", action="append", metavar="ID",
                   help="id clients send as 'model' for the --model at the same position "
                        "(default: the model name, or the directory/file name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the "
                        "network, so set an API key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="require 'Authorization: Bearer <key>' on /v1/* and /metrics, with the key on the file's "
                        "first line (or set $CORELM_API_KEY); /health and the chat page stay public")
    p.add_argument("--max-batch", type=_positive(int), default=8,
                   help="requests decoded together in the running batch (KV-cache rows; default 8)")
    p.add_argument("--max-seq-len", type=_positive(int), default=2048,
                   help="tokens per request, prompt + output (caps the context window so the KV cache of "
                        "max-batch rows fits in memory; default 2048)")
    p.add_argument("--max-queue", type=_positive(int), default=64,
                   help="requests allowed to wait for a batch row; more get 503 with Retry-After at once (default 64)")
    p.add_argument("--request-timeout", type=_positive(float), default=600.0,
                   help="seconds after which a queued or running request is ended with an error (default 600)")
    p.add_argument("--max-body-kb", type=_positive(int), default=1024,
                   help="largest accepted request body in KiB; larger bodies get 413 (default 1024)")
    p.add_argument("--default-max-tokens", type=_positive(int), default=512,
                   help="output limit for requests that give no max_tokens (default 512)")
    p.add_argument("--header-timeout", type=_positive(float), default=10.0,
                   help="seconds a connection may take to send a request's headers; slower ones are closed "
                        "(default 10)")
    p.add_argument("--body-timeout", type=_positive(float), default=30.0,
                   help="seconds a request body may take to arrive after its headers; then 408 (default 30)")
    p.add_argument("--keep-alive-timeout", type=_positive(float), default=5.0,
                   help="seconds an idle kept-alive connection stays open between requests (default 5)")
    p.add_argument("--max-connections", type=_positive(int), default=1000,
                   help="open connections at once; a request beyond them gets 503 (default 1000)")
    p.add_argument("--max-header-kb", type=_positive(int), default=16,
                   help="KiB of request line and headers buffered before they must be complete; "
                        "more get 400 (default 16)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="weights/compute dtype (default: bf16 where the CPU declares bf16 arithmetic, else fp32)")
    p.add_argument("--device", default="cpu", help="where the models run: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="weight-only quantization of the decoder(s) at load time")
    p.add_argument("--threads", type=_positive(int), default=None,
                   help="torch CPU threads for the model (default: all cores but one, at least 1: the HTTP side "
                        "needs a core too, and threads that wait on a busy core stall every matmul)")
    p.add_argument("--access-log", action="store_true", help="log one line per HTTP request")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from corelm.serve import server

    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        if args.host != "localhost":
            raise CorelmError(f"--host must be an IP address (e.g. 127.0.0.1 or 0.0.0.0), got {args.host!r}") from None
    if not 0 < args.port < 65536:
        raise CorelmError(f"--port must be in 1..65535, got {args.port}")
    api_key = server.read_api_key(args.api_key_file)
    server.check_port(args.host, args.port)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach this port can use it",
              file=sys.stderr)
    options = server.ServeOptions(max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_queue=args.max_queue,
                                  request_timeout=args.request_timeout, max_body_bytes=args.max_body_kb * 1024,
                                  default_max_tokens=args.default_max_tokens, header_timeout=args.header_timeout,
                                  body_timeout=args.body_timeout, keep_alive_timeout=args.keep_alive_timeout,
                                  max_connections=args.max_connections, max_header_bytes=args.max_header_kb * 1024)
    import torch

    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    specs = args.model or [DEFAULT_MODEL]
    print(f"loading {', '.join(specs)} ...", file=sys.stderr)
    app, served = server.build(specs, options, api_key=api_key, dtype=args.dtype, names=args.name,
                               device=args.device, quantize=args.quantize,
                               loopback_only=args.host in ("127.0.0.1", "localhost", "::1"))
    for m in served:
        if m.kind == "embed":
            print(f"serving {m.name!r} (/v1/embeddings; up to {m.context_window} tokens per input)", file=sys.stderr)
            continue
        cache = m.batcher.cache
        parts = [cache.k, cache.v] if isinstance(cache.k, torch.Tensor) else [*cache.k, *cache.v]
        gib = sum(t.numel() * t.element_size() for t in parts) / 2**30
        print(f"serving {m.name!r} ({describe_decoder(m.batcher.model)}; /v1/completions, /v1/chat/completions; "
              f"context {m.context_window} tokens; KV cache {m.batcher.max_batch} rows = {gib:.2f} GiB; "
              f"{threads} thread{'s' * (threads > 1)})", file=sys.stderr)
    print(f"web chat: http://{args.host}:{args.port}/   API: http://{args.host}:{args.port}/v1"
          + ("   (API key required)" if api_key else ""), file=sys.stderr)
    try:
        server.run(app, args.host, args.port, access_log=args.access_log, options=options)
    finally:
        server.stop(served)
    return 0
