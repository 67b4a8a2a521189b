"""Detect prompts that are themselves translation tasks (method.md §2 step 3).

"Translate this sentence into French: ..." must not have its answers translated: the
answer's language is fixed by the instruction, not by the prompt's language. The paper
used a fixed id list; this module lets the project find such prompts in any data, in
any of en, es, de, fr, it, pt, ru, zh, ja, ko, ar, th (the language of the
instruction need not be known: every language's patterns are tried).

Tuned for precision. A prompt is a translation task when one of its clauses (quoted
material removed, split at line and sentence ends and colons) holds

1. a request to translate -- the verb in request position: at the start of the clause
   (after "please", "can you", "given a sentence," ...), or, in verb-final languages
   (de infinitive, zh, ja, ko, th, ar), tied to a language ("翻译成法语", "英語に翻訳",
   "ins Spanische übersetzen") -- and
2. a natural language named in the same clause ("into French", "al inglés", "from one
   language to another"), and no non-language target ("into a mathematical equation",
   "into Python code", "в градусы Цельсия");

or, without any language named, when the instruction opens with the request, says what
to translate ("the sentence", a quotation) and names no target at all ("Translate the
sentence: «Je suis très content.»").

Not translation tasks: "How do I become a translator?", "What does 'translate' mean in
biology?", "Why is poetry hard to translate into English?", "Переведите 5 миль в
километры" (convert), "แปลงอุณหภูมิ..." (Thai "convert").

Measured on the paper's AlpaGasus prompts (2000 ids x 11 languages, 17 marked ids):
see tests/test_pairs.py::test_detector_on_paper_data and the module's `evaluate`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

_F = re.IGNORECASE | re.UNICODE


def _words(*alts: str) -> str:
    """Whole-word alternation for space-separated scripts (Latin, Cyrillic, Arabic)."""
    return r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)"


# --- 2. language references, in every supported language --------------------------------
# (adjective stems take the usual endings; "language" words count as a reference:
# "from one language to another", "in die deutsche Sprache", "на английский язык").
_LANG_LATIN = _words(
    # en
    "english", "spanish", "french", "german", "italian", "portuguese", "russian", "chinese",
    "mandarin", "cantonese", "japanese", "korean", "arabic", "thai", "dutch", "latin", "greek",
    "hindi", "turkish", "vietnamese", "swedish", "polish", "hebrew", "swahili", "bengali",
    "indonesian", "ukrainian", "czech", "danish", "norwegian", "finnish", "hungarian",
    "romanian", "persian", "farsi", "urdu", "tamil", "telugu", "malay", "tagalog", "filipino",
    "esperanto", "catalan", "languages?",
    # es
    "ingl[eéê]s", "espa[ñn]ol", "castellano", "franc[eéê]s", "alem[aá]n", "italiano",
    "portugu[eéê]s", "ruso", "chino", "mandar[ií]n", "japon[eé]s", "coreano", "[aá]rabe",
    "tailand[eé]s", "holand[eé]s", "neerland[eé]s", "lat[ií]n", "griego", "turco",
    "vietnamita", "sueco", "polaco", "hebreo", "suajili", "idiomas?", "lenguas?",
    # de
    "englisch(?:e|en|er|es)?", "spanisch(?:e|en|er|es)?", "franz[öo]sisch(?:e|en|er|es)?",
    "deutsch(?:e|en|er|es)?", "italienisch(?:e|en|er|es)?", "portugiesisch(?:e|en|er|es)?",
    "russisch(?:e|en|er|es)?", "chinesisch(?:e|en|er|es)?", "japanisch(?:e|en|er|es)?",
    "koreanisch(?:e|en|er|es)?", "arabisch(?:e|en|er|es)?", "thail[äa]ndisch(?:e|en|er|es)?",
    "niederl[äa]ndisch(?:e|en|er|es)?", "holl[äa]ndisch(?:e|en|er|es)?", "latein(?:isch)?(?:e|en|er|es)?",
    "griechisch(?:e|en|er|es)?", "t[üu]rkisch(?:e|en|er|es)?", "schwedisch(?:e|en|er|es)?",
    "polnisch(?:e|en|er|es)?", "hebr[äa]isch(?:e|en|er|es)?", "sprachen?",
    # fr
    "anglaise?s?", "espagnole?s?", "fran[çc]aise?s?", "allemande?s?", "italienne?s?",
    "italiens?", "portugaise?s?", "russes?", "chinoise?s?", "japonaise?s?", "cor[ée]enne?s?",
    "arabes?", "tha[ïi]", "tha[ïi]landaise?s?", "n[ée]erlandaise?s?", "hollandaise?s?",
    "grecque?s?", "turque?s?", "su[ée]doise?s?", "polonaise?s?", "h[ée]breu", "langues?",
    # it
    "inglese", "spagnolo", "francese", "tedesco", "portoghese", "russo", "cinese",
    "giapponese", "arabo", "tailandese", "olandese", "latino", "greco", "svedese", "polacco",
    "ebraico", "lingua", "lingue",
    # pt
    "espanhol", "alem[ãa]o", "chin[êe]s", "japon[êe]s", "tailand[êe]s", "holand[êe]s",
    "latim", "grego", "polon[êe]s", "hebraico", "l[íi]nguas?",
)
_LANG_CYRILLIC = r"(?<!\w)(?:" + "|".join((
    "англий", "француз", "немец", "испан", "итальян", "португал", "русск", "китай", "япон",
    "корей", "арабск", "тайск", "голланд", "нидерланд", "латин", "греческ", "турецк", "шведск",
    "польск", "иврит", "хинди", "язык",
)) + r")\w*"
_LANG_ARABIC = r"(?<!\w)(?:[وب]?(?:ال)?)(?:" + "|".join((
    "إنجليزي", "انجليزي", "إنكليزي", "انكليزي", "فرنسي", "ألماني", "الماني", "إسباني",
    "اسباني", "إيطالي", "ايطالي", "برتغالي", "روسي", "صيني", "ياباني", "كوري", "عربي",
    "تايلاندي", "تايلندي", "هولندي", "لاتيني", "يوناني", "تركي", "سويدي", "بولندي", "عبري",
)) + r")[ةه]?(?!\w)|(?<!\w)[وب]?(?:ال)?لغ(?:ة|ه|ات)(?!\w)"
_LANG_ZH = (
    r"(?:英|法|德|西班牙|意大利|葡萄牙|俄|中|汉|漢|日|韩|韓|朝鲜|阿拉伯|泰|荷兰|荷蘭|拉丁|希腊|希臘|"
    r"印地|土耳其|越南|瑞典|波兰|波蘭|外|粤|粵)(?:语|語|文)|普通话|语言|語言"
)
_LANG_JA = (
    r"(?:英|フランス|仏|ドイツ|独|スペイン|イタリア|ポルトガル|ロシア|中国|日本|韓国|朝鮮|アラビア|"
    r"タイ|オランダ|ラテン|ギリシャ|ギリシア|ヒンディー|トルコ|ベトナム|スウェーデン|ポーランド|"
    r"ヘブライ|外国)語|言語"
)
_LANG_KO = (
    r"(?:영|프랑스|불|독일|스페인|이탈리아|포르투갈|러시아|중국|일본|한국|아랍|태국|네덜란드|"
    r"라틴|그리스|힌디|터키|베트남|스웨덴|폴란드|히브리|외국)어|언어|한국말|영문"
)
_LANG_TH = r"ภาษา"

LANGUAGE_REF = re.compile(
    "|".join((_LANG_LATIN, _LANG_CYRILLIC, _LANG_ARABIC, _LANG_ZH, _LANG_JA, _LANG_KO, _LANG_TH)), _F
)

# Targets that are not natural languages: such a "translation" is a conversion, and a
# "language" next to them is a programming or formal one.
NON_LANGUAGE_TARGET = re.compile(
    "|".join((
        _words(
            "equations?", "formulas?", "formulae", "mathematical", "math", "programming", "code",
            "pseudo-?code", "python", "javascript", "java", r"c\+\+", "sql", "html", "regex",
            "regular expressions?", "binary", "hexadecimal", "json",
            "ecuaci[oó]n", "f[oó]rmula", "c[oó]digo", "programaci[oó]n", "matem[aá]tica",
            "gleichung", "formel", "mathematische", "programmier\\w*",
            "[ée]quation", "formule", "math[ée]matique", "programmation",
            "equazione", "matematica", "codice", "programmazione",
            "equa[çc][ãa]o", "programa[çc][ãa]o",
        ),
        r"(?<!\w)(?:уравнени|формул|математическ|программ|код)\w*",
        r"(?<!\w)(?:[وب]?(?:ال)?)(?:معادل|رياضي|برمج|كود|شيفر)\w*",
        r"方程|等式|公式|代码|代碼|编程|程序|数式|方程式|コード|プログラ|방정식|수식|코드|프로그래밍|สมการ|สูตร|โค้ด|โปรแกรม",
        # "languages" that are not a fixed output language: the answer stays in the
        # prompt's language ("Translate this logic formula into natural language")
        _words(
            r"natural\s+language", r"plain\s+(?:english|language)", r"simple\s+(?:english|language|terms)",
            r"everyday\s+language", r"layman'?s\s+terms", r"(?:sign|body|formal|machine|assembly)\s+language",
            r"lenguaje\s+(?:natural|sencillo|simple|cotidiano)", r"lengua\s+de\s+señas", r"t[ée]rminos\s+sencillos",
            r"nat[üu]rliche\s+sprache", r"einfache\s+sprache", r"geb[äa]rdensprache",
            r"langage\s+(?:naturel|simple|courant)", r"langue\s+(?:naturelle|des\s+signes)", r"termes\s+simples",
            r"linguaggio\s+(?:naturale|semplice)", r"lingua\s+naturale", r"termini\s+semplici",
            r"linguagem\s+(?:natural|simples)",
        ),
        r"(?<!\w)(?:естественн|прост|разговорн)\w*\s+язык\w*|язык\w*\s+жестов",
        r"(?<!\w)(?:ال)?لغ[ةه]\s+(?:ال)?(?:طبيعي|بسيط|إشار)\w*",
        r"自然语言|自然語言|通俗|白话|白話|手语|手語|自然言語|平易な|手話|자연어|쉬운\s*말|수화|ภาษาธรรมชาติ|ภาษาง่าย|ภาษามือ",
    )),
    _F,
)

# What to translate, for prompts that name no language ("Translate the sentence: ...").
TEXT_OBJECT = re.compile(
    "|".join((
        _words(
            "sentences?", "phrases?", "text", "words?", "paragraphs?", "passage", "statements?",
            "expressions?", "quotes?", "quotation", "proverb", "saying", "idiom", "following",
            "this", "it", "message", "title", "poem", "lyrics",
            "frases?", "oraci[oó]n(?:es)?", "texto", "palabras?", "p[aá]rrafo", "declaraci[oó]n",
            "expresi[oó]n", "cita", "siguiente", "esto",
            "s[äa]tze?", "satz", "texts?", "wort", "w[öo]rter", "absatz", "aussage", "ausdruck",
            "folgenden?", "dies(?:en)?",
            "phrases?", "texte", "mots?", "paragraphe", "d[ée]claration", "citation", "suivante?",
            "ceci",
            "testo", "parol[ae]", "paragrafo", "affermazione", "espressione", "citazione", "seguente",
            "palavras?", "par[aá]grafo", "declara[çc][ãa]o", "express[ãa]o", "cita[çc][ãa]o", "seguinte",
        ),
        r"(?<!\w)(?:предложени|фраз|текст|слов|абзац|выражени|утверждени|цитат|следующ)\w*",
        r"(?<!\w)(?:[وب]?(?:ال)?)(?:جمل|عبار|نص|كلم|التالي)\w*",
        r"句子|这句话|這句話|短语|短語|文本|文字|段落|单词|單詞|以下|下面|文章|フレーズ|テキスト|単語|次の|"
        r"문장|문구|텍스트|단어|다음|아래|ประโยค|วลี|ข้อความ|ต่อไปนี้",
    )),
    _F,
)

QUOTE_MARK = "\u27e8q\u27e9"  # stands for quoted material
_QUOTED = re.compile(
    r"[\"“„][^\"“”„\n]{1,300}[\"”“]|«[^«»\n]{1,300}»|「[^「」\n]{1,300}」|『[^『』\n]{1,300}』|‘[^‘’\n]{1,300}’"
)
_CLAUSE_SPLIT = re.compile(r"[\n.!?;:。！？；：،؛]+")


# --- 1. the request to translate, per language -------------------------------------------
@dataclass(frozen=True)
class _Spec:
    verb: str  # the verb (or a "give a translation" phrase)
    lead: str = ""  # what may precede the verb at the start of a clause
    final: bool = False  # the verb may also end the clause (de infinitive)
    bound: str = ""  # verb tied to a language anywhere in the clause (verb-final languages)
    target: str = ""  # an explicit target marker ("into", "al", "в"): with no language, not a task

    def __post_init__(self):
        object.__setattr__(self, "_verb", re.compile(self.verb, _F))
        object.__setattr__(self, "_lead", re.compile(rf"(?:{self.lead})?" if self.lead else "", _F))
        object.__setattr__(self, "_bound", re.compile(self.bound, _F) if self.bound else None)
        object.__setattr__(self, "_target", re.compile(self.target, _F) if self.target else None)


_GIVEN = r"(?:given|using|with|for)\b[^,]{0,80},\s*"
SPECS: dict[str, _Spec] = {
    "en": _Spec(
        verb=r"\bs?translat(?:e|es)\b|\b(?:provide|give|write|produce|generate|create|make)\s+"
        r"(?:me\s+|us\s+)?(?:a|an|the)\s+(?:\w+\s+)?translation\b",
        lead=r"(?:(?:please|kindly|now|also|then|and|next|finally)\s*,?\s*)*"
        r"(?:(?:can|could|would|will)\s+you\s+(?:please\s+)?|i\s+(?:need|want|would\s+like)\s+(?:you\s+)?to\s+|"
        r"(?:help\s+me|let'?s|your\s+task\s+is\s+to|you\s+(?:need|have)\s+to)\s+|" + _GIVEN + r")?(?:please\s+)?",
        target=r"\b(?:into|to|in)\b",
    ),
    "es": _Spec(
        verb=r"\b(?:traduce|traduzca|traduzcan|traducir|traducid|trad[uú]ce(?:l[aoe]s?|me)|"
        r"trad[uú]zca(?:l[aoe]s?|me))\b|\b(?:proporciona|da|dame|escribe|ofrece|genera)\s+(?:una|la)\s+traducci[oó]n\b",
        lead=r"(?:por\s+favor\s*,?\s*|(?:puedes|podr[ií]as|podr[ií]a|puede)\s+|(?:necesito|quiero)\s+que\s+|"
        r"(?:dad[ao]s?|usando|con)\b[^,]{0,80},\s*)*",
        target=r"\b(?:al|a|en)\b",
    ),
    "pt": _Spec(
        verb=r"\b(?:traduza|traduzir|traduz|traduzam|traduze)\b",
        lead=r"(?:por\s+favor\s*,?\s*|(?:voc[êe]\s+)?(?:pode|poderia)\s+|(?:dad[ao]s?)\b[^,]{0,80},\s*)*",
        target=r"\b(?:para|em|ao|à)\b",
    ),
    "fr": _Spec(
        verb=r"\b(?:tradui(?:s|sez|sons|t)|traduire)\b|\b(?:donne|donnez|fournis|fournissez|[ée]cris|"
        r"[ée]crivez)(?:-moi)?\s+(?:une|la)\s+traduction\b",
        lead=r"(?:s'il\s+(?:vous|te)\s+pla[iî]t\s*,?\s*|veuillez\s+|merci\s+de\s+|(?:pouvez-vous|peux-tu|"
        r"pourriez-vous|pourrais-tu)\s+|(?:[ée]tant\s+donn[ée]e?s?|compte\s+tenu\s+d[eu'])\b[^,]{0,80},\s*)*",
        target=r"\b(?:en|vers|dans)\b",
    ),
    "it": _Spec(
        verb=r"\b(?:traduci(?:l[aoei]|mi)?|tradurre|traduca|traducete|traducano|traduce)\b",
        lead=r"(?:per\s+(?:favore|piacere)\s*,?\s*|(?:puoi|potresti|pu[oò]|potrebbe)\s+|"
        r"(?:dat[aoie])\b[^,]{0,80},\s*)*",
        target=r"(?<!\w)(?:in|nel|nella|al|a|all')",
    ),
    "de": _Spec(
        verb=r"\b(?:übersetze|übersetzen|übersetzt|übersetzet)\b",
        lead=r"(?:bitte\s*,?\s*|(?:kannst\s+du|k[öo]nnen\s+sie|k[öo]nntest\s+du|k[öo]nnten\s+sie)\s+)*",
        final=True,
        target=r"\b(?:in|ins|auf|zu)\b",
    ),
    "ru": _Spec(
        verb=r"(?<!\w)(?:переведите|переведи|перевести|переводит|переводите)(?!\w)",
        lead=r"(?:пожалуйста\s*,?\s*|(?:можете|можешь|не\s+могли\s+бы\s+вы)\s+|"
        r"(?:учитывая|дано|дан|дана|используя)(?!\w)[^,]{0,80},\s*)*",
        target=r"(?<!\w)(?:в|во|на|из|с)(?!\w)",
    ),
    "ar": _Spec(
        verb=r"(?<!\w)[وف]?(?:ترجم(?:ي|وا|ها|ه)?|ترجمة|يترجم|بترجمة|ترجمتها|ترجمته)(?!\w)",
        lead=r"(?:(?:من\s+فضلك|يرجى|الرجاء|رجاء|هل\s+يمكنك|قم|قومي)\s*،?\s*)*",
        target=r"(?<!\w)(?:إلى|الى|الي)(?!\w)",
    ),
    "th": _Spec(
        verb=r"(?<!นัก)แปล(?!ก|ง|ว่า)",
        lead=r"(?:กรุณา|โปรด|ช่วย|ให้)*",
        bound=r"(?<!นัก)แปล(?!ก|ง|ว่า)[^\n]{0,40}?ภาษา",
        target=r"เป็น|ใน",
    ),
    "zh": _Spec(
        verb=r"翻译|翻譯",
        lead=r"(?:请|請|请你|請你|帮我|幫我|麻烦)*",
        bound=rf"(?:翻译|翻譯|译|譯)\s*(?:成|为|為|到|至|作)\s*(?:一种|一種)?\s*(?:{_LANG_ZH})|"
        rf"从\s*(?:{_LANG_ZH})[^。！？\n]{{0,12}}?(?:翻译|翻譯|译|譯)",
        target=r"成|为|為|到|至",
    ),
    "ja": _Spec(
        verb=r"翻訳|英訳|和訳|(?<!い)訳して",
        lead=r"(?:以下を|次を)?",
        # "...語に翻訳して/する/します": a request, not "英語からドイツ語への翻訳タスク"
        bound=rf"(?:{_LANG_JA})\s*に\s*(?:翻訳|訳)\s*(?:し|す)|(?:英訳|和訳)\s*(?:し|す)",
        target=r"(?:に|へ)(?:翻訳|訳)",
    ),
    "ko": _Spec(
        verb=r"번역",
        bound=rf"(?:{_LANG_KO})\s*(?:로|으로|에서)[^.\n]{{0,20}}?번역|번역[^.\n]{{0,12}}?(?:{_LANG_KO})\s*(?:로|으로)",
        target=r"(?:로|으로)\s*번역",
    ),
}
# An imperative translate verb in verb-final languages (for prompts naming no language).
_FINAL_REQUEST = re.compile(
    r"번역\s*(?:하세요|해\s*(?:주세요|보세요|줘)|하십시오|하시오|해라|해보세요)|"
    r"(?:翻訳|訳)\s*(?:してください|して下さい|しなさい|して)|^(?:请|請)?\s*(?:翻译|翻譯)",
    _F,
)

LANGUAGES = tuple(SPECS)
# Any translate verb of any language: most prompts have none and stop here.
_ANY_VERB = re.compile("|".join(spec.verb for spec in SPECS.values()) + r"|译|譯|訳", _F)


def _strip_quotes(text: str) -> str:
    return _QUOTED.sub(f" {QUOTE_MARK} ", text)


def _clauses(text: str) -> list[str]:
    """Clauses of the instruction proper: its first line, and its last line when the
    request follows the material ("<text>\n\nTranslate it into French."). The lines
    between are material, which may well mention translation ("an English-to-German
    translation task") without asking for one."""
    lines = [ln for ln in _strip_quotes(text).splitlines() if ln.strip()]
    lines = lines[:1] + lines[-1:] if len(lines) > 1 else lines
    return [c.strip() for ln in lines for c in _CLAUSE_SPLIT.split(ln) if c.strip()]


def _request_at_start(spec: _Spec, clause: str, m: re.Match) -> bool:
    """The verb opens the clause, possibly after a polite or 'given ...,' lead."""
    prefix = clause[: m.start()].lstrip(" \t\"'“«„¿¡*-–—•([")
    if not prefix:
        return True
    if not spec.lead:
        return False
    return any(spec._lead.fullmatch(p) for p in (prefix, prefix.rstrip() + " "))


def _request_at_end(clause: str, m: re.Match) -> bool:
    return not re.search(r"\w", clause[m.end():])


def explain(instruction: str) -> str | None:
    """Why `instruction` is a translation task ("<lang>: <rule> in <clause>"), or None."""
    if not instruction or not _ANY_VERB.search(instruction):
        return None
    clauses = _clauses(instruction)
    for k, clause in enumerate(clauses):
        if NON_LANGUAGE_TARGET.search(clause):
            continue
        names_language = LANGUAGE_REF.search(clause) is not None
        for lang, spec in SPECS.items():
            if spec._bound is not None and spec._bound.search(clause):
                return f"{lang}: verb tied to a language in {clause!r}"
            for m in spec._verb.finditer(clause):
                at_start = _request_at_start(spec, clause, m)
                if names_language and (at_start or (spec.final and _request_at_end(clause, m))):
                    return f"{lang}: request naming a language in {clause!r}"
                # No language named: only an opening request that says what to translate
                # and names no target ("Translate the sentence: ...").
                if (
                    k == 0
                    and at_start
                    and not names_language
                    and (TEXT_OBJECT.search(clause) or QUOTE_MARK in clause)
                    and not (spec._target and spec._target.search(clause[m.end():]))
                ):
                    return f"{lang}: opening request with no target in {clause!r}"
        if k == 0 and not names_language and _FINAL_REQUEST.search(clause) and (
            TEXT_OBJECT.search(clause) or QUOTE_MARK in clause
        ) and not any(s._target and s._target.search(clause) for s in (SPECS["ko"], SPECS["ja"], SPECS["zh"])):
            return f"request with no target in {clause!r}"
    return None


def is_translation_task(instruction: str) -> bool:
    """Whether the instruction asks for a translation (its answers must not be translated)."""
    return explain(instruction) is not None


def detect_translation_task_ids(
    prompts: Mapping[str, Mapping[object, str]],
    languages: Iterable[str] | None = None,
    min_share: float = 0.5,
) -> set:
    """Ids whose prompt is a translation task in at least `min_share` of the languages
    that have it (prompts: lang -> id -> instruction). Parallel prompts are
    translations of one another, so a vote across languages absorbs one language's
    odd wording or a lossy prompt translation."""
    langs = list(languages) if languages is not None else list(prompts)
    votes: dict[object, list[bool]] = {}
    for lang in langs:
        for pid, text in prompts.get(lang, {}).items():
            votes.setdefault(pid, []).append(is_translation_task(text))
    return {pid for pid, v in votes.items() if v and sum(v) / len(v) >= min_share}


def evaluate(rows: Iterable[tuple[object, str]], marked: set) -> dict:
    """Precision/recall of the detector on (id, instruction) rows against marked ids."""
    tp = fp = fn = 0
    misses, false_alarms = [], []
    for pid, text in rows:
        hit, gold = is_translation_task(text), pid in marked
        tp += hit and gold
        fp += hit and not gold
        fn += gold and not hit
        if gold and not hit:
            misses.append(pid)
        if hit and not gold:
            false_alarms.append(pid)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "misses": misses,
        "false_alarms": false_alarms,
    }


__all__ = [
    "LANGUAGES",
    "LANGUAGE_REF",
    "detect_translation_task_ids",
    "evaluate",
    "explain",
    "is_translation_task",
]
