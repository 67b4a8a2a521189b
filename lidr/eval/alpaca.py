"""X-AlpacaEval (method.md §3): the model answers the AlpacaEval instructions in each
language; an LLM judge compares each answer with a reference answer.

Data: a folder in the layout of `shared/datasets/x-alpacaeval/`:
    prompts/<lang>.json                  [{id, dataset, instruction}]
    reference-gpt-4-turbo/<lang>.json    AlpacaEval model_outputs: [{id?, instruction, output, generator, dataset}]
A language needs at least one of the two (instructions are taken from the reference
file when there is no prompts file); win rates and reference likelihood need the
reference.

Outputs under `<out>/`:
    answers/<lang>.jsonl        {id, lang, instruction, output, finish_reason, detected_lang, off_target}
    model_outputs/<lang>.json   AlpacaEval's format, to feed the official `alpaca_eval` tool
    judgments/<lang>.jsonl      {id, model_first, p_model, weighted}
    summary.json                per language: off-target rate, win rate ± SE, judge failures
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lidr.eval.stats import wilson, win_rate
from lidr.records import JsonlAppender, RecordError, atomic_write_json, digest, load_records

ALPACA_DIR = "x-alpacaeval"
REFERENCE_DIR = "reference-gpt-4-turbo"


def alpaca_languages(root: str | Path) -> list[str]:
    """Languages with prompts or references under `root` (the x-alpacaeval folder)."""
    root = Path(root)
    return sorted({p.stem for sub in ("prompts", REFERENCE_DIR) for p in (root / sub).glob("*.json")})


def reference_languages(root: str | Path) -> list[str]:
    """Languages with reference answers (the ones a win rate can be computed for)."""
    return sorted(p.stem for p in (Path(root) / REFERENCE_DIR).glob("*.json"))


def _read_list(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise RecordError(f"{path}: expected a JSON list of records")
    return rows


def load_alpaca(root: str | Path, langs: list[str], limit: int | None = None) -> dict[str, list[dict]]:
    """lang -> [{id, instruction, reference (or None), dataset}], checked before any model loads."""
    root = Path(root)
    out = {}
    for lang in langs:
        prompts_file, ref_file = root / "prompts" / f"{lang}.json", root / REFERENCE_DIR / f"{lang}.json"
        if not prompts_file.exists() and not ref_file.exists():
            raise RecordError(f"X-AlpacaEval data: neither {prompts_file} nor {ref_file} exists "
                              f"(languages there: {', '.join(alpaca_languages(root)) or 'none'})")
        refs = _read_list(ref_file) if ref_file.exists() else None
        rows = _read_list(prompts_file) if prompts_file.exists() else refs
        items = []
        for i, row in enumerate(rows):
            src = prompts_file if prompts_file.exists() else ref_file
            if not isinstance(row, dict) or not str(row.get("instruction", "")).strip():
                raise RecordError(f"{src}: record {i}: field 'instruction' is missing or empty")
            ref = None
            if refs is not None:
                if i >= len(refs):
                    raise RecordError(f"{ref_file}: has {len(refs)} records, fewer than {src} ({len(rows)})")
                if not isinstance(refs[i].get("output"), str):
                    raise RecordError(f"{ref_file}: record {i}: field 'output' is missing")
                ref = refs[i]["output"]
            items.append({"id": i, "instruction": row["instruction"], "reference": ref,
                          "dataset": row.get("dataset", "x-alpacaeval")})
            if limit and len(items) >= limit:
                break
        out[lang] = items
    return out


def score_answer(item: dict, lang: str, output: str, finish_reason: str | None) -> dict:
    from lidr.langid import detect, enough_text

    if enough_text(output):
        detected = detect(output)[0]
        off = detected != lang
    else:  # too little text to tell the language
        detected, off = None, None
    return {"id": item["id"], "lang": lang, "instruction": item["instruction"], "output": output,
            "finish_reason": finish_reason, "detected_lang": detected, "off_target": off}


def answer_set(fmt, data: dict[str, list[dict]], out_dir: Path, *, max_new_tokens: int,
               repetition_penalty: float = 1.0):
    """The answers still needed (ids already in <out>/answers/<lang>.jsonl are kept),
    checked for language and appended as they arrive."""
    from lidr.eval import answers

    return answers.per_language("x-alpacaeval answers", fmt, data, lambda lang: out_dir / "answers" / f"{lang}.jsonl",
                                prompt=lambda it, lang: fmt.response_prompt(it["instruction"], lang),
                                score=score_answer, max_new_tokens=max_new_tokens,
                                repetition_penalty=repetition_penalty)


def generate_answers(backend, fmt, data: dict[str, list[dict]], out_dir: Path, *, max_new_tokens: int,
                     batch_size: int, repetition_penalty: float = 1.0, progress=None) -> None:
    """The model's answers, per language (resumable: ids already written are kept)."""
    from lidr.eval import answers

    answers.generate(backend, [answer_set(fmt, data, out_dir, max_new_tokens=max_new_tokens,
                                          repetition_penalty=repetition_penalty)],
                     batch_size=batch_size, progress=progress)


def load_answers(out_dir: Path, langs: list[str]) -> dict[str, dict[int, dict]]:
    return {lang: {r["id"]: r for r in load_records(Path(out_dir) / "answers" / f"{lang}.jsonl")} for lang in langs}


def export_model_outputs(out_dir: Path, data: dict[str, list[dict]], generator: str) -> None:
    """AlpacaEval's model_outputs.json per language (instruction, output, generator, dataset)."""
    answers = load_answers(out_dir, list(data))
    for lang, items in data.items():
        rows = [{"instruction": it["instruction"], "output": answers[lang][it["id"]]["output"],
                 "generator": generator, "dataset": it["dataset"]}
                for it in items if it["id"] in answers[lang]]
        atomic_write_json(out_dir / "model_outputs" / f"{lang}.json", rows)


def model_shown_first(seed: int, lang: str, item_id) -> bool:
    """The order of the two answers shown to the judge, random but fixed per item."""
    return random.Random(digest([seed, lang, item_id])).random() < 0.5


def judge_against_reference(judge, data: dict[str, list[dict]], out_dir: Path, *, seed: int = 0,
                            progress=None) -> dict[str, int]:
    """Judge every answer that has a reference and no judgment yet; returns failures per language."""
    from lidr.console import tracker

    answers = load_answers(out_dir, list(data))
    writers = {lang: JsonlAppender(out_dir / "judgments" / f"{lang}.jsonl") for lang in data}
    jobs = []
    for lang, items in data.items():
        for it in items:
            ans = answers[lang].get(it["id"])
            if it["reference"] is None or ans is None or it["id"] in writers[lang].done:
                continue
            first = model_shown_first(seed, lang, it["id"])
            a, b = (ans["output"], it["reference"]) if first else (it["reference"], ans["output"])
            jobs.append(((lang, it["id"], first), it["instruction"], a, b))
    failures = {lang: 0 for lang in data}
    advance = tracker(progress, "judge vs reference", len(jobs))
    try:
        for (lang, pid, first), result in judge.compare_many(jobs):
            advance(1)
            if isinstance(result, Exception):
                failures[lang] += 1
                continue
            p_model = result.p_first if first else 1.0 - result.p_first
            writers[lang].write({"id": pid, "model_first": first, "p_model": round(p_model, 6),
                                 "weighted": result.weighted})
    finally:
        for w in writers.values():
            w.close()
    return failures


def summarize(out_dir: Path, data: dict[str, list[dict]], judge_info: dict | None = None,
              failures: dict[str, int] | None = None) -> dict:
    per_lang = {}
    answers = load_answers(out_dir, list(data))
    for lang, items in data.items():
        recs = [answers[lang][it["id"]] for it in items if it["id"] in answers[lang]]
        judged = [r for r in recs if r["off_target"] is not None]
        off = sum(r["off_target"] for r in judged)
        entry = {
            "n": len(recs),
            "off_target_rate": round(off / len(judged), 4) if judged else None,
            "off_target_ci95": wilson(off, len(judged)),
            "langid_undecided": len(recs) - len(judged),
            "hit_token_limit": sum(r["finish_reason"] == "length" for r in recs),
            "win_rate": None, "win_rate_se": None, "judged": 0, "judge_failures": 0,
        }
        if judge_info is not None:
            wanted = {it["id"] for it in items if it["reference"] is not None}
            prefs = [r["p_model"] for r in load_records(out_dir / "judgments" / f"{lang}.jsonl") if r["id"] in wanted]
            entry["win_rate"], entry["win_rate_se"] = win_rate(prefs)
            entry["judged"] = len(prefs)
            entry["judge_failures"] = (failures or {}).get(lang, 0)
        per_lang[lang] = entry
    wins = [v["win_rate"] for v in per_lang.values() if v["win_rate"] is not None]
    offs = [v["off_target_rate"] for v in per_lang.values() if v["off_target_rate"] is not None]
    summary = {
        "benchmark": "x-alpacaeval",
        "languages": per_lang,
        "average_win_rate": round(sum(wins) / len(wins), 2) if wins else None,
        "average_off_target_rate": round(sum(offs) / len(offs), 4) if offs else None,
        "judge": judge_info,
        "judge_failures": sum((failures or {}).values()),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
