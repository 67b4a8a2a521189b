"""Judge-based comparisons beyond the reference: head-to-head between two models, and
reward accuracy of a run's preference pairs (method.md §3).

Head-to-head: for each instruction both models answered, the judge compares the two
answers in both orders. A wins if both orders prefer A, loses if both prefer B; anything
else (disagreeing orders, an exact tie) is a tie. This cancels the judge's position bias.

Reward accuracy: the share of pairs on which the judge prefers `chosen` over `rejected`,
i.e. how often the label derived from the language imbalance agrees with a strong
judge (0.57–0.79 per language in the paper). The order is randomised per pair.
"""

from __future__ import annotations

from pathlib import Path

from lidr.eval.alpaca import load_answers, model_shown_first
from lidr.eval.stats import h2h_outcome, tally, wilson
from lidr.records import JsonlAppender, atomic_write_json, load_records


def head_to_head(judge, answers_a: dict[str, dict[int, dict]], answers_b: dict[str, dict[int, dict]],
                 out_dir: Path, *, name_a: str = "A", name_b: str = "B", progress=None) -> dict:
    """answers_x: lang -> id -> {instruction, output}. Writes <out>/<lang>.jsonl and summary.json."""
    from lidr.console import tracker

    langs = [l for l in answers_a if l in answers_b]
    writers = {lang: JsonlAppender(out_dir / f"{lang}.jsonl") for lang in langs}
    jobs = []
    for lang in langs:
        for pid in sorted(set(answers_a[lang]) & set(answers_b[lang])):
            if pid in writers[lang].done:
                continue
            a, b = answers_a[lang][pid], answers_b[lang][pid]
            jobs.append(((lang, pid, "ab"), a["instruction"], a["output"], b["output"]))
            jobs.append(((lang, pid, "ba"), a["instruction"], b["output"], a["output"]))
    pending: dict[tuple, dict] = {}
    failures = {lang: 0 for lang in langs}
    advance = tracker(progress, f"head-to-head {name_a} vs {name_b}", len(jobs))
    try:
        for (lang, pid, order), result in judge.compare_many(jobs):
            advance(1)
            slot = pending.setdefault((lang, pid), {})
            # P(A better) in this order; None when the judgment failed
            slot[order] = None if isinstance(result, Exception) else (
                result.p_first if order == "ab" else 1.0 - result.p_first)
            if len(slot) == 2:  # both orders are back
                if None in slot.values():  # not written: a re-run asks again (cached half is free)
                    failures[lang] += 1
                else:
                    writers[lang].write({"id": pid, "p_a_ab": round(slot["ab"], 6), "p_a_ba": round(slot["ba"], 6),
                                         "outcome": h2h_outcome(slot["ab"], slot["ba"])})
    finally:
        for w in writers.values():
            w.close()
    per_lang = {}
    for lang in langs:
        recs = load_records(out_dir / f"{lang}.jsonl")
        per_lang[lang] = {**tally([r["outcome"] for r in recs]), "failures": failures[lang]}
    summary = {"a": name_a, "b": name_b, "judge": judge.describe(), "languages": per_lang,
               "failures": sum(failures.values())}
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def answers_from(eval_dir: Path, langs: list[str] | None = None) -> dict[str, dict[int, dict]]:
    """Answers a model gave in an X-AlpacaEval evaluation folder (<eval>/answers/<lang>.jsonl)."""
    langs = langs or sorted(p.stem for p in (Path(eval_dir) / "answers").glob("*.jsonl"))
    return load_answers(Path(eval_dir), langs)


def reward_accuracy(judge, pairs: list[dict], out_dir: Path, *, seed: int = 0, progress=None) -> dict:
    """pairs: rows of a run's pairs.jsonl ({id, lang, prompt, chosen, rejected, kind})."""
    from lidr.console import tracker

    langs = sorted({p["lang"] for p in pairs})
    writers = {lang: JsonlAppender(out_dir / f"{lang}.jsonl", key="pair") for lang in langs}
    jobs = []
    for p in pairs:
        key = f"{p['id']}|{p.get('kind', '')}|{p.get('via', '')}"
        if key in writers[p["lang"]].done:
            continue
        chosen_first = model_shown_first(seed, p["lang"], key)
        a, b = (p["chosen"], p["rejected"]) if chosen_first else (p["rejected"], p["chosen"])
        jobs.append(((p["lang"], key, chosen_first, p.get("kind")), p["prompt"], a, b))
    failures = {lang: 0 for lang in langs}
    advance = tracker(progress, "reward accuracy", len(jobs))
    try:
        for (lang, key, chosen_first, kind), result in judge.compare_many(jobs):
            advance(1)
            if isinstance(result, Exception):
                failures[lang] += 1
                continue
            p_chosen = result.p_first if chosen_first else 1.0 - result.p_first
            writers[lang].write({"pair": key, "kind": kind, "p_chosen": round(p_chosen, 6),
                                 "agree": p_chosen > 0.5})
    finally:
        for w in writers.values():
            w.close()
    per_lang = {}
    for lang in langs:
        recs = load_records(out_dir / f"{lang}.jsonl")
        agree = sum(r["agree"] for r in recs)
        per_lang[lang] = {"n": len(recs), "agree": agree,
                          "accuracy": round(agree / len(recs), 4) if recs else None,
                          "ci95": wilson(agree, len(recs)), "failures": failures[lang]}
    summary = {"judge": judge.describe(), "languages": per_lang, "failures": sum(failures.values())}
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
