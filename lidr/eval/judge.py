"""The LLM judge: AlpacaEval 2's pairwise comparison, plus the multilingual rule.

Protocol (method.md §3, AlpacaEval 2 `weighted_alpaca_eval_gpt4_turbo`): the judge sees
the instruction and two answers labelled `m` (first) and `M` (second) and must answer
with the label of the better one, in one token. Where the server returns token
probabilities, the preference is weighted: P(first better) = p(m) / (p(m) + p(M)) over
the first token's top alternatives; otherwise it is discrete (1 or 0). The multilingual
rule: a good answer is in the language of the instruction unless the instruction asks
for another.

Every judgment is cached on disk, keyed by (judge model, prompt version, instruction,
first answer, second answer): a re-run or a resumed run never pays twice. Failures
(after the client's retries, or an unreadable reply) are raised, counted by the
caller, and never cached.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from lidr.openai_client import OpenAIClient, RequestFailed
from lidr.records import JsonlAppender, digest, read_jsonl

PROMPT_VERSION = "alpaca-eval-2-pairwise+multilingual/1"

SYSTEM = (
    "You are a careful assistant that compares the answers of large language models to "
    "the same instruction and picks the one a human would prefer. Your choices build a "
    "leaderboard of the most accurate and helpful models."
)

USER = """I am building a leaderboard of large language models. Below is an instruction given to two models and the answer each produced. Decide which answer is better from a human's point of view.

## Instruction

{{
    "instruction": \"\"\"{instruction}\"\"\",
}}

## Model answers

The two answers come in no particular order; each is tagged with a model identifier.

{{
    {{
        "model_identifier": "m",
        "output": \"\"\"{first}\"\"\"
    }},
    {{
        "model_identifier": "M",
        "output": \"\"\"{second}\"\"\"
    }}
}}

## Task

Judge the answers on quality and relevance to the instruction and pick the model whose answer is best. Language rule: a good answer is written in the language of the instruction, unless the instruction asks for another language; an answer in the wrong language is worse. Reply with the identifier of the best model only, exactly one of: m or M. No quotes, spaces, newlines or other text.

## Best model identifier
"""


class JudgeParseError(RuntimeError):
    """The judge's reply names neither answer."""


@dataclass(frozen=True)
class Judgment:
    p_first: float  # probability that the first answer shown is the better one
    weighted: bool  # True: from token probabilities; False: the discrete reply
    reply: str  # what the judge wrote (one token)


def judge_messages(instruction: str, first: str, second: str) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": USER.format(instruction=instruction, first=first, second=second)},
    ]


def parse_reply(response: dict) -> Judgment:
    """A chat-completions response -> Judgment (weighted when logprobs are present)."""
    try:
        choice = response["choices"][0]
        text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
    except (KeyError, IndexError, TypeError):
        raise JudgeParseError(f"not a chat completion: {json.dumps(response)[:200]}") from None
    probs = {"m": 0.0, "M": 0.0}
    for alt in _first_token_alternatives(choice):
        token = str(alt.get("token", "")).strip()
        if token in probs and alt.get("logprob") is not None:
            probs[token] += math.exp(alt["logprob"])
    # Weighted only when both labels are among the alternatives; a constrained reply
    # (grammar, guided choice) may list just the chosen token, which says nothing more
    # than the reply itself.
    if probs["m"] > 0 and probs["M"] > 0:
        return Judgment(probs["m"] / (probs["m"] + probs["M"]), True, text)
    label = text.strip().strip("\"'`*").strip()
    if label[:1] in ("m", "M") and (len(label) == 1 or not label[1].isalpha()):
        return Judgment(1.0 if label[0] == "m" else 0.0, False, text)
    raise JudgeParseError(f"the judge answered {text[:80]!r}, neither 'm' nor 'M'")


def _first_token_alternatives(choice: dict) -> list[dict]:
    """Top alternatives of the first generated token, from the chat format
    (logprobs.content[0].top_logprobs) or the legacy completions format
    (logprobs.top_logprobs[0] as {token: logprob})."""
    lp = choice.get("logprobs") or {}
    content = lp.get("content") if isinstance(lp, dict) else None
    if content:
        first = content[0]
        return list(first.get("top_logprobs") or []) or [first]
    legacy = lp.get("top_logprobs") if isinstance(lp, dict) else None
    if legacy and isinstance(legacy[0], dict):
        return [{"token": t, "logprob": v} for t, v in legacy[0].items()]
    return []


class JudgmentCache:
    """Append-only JSONL of judgments keyed by (judge, prompt version, texts)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        if self.path.exists():
            for _, rec in read_jsonl(self.path):
                self._entries[rec["key"]] = rec
        self._writer = JsonlAppender(self.path, key="key")

    @staticmethod
    def key(judge_model: str, instruction: str, first: str, second: str) -> str:
        return digest([judge_model, PROMPT_VERSION, instruction, first, second])

    def get(self, key: str) -> Judgment | None:
        rec = self._entries.get(key)
        return None if rec is None else Judgment(rec["p_first"], rec["weighted"], rec["reply"])

    def put(self, key: str, j: Judgment) -> None:
        with self._lock:
            if key in self._entries:
                return
            rec = {"key": key, "p_first": j.p_first, "weighted": j.weighted, "reply": j.reply}
            self._writer.write(rec)
            self._entries[key] = rec

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        self._writer.close()


class Judge:
    """Pairwise judgments through an OpenAI-compatible chat endpoint, cached."""

    def __init__(self, client: OpenAIClient, cache: JudgmentCache, logprobs: bool = True):
        self.client, self.cache, self.logprobs = client, cache, logprobs
        self.stats = {"cached": 0, "asked": 0, "failed": 0}
        self._lock = threading.Lock()

    @property
    def model(self) -> str:
        return self.client.model

    def describe(self) -> dict:
        return {"model": self.client.model, "url": self.client.base_url, "prompt_version": PROMPT_VERSION}

    def _bump(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def compare(self, instruction: str, first: str, second: str) -> Judgment:
        key = JudgmentCache.key(self.model, instruction, first, second)
        hit = self.cache.get(key)
        if hit is not None:
            self._bump("cached")
            return hit
        params = {"max_tokens": 1, "temperature": 0}
        if self.logprobs:
            params.update(logprobs=True, top_logprobs=5)
        self._bump("asked")
        try:
            judgment = parse_reply(self.client.chat(judge_messages(instruction, first, second), **params))
        except (RequestFailed, JudgeParseError):
            self._bump("failed")
            raise
        self.cache.put(key, judgment)
        return judgment

    def compare_many(self, items: Iterable[tuple[object, str, str, str]]) -> Iterator[tuple[object, Judgment | Exception]]:
        """(key, instruction, first, second) -> (key, Judgment or the failure), as each
        finishes, with the client's bounded concurrency."""
        items = list(items)
        for item, result in self.client.map(lambda it: self.compare(it[1], it[2], it[3]), items):
            yield item[0], result

    def close(self) -> None:
        self.cache.close()
        self.client.close()


def make_judge(endpoint, cache_path: str | Path) -> Judge:
    """A Judge from an `EndpointConfig` (url, model, api_key_env, timeout, retries, concurrency)."""
    from lidr.openai_client import client_from

    return Judge(client_from(endpoint), JudgmentCache(cache_path))
