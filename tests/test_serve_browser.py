"""The web chat page in headless Chromium, driven over the DevTools protocol (CDP).

CDP runs over ``--remote-debugging-pipe`` (JSON messages separated by NUL bytes on fds 3 and 4),
so no extra Python package is needed. Chromium comes from Debian's ``chromium`` package
(``scripts/setup_browser.sh``); without it this test is skipped with that instruction.

The served model is the tiny random Llama of ``test_serve_api`` whose sampler is scripted (test
only) to emit a reply containing ``<script>`` and ``<img onerror>`` markup, slowly enough that the
page is seen mid-stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import time

import pytest

from corelm.serve.app import ServerConfig, create_app
from corelm.serve.batcher import Batcher
from corelm.serve.server import ServerThread
from corelm.serve.service import TextModel
from tests.test_serve_api import WINDOW, tiny_llm

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REPLY = ('Hello <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> '
         'and <b>bold</b> text that streams one token at a time for a while to be seen mid-stream.')


class CDP:
    """A minimal Chrome DevTools Protocol client over Chromium's debugging pipe."""

    def __init__(self, user_dir: str) -> None:
        cmd_r, self._cmd_w = os.pipe()   # we write commands, Chromium reads fd 3
        self._out_r, out_w = os.pipe()   # Chromium writes fd 4, we read
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", f"--user-data-dir={user_dir}", "--remote-debugging-pipe", "about:blank"]
        # Map the pipe ends to fds 3/4 in the child with the shell (no preexec_fn: we have threads).
        script = f'exec 3<&{cmd_r} 4>&{out_w}; exec "$0" "$@"'
        self.proc = subprocess.Popen(["bash", "-c", script, CHROMIUM, *flags], pass_fds=(cmd_r, out_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0

    def _message(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._out_r, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the debugging pipe")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, timeout: float = 20.0, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            answer = self._message(timeout)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._out_r)


class Page:
    def __init__(self, cdp: CDP, url: str) -> None:
        self.cdp = cdp
        target = cdp.call("Target.createTarget", url=url)["targetId"]
        self.session = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expression: str):
        result = self.cdp.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True,
                               awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"].get("text"))
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 20.0, interval: float = 0.02) -> list:
        """Poll until ``expression`` is truthy; returns every value seen (to observe streaming)."""
        seen, t0 = [], time.monotonic()
        while True:
            try:
                value = self.js(expression)
            except RuntimeError:  # the page is still navigating
                value = None
            seen.append(value)
            if value:
                return seen
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"waited {timeout} s for {expression}")
            time.sleep(interval)


@pytest.fixture(scope="module")
def chat_server():
    llm = tiny_llm()
    script = llm.tokenizer.encode(REPLY)
    batcher = Batcher(llm.model, max_batch=4, max_seq_len=WINDOW, max_queue=4)

    counts: dict[int, list] = {}  # id(generator) -> [generator (kept alive: ids stay unique), tokens sampled]

    def scripted(logits, spec, generator, history):  # test only: emit REPLY, 30 ms per token
        time.sleep(0.03)
        entry = counts.setdefault(id(generator), [generator, 0])
        entry[1] += 1
        return script[(entry[1] - 1) % len(script)]

    batcher._sample = scripted
    batcher.n_script = len(script)
    app = create_app([TextModel("tiny", llm, batcher)], ServerConfig())
    batcher.start()
    with ServerThread(app) as srv:
        srv.batcher = batcher
        yield srv
    batcher.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: run scripts/setup_browser.sh")
def test_page_streams_renders_inert_text_and_stops(chat_server, tmp_path):
    cdp = CDP(str(tmp_path / "profile"))
    try:
        page = Page(cdp, chat_server.url + "/")
        page.wait("document.readyState === 'complete' && document.getElementById('model').value === 'tiny'")
        page.js("document.getElementById('temperature').value = '0';"
                f"document.getElementById('max-tokens').value = '{chat_server.batcher.n_script}';"
                "document.getElementById('input').focus()")
        cdp.call("Input.insertText", page.session, text="Say hello <b>there</b>")
        page.js("document.getElementById('send').click()")

        page.wait("document.querySelector('.msg.assistant[data-done]') !== null", timeout=30)
        # A second turn, sampling the reply's length while it streams.
        lengths = []
        cdp.call("Input.insertText", page.session, text="again")
        page.js("document.getElementById('send').click()")
        last = "document.querySelectorAll('.msg.assistant')[1]"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            state = page.js(f"{last} ? [{last}.querySelector('.content').textContent.length, "
                            f"{last}.dataset.done === '1'] : [0, false]")
            lengths.append(state[0])
            if state[1]:
                break
            time.sleep(0.05)
        partial = {n for n in lengths if 0 < n < len(REPLY)}
        assert len(partial) >= 3, f"no streaming seen: {lengths}"

        texts = page.js("[...document.querySelectorAll('.msg .content')].map(e => e.textContent)")
        assert texts[0] == "Say hello <b>there</b>" and texts[1] == texts[3]
        assert texts[1].startswith("Hello <img src=x onerror=")  # the markup is shown as text ...
        assert page.js("document.querySelectorAll('#log img, #log script, #log b').length") == 0
        assert page.js("window.__pwned === undefined")  # ... and nothing ran
        stats = page.js(f"{last}.querySelector('.stats').textContent")
        assert "tokens/s" in stats and "first token" in stats
        # The conversation is kept: the second request carried the whole history.
        assert page.js("JSON.parse(sessionStorage.getItem('corelm-chat-conversation')).length") == 4

        # Stop: a third generation is aborted mid-stream; the server frees its row.
        cdp.call("Input.insertText", page.session, text="and stop")
        page.js("document.getElementById('send').click()")
        third = "document.querySelectorAll('.msg.assistant')[2]"
        page.wait(f"{third} && {third}.querySelector('.content').textContent.length > 10")
        page.js("document.getElementById('stop').click()")
        page.wait(f"{third}.dataset.done === '1'")
        assert "stopped" in page.js(f"{third}.querySelector('.stats').textContent")
        t0 = time.monotonic()
        while chat_server.batcher.running:  # event: the row is freed (the guard is against a hang only)
            assert time.monotonic() - t0 < 120, "the stopped generation still holds its row"
            time.sleep(0.02)
        assert len(page.js(f"{third}.querySelector('.content').textContent")) < len(REPLY)
    finally:
        cdp.close()
