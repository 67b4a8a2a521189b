"""A small client for OpenAI-compatible HTTP servers (vLLM serve, SGLang, llama.cpp's
server, hosted APIs), shared by the LLM judge and the `openai` generation backend.

What it adds over a bare POST: retries with exponential backoff (and jitter) on 429,
5xx, timeouts and dropped connections, honouring `Retry-After`; bounded concurrency;
the API key read from an environment variable and never logged. After the last retry a
`RequestFailed` is raised, so callers can count the failure and move on; nothing about
a failed request is ever cached.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Iterable, Iterator, TypeVar

import httpx

T = TypeVar("T")
R = TypeVar("R")

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class RequestFailed(RuntimeError):
    """A request that still failed after every retry (or failed in a way retries cannot fix)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class OpenAIClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        concurrency: int = 8,
        extra_body: dict | None = None,
    ):
        # Accept both http://host:port and http://host:port/v1.
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model = model
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.concurrency = max(1, concurrency)
        self.extra_body = dict(extra_body or {})  # server-specific fields sent with every request
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), headers=headers)
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "failures": 0}

    def __repr__(self) -> str:  # no headers: the key must never reach a log
        return f"OpenAIClient({self.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        self._http.close()

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def post(self, path: str, payload: dict) -> dict:
        """POST `payload` (the model filled in) to base_url + path, with retries."""
        body = {"model": self.model, **self.extra_body, **payload}
        url = f"{self.base_url}/{path.lstrip('/')}"
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
            self._count("requests")
            wait = None
            try:
                resp = self._http.post(url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()
                    except ValueError:
                        last = "200 with a body that is not JSON"
                elif resp.status_code in RETRY_STATUS:
                    last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                    wait = _retry_after(resp)
                else:  # 400/401/404...: the request itself is wrong, retrying cannot help
                    self._count("failures")
                    raise RequestFailed(f"{url}: HTTP {resp.status_code}: {resp.text[:300]}", resp.status_code)
            if attempt < self.max_retries:
                delay = min(self.max_backoff, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
                time.sleep(max(delay, wait or 0.0))
        self._count("failures")
        raise RequestFailed(f"{url}: gave up after {self.max_retries + 1} attempts ({last})")

    def chat(self, messages: list[dict], **params: Any) -> dict:
        return self.post("chat/completions", {"messages": messages, **params})

    def complete(self, prompt: str, **params: Any) -> dict:
        return self.post("completions", {"prompt": prompt, **params})

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[tuple[T, R | Exception]]:
        """Run `fn` over items with at most `concurrency` requests in flight; yields
        (item, result or the exception it raised) as they finish, so callers can write
        each result at once (nothing lost if the run stops)."""
        items = list(items)
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(fn, it): it for it in items}
            for fut in as_completed(futures):
                try:
                    yield futures[fut], fut.result()
                except Exception as e:  # noqa: BLE001 - handed to the caller, who counts it
                    yield futures[fut], e


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return min(float(value), 120.0) if value is not None else None
    except ValueError:
        return None


def client_from(cfg) -> OpenAIClient:
    """An OpenAIClient from a config section with url, model, api_key_env, timeout,
    max_retries, concurrency, extra_body (the judge and the openai backend share these names)."""
    return OpenAIClient(cfg.url, cfg.model, api_key_env=cfg.api_key_env, timeout=cfg.timeout,
                        max_retries=cfg.max_retries, concurrency=cfg.concurrency,
                        extra_body=getattr(cfg, "extra_body", None))
