"""Generation through any OpenAI-compatible server (vLLM serve, SGLang, llama.cpp's
server, a hosted API), with `lidr.openai_client.OpenAIClient` (retries with backoff on
429 / 5xx / timeouts, bounded concurrency, the key read from an environment variable).

lidr's templates already produce the whole prompt string (chat template or few-shot
format, special tokens included), so this backend uses the plain `/v1/completions`
endpoint with that string, greedy (temperature 0). Prompts are formatted and tokens
counted with a local tokenizer, which must be the served model's: the server has to
serve the same model as the tokenizer's (M0, then M_{t-1}).

Rows are sent concurrently and written one by one as they come back (`run_batched`).
A row that still fails after every retry is counted, the others are written, and the
stage stops with `GenerationFailed`; running it again resumes and asks only for the
missing rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from lidr.backends.decode import Generation, Request, as_requests
from lidr.errors import BackendError
from lidr.models import load_tokenizer
from lidr.openai_client import OpenAIClient, RequestFailed, client_from

# Request fields beyond the OpenAI completions API, for the engines lidr is run with.
# vLLM and SGLang take `repetition_penalty` (HF semantics: the prompt and all generated
# tokens are penalised); llama.cpp's servers take `repeat_penalty` instead (only the
# last 64 tokens are penalised, and llama-cpp-python defaults it to 1.1, so it is always
# sent). A server that ignores both (or a hosted API) decodes without the penalty:
# answers may then repeat more than with the hf backend. `include_stop_str_in_output`
# (vLLM) and `no_stop_trim` (SGLang) keep the stop string a row ended on in the text, as
# the hf backend does. `add_special_tokens` is not sent: see `_prompt_text`.
EXTRA_FIELDS = ("repetition_penalty", "repeat_penalty", "include_stop_str_in_output", "no_stop_trim")


def tokenizer_source(spec: str) -> str | Path:
    """A model spec -> what `load_tokenizer` reads: the alias, a .gguf file or a folder are
    resolved as models are (a GGUF file holds its tokenizer); a Hub id is passed as it is,
    so only its tokenizer files are fetched, not the weights the server already holds."""
    from lidr.models import ALIASES, resolve_model

    if spec in ALIASES or Path(spec).expanduser().exists():
        return resolve_model(spec)
    return spec


class GenerationFailed(BackendError):
    """Rows that failed after every retry; the rows that succeeded are already written."""


class OpenAIBackend:
    name = "openai"

    def __init__(self, server, tokenizer_path: str | Path | None, trust_remote_code: bool = False,
                 client: OpenAIClient | None = None, tokenizer=None):
        self.server = server
        self.client = client or client_from(server)
        self.tokenizer = tokenizer or load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
        # Servers tokenize the prompt with the model's own special-token rule: when that
        # rule adds BOS, the BOS text lidr's templates put in front is dropped (else the
        # model would see two BOS tokens, which degrades some models).
        bos = self.tokenizer.bos_token
        ids = self.tokenizer("a", add_special_tokens=True).input_ids
        self._strip_bos = bos if bos and ids and ids[0] == self.tokenizer.bos_token_id else None
        self._extras = True  # dropped once if the server rejects unknown fields (HTTP 400)

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.where})"

    @property
    def where(self) -> str:
        return f"{self.client.base_url} (model {self.client.model!r})"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def served_models(self) -> list[dict]:
        """The server's /v1/models entries (vLLM lists the served folder as `root`)."""
        resp = self.client._http.get(f"{self.client.base_url}/models")
        resp.raise_for_status()
        return list(resp.json().get("data") or [])

    # ---- one request --------------------------------------------------------------
    def _prompt_text(self, prompt: str) -> str:
        if self._strip_bos and prompt.startswith(self._strip_bos):
            return prompt[len(self._strip_bos):]
        return prompt

    def _payload(self, prompt: str, stops: list[str], max_new_tokens: int, repetition_penalty: float) -> dict:
        body = {"prompt": self._prompt_text(prompt), "max_tokens": max_new_tokens, "temperature": 0}
        if stops:
            body["stop"] = list(stops)
        if self._extras:
            body.update(repetition_penalty=repetition_penalty, repeat_penalty=repetition_penalty,
                        include_stop_str_in_output=True, no_stop_trim=True)
        return body

    def _complete(self, prompt: str, stops: list[str], max_new_tokens: int, repetition_penalty: float) -> Generation:
        try:
            resp = self.client.complete(**self._payload(prompt, stops, max_new_tokens, repetition_penalty))
        except RequestFailed as e:
            if not (self._extras and e.status == 400 and any(f in str(e) for f in EXTRA_FIELDS)):
                raise
            self._extras = False  # a strict server (e.g. a hosted API): plain OpenAI fields only
            resp = self.client.complete(**self._payload(prompt, stops, max_new_tokens, repetition_penalty))
        return self._parse(resp, stops)

    def _parse(self, resp: dict, stops: list[str]) -> Generation:
        try:
            choice = resp["choices"][0]
            text = choice.get("text") or ""
        except (KeyError, IndexError, TypeError):
            raise RequestFailed(f"{self.where}: unexpected completion response: {str(resp)[:300]}") from None
        if choice.get("finish_reason") == "length":
            return Generation(text=text, finish_reason="length")
        # "stop" (or a server-specific reason): EOS or a stop string. Like the hf backend,
        # keep the stop string a row ended on, since the translation parser looks for it.
        if stops and not any(text.endswith(s) for s in stops):
            matched = self._matched_stop(choice, resp, text, stops)
            if matched:
                text += matched
        return Generation(text=text, finish_reason="stop")

    def _matched_stop(self, choice: dict, resp: dict, text: str, stops: list[str]) -> str | None:
        """Which stop string ended a row whose text comes back without it (None = EOS)."""
        for key in ("stop_reason", "matched_stop"):  # vLLM, SGLang: the string, or None/int for EOS
            if key in choice:
                value = choice[key]
                return value if isinstance(value, str) and value in stops else None
        # Servers that say nothing (llama.cpp): they count every generated token, the cut
        # stop string's included, so more generated tokens than the text holds means a
        # stop string ended it. Which one is not known: the first is restored. Responses
        # are cut at any stop string anyway; for a translation that is the closing
        # delimiter, so one the model ended with a source delimiter instead counts as
        # closed there (servers that report the matched stop mark it failed).
        generated = (resp.get("usage") or {}).get("completion_tokens")
        if isinstance(generated, int) and generated > self.count_tokens(text) + 1:
            return stops[0]
        return None

    # ---- the interface --------------------------------------------------------------
    def generate(self, prompts: list[str], *, max_new_tokens: int, stops: list[list[str]] | None = None,
                 repetition_penalty: float = 1.0) -> list[Generation]:
        """All rows concurrently; raises GenerationFailed if any row failed."""
        stops = stops or [[] for _ in prompts]
        out: list[Generation | None] = [None] * len(prompts)

        def keep(i, gen):
            out[i] = gen

        self.run_batched([(i, p, s) for i, (p, s) in enumerate(zip(prompts, stops))], batch_size=len(prompts) or 1,
                         on_result=keep, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
        return out  # type: ignore[return-value]

    def run_batched(self, items: Iterable[Request | tuple[object, str, list[str]]], *, batch_size: int,
                    on_result: Callable[[object, Generation], None], advance: Callable[[int], None] = lambda n: None,
                    max_new_tokens: int, repetition_penalty: float = 1.0) -> None:
        """Every row is its own request, `concurrency` in flight; each result goes to
        `on_result` as soon as it arrives (in this thread, so writers need no lock).
        Rows go out in chunks of `batch_size`, so an interrupted run loses at most the
        requests in flight. A chunk in which every row failed stops the stage early (the
        server is down or refusing): retrying the rest would only wait out the backoffs."""
        items = as_requests(items, max_new_tokens, repetition_penalty)
        failed, errors, skipped = 0, [], 0
        for start in range(0, len(items), max(1, batch_size)):
            chunk = items[start : start + max(1, batch_size)]
            ok_in_chunk = 0
            for req, result in self.client.map(
                lambda r: self._complete(r.prompt, r.stops, r.max_new_tokens, r.repetition_penalty), chunk
            ):
                if isinstance(result, Exception):
                    failed += 1
                    errors.append(str(result))
                else:
                    ok_in_chunk += 1
                    on_result(req.key, result)
                advance(1)
            if ok_in_chunk == 0 and chunk:
                skipped = len(items) - start - len(chunk)
                break
        if failed:
            done = len(items) - failed - skipped
            raise GenerationFailed(
                f"{failed} of {len(items)} generation requests to {self.where} failed "
                f"(retried up to {self.client.max_retries} times)"
                + (f" and {skipped} were not sent (a whole batch failed)" if skipped else "")
                + f"; the {done} that succeeded are saved. Run the same command again to generate only "
                f"the missing rows. Last error: {errors[-1][:300]}"
            )

    def close(self) -> None:
        self.client.close()
