"""Assemble and run a server: load models, start their batchers, run uvicorn (blocking or in a thread).

``corelm serve`` calls :func:`build` then :func:`run`; tests and ``benchmarks/serve.py`` use
:class:`ServerThread` to run the same app on a free loopback port inside their own process. :func:`run`
drains on SIGTERM or Ctrl-C (:class:`DrainingServer`): no new connections, the running requests finish
within ``drain_timeout`` seconds, then those left get an in-band 503 and the process exits (0 after a
SIGTERM, 130 after Ctrl-C, as every corelm command).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from corelm.errors import CorelmError
from corelm.serve import adapters
from corelm.serve.app import ServerConfig, create_app
from corelm.serve.batcher import Batcher
from corelm.serve.service import EmbeddingModel, TextModel


@dataclass
class ServeOptions:
    """Everything ``corelm serve`` can set (its ``--help`` documents each field).

    Attributes:
        max_batch: requests decoded together (rows of the KV cache).
        max_seq_len: tokens per request (prompt + output); caps the model's context window so the
            KV cache (``max_batch x max_seq_len`` slots per layer) fits in memory.
        max_queue: requests that may wait for a row; beyond that new requests get 503 at once.
        request_timeout: seconds after which a request is ended (queued or running).
        max_body_bytes: request bodies above this get 413.
        default_max_tokens: output limit when a request gives no ``max_tokens``.
        header_timeout: seconds a connection may take to send a request's headers (slow clients are
            closed, see :mod:`corelm.serve.timeouts`).
        body_timeout: seconds a request's whole body may take to arrive once its headers are in (408).
        keep_alive_timeout: seconds an idle kept-alive connection stays open between requests.
        max_connections: open connections (and requests in flight); a request beyond it gets 503.
        max_header_bytes: a request line and headers still unfinished after this many bytes get 400
            (h11's incomplete-event limit).
        drain_timeout: seconds the running requests get to finish after SIGTERM or Ctrl-C (:func:`run`).
        lora: ``NAME=PATH`` LoRA runs served over the first decoder (:mod:`corelm.serve.adapters`).
        max_loras: adapter slots (adapters loaded at once); 0: ``max(4, len(lora))`` when ``lora`` is
            given, else no slots (and no adapter endpoint).
        max_lora_rank: the largest adapter rank a slot holds; 0: the largest rank in ``lora``, or 16.
        prefill_chunk: prompt tokens prefilled per batcher step, all prefilling requests together
            (chunked prefill: running streams get a token every step while long prompts come in).
        prefix_cache_mb: MiB of keys and values the prefix cache keeps (:mod:`corelm.serve.prefix`); 0: off.
    """

    max_batch: int = 8
    max_seq_len: int = 2048
    max_queue: int = 64
    request_timeout: float = 600.0
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 512
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1000
    max_header_bytes: int = 16 * 1024
    drain_timeout: float = 30.0
    lora: list[str] | None = None
    max_loras: int = 0
    max_lora_rank: int = 0
    prefill_chunk: int = 128
    prefix_cache_mb: int = 256


def served_name(spec: str) -> str:
    """The id clients use for a model: the preset/embedded name, or the directory/file stem (never a path)."""
    path = Path(spec)
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    return spec


def wrap(name: str, loaded: Any, options: ServeOptions, with_adapters: bool = False) -> TextModel | EmbeddingModel:
    """Put a ``corelm.load`` result behind the server: a batcher for decoders, ``embed`` for encoders;
    ``with_adapters``: LoRA adapter slots (``options.lora``, ``max_loras``) over the decoder."""
    if hasattr(loaded, "embed"):
        return EmbeddingModel(name, loaded)
    max_seq_len = min(options.max_seq_len, int(loaded.config.max_seq_len))
    lora = adapters.start_adapters(loaded.model, options.lora or [], options.max_loras, options.max_lora_rank) \
        if with_adapters else None
    batcher = Batcher(loaded.model, max_batch=options.max_batch, max_seq_len=max_seq_len,
                      max_queue=options.max_queue, step=lora.step if lora else None,
                      prefill_chunk=options.prefill_chunk, prefix_cache_mib=options.prefix_cache_mb)
    model = TextModel(name, loaded, batcher, default_max_tokens=options.default_max_tokens)
    if lora is not None:
        model.adapters = lora.attach(batcher)
    return model


def build(model_specs: list[str], options: ServeOptions, api_key: str | None = None,
          dtype: str | None = None, names: list[str] | None = None, device: str = "cpu",
          quantize: str | None = None, loopback_only: bool = False) -> tuple[Any, list[Any]]:
    """Load every model, start the batchers, and return ``(app, served models)``."""
    import corelm
    from corelm.presets import EMBEDDED, PRESETS

    served: list[Any] = []
    for i, spec in enumerate(model_specs):
        name = names[i] if names and i < len(names) else served_name(spec)
        family = PRESETS.get(EMBEDDED[spec][2] if spec in EMBEDDED else spec, {}).get("family")
        quant = None if family == "bert" else quantize  # encoders are served as they are
        loaded = corelm.load(spec, dtype=dtype, device=device, quantize=quant)
        first_decoder = not hasattr(loaded, "embed") and not any(isinstance(m, TextModel) for m in served)
        lora = first_decoder and bool(options.lora or options.max_loras)  # adapters go on the first decoder
        served.append(wrap(name, loaded, options, with_adapters=lora))
    if len({m.name for m in served}) != len(served):
        raise CorelmError("two served models have the same name; pick distinct ones with --name")
    config = ServerConfig(api_key=api_key, max_body_bytes=options.max_body_bytes,
                          request_timeout=options.request_timeout, loopback_only=loopback_only,
                          body_timeout=options.body_timeout)
    app = create_app(served, config)
    start(served)
    return app, served


def start(served: list[Any]) -> None:
    for m in served:
        if isinstance(m, TextModel):
            m.batcher.start()


def stop(served: list[Any]) -> None:
    for m in served:
        if isinstance(m, TextModel):
            m.batcher.stop()


def read_api_key(path: str | None) -> str | None:
    """The key from ``--api-key-file`` (first line) or ``$CORELM_API_KEY``; ``None`` = no auth."""
    if path:
        try:
            key = Path(path).read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            raise CorelmError(f"cannot read the API key file {path}: {exc.strerror}") from None
        if not key or not key[0].strip():
            raise CorelmError(f"the API key file {path} is empty")
        return key[0].strip()
    return os.environ.get("CORELM_API_KEY") or None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """Fail with one clear line before loading anything when the address is taken."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise CorelmError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


class ServerThread:
    """Run an app with uvicorn in a background thread (tests, benchmarks).

    Usage::

        with ServerThread(app) as server:
            client = OpenAI(base_url=server.url + "/v1", api_key="x")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None,
                 options: ServeOptions | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", timeout_graceful_shutdown=2,
                                lifespan="off", **uvicorn_limits(options or ServeOptions()))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="corelm-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:  # noqa: PYI034 (py3.10: no typing.Self)
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 30:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# Seconds past the drain deadline before uvicorn cancels what is still running (a request the batchers'
# shutdown does not end, e.g. an embedding in progress).
DRAIN_GRACE = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with corelm's shutdown.

    On SIGTERM or Ctrl-C it stops accepting connections and closes idle ones (uvicorn's graceful shutdown),
    lets the running requests -- streams included -- finish for up to ``drain_timeout`` seconds, then calls
    ``on_deadline`` (stopping the batchers: every request still running or queued ends with a 503
    ``shutdown`` error, in-band for a stream, followed by ``data: [DONE]``), and returns once they are
    answered. A SIGTERM is not re-raised afterwards, so ``corelm serve`` exits 0 after a drain.
    """

    def __init__(self, config: uvicorn.Config, drain_timeout: float, on_deadline: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.on_deadline = on_deadline

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        logging.getLogger("corelm.serve").info("draining: %d request(s) running; deadline %g s",
                                               len(self.server_state.tasks), self.drain_timeout)
        # in a worker thread: stopping a batcher joins its thread, and its last events need this loop
        deadline = loop.call_later(self.drain_timeout, lambda: loop.run_in_executor(None, self.on_deadline))
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the signal it stopped for once its handlers are restored: a SIGTERM asked for
            # exactly this drain, so it ends here (exit 0); Ctrl-C still reaches the CLI as an interrupt.
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def run(app: Any, host: str, port: int, access_log: bool = False, options: ServeOptions | None = None,
        served: list[Any] | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C (blocking), then drain (:class:`DrainingServer`) and stop ``served``'s
    batchers. ``access_log``: one JSON line per request on stderr (:mod:`corelm.serve.accesslog`)."""
    options = options or ServeOptions()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if access_log:
        from corelm.serve.accesslog import AccessLog, log

        handler = logging.StreamHandler(sys.stderr)  # the bare JSON object, one per line
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        app = AccessLog(app)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=options.drain_timeout + DRAIN_GRACE, **uvicorn_limits(options))
    DrainingServer(config, options.drain_timeout, lambda: stop(served or [])).run()


def uvicorn_limits(options: ServeOptions) -> dict[str, Any]:
    """uvicorn settings that bound what slow or many clients can hold (the body's bound is the app's,
    :class:`~corelm.serve.app.ServerConfig` ``body_timeout``)."""
    from corelm.serve.timeouts import header_timeout_protocol

    return {"http": header_timeout_protocol(options.header_timeout), "timeout_keep_alive": options.keep_alive_timeout,
            "limit_concurrency": options.max_connections, "h11_max_incomplete_event_size": options.max_header_bytes}
