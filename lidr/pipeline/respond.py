"""Stage 1, respond: the model answers every prompt in every language (method.md §2.1).

Writes responses/<lang>.jsonl, one record {id, lang, prompt, response, finish_reason}
a line, flushed as soon as it exists; an interrupted stage continues with the ids
not yet written.
"""

from __future__ import annotations

from pathlib import Path

from lidr.backends import run_batched
from lidr.config import GenerationConfig
from lidr.console import tracker
from lidr.records import JsonlAppender
from lidr.templates import PromptFormat


def respond(
    backend,
    fmt: PromptFormat,
    prompts: dict[str, dict],  # lang -> id -> instruction (this iteration's slice)
    out_dir: Path,
    gen: GenerationConfig,
    progress=None,
) -> None:
    writers = {lang: JsonlAppender(out_dir / f"{lang}.jsonl") for lang in prompts}
    items = [
        ((lang, pid), fmt.response_prompt(text, lang), fmt.response_stops(lang))
        for lang, texts in prompts.items()
        for pid, text in texts.items()
        if pid not in writers[lang].done
    ]
    advance = tracker(progress, "respond", len(items))

    def write(key, out):
        lang, pid = key
        writers[lang].write({
            "id": pid,
            "lang": lang,
            "prompt": prompts[lang][pid],
            "response": fmt.clean_response(out.text, lang),
            "finish_reason": out.finish_reason,
        })

    try:
        run_batched(
            backend, items, batch_size=gen.batch_size, on_result=write,
            advance=advance,
            max_new_tokens=gen.max_new_tokens, repetition_penalty=gen.repetition_penalty,
        )
    finally:
        for w in writers.values():
            w.close()
