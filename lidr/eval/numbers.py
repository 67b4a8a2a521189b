"""The final number of a model's answer, for MGSM-style accuracy (stdlib only).

Rules, in order of precedence (the first that yields a number wins):

1. the last ``\\boxed{...}``: the last number inside it;
2. the last ``####`` directly followed by a number (GSM8K style): that number;
3. the last "answer is"-style phrase (``ANSWER_PHRASES``: the response language's and
   English ones; when ``lang`` is None, the language whose phrase comes last is assumed,
   for phrases and number conventions alike): the first number starting within
   ``WINDOW`` characters after it (for zh/ja a simple kanji numeral such as 十八 when
   no digits are there);
4. the last markdown bold span that starts with a number (``**$18**``);
5. the last number in the text.

Reading a number: native digits (Bengali, Thai, Telugu, Devanagari, Arabic-Indic,
full-width, ...) become ASCII through ``unicodedata.decimal``. ``1 200`` (space, no-break
or narrow no-break space, thin space, apostrophe) groups thousands only when exactly
three digits follow. A lone ``,`` followed by exactly three digits (``1,250``) groups
thousands in every language (MGSM answers are integers and models often write English
grouping in any language); a lone ``.`` followed by exactly three digits (``1.250``)
groups only in decimal-comma languages (``COMMA_DECIMAL``), elsewhere it is a decimal
point. Any other lone ``,`` or ``.`` is a decimal mark (``3,5`` = ``3.5`` = 3.5). With
both marks (``1.234,5`` / ``1,234.5``) the last one is the decimal mark. Repeated marks
must form valid groups (``1,234,567``; Indian ``1,00,000``), else the token is read as
separate numbers (dates such as ``12.05.2023``). A sentence-final period is never a
decimal (``is 18.`` = 18). Currency signs, units and ``%`` around a number are ignored;
an attached ``-``/``−`` (``-5``, ``-$5``) makes it negative, a spaced or in-word one
(``20 - 5``, ``3-5``) does not. ``a/b`` between plain integers is a fraction, and ``万``/``亿``
after digits multiply (``1.5万`` = 15000).
"""

from __future__ import annotations

import math
import re
import unicodedata

WINDOW = 60  # characters after an answer phrase in which its number must start

COMMA_DECIMAL = frozenset({"de", "es", "fr", "ru", "it", "pt", "nl", "pl", "tr", "id", "uk"})

ANSWER_PHRASES: dict[str, tuple[str, ...]] = {
    "en": (r"answer\s*(?:is|would be|will be|[:：=])",),
    "es": (r"respuesta(?:\s+(?:final|correcta))?\s*(?:es|[:=])",),
    "de": (r"(?:antwort|ergebnis)\s*(?:lautet|ist|[:=])",),
    "fr": (r"r[ée]ponse(?:\s+(?:finale|correcte))?\s*(?:est|[:=])",),
    "ru": (r"ответ\s*(?:[:=—–-]|равен|будет|составляет|это)",),
    "zh": (r"答案\s*(?:应该是|應該是|是|为|為|[:：])", r"答\s*[:：]"),
    "ja": (r"(?:答え|解答)\s*(?:は|[:：])", r"答\s*[:：]"),
    "th": (r"คำตอบ(?:สุดท้าย|ที่ถูกต้อง)?\s*(?:คือ|[:：=])",),
    "sw": (r"jibu(?:\s+(?:la\s+mwisho|sahihi))?\s*(?:ni|[:=])",),
    "bn": (r"উত্তর(?:টি)?\s*(?:হল|হলো|হচ্ছে|[:ঃ=])",),
    "te": (r"(?:సమాధానం|జవాబు)\s*(?:[:=]|అనేది)?",),
}

_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_HASHES = re.compile(r"####(?=\s*[-−]?[$€£¥₹]?\s*[0-9])")  # not "#### Step 1" headings
_BOLD = re.compile(r"\*\*([^*\n]{1,40})\*\*")
_BOLD_NUMBER = re.compile(r"\s*(?:[A-Z]{0,2}[$€£¥₹₽])?\s*[-−]?[0-9]")
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([0-9]+)\s*\}\s*\{\s*([0-9]+)\s*\}")
_GROUP_SEPS = " '’\u00a0\u202f\u2009"  # only ever thousands separators
_TOKEN = re.compile(rf"(?<![0-9])[0-9]+(?:(?:[.,]|[{_GROUP_SEPS}](?=[0-9]{{3}}(?![0-9])))[0-9]+)*")
_SEP = re.compile(rf"([.,{_GROUP_SEPS}])")
_CURRENCY = "$€£¥₹₽₩฿₦"
_MINUS = "-−"
_BIG = {"万": 1e4, "萬": 1e4, "亿": 1e8, "億": 1e8}
_KANJI_RUN = re.compile(r"[〇零一二两兩三四五六七八九十百千万萬亿億]+")
_KANJI_DIGIT = {c: i for i, c in enumerate("〇一二三四五六七八九")} | {"零": 0, "两": 2, "兩": 2}
_KANJI_UNIT = {"十": 10, "百": 100, "千": 1000}

_OWN = {lang: re.compile("|".join(f"(?:{p})" for p in ps), re.IGNORECASE) for lang, ps in ANSWER_PHRASES.items()}
_PHRASES = {lang: re.compile(f"{rx.pattern}|{_OWN['en'].pattern}", re.IGNORECASE) for lang, rx in _OWN.items()}


def _guess_lang(text: str) -> str | None:
    """For lang=None: the language whose answer phrase comes last (its number conventions apply)."""
    ends = {lang: max((m.end() for m in rx.finditer(text)), default=-1) for lang, rx in _OWN.items()}
    best = max(ends, key=lambda lang: (ends[lang], lang != "en"))
    return best if ends[best] >= 0 else None


def _normalise(text: str) -> str:
    """Native digits to ASCII (same length, so positions hold), plus a little LaTeX."""
    chars = []
    for c in text:
        if not c.isascii() and (d := unicodedata.decimal(c, None)) is not None:
            c = str(d)
        chars.append({"٫": ".", "٬": ","}.get(c, c))
    text = "".join(chars).replace("{,}", ",").replace("\\,", "\u2009").replace("\\$", "$")
    return _FRAC.sub(r"\1/\2", text)


def _valid_groups(groups: list[str], seps: list[str]) -> bool:
    """Integer part written with thousands (or Indian lakh) grouping."""
    if not seps:
        return True
    if len(set(seps)) != 1 or not 1 <= len(groups[0]) <= 3:
        return False
    rest = groups[1:]
    if all(len(g) == 3 for g in rest):
        return True
    indian = [len(g) for g in rest[:-1]] == [2] * (len(rest) - 1) and len(rest[-1]) == 3
    return seps[0] == "," and len(groups[0]) <= 2 and indian


def _interpret(token: str, lang: str | None) -> list[float]:
    """One number, or the digit runs as separate numbers when the token is no valid number."""
    parts = _SEP.split(token)
    groups, seps = parts[0::2], parts[1::2]
    if not seps:
        return [float(token)]
    last = seps[-1]
    if len(seps) == 1 and last in ".,":
        a, b = groups
        grouping = len(b) == 3 and len(a) <= 3 and a != "0" and (last == "," or lang in COMMA_DECIMAL)
        return [float(a + b) if grouping else float(f"{a}.{b}")]
    if last in ".," and seps.count(last) == 1:  # 1,234.5 / 1.234,5 / 1 234,5
        if _valid_groups(groups[:-1], seps[:-1]):
            return [float("".join(groups[:-1]) + "." + groups[-1])]
    elif _valid_groups(groups, seps):
        return [float("".join(groups))]
    return [float(g) for g in groups]


def _numbers(text: str, lang: str | None) -> list[tuple[int, int, float]]:
    """(start, end, value) of every number in normalised text, in order."""
    found: list[tuple[int, int, float]] = []
    for m in _TOKEN.finditer(text):
        values = _interpret(m.group(), lang)
        if len(values) == 1:
            j = m.start() - 1
            if j >= 0 and text[j] in _CURRENCY:
                j -= 1
            if j >= 0 and text[j] in _MINUS and (j == 0 or not re.match(r"[0-9A-Za-z)\]]", text[j - 1])):
                values = [-values[0]]
            if m.end() < len(text) and text[m.end()] in _BIG:
                values = [values[0] * _BIG[text[m.end()]]]
        found += [(m.start(), m.end(), v) for v in values]
    out: list[tuple[int, int, float]] = []
    for start, end, value in found:  # a/b between plain integers
        if out and text[out[-1][1]:start] == "/" and text[out[-1][0] - 1:out[-1][0]] != "/" \
                and text[end:end + 1] != "/" and value != 0 \
                and re.fullmatch(r"[0-9]+", text[out[-1][0]:out[-1][1]]) \
                and re.fullmatch(r"[0-9]+", text[start:end]):
            out[-1] = (out[-1][0], end, out[-1][2] / value)
        else:
            out.append((start, end, value))
    return out


def _kanji(run: str) -> float:
    total = section = num = 0
    for c in run:
        if c in _KANJI_DIGIT:
            num = num * 10 + _KANJI_DIGIT[c] if c in "〇零" or num else _KANJI_DIGIT[c]
        elif c in _KANJI_UNIT:
            section += (num or 1) * _KANJI_UNIT[c]
            num = 0
        else:
            total += (section + num or 1) * int(_BIG[c])
            section = num = 0
    return float(total + section + num)


def extract_answer(text: str, lang: str | None = None) -> float | None:
    """The answer number of a response: the number after an 'answer is'-style phrase if one
    is present (the last such phrase), else the last number in the text. None if no number.
    ``\\boxed{}`` and ``####`` come first; see the module docstring for all the rules."""
    if not text:
        return None
    lang = lang.split("-")[0].split("_")[0].lower() if lang else None
    text = _normalise(text)
    lang = lang or _guess_lang(text)
    numbers = _numbers(text, lang)

    boxes = list(_BOXED.finditer(text))
    if boxes and (inside := _numbers(boxes[-1].group(1), lang)):
        return inside[-1][2]

    markers = list(_HASHES.finditer(text)) or list(_PHRASES.get(lang, _PHRASES["en"]).finditer(text))
    if markers:
        at = markers[-1].end()
        after = [v for s, _, v in numbers if at <= s < at + WINDOW]
        if after:
            return after[0]
        if lang in (None, "zh", "ja") and (k := _KANJI_RUN.search(text, at, at + WINDOW)):  # 答えは十八
            return _kanji(k.group())

    bold = [m for m in _BOLD.finditer(text) if _BOLD_NUMBER.match(m.group(1))]
    if bold and (inside := _numbers(bold[-1].group(1), lang)):
        return inside[0][2]
    return numbers[-1][2] if numbers else None


def parse_gold(s: str) -> float:
    """An MGSM gold answer ("18", "2,125", "114,200"; English grouping) as a float."""
    try:
        return float(s.strip().replace(",", "").replace("_", ""))
    except ValueError:
        value = extract_answer(s)
        if value is None:
            raise ValueError(f"not a number: {s!r}") from None
        return value


def numbers_equal(a: float | None, b: float) -> bool:
    """a equals b within 1e-6 relative (1e-9 absolute near zero); None never equals."""
    return a is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
