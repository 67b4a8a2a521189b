"""MGSM: accuracy and off-target rate per language (method.md §3).

Accuracy: the final number of the answer (`numbers.extract_answer`) equals the gold
number. Off-target: the language identifier says the answer is not in the question's
language (answers too short to tell are left out of that rate and counted).

Data: a folder in the layout of `shared/datasets/mgsm/` (`<lang>.jsonl` with `query` and
`response` = the gold number). Per item a record
{id, lang, question, response, finish_reason, extracted, gold, correct, detected_lang,
off_target} goes to `<out>/<lang>.jsonl` (appended, resumable); `<out>/summary.json`
holds per-language accuracy and off-target rate with 95 % Wilson intervals.
"""

from __future__ import annotations

from pathlib import Path

from lidr.eval.numbers import extract_answer, numbers_equal, parse_gold
from lidr.eval.stats import wilson
from lidr.languages import name
from lidr.records import JsonlAppender, RecordError, atomic_write_json, atomic_write_jsonl, load_records, read_jsonl

MGSM_LANGUAGES = ["bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"]

# The paper's Alpaca-style wrapper for math prompts: it names the answer language.
CHAT_WRAPPER = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request in {language}. Please answer in {language}.\n\n"
    "### Instruction:\n{question}\n\n### Response:"
)


def load_mgsm(folder: str | Path, langs: list[str], limit: int | None = None) -> dict[str, list[dict]]:
    """lang -> [{id, question, gold}], checked before any model loads."""
    folder = Path(folder)
    out = {}
    for lang in langs:
        path = folder / f"{lang}.jsonl"
        if not path.exists():
            raise RecordError(f"MGSM data: {path} not found (languages there: "
                              f"{', '.join(sorted(p.stem for p in folder.glob('*.jsonl'))) or 'none'})")
        items = []
        for lineno, rec in read_jsonl(path):
            for field in ("query", "response"):
                if not str(rec.get(field, "")).strip():
                    raise RecordError(f"{path}:{lineno}: field '{field}' is missing or empty")
            try:
                gold = parse_gold(str(rec["response"]))
            except ValueError:
                raise RecordError(f"{path}:{lineno}: field 'response' is not a number: {rec['response']!r}") from None
            items.append({"id": len(items), "question": rec["query"], "gold": gold})
            if limit and len(items) >= limit:
                break
        out[lang] = items
    return out


def mgsm_prompt(fmt, question: str, lang: str) -> str:
    """Zero-shot with the language-naming wrapper for chat models; the few-shot
    completion format (in the question's language) for base models."""
    if fmt.kind == "chat":
        return fmt.response_prompt(CHAT_WRAPPER.format(language=name(lang), question=question), lang)
    return fmt.response_prompt(question, lang)


def score(item: dict, lang: str, response: str, finish_reason: str | None = None) -> dict:
    from lidr.langid import detect, enough_text

    extracted = extract_answer(response, lang)
    if enough_text(response):
        detected = detect(response)[0]
        off = detected != lang
    else:  # too little text to tell the language
        detected, off = None, None
    return {
        "id": item["id"], "lang": lang, "question": item["question"], "response": response,
        "finish_reason": finish_reason, "extracted": extracted, "gold": item["gold"],
        "correct": numbers_equal(extracted, item["gold"]), "detected_lang": detected, "off_target": off,
    }


def summarize(records: dict[str, list[dict]]) -> dict:
    per_lang = {}
    for lang, recs in records.items():
        n = len(recs)
        correct = sum(r["correct"] for r in recs)
        judged = [r for r in recs if r["off_target"] is not None]
        off = sum(r["off_target"] for r in judged)
        per_lang[lang] = {
            "n": n,
            "accuracy": round(correct / n, 4) if n else None,
            "accuracy_ci95": wilson(correct, n),
            "no_number": sum(r["extracted"] is None for r in recs),
            "off_target_rate": round(off / len(judged), 4) if judged else None,
            "off_target_ci95": wilson(off, len(judged)),
            "langid_undecided": n - len(judged),
        }
    accs = [v["accuracy"] for v in per_lang.values() if v["accuracy"] is not None]
    offs = [v["off_target_rate"] for v in per_lang.values() if v["off_target_rate"] is not None]
    return {
        "benchmark": "mgsm",
        "languages": per_lang,
        "average_accuracy": round(sum(accs) / len(accs), 4) if accs else None,
        "average_off_target_rate": round(sum(offs) / len(offs), 4) if offs else None,
    }


def answer_set(fmt, data: dict[str, list[dict]], out_dir: Path, *, max_new_tokens: int,
               repetition_penalty: float = 1.0):
    """The answers MGSM still needs (ids already in <out>/<lang>.jsonl are kept), scored and
    appended as they arrive."""
    from lidr.eval import answers

    return answers.per_language("mgsm", fmt, data, lambda lang: out_dir / f"{lang}.jsonl",
                                prompt=lambda it, lang: mgsm_prompt(fmt, it["question"], lang), score=score,
                                max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)


def evaluate_mgsm(backend, fmt, data: dict[str, list[dict]], out_dir: Path, *, max_new_tokens: int,
                  batch_size: int, repetition_penalty: float = 1.0, progress=None) -> dict:
    """Generate (resumable), score, summarize."""
    from lidr.eval import answers

    answers.generate(backend, [answer_set(fmt, data, out_dir, max_new_tokens=max_new_tokens,
                                          repetition_penalty=repetition_penalty)],
                     batch_size=batch_size, progress=progress)
    return write_summary(out_dir, list(data))


def score_responses(responses_file: Path, data: dict[str, list[dict]], out_dir: Path) -> dict:
    """Score answers produced elsewhere: records with {lang, id, response} (id = the item's
    0-based line index in <lang>.jsonl), no model needed."""
    scored: dict[str, dict] = {lang: {} for lang in data}
    for lineno, rec in read_jsonl(responses_file):
        for field in ("lang", "id", "response"):
            if field not in rec:
                raise RecordError(f"{responses_file}:{lineno}: missing field '{field}'")
        lang, pid = rec["lang"], rec["id"]
        if lang not in data:
            continue
        if not isinstance(pid, int) or not 0 <= pid < len(data[lang]):
            raise RecordError(f"{responses_file}:{lineno}: field 'id' {pid!r} is not an item of MGSM {lang}")
        scored[lang][pid] = score(data[lang][pid], lang, str(rec["response"]), rec.get("finish_reason"))
    for lang, recs in scored.items():
        atomic_write_jsonl(out_dir / f"{lang}.jsonl", [recs[i] for i in sorted(recs)])
    return write_summary(out_dir, [l for l in data if scored[l]])


def write_summary(out_dir: Path, langs: list[str]) -> dict:
    records = {lang: load_records(out_dir / f"{lang}.jsonl") for lang in langs}
    summary = summarize(records)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
