"""Stage 2, self-translate: the same model translates its own answers (method.md §2.2).

The dominant answer goes into each non-dominant language (y^{d->l}) and each
non-dominant answer into the dominant language (y^{l->d}). The request wraps the text
in delimiters and pre-fills the opening result delimiter; a result without the closing
delimiter, or an empty one, is a failed translation, kept with its raw output. A
translation stops at the first delimiter the model writes, and at
`generation.translation_limit` tokens (a multiple of its source's length, within the
stage's limit): past that it is looping, not translating.

Writes translations/<src>-<tgt>.jsonl: {id, src, tgt, text, translation, ok, raw}.
"""

from __future__ import annotations

from pathlib import Path

from lidr.backends import Request, run_batched
from lidr.config import GenerationConfig
from lidr.console import tracker
from lidr.records import JsonlAppender
from lidr.templates import PromptFormat, parse_translation


def translate(
    backend,
    fmt: PromptFormat,
    responses: dict[str, dict],  # lang -> id -> response record
    needed: dict[tuple[str, str], set],  # (src, tgt) -> ids to translate
    out_dir: Path,
    gen: GenerationConfig,
    progress=None,
) -> None:
    writers = {d: JsonlAppender(out_dir / f"{d[0]}-{d[1]}.jsonl") for d in needed}
    todo = [
        (src, tgt, pid)
        for (src, tgt), ids in needed.items()
        for pid in sorted(ids, key=str)
        if pid in responses.get(src, {}) and pid not in writers[(src, tgt)].done
    ]
    advance = tracker(progress, "translate", len(todo))

    def write(key, raw: str):
        src, tgt, pid = key
        translation, ok = parse_translation(raw)
        writers[(src, tgt)].write({
            "id": pid, "src": src, "tgt": tgt, "text": responses[src][pid]["response"],
            "translation": translation, "ok": ok, "raw": raw,
        })

    try:
        # An empty answer has nothing to translate: recorded as failed, no model call.
        empty = {k for k in todo if not responses[k[0]][k[2]]["response"].strip()}
        for key in empty:
            write(key, "")
        advance(len(empty))
        items = []
        for key in todo:
            if key not in empty:
                text = responses[key[0]][key[2]]["response"]
                items.append(Request(key, fmt.translation_prompt(text, key[0], key[1]), fmt.translation_stops,
                                     gen.translation_limit(backend.count_tokens(text))))
        run_batched(
            backend, items, batch_size=gen.batch_size, on_result=lambda key, out: write(key, out.text),
            advance=advance, max_new_tokens=gen.translation_tokens,
            repetition_penalty=gen.translation_repetition_penalty,
        )
    finally:
        for w in writers.values():
            w.close()
