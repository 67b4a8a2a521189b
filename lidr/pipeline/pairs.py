"""Stage 3: preference pairs from the language imbalance (method.md §2 step 3).

For each prompt id i, dominant language d and non-dominant language l, with y^l the
model's answer to the prompt in l and y^{a->b} its own translation from a into b:

    non-dominant l:  prompt x^l   chosen y^{d->l}   rejected y^l        "translated_beats_native"
    dominant d:      prompt x^d   chosen y^d        rejected y^{l->d}   "native_beats_backtranslated" (+ via=l)
    translation-task prompt, non-dominant l:
                     prompt x^l   chosen y^d        rejected y^l        "translation_task"

Rules (method.md §2 step 3), each applied in one place:

R1  A pair whose translation failed is dropped.                      `_problem`
R2  Translation-task prompts: their answers are never translated.    `needed_translations`,
    The non-dominant pair takes the untranslated y^d as chosen;      `_nondominant_pair`,
    there is no dominant pair (its rejected side would be y^l        `build_pairs`
    translated out of the language the task asked for; the
    released code kept one).
R3  Dominant pairs: which back-translation is rejected (open in      `_dominant_pairs`
    the paper): one per prompt by seed (default), one per language,
    or the released code's last language.
R4  Quality filters on chosen and rejected (open in the paper):      `_problem`
    empty, a line repeated >= max_line_repeats times, chosen ==
    rejected.
R5  Beyond the paper: the chosen answer is in the prompt's           `_problem`
    language (not checked for translation tasks).

Every candidate pair ends up in `kept` or in `dropped` with one `reason` (the first
problem found, in the order of `REASONS`) and a free-text `detail`. Pure functions: no
generation model, no files (the default language check uses py3langid's bundled model).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

from lidr.config import PairsConfig

TRANSLATED_BEATS_NATIVE = "translated_beats_native"
NATIVE_BEATS_BACKTRANSLATED = "native_beats_backtranslated"
TRANSLATION_TASK = "translation_task"
KINDS = (TRANSLATED_BEATS_NATIVE, NATIVE_BEATS_BACKTRANSLATED, TRANSLATION_TASK)

# Why a pair was dropped, in the order the checks run (a pair gets the first that applies).
REASONS = (
    "missing_response",  # an answer the pair needs was never generated
    "empty",  # R4: an answer or translation is empty after strip
    "missing_translation",  # the translate stage has no record for it
    "translation_failed",  # R1: no closing delimiter / empty result
    "degenerate_repetition",  # R4: a line repeated max_line_repeats times or more
    "identical",  # R4: chosen == rejected up to whitespace
    "wrong_language",  # R5: chosen not identified as the prompt's language
)

POLICIES = ("one_per_prompt", "per_language", "last_language")


@dataclass
class PairsResult:
    kept: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # {"kept": {lang: n}, "dropped": {lang: {reason: n}}}


# --- helpers -----------------------------------------------------------------------------


def id_sort_key(pid) -> tuple:
    """Natural order for ids: numbers by value, 'alpagasus-19' before 'alpagasus-100'."""
    if isinstance(pid, (int, float)) and not isinstance(pid, bool):
        return (0, pid, "")
    s = str(pid)
    parts = re.split(r"(\d+)", s)
    return (1, tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), s)


def _normalise(text: str) -> str:
    return " ".join(text.split())


_FENCE = re.compile(r"^\s*(?:```|~~~)")
_MARKUP = re.compile(r"^(?:[-*+>#]+|\d+[.)])\s*|[*_`]+")
_NON_LETTERS = re.compile(r"[\W\d_]+")
_LETTERS_IN_CONTENT = 12


def repeated_line(text: str, threshold: int) -> tuple[str, int] | None:
    """A line repeated `threshold` times or more (a degenerate loop), with its count.

    Lines are compared stripped. Not counted: code-fence lines and lines inside code
    blocks (code repeats "}", "end", "return x" legitimately). A content line (at least
    12 letters once list, heading and bold markup is removed, and not a label ending in
    ':') counts wherever it occurs; a short line or label ("**Chorus:**", "- **Name**",
    "Pros:") only counts in a run of consecutive repeats, since structured answers
    repeat their labels but never back to back.
    """
    counts: Counter = Counter()
    run_line, run_len, best_run = None, 0, (None, 0)
    in_code = False
    for raw in text.splitlines():
        if _FENCE.match(raw):
            in_code = not in_code
            run_line, run_len = None, 0
            continue
        line = raw.strip()
        if in_code or not line:
            continue
        run_len = run_len + 1 if line == run_line else 1
        run_line = line
        if run_len > best_run[1]:
            best_run = (line, run_len)
        bare = _MARKUP.sub("", line).strip()
        if not bare.endswith(":") and len(_NON_LETTERS.sub("", bare)) >= _LETTERS_IN_CONTENT:
            counts[line] += 1
    line, n = counts.most_common(1)[0] if counts else (None, 0)
    if n >= threshold:
        return line, n
    if best_run[1] >= threshold:
        return best_run
    return None


def rejected_language_order(pid, others: list[str], seed: int) -> list[str]:
    """R3, "one_per_prompt": the order in which a prompt tries the back-translations.

    A hash of (seed, id, language), so the choice is deterministic, spread evenly over
    the languages, independent of Python's hash seed and of the order of `others`.
    """
    token = json.dumps(pid, sort_keys=True, default=str)

    def key(lang: str) -> str:
        return hashlib.sha256(f"{seed}\x1f{token}\x1f{lang}".encode()).hexdigest()

    return sorted(others, key=key)


def needed_translations(
    dominant: str,
    others: list[str],
    translation_task_ids: Iterable,
    ids: Iterable,
    *,
    dominant_rejected: str | None = None,
) -> dict[tuple[str, str], set]:
    """The translations stage 2 must produce: (src, tgt) -> ids.

    - d->l for every l: the chosen side of the non-dominant pairs;
    - l->d for every l: the rejected side of the dominant pairs. With
      dominant_rejected="last_language" only the last language's are used; with
      "one_per_prompt" all are kept, since a prompt falls back to another language
      when its first choice fails.
    R2: translation-task ids get neither (their answers are never translated).
    """
    tt = set(translation_task_ids)
    todo = {i for i in ids if i not in tt}
    rejected_from = others[-1:] if dominant_rejected == "last_language" else list(others)
    need: dict[tuple[str, str], set] = {}
    for lang in others:
        need[(dominant, lang)] = set(todo)
    for lang in rejected_from:
        need[(lang, dominant)] = set(todo)
    return need


# --- building one candidate pair --------------------------------------------------------


@dataclass
class _Candidate:
    pair: dict  # the pair record as far as it could be built
    responses: list[tuple[str, str, dict | None]]  # (side it feeds, lang, response record)
    translation: tuple[str, tuple[str, str], dict | None] | None = None  # (side, (src, tgt), record)


def _response_text(rec: dict | None) -> str | None:
    return None if rec is None else rec.get("response")


def _translation_text(rec: dict | None) -> str | None:
    if rec is None or not rec.get("ok"):
        return None
    return rec.get("translation")


def _nondominant_pair(pid, lang, dominant, responses, translations, is_task: bool) -> _Candidate:
    native = responses.get(lang, {}).get(pid)
    dom = responses.get(dominant, {}).get(pid)
    pair = {
        "id": pid,
        "lang": lang,
        "prompt": None if native is None else native.get("prompt"),
        "chosen": None,
        "rejected": _response_text(native),
        "kind": TRANSLATION_TASK if is_task else TRANSLATED_BEATS_NATIVE,
    }
    if is_task:
        # R2: the task fixes the answer's language; y^d is the chosen answer untranslated.
        pair["chosen"] = _response_text(dom)
        return _Candidate(pair, [("chosen", dominant, dom), ("rejected", lang, native)])
    # The imbalance: the dominant answer, translated into l, beats the native answer in l.
    tr = translations.get((dominant, lang), {}).get(pid)
    pair["chosen"] = _translation_text(tr)
    return _Candidate(
        pair, [("chosen", dominant, dom), ("rejected", lang, native)], ("chosen", (dominant, lang), tr)
    )


def _dominant_pair(pid, via, dominant, responses, translations) -> _Candidate:
    # The imbalance: the native dominant answer beats an answer from l translated into d.
    dom = responses.get(dominant, {}).get(pid)
    native = responses.get(via, {}).get(pid)
    tr = translations.get((via, dominant), {}).get(pid)
    pair = {
        "id": pid,
        "lang": dominant,
        "prompt": None if dom is None else dom.get("prompt"),
        "chosen": _response_text(dom),
        "rejected": _translation_text(tr),
        "kind": NATIVE_BEATS_BACKTRANSLATED,
        "via": via,
    }
    return _Candidate(pair, [("chosen", dominant, dom), ("rejected", via, native)], ("rejected", (via, dominant), tr))


# --- the checks: R1, R4, R5 --------------------------------------------------------------


def _problem(cand: _Candidate, cfg: PairsConfig, language_of, describe) -> tuple[str, str, str] | None:
    """(reason, detail, side) of the first problem of a candidate, or None if it is kept.

    side is "chosen", "rejected" or "pair": which part of the pair the problem is in.
    """
    for side, lang, rec in cand.responses:
        if _response_text(rec) is None:
            return "missing_response", f"no {lang} response for this id", side
    if cfg.drop_empty:
        for side, lang, rec in cand.responses:
            if not rec["response"].strip():
                return "empty", f"the {lang} response ({side} side) is empty", side
    if cand.translation is not None:
        side, (src, tgt), tr = cand.translation
        if tr is None:
            return "missing_translation", f"no {src}->{tgt} translation record", side
        if not tr.get("ok") or tr.get("translation") is None:  # R1
            raw = tr.get("raw") or ""
            return "translation_failed", f"{src}->{tgt} translation failed ({len(raw)} chars of raw output)", side
        if cfg.drop_empty and not tr["translation"].strip():
            return "empty", f"the {src}->{tgt} translation ({side} side) is empty", side
    pair = cand.pair
    for side in ("chosen", "rejected"):  # R4: degenerate loops
        rep = repeated_line(pair[side], cfg.max_line_repeats)
        if rep is not None:
            line, n = rep
            return "degenerate_repetition", f"{side}: a line repeated {n} times: {line[:80]!r}", side
    if cfg.drop_identical and _normalise(pair["chosen"]) == _normalise(pair["rejected"]):  # R4
        return "identical", "chosen and rejected are the same text", "pair"
    # R5: the chosen answer must be in the prompt's language; a translation task's answer
    # is in the language the task asks for, so it is not checked.
    if cfg.check_language and pair["kind"] != TRANSLATION_TASK:
        if language_of(pair["chosen"], pair["lang"]) is False:
            found = f": {describe(pair['chosen'], pair['lang'])}" if describe else ""
            return "wrong_language", f"chosen is not in {pair['lang']}{found}", "chosen"
    return None


# --- R3: dominant pairs -----------------------------------------------------------------


def _dominant_pairs(pid, others, policy, seed, candidate, check) -> tuple[list[dict], list[dict]]:
    """R3: the dominant-language pair(s) of one prompt under the configured policy.

    - "per_language": one pair per non-dominant language (the dominant language then
      has len(others) times the pairs of any other language);
    - "last_language": the released code's behaviour, only the last language of
      `others`, dropped if that one fails (no fallback);
    - "one_per_prompt" (default): languages tried in `rejected_language_order`; the
      first that passes every check is kept. Candidates tried and failed before it
      are recorded as dropped; a problem in y^d itself (the chosen side, shared by all
      candidates) ends the search.
    """
    if policy == "per_language":
        langs, first_only = list(others), False
    elif policy == "last_language":
        langs, first_only = list(others[-1:]), True
    elif policy == "one_per_prompt":
        langs, first_only = rejected_language_order(pid, others, seed), True
    else:
        raise ValueError(f"unknown dominant_rejected policy {policy!r}; expected one of {POLICIES}")
    kept, dropped = [], []
    for via in langs:
        pair, problem = check(candidate(via))
        if problem is None:
            kept.append(pair)
            if first_only:
                break
            continue
        dropped.append(_dropped(pair, problem))
        if first_only and problem[2] == "chosen":
            break
    if policy == "one_per_prompt" and kept:
        for d in dropped:
            d["detail"] += f" (the pair via {kept[0]['via']} was kept instead)"
    return kept, dropped


def _dropped(pair: dict, problem: tuple[str, str, str]) -> dict:
    reason, detail, _side = problem
    return {**pair, "reason": reason, "detail": detail}


# --- the stage ----------------------------------------------------------------------------


def build_pairs(
    responses: dict[str, dict[object, dict]],
    translations: dict[tuple[str, str], dict[object, dict]],
    dominant: str,
    others: list[str],
    cfg: PairsConfig,
    seed: int,
    translation_task_ids: Iterable = frozenset(),
    language_of: Callable[[str, str], bool | None] | None = None,
) -> PairsResult:
    """All preference pairs of one iteration, with the dropped ones and their reasons.

    responses: lang -> id -> {id, lang, prompt, response, finish_reason}
    translations: (src, tgt) -> id -> {id, src, tgt, text, translation, ok, raw}
    translation_task_ids: ids whose prompt is a translation task (list and/or detector)
    language_of: (text, lang) -> True/False/None (None = cannot tell); default: py3langid
        restricted to the run's languages, texts under cfg.min_langid_chars unchecked.

    Output order: languages as [dominant, *others], then ids in natural order, then the
    back-translation language in `others` order. Same inputs and seed, same output.
    """
    others = list(others)
    if not others:
        raise ValueError("at least one non-dominant language is needed")
    if dominant in others:
        raise ValueError(f"dominant language {dominant!r} is also in others")
    run_langs = [dominant, *others]
    tt = set(translation_task_ids)

    describe = None
    if language_of is None:
        from lidr.langid import language_verdict

        def language_of(text: str, lang: str) -> bool | None:
            return language_verdict(text, lang, cfg.min_langid_chars, candidates=run_langs)[0]

        def describe(text: str, lang: str) -> str:
            return language_verdict(text, lang, cfg.min_langid_chars, candidates=run_langs)[1]

    verdicts: dict[tuple[str, str], bool | None] = {}  # y^d is checked once per prompt

    def cached_language_of(text: str, lang: str) -> bool | None:
        if (text, lang) not in verdicts:
            verdicts[(text, lang)] = language_of(text, lang)
        return verdicts[(text, lang)]

    def check(cand: _Candidate) -> tuple[dict, tuple[str, str, str] | None]:
        return cand.pair, _problem(cand, cfg, cached_language_of, describe)

    ids = sorted({pid for lang in run_langs for pid in responses.get(lang, {})}, key=id_sort_key)
    kept: list[dict] = []
    dropped: list[dict] = []

    # Dominant language.
    for pid in ids:
        if pid in tt:
            continue  # R2: no back-translation of a translation task's answers

        def candidate(via: str, pid=pid) -> _Candidate:
            return _dominant_pair(pid, via, dominant, responses, translations)

        k, d = _dominant_pairs(pid, others, cfg.dominant_rejected, seed, candidate, check)
        kept += k
        dropped += d

    # Non-dominant languages.
    for lang in others:
        for pid in ids:
            pair, problem = check(_nondominant_pair(pid, lang, dominant, responses, translations, pid in tt))
            if problem is None:
                kept.append(pair)
            else:
                dropped.append(_dropped(pair, problem))

    order = {lang: n for n, lang in enumerate(run_langs)}

    def sort_key(p: dict) -> tuple:
        return (order[p["lang"]], id_sort_key(p["id"]), order.get(p.get("via"), -1))

    kept.sort(key=sort_key)
    dropped.sort(key=sort_key)
    return PairsResult(kept=kept, dropped=dropped, counts=count_pairs(kept, dropped, run_langs))


def count_pairs(kept: list[dict], dropped: list[dict], langs: list[str]) -> dict:
    """{"kept": {lang: n}, "dropped": {lang: {reason: n}}}, every language listed."""
    kept_n = {lang: 0 for lang in langs}
    for p in kept:
        kept_n[p["lang"]] = kept_n.get(p["lang"], 0) + 1
    dropped_n: dict[str, dict[str, int]] = {lang: {} for lang in langs}
    for p in dropped:
        per = dropped_n.setdefault(p["lang"], {})
        per[p["reason"]] = per.get(p["reason"], 0) + 1
    rank = {r: n for n, r in enumerate(REASONS)}
    dropped_n = {
        lang: dict(sorted(v.items(), key=lambda kv: rank.get(kv[0], len(rank)))) for lang, v in dropped_n.items()
    }
    return {"kept": kept_n, "dropped": dropped_n}


__all__ = [
    "KINDS",
    "NATIVE_BEATS_BACKTRANSLATED",
    "POLICIES",
    "PairsResult",
    "REASONS",
    "TRANSLATED_BEATS_NATIVE",
    "TRANSLATION_TASK",
    "build_pairs",
    "count_pairs",
    "id_sort_key",
    "needed_translations",
    "rejected_language_order",
    "repeated_line",
]
