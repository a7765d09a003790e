"""A real HTTP server and a real browser for the dashboard tests.

``serve(app)`` runs the app under uvicorn on 127.0.0.1 (a free port) in a thread;
``Chromium.launch()`` starts headless Chromium with a throwaway profile and drives its page
over the Chrome DevTools Protocol with the ``websockets`` package (a Prefect dependency):
``navigate``, ``evaluate`` (JavaScript in the page), ``click`` (then wait for the next page).
Both always stop what they started, by its id, and every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from websockets.sync.client import ClientConnection, connect

from tools.report_screenshot import find_chromium

TIMEOUT = 15.0


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free port of 127.0.0.1; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning",
                                           lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


class Chromium:
    """Headless Chromium and one of its pages, over the DevTools Protocol."""

    def __init__(self, process: subprocess.Popen[bytes], profile: tempfile.TemporaryDirectory,
                 ws: ClientConnection) -> None:
        self.process, self.profile, self.ws = process, profile, ws
        self.events: list[dict[str, Any]] = []
        self._id = 0

    @classmethod
    def launch(cls) -> Chromium:
        binary = find_chromium()
        if binary is None:
            raise FileNotFoundError("chromium is not installed")
        profile = tempfile.TemporaryDirectory(prefix="dashboard-chromium-")
        log = open(Path(profile.name) / "chromium.log", "wb")  # noqa: SIM115 (closed below)
        process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--no-proxy-server", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", "--remote-debugging-port=0",
             f"--user-data-dir={profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        try:
            ws = connect(cls._page_socket(process, Path(profile.name)), open_timeout=TIMEOUT,
                         max_size=None)
        except BaseException:
            cls._stop(process)
            profile.cleanup()
            raise
        browser = cls(process, profile, ws)
        browser.send("Page.enable")
        return browser

    @staticmethod
    def _page_socket(process: subprocess.Popen[bytes], profile: Path) -> str:
        """The DevTools WebSocket of the browser's first page (``DevToolsActivePort``)."""
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + TIMEOUT
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            if process.poll() is not None:
                log = (profile / "chromium.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"chromium exited ({process.returncode}): {log}")
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not open its DevTools port")
            lines = port_file.read_text().split() if port_file.exists() else []
            if lines:
                try:
                    with opener.open(f"http://127.0.0.1:{lines[0]}/json/list", timeout=2) as r:
                        targets = json.load(r)
                except OSError:
                    targets = []
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.05)

    # -- the protocol --------------------------------------------------------------------------

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call a DevTools method and return its result (events meanwhile are kept)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + TIMEOUT
        while True:
            message = self._receive(deadline, method)
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"chromium: no answer to {waiting_for} within {TIMEOUT} s")
        try:
            return json.loads(self.ws.recv(timeout=remaining))
        except TimeoutError:
            raise TimeoutError(f"chromium: no answer to {waiting_for} within {TIMEOUT} s") from None

    def wait_for(self, event: str) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            for i, message in enumerate(self.events):
                if message["method"] == event:
                    del self.events[: i + 1]
                    return message.get("params", {})
            self.events.clear()
            message = self._receive(deadline, event)
            if "method" in message:
                self.events.append(message)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        result = self.send("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait until it has loaded."""
        self.events.clear()
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise RuntimeError(f"{url}: {result['errorText']}")
        self.wait_for("Page.loadEventFired")

    def act_and_wait(self, expression: str) -> None:
        """Run ``expression`` (a click, a form submission) and wait for the next page."""
        self.events.clear()
        self.evaluate(expression)
        self.wait_for("Page.loadEventFired")

    # -- stopping ------------------------------------------------------------------------------

    @staticmethod
    def _stop(process: subprocess.Popen[bytes]) -> None:
        """Stop chromium if it still runs, and its helpers (its own process group, by id)."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # helpers left in its group, if any

    def close(self) -> None:
        """Ask chromium to quit (it then reaps its helpers), then make sure it did."""
        try:
            with contextlib.suppress(Exception):
                self._id += 1
                self.ws.send(json.dumps({"id": self._id, "method": "Browser.close"}))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(5)
            self.ws.close()
        finally:
            self._stop(self.process)
            self.profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
