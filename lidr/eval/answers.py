"""The model's answers to a benchmark's prompts, recorded as they come.

Each benchmark (MGSM, X-AlpacaEval) describes the answers it needs as an `AnswerSet`: the
rows to generate, with their own token limit and repetition penalty, and how a finished
row is scored and written. `generate` decodes several sets in one run, so the
evaluation pays one tail of long answers per model instead of one per benchmark (with
continuous batching, the last few long rows of a run decode nearly alone).

Resuming: a set leaves out the ids its files already hold, so an interrupted evaluation
generates only what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lidr.backends import Generation, Request, run_batched
from lidr.console import tracker
from lidr.records import JsonlAppender


@dataclass
class AnswerSet:
    name: str  # the progress bar's label
    requests: list[Request]  # rows still to generate, each with its token limit and penalty
    record: Callable[[object, Generation], None]  # scores and writes one finished row
    close: Callable[[], None]  # closes the set's files


def per_language(name: str, fmt, data: dict[str, list[dict]], file_of: Callable[[str], object], *,
                 prompt: Callable[[dict, str], str], score: Callable[[dict, str, str, str | None], dict],
                 max_new_tokens: int, repetition_penalty: float) -> AnswerSet:
    """A benchmark's usual set: items per language ({id, ...}), one JSONL file per language
    (`file_of(lang)`; ids already there are kept); each answer is cut at the format's stop
    strings (`fmt.clean_response`), scored (`score(item, lang, answer, finish_reason)`) and
    appended the moment it arrives."""
    writers = {lang: JsonlAppender(file_of(lang)) for lang in data}
    requests = [Request((lang, it["id"]), prompt(it, lang), fmt.response_stops(lang), max_new_tokens,
                        repetition_penalty)
                for lang, items in data.items() for it in items if it["id"] not in writers[lang].done]
    by_key = {(lang, it["id"]): it for lang, items in data.items() for it in items}

    def record(key, out: Generation) -> None:
        lang = key[0]
        writers[lang].write(score(by_key[key], lang, fmt.clean_response(out.text, lang), out.finish_reason))

    def close() -> None:
        for w in writers.values():
            w.close()

    return AnswerSet(name, requests, record, close)


def generate(backend, sets: list[AnswerSet], *, batch_size: int, progress=None) -> None:
    """Decode every set's rows in one run; each result is recorded the moment it arrives."""
    advances = [tracker(progress, s.name, len(s.requests)) for s in sets]

    def record(key, out: Generation) -> None:
        i, inner = key
        sets[i].record(inner, out)
        advances[i](1)

    requests = [r._replace(key=(i, r.key)) for i, s in enumerate(sets) for r in s.requests]
    try:
        # Every request carries its own settings; the call's defaults are never used.
        run_batched(backend, requests, batch_size=batch_size, on_result=record, max_new_tokens=1)
    finally:
        for s in sets:
            s.close()
