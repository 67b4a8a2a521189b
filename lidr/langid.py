"""Language identification with py3langid (a library that ships its model).

- `detect(text, candidates=None) -> (code, probability)`: ISO 639-1 code and its
  normalised probability (py3langid's `norm_probs`, not `classify`'s raw log-score),
  optionally restricted to a candidate set (probabilities renormalised over it).
- `is_language(text, lang, min_chars=20, candidates=None) -> bool | None`: whether the
  text is in `lang`; None when too little text is left to tell or the call is weak
  (`language_verdict` gives the same answer with an explanation).

Code blocks, inline code, URLs, markup, digits and punctuation are stripped before
identification: they carry no language signal and drag short texts towards English.
Restricting the candidates to the run's languages is the robust choice for decisions:
py3langid confuses close languages (es/gl/ca, fr/oc, de/lb, zh/wuu/yue) on short texts,
and a run only ever needs to tell its own languages apart.

The model is loaded once per process, lazily (memory-mapped from lidr's cache, 0.6-0.7 s the
first time); restricted identifiers are cheap copies that share the model's arrays, cached per
candidate set.
"""

from __future__ import annotations

import copy
import functools
import re
import threading
import unicodedata
from typing import Iterable

UNDETERMINED = "und"
# Longer texts are identified from their first characters only: enough for a confident
# answer, and py3langid walks the text byte by byte in Python.
MAX_CHARS = 1500

_lock = threading.Lock()
_full = None  # the py3langid LanguageIdentifier over all its languages
_restricted: dict[frozenset, object] = {}

_FENCED = re.compile(r"(?:```|~~~).*?(?:```|~~~|\Z)", re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_URL = re.compile(r"(?:https?://|ftp://|www\.)\S+|\S+@\S+\.\w+", re.I)
_TAG = re.compile(r"</?[A-Za-z][^<>\n]{0,200}>")
_LATEX = re.compile(r"\$\$.*?\$\$|\$[^$\n]{1,200}\$|\\\(.*?\\\)|\\\[.*?\\\]", re.S)
_WS = re.compile(r"\s+")

# The writing systems each language is written in (first word of the Unicode character
# name). A text almost entirely in another script (see MIN_SCRIPT_SHARE) is not in that
# language, whatever the restricted identifier says: restricted to {en, es, de, fr},
# Korean text still gets one of the four as its "most likely" language.
SCRIPTS: dict[str, frozenset[str]] = {
    **{c: frozenset({"LATIN"}) for c in ("en", "es", "de", "fr", "it", "pt", "sw", "nl", "pl", "tr", "vi", "id")},
    "ru": frozenset({"CYRILLIC"}),
    "uk": frozenset({"CYRILLIC"}),
    "zh": frozenset({"CJK"}),
    "ja": frozenset({"CJK", "HIRAGANA", "KATAKANA"}),
    "ko": frozenset({"HANGUL", "CJK"}),
    "ar": frozenset({"ARABIC"}),
    "th": frozenset({"THAI"}),
    "bn": frozenset({"BENGALI"}),
    "te": frozenset({"TELUGU"}),
    "hi": frozenset({"DEVANAGARI"}),
    "el": frozenset({"GREEK"}),
    "he": frozenset({"HEBREW"}),
}


@functools.lru_cache(maxsize=1)
def _letter_patterns() -> tuple[re.Pattern, re.Pattern]:
    """(one letter, one non-letter): letters and combining marks (Thai vowels, Devanagari
    signs, accents in NFD) carry the language; digits, punctuation, symbols and
    underscores do not."""
    marks = _combining_marks()
    return re.compile(rf"[^\W\d_]|[{marks}]"), re.compile(rf"[^\w{marks}]|[\d_]")


def _combining_marks() -> str:
    """The combining marks (Unicode category M) as a regex character-class body. Scanning all
    of Unicode for them takes 0.08-0.2 s, so the result is kept in lidr's cache folder, named
    by the Unicode version of Python's unicodedata (a cache that cannot be read or written is
    passed by)."""
    from lidr.models import cache_dir
    from lidr.records import atomic_write_text

    cached = cache_dir() / "langid" / f"marks-unicode-{unicodedata.unidata_version}.txt"
    try:
        return cached.read_text(encoding="utf-8")
    except (OSError, ValueError):
        pass
    out, start, prev = [], None, None
    for cp in range(0x110000):
        if unicodedata.category(chr(cp))[0] == "M":
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            out.append(re.escape(chr(start)) + ("-" + re.escape(chr(prev)) if prev > start else ""))
            start = None
    marks = "".join(out)
    try:
        atomic_write_text(cached, marks)
    except OSError:
        pass
    return marks


def _letter_share(line: str) -> float:
    visible = len("".join(line.split()))
    return len(_letter_patterns()[0].findall(line)) / visible if visible else 1.0


def clean_text(text: str) -> str:
    """The text with code, URLs, markup, math, digits and punctuation removed.

    Lines that are mostly symbols (code outside fences, tables of numbers, formulas)
    are dropped whole; what is left is letters (and combining marks) and single spaces.
    Only the first 2 x MAX_CHARS characters are looked at.
    """
    text = _FENCED.sub(" ", (text or "")[: 2 * MAX_CHARS])
    text = _INLINE_CODE.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _TAG.sub(" ", text)
    text = _LATEX.sub(" ", text)
    lines = [ln for ln in text.splitlines() if _letter_share(ln) >= 0.6]
    return _WS.sub(" ", _letter_patterns()[1].sub(" ", "\n".join(lines))).strip()


def script_share(text: str, lang: str) -> float | None:
    """Share of the letters of `text` written in `lang`'s script(s); None if unknown."""
    return _script_share_cleaned(clean_text(text), lang)


def letter_count(text: str) -> int:
    """Characters left for identification after `clean_text` (spaces not counted)."""
    return sum(not c.isspace() for c in clean_text(text))


def _dense(c: str) -> bool:
    # CJK ideographs, kana and Hangul syllables: one character is about a word.
    o = ord(c)
    return 0x3040 <= o <= 0x30FF or 0x3400 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF


def enough_text(text: str, min_chars: int = 20) -> bool:
    """Whether enough text is left to identify its language: letters after `clean_text`,
    with a CJK/kana/Hangul character counted as three (it carries about a word)."""
    return sum(3 if _dense(c) else 1 for c in clean_text(text) if not c.isspace()) >= min_chars


def _load():
    global _full
    if _full is None:
        with _lock:
            if _full is None:
                import numpy as np
                from py3langid.langid import LanguageIdentifier

                # as LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True) builds it
                ptc, pc, classes, nextmove, row, output = _model_parts()
                _full = LanguageIdentifier(np.asarray(ptc), np.asarray(pc), classes, nextmove, output,
                                           norm_probs=True, tk_row=row)
    return _full


def _model_parts() -> tuple:
    """py3langid's model as its loader gives it: (ptc, pc, classes, nextmove, row, output).
    The file it ships is LZMA-compressed, and unpacking it takes 0.6-0.7 s, once per process.
    The unpacked arrays are kept in lidr's cache folder (a folder of .npy files, 68 MB, named by
    py3langid's version and the shipped file's size and mtime) and memory-mapped from there:
    no copy is made, and only the pages a text's walk touches are read (an .npz read whole took
    0.15-0.25 s; bench/fixed_costs.py). The byte-walk tables come as memoryviews, which index
    like py3langid's stdlib arrays. A cache that cannot be read or written is passed by."""
    import importlib.metadata
    import os
    import shutil

    import numpy as np
    from py3langid import modelio
    from py3langid.langid import MODEL_DIR, MODEL_FILE

    from lidr.models import cache_dir

    shipped = MODEL_DIR / MODEL_FILE
    st = shipped.stat()
    cached = cache_dir() / "langid" / f"py3langid-{importlib.metadata.version('py3langid')}-{st.st_size}-{st.st_mtime_ns}"
    try:
        load = lambda name: np.load(cached / f"{name}.npy", mmap_mode="r", allow_pickle=False)  # noqa: E731
        return (load("ptc"), load("pc"), load("classes").tolist(), memoryview(load("nextmove")),
                memoryview(load("row")), load("output").tolist())
    except (OSError, ValueError, EOFError):
        pass
    parts = ptc, pc, classes, nextmove, row, output = modelio.load_model(shipped)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        arrays = {"ptc": ptc, "pc": pc, "classes": np.array(classes), "output": np.asarray(output),
                  "nextmove": np.frombuffer(nextmove, dtype=nextmove.typecode),
                  "row": np.frombuffer(row, dtype=row.typecode)}
        for name, a in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(a), allow_pickle=False)
        shutil.rmtree(cached, ignore_errors=True)  # one that could not be read
        os.replace(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return parts


def supported_languages() -> list[str]:
    """The codes py3langid can return."""
    return list(_load().labels)


def _identifier(candidates: Iterable[str] | None):
    full = _load()
    if candidates is None:
        return full
    known = set(full.labels)
    cands = frozenset(c for c in candidates if c in known)
    if not cands:
        raise ValueError(f"none of the candidate languages {sorted(set(candidates))} is known to py3langid")
    ident = _restricted.get(cands)
    if ident is None:
        with _lock:
            ident = _restricted.get(cands)
            if ident is None:
                # A shallow copy shares the model arrays; set_languages only rebinds the
                # copy's class columns, the shared full model is untouched.
                ident = copy.copy(full)
                ident.set_languages(sorted(cands))
                _restricted[cands] = ident
    return ident


def _rank_cleaned(cleaned: str, candidates: Iterable[str] | None) -> tuple[str, float]:
    cleaned = cleaned[:MAX_CHARS]
    if not cleaned:
        return UNDETERMINED, 0.0
    ranked = _identifier(candidates).rank(cleaned)
    code, prob = ranked[0]
    if len(ranked) > 1 and prob <= ranked[1][1]:
        # no feature matched: a uniform distribution carries no decision
        return UNDETERMINED, 0.0
    return code, float(prob)


def _script_share_cleaned(cleaned: str, lang: str) -> float | None:
    scripts = SCRIPTS.get(lang)
    letters = [c for c in cleaned[:600] if unicodedata.category(c)[0] == "L"]
    if scripts is None or not letters:
        return None
    return sum(unicodedata.name(c, "?").split(" ", 1)[0] in scripts for c in letters) / len(letters)


def detect(text: str, candidates: Iterable[str] | None = None) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language of `text`.

    `candidates` restricts the choice (codes unknown to py3langid are ignored); the
    probability is then renormalised over the candidates. Text with nothing left after
    cleaning gives ("und", 0.0). Varieties py3langid tells apart but a benchmark's
    language code does not (Wu and Cantonese Chinese) are reported as their
    macrolanguage.
    """
    code, prob = _rank_cleaned(clean_text(text), candidates)
    return MACROLANGUAGE.get(code, code), prob


MACROLANGUAGE = {"wuu": "zh", "yue": "zh"}


# is_language says False only when another language wins clearly, or the text is almost
# all in another writing system; weak calls (names, word lists, IPA) are "cannot tell".
MIN_CONFIDENCE = 0.7
MIN_SCRIPT_SHARE = 0.25


def language_verdict(
    text: str,
    lang: str,
    min_chars: int = 20,
    candidates: Iterable[str] | None = None,
    min_confidence: float = MIN_CONFIDENCE,
) -> tuple[bool | None, str]:
    """`is_language`'s answer with a short explanation ("es (p=0.98)", "too short")."""
    if lang not in _load().labels:
        return None, f"{lang!r} is unknown to py3langid"
    cleaned = clean_text(text)
    letters = len(cleaned) - cleaned.count(" ")
    if letters < min_chars:
        return None, f"too short to tell ({letters} letters)"
    share = _script_share_cleaned(cleaned, lang)
    if share is not None and share < MIN_SCRIPT_SHARE:
        return False, f"mostly another writing system ({share:.0%} of letters in {lang}'s script)"
    code, prob = _rank_cleaned(cleaned, None if candidates is None else {*candidates, lang})
    if code == UNDETERMINED:
        return None, "no language features"
    if code == lang:
        return True, f"identified as {code} (p={prob:.2f})"
    if prob < min_confidence:
        return None, f"identified as {code} (p={prob:.2f}), too weak to tell"
    return False, f"identified as {code} (p={prob:.2f})"


def is_language(
    text: str,
    lang: str,
    min_chars: int = 20,
    candidates: Iterable[str] | None = None,
    min_confidence: float = MIN_CONFIDENCE,
) -> bool | None:
    """Whether `text` is written in `lang`.

    None when it cannot be told: fewer than `min_chars` letters remain after stripping
    code, digits and punctuation; py3langid does not know `lang`; or another language
    comes out on top with a probability under `min_confidence` (lists of names, single
    words). False when under 25 % of the letters are in `lang`'s writing system, or
    another language wins clearly. With `candidates` (e.g. the run's languages; `lang`
    is always added) the choice is among them only, which is far more reliable than
    over all 100+ languages.
    """
    return language_verdict(text, lang, min_chars, candidates, min_confidence)[0]


__all__ = [
    "SCRIPTS",
    "UNDETERMINED",
    "clean_text",
    "detect",
    "is_language",
    "language_verdict",
    "letter_count",
    "script_share",
    "supported_languages",
]
