"""Stage 3 (lidr.pipeline.pairs) and the translation-task detector, no model needed."""

import json
from collections import Counter
from pathlib import Path

import pytest

from lidr.config import PairsConfig
from lidr.pipeline.pairs import (
    NATIVE_BEATS_BACKTRANSLATED,
    REASONS,
    TRANSLATED_BEATS_NATIVE,
    TRANSLATION_TASK,
    build_pairs,
    id_sort_key,
    needed_translations,
    rejected_language_order,
    repeated_line,
)
from lidr.pipeline.translation_tasks import (
    detect_translation_task_ids,
    evaluate,
    explain,
    is_translation_task,
)

D, OTHERS = "en", ["es", "de", "fr"]
ALL = [D, *OTHERS]
NO_LANGID = lambda text, lang: None  # noqa: E731  (language check: "cannot tell")


def cfg(**kw) -> PairsConfig:
    return PairsConfig(**kw)


def response(pid, lang, text=None):
    return {"id": pid, "lang": lang, "prompt": f"prompt {pid} [{lang}]",
            "response": f"answer {pid} in {lang}" if text is None else text, "finish_reason": "stop"}


def translation(pid, src, tgt, text=None, ok=True):
    out = f"answer {pid} {src}->{tgt}" if text is None else text
    return {"id": pid, "src": src, "tgt": tgt, "text": f"answer {pid} in {src}",
            "translation": out if ok else None, "ok": ok, "raw": out}


def world(ids, langs=ALL, dominant=D, tt=()):
    """Responses for every (id, lang) and every needed translation, all distinct texts."""
    others = [lang for lang in langs if lang != dominant]
    responses = {lang: {i: response(i, lang) for i in ids} for lang in langs}
    need = needed_translations(dominant, others, set(tt), ids)
    translations = {k: {i: translation(i, *k) for i in v} for k, v in need.items()}
    return responses, translations


def run(responses, translations, c=None, seed=0, tt=(), language_of=NO_LANGID, others=OTHERS):
    return build_pairs(responses, translations, D, others, c or cfg(), seed,
                       translation_task_ids=set(tt), language_of=language_of)


def by(result_list, **kw):
    return [p for p in result_list if all(p.get(k) == v for k, v in kw.items())]


# --- the two directions --------------------------------------------------------------------


def test_nondominant_pair_translated_beats_native():
    r = run(*world([1]))
    (p,) = by(r.kept, lang="es")
    assert p == {"id": 1, "lang": "es", "prompt": "prompt 1 [es]", "chosen": "answer 1 en->es",
                 "rejected": "answer 1 in es", "kind": TRANSLATED_BEATS_NATIVE}


def test_dominant_pair_native_beats_backtranslated():
    r = run(*world([1]), c=cfg(dominant_rejected="per_language"))
    pairs = by(r.kept, lang="en")
    assert [p["via"] for p in pairs] == OTHERS
    for p in pairs:
        assert p == {"id": 1, "lang": "en", "prompt": "prompt 1 [en]", "chosen": "answer 1 in en",
                     "rejected": f"answer 1 {p['via']}->en", "kind": NATIVE_BEATS_BACKTRANSLATED, "via": p["via"]}


# --- translation tasks (R2) ----------------------------------------------------------------


def test_needed_translations_skip_translation_tasks():
    need = needed_translations(D, OTHERS, {2}, [1, 2, 3])
    assert set(need) == {(D, lang) for lang in OTHERS} | {(lang, D) for lang in OTHERS}
    assert all(v == {1, 3} for v in need.values())
    last = needed_translations(D, OTHERS, set(), [1], dominant_rejected="last_language")
    assert set(last) == {(D, lang) for lang in OTHERS} | {("fr", D)}


def test_translation_task_uses_untranslated_dominant_answer():
    ids = [1, 2]
    responses, translations = world(ids, tt={2})
    # language check on: a translation task's answer is in the requested language, unchecked
    r = run(responses, translations, tt={2}, language_of=lambda t, l: False)
    for lang in OTHERS:
        (p,) = by(r.kept, lang=lang, id=2)
        assert p["kind"] == TRANSLATION_TASK
        assert p["chosen"] == "answer 2 in en" and p["rejected"] == f"answer 2 in {lang}"
        assert p["prompt"] == f"prompt 2 [{lang}]"
    # no dominant pair for a translation task, and nothing dropped for it
    assert not by(r.kept, lang="en", id=2) and not by(r.dropped, id=2)
    # the ordinary id still gets language-checked (and fails here)
    assert {p["reason"] for p in by(r.dropped, id=1)} == {"wrong_language"}


def test_translation_task_identical_answers_dropped():
    responses, translations = world([1], tt={1})
    responses["es"][1]["response"] = "answer 1 in en"
    r = run(responses, translations, tt={1})
    (d,) = by(r.dropped, lang="es")
    assert d["reason"] == "identical" and d["kind"] == TRANSLATION_TASK


# --- failed / missing translations and responses (R1) --------------------------------------


def test_failed_translation_drops_the_pair():
    responses, translations = world([1, 2])
    translations[("en", "de")][1] = translation(1, "en", "de", ok=False)
    translations[("fr", "en")][2] = translation(2, "fr", "en", ok=False)
    r = run(responses, translations, c=cfg(dominant_rejected="per_language"))
    (d,) = by(r.dropped, lang="de")
    assert d["reason"] == "translation_failed" and d["id"] == 1 and d["chosen"] is None
    assert d["rejected"] == "answer 1 in de" and "detail" in d
    (d,) = by(r.dropped, lang="en")
    assert d["reason"] == "translation_failed" and d["id"] == 2 and d["via"] == "fr" and d["rejected"] is None
    assert len(r.kept) == 2 * 3 + 2 * 3 - 2


def test_missing_translation_record():
    responses, translations = world([1])
    del translations[("en", "es")][1]
    r = run(responses, translations)
    (d,) = by(r.dropped, lang="es")
    assert d["reason"] == "missing_translation"


def test_missing_native_response():
    responses, translations = world([1, 2])
    del responses["de"][1]
    r = run(responses, translations, c=cfg(dominant_rejected="per_language"))
    (d,) = by(r.dropped, lang="de")
    assert d["reason"] == "missing_response" and d["id"] == 1 and d["prompt"] is None
    (d,) = by(r.dropped, lang="en")
    assert d["reason"] == "missing_response" and d["via"] == "de"


def test_missing_dominant_response_drops_everything_for_that_id():
    responses, translations = world([1, 2])
    del responses["en"][1]
    for policy, n_dom in (("per_language", 3), ("one_per_prompt", 1), ("last_language", 1)):
        r = run(responses, translations, c=cfg(dominant_rejected=policy))
        assert not by(r.kept, id=1)
        assert [d["reason"] for d in by(r.dropped, id=1, lang="en")] == ["missing_response"] * n_dom
        assert len(by(r.dropped, id=1)) == n_dom + 3
        assert len(by(r.kept, id=2)) == 3 + (3 if policy == "per_language" else 1)


def test_id_only_in_one_language():
    responses, translations = world([1])
    responses["fr"]["extra"] = response("extra", "fr")
    r = run(responses, translations, c=cfg(dominant_rejected="per_language"))
    assert {(d["lang"], d["reason"]) for d in by(r.dropped, id="extra")} == {
        ("en", "missing_response"), ("es", "missing_response"), ("de", "missing_response"), ("fr", "missing_response")}


# --- dominant policies (R3) ----------------------------------------------------------------


def test_one_per_prompt_is_deterministic_and_spread():
    ids = list(range(300))
    responses, translations = world(ids)
    a = run(responses, translations, seed=1)
    b = run(responses, translations, seed=1)
    c = run(responses, translations, seed=2)
    dom_a = {p["id"]: p["via"] for p in by(a.kept, lang="en")}
    assert len(dom_a) == 300  # exactly one per prompt
    assert a.kept == b.kept and a.dropped == b.dropped
    dom_c = {p["id"]: p["via"] for p in by(c.kept, lang="en")}
    assert sum(dom_a[i] != dom_c[i] for i in ids) > 100  # the seed matters
    spread = Counter(dom_a.values())
    assert set(spread) == set(OTHERS) and min(spread.values()) >= 70  # about 100 each
    # the choice does not depend on the order of `others`
    assert rejected_language_order(5, OTHERS, 1) == rejected_language_order(5, list(reversed(OTHERS)), 1)


def test_one_per_prompt_falls_back_to_next_language():
    responses, translations = world([7])
    first, second, third = rejected_language_order(7, OTHERS, seed=3)
    translations[(first, "en")][7] = translation(7, first, "en", ok=False)
    r = run(responses, translations, seed=3)
    (p,) = by(r.kept, lang="en")
    assert p["via"] == second
    (d,) = by(r.dropped, lang="en")
    assert d["via"] == first and d["reason"] == "translation_failed" and second in d["detail"]
    # all three fail: three dropped candidates, no pair
    for lang in (second, third):
        translations[(lang, "en")][7] = translation(7, lang, "en", text="loop\n" * 6)
    r = run(responses, translations, seed=3)
    assert not by(r.kept, lang="en")
    assert Counter(d["reason"] for d in by(r.dropped, lang="en")) == {
        "translation_failed": 1, "degenerate_repetition": 2}


def test_one_per_prompt_stops_on_a_bad_dominant_answer():
    responses, translations = world([1])
    responses["en"][1]["response"] = "   "
    r = run(responses, translations)
    (d,) = by(r.dropped, lang="en")  # one record, not one per language
    assert d["reason"] == "empty"


def test_last_language_is_the_released_behaviour():
    ids = list(range(20))
    responses, translations = world(ids)
    r = run(responses, translations, c=cfg(dominant_rejected="last_language"))
    assert {p["via"] for p in by(r.kept, lang="en")} == {"fr"} and len(by(r.kept, lang="en")) == 20
    # no fallback when the last language's back-translation failed
    translations[("fr", "en")][3] = translation(3, "fr", "en", ok=False)
    r = run(responses, translations, c=cfg(dominant_rejected="last_language"))
    assert not by(r.kept, lang="en", id=3)
    assert [d["reason"] for d in by(r.dropped, lang="en")] == ["translation_failed"]


def test_per_language_gives_one_dominant_pair_per_language():
    responses, translations = world([1, 2])
    r = run(responses, translations, c=cfg(dominant_rejected="per_language"))
    assert r.counts["kept"] == {"en": 6, "es": 2, "de": 2, "fr": 2}


# --- quality filters (R4) ------------------------------------------------------------------


def test_empty_answers_dropped():
    responses, translations = world([1, 2, 3])
    responses["es"][1]["response"] = " \n "
    translations[("en", "de")][2] = translation(2, "en", "de", text="  ")
    r = run(responses, translations)
    assert by(r.dropped, lang="es", id=1)[0]["reason"] == "empty"
    assert by(r.dropped, lang="de", id=2)[0]["reason"] == "empty"
    # the dominant pair via es for id 1 would also need the empty es answer
    off = run(responses, translations, c=cfg(drop_empty=False))
    assert by(off.kept, lang="es", id=1) and by(off.kept, lang="de", id=2)


def test_degenerate_repetition():
    loop = "Intro line\n" + "I am a helpful assistant.\n" * 5 + "end"
    almost = "Intro line\n" + "I am a helpful assistant.\n" * 4 + "end"
    responses, translations = world([1, 2, 3])
    responses["fr"][1]["response"] = loop  # rejected side
    translations[("en", "fr")][2] = translation(2, "en", "fr", text=loop)  # chosen side
    responses["fr"][3]["response"] = almost
    r = run(responses, translations)
    assert by(r.dropped, lang="fr", id=1)[0]["reason"] == "degenerate_repetition"
    assert by(r.dropped, lang="fr", id=2)[0]["reason"] == "degenerate_repetition"
    assert by(r.kept, lang="fr", id=3)
    r = run(responses, translations, c=cfg(max_line_repeats=4))
    assert by(r.dropped, lang="fr", id=3)[0]["reason"] == "degenerate_repetition"


def test_repeated_line_spares_structured_answers():
    # Well-formed answers repeat code lines, fences and labels; none of that is a loop.
    code = "```bash\nend\nreturn 1;\n}\n```\n" * 6
    assert repeated_line(code, 5) is None
    song = "".join(f"**Chorus:**\nWe sing line number {i} of the song\n" for i in range(6))
    assert repeated_line(song, 5) is None
    pros = "".join(f"- **Name**\nOption {i}\nPros:\nIt is cheap and fast {i}\n" for i in range(6))
    assert repeated_line(pros, 5) is None
    assert repeated_line("a\n\n\n\n\n\n\nb", 5) is None  # blank lines are not a loop


def test_repeated_line_catches_loops():
    # a content line anywhere, stripped
    assert repeated_line("  I am a helpful assistant.  \nok\n" + "I am a helpful assistant.\nok\n" * 4, 5) == (
        "I am a helpful assistant.", 5)
    # a short line or label only when repeated back to back
    assert repeated_line("Intro\n" + "Yes\n" * 5, 5) == ("Yes", 5)
    assert repeated_line("Yes\nno\n" * 5, 5) is None
    assert repeated_line("**Answer:**\n" * 6, 5) == ("**Answer:**", 6)


def test_identical_chosen_and_rejected():
    responses, translations = world([1])
    responses["es"][1]["response"] = "La misma respuesta,\n  exactamente."
    translations[("en", "es")][1] = translation(1, "en", "es", text="La misma  respuesta, exactamente.\n")
    r = run(responses, translations)
    assert by(r.dropped, lang="es")[0]["reason"] == "identical"
    assert by(run(responses, translations, c=cfg(drop_identical=False)).kept, lang="es")


# --- language check of the chosen side (R5), real py3langid --------------------------------

TEXT = {
    "en": "To keep a houseplant healthy, water it when the top of the soil feels dry and give it indirect light.",
    "es": "Para mantener sana una planta de interior, riégala cuando la tierra esté seca y dale luz indirecta.",
    "de": "Damit eine Zimmerpflanze gesund bleibt, gieße sie, wenn die Erde oben trocken ist, und stelle sie hell.",
    "fr": "Pour garder une plante d'intérieur en bonne santé, arrosez-la quand la terre est sèche "
    "et donnez-lui de la lumière.",
}
NATIVE = {
    "es": "Riega la planta cada semana y ponla cerca de una ventana para que reciba bastante sol.",
    "de": "Gieße die Pflanze jede Woche und stelle sie an ein Fenster, damit sie genug Sonne bekommt.",
    "fr": "Arrosez la plante chaque semaine et placez-la près d'une fenêtre pour qu'elle ait assez de soleil.",
}


def real_world():
    responses = {D: {1: response(1, D, TEXT["en"])}}
    translations = {}
    for lang in OTHERS:
        responses[lang] = {1: response(1, lang, NATIVE[lang])}
        translations[(D, lang)] = {1: translation(1, D, lang, TEXT[lang])}
        translations[(lang, D)] = {1: translation(1, lang, D, f"Water the plant every week ({lang}), near a window.")}
    return responses, translations


def test_language_check_keeps_correct_languages():
    r = build_pairs(*real_world(), D, OTHERS, cfg(), seed=0)
    assert r.counts["kept"] == {"en": 1, "es": 1, "de": 1, "fr": 1}
    assert not r.dropped


def test_language_check_drops_wrong_language_chosen():
    responses, translations = real_world()
    translations[(D, "es")][1]["translation"] = TEXT["en"]  # "translation" left in English
    translations[(D, "fr")][1]["translation"] = TEXT["de"]  # into the wrong language
    r = build_pairs(responses, translations, D, OTHERS, cfg(), seed=0)
    for lang, found in (("es", "en"), ("fr", "de")):
        (d,) = by(r.dropped, lang=lang)
        assert d["reason"] == "wrong_language" and f"identified as {found}" in d["detail"]
    assert by(r.kept, lang="de") and by(r.kept, lang="en")
    # the dominant chosen answer is checked too
    responses, translations = real_world()
    responses[D][1]["response"] = TEXT["es"]
    r = build_pairs(responses, translations, D, OTHERS, cfg(), seed=0)
    assert [d["reason"] for d in by(r.dropped, lang="en")] == ["wrong_language"]
    # switched off
    r = build_pairs(responses, translations, D, OTHERS, cfg(check_language=False), seed=0)
    assert by(r.kept, lang="en")


def test_language_check_skips_short_texts():
    responses, translations = real_world()
    translations[(D, "de")][1]["translation"] = "OK, 42."  # too short to tell
    r = build_pairs(responses, translations, D, OTHERS, cfg(min_langid_chars=20), seed=0)
    assert by(r.kept, lang="de")
    translations[(D, "de")][1]["translation"] = "Yes, of course."
    r = build_pairs(responses, translations, D, OTHERS, cfg(min_langid_chars=5), seed=0)
    assert by(r.dropped, lang="de")[0]["reason"] == "wrong_language"


def test_language_of_override_is_used():
    calls = []

    def language_of(text, lang):
        calls.append(lang)
        return lang != "de"

    r = run(*world([1]), language_of=language_of)
    assert by(r.dropped, lang="de")[0]["reason"] == "wrong_language"
    assert set(calls) == set(ALL)
    assert calls.count("en") == 1  # y^d is checked once per prompt


# --- order, determinism, counts ------------------------------------------------------------


def test_output_order_and_determinism():
    ids = ["p-10", "p-2", "p-1"]
    responses, translations = world(ids)
    r1 = run(responses, translations, c=cfg(dominant_rejected="per_language"))
    # same content given in another dict order
    shuffled = {lang: dict(reversed(list(v.items()))) for lang, v in reversed(list(responses.items()))}
    r2 = run(shuffled, translations, c=cfg(dominant_rejected="per_language"))
    assert r1.kept == r2.kept
    keys = [(p["lang"], p["id"], p.get("via")) for p in r1.kept]
    assert keys[:4] == [("en", "p-1", "es"), ("en", "p-1", "de"), ("en", "p-1", "fr"), ("en", "p-2", "es")]
    assert [k[0] for k in keys] == sorted((k[0] for k in keys), key=ALL.index)
    assert [p["id"] for p in by(r1.kept, lang="es")] == ["p-1", "p-2", "p-10"]
    assert sorted([10, "b", 2, "a-10", "a-9"], key=id_sort_key) == [2, 10, "a-9", "a-10", "b"]


def test_counts_and_dropped_record_shape():
    responses, translations = world([1, 2, 3])
    translations[("en", "es")][1] = translation(1, "en", "es", ok=False)
    responses["de"][2]["response"] = ""
    r = run(responses, translations, c=cfg(dominant_rejected="per_language"))
    assert r.counts == {
        "kept": {"en": 8, "es": 2, "de": 2, "fr": 3},
        "dropped": {"en": {"empty": 1}, "es": {"translation_failed": 1}, "de": {"empty": 1}, "fr": {}},
    }
    json.dumps(r.counts)
    for d in r.dropped:
        assert d["reason"] in REASONS and isinstance(d["detail"], str)
        assert {"id", "lang", "prompt", "chosen", "rejected", "kind"} <= set(d)
    for p in r.kept:
        assert set(p) == {"id", "lang", "prompt", "chosen", "rejected", "kind"} | ({"via"} if p["lang"] == D else set())


def test_bad_arguments():
    responses, translations = world([1])
    with pytest.raises(ValueError):
        build_pairs(responses, translations, "en", ["en", "es"], cfg(), 0)
    with pytest.raises(ValueError):
        build_pairs(responses, translations, "en", [], cfg(), 0)


# --- the translation-task detector ---------------------------------------------------------

POSITIVE = [
    "Translate this sentence into French: The cat is on the table.",
    "Please translate the following paragraph to German.",
    "Can you translate 'good morning' into Japanese?",
    "Given a sentence in Spanish, translate it into English.\nHola amigo.",
    'Translate the sentence: "Je suis très content."',
    "Here is a short story.\nOnce upon a time there was a king.\nTranslate it into Italian.",
    "Traduce al inglés la siguiente frase: «Me gusta el café».",
    "¿Puedes traducir este texto al alemán?",
    "Übersetze ins Deutsche: I like trains.",
    "Bitte übersetzen Sie den folgenden Text ins Englische.",
    '"es regnet nicht" ins Spanische übersetzen',
    "Traduisez en anglais : « Il pleut ».",
    "Traduci in inglese questa frase.",
    "Traduza para o inglês: Eu gosto de café.",
    "Переведите на английский: Я люблю кофе.",
    "Переведи этот текст на немецкий язык.",
    "把这句话翻译成英文：我喜欢喝咖啡。",
    "请翻译下面的句子：我很高兴。",
    "次の文を英語に翻訳してください。",
    "この文章を翻訳して：「こんにちは」",
    "다음 문장을 영어로 번역하세요.",
    "ترجم الجملة التالية إلى الإنجليزية.",
    "يرجى ترجمة هذا النص إلى الفرنسية.",
    "แปลประโยคนี้เป็นภาษาอังกฤษ",
]
NEGATIVE = [
    "How do I become a translator?",
    "What does 'translate' mean in biology?",
    'What does "translate" mean in French?',
    "Why is poetry hard to translate into English?",
    "Explain how machine translation works.",
    "Given a sentence, translate it into a mathematical equation.\nThe sum of two numbers is five.",
    "Translate this Python code into JavaScript.",
    "Translate this logic formula into natural language.",
    "Translate 5 miles to kilometers.",
    "Describe the role of translation in protein synthesis.",
    "Write a poem in Spanish about the sea.",
    "Summarize this article.\n\nThe model reached 28.4 BLEU on the WMT 2014 English-to-German translation task.",
    "¿Cómo me convierto en traductor?",
    "Wie werde ich Übersetzer?",
    "Comment devenir traducteur ?",
    "Переведите 5 миль в километры.",
    "Переведите предложение из активного залога в пассивный.",
    "如何成为一名翻译？",
    "英语翻译是一个好职业吗？",
    "翻訳者になるにはどうすればいいですか？",
    "번역가가 되려면 어떻게 해야 하나요?",
    "كيف أصبح مترجما؟",
    "ฉันจะเป็นนักแปลได้อย่างไร",
    "แปลงอุณหภูมินี้เป็นเซลเซียส",
]


@pytest.mark.parametrize("text", POSITIVE)
def test_detector_positive(text):
    assert is_translation_task(text), text


@pytest.mark.parametrize("text", NEGATIVE)
def test_detector_negative(text):
    assert not is_translation_task(text), explain(text)


DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "alpagasus"
PAPER_LANGS = ["en", "es", "de", "fr", "it", "ru", "zh", "ja", "ko", "ar", "th"]


def _paper_data():
    if not (DATA / "translation_instruction_ids.jsonl").is_file():
        pytest.skip("../shared/datasets/alpagasus not available")
    marked = [json.loads(line) for line in (DATA / "translation_instruction_ids.jsonl").open(encoding="utf-8")]
    prompts = {}
    for lang in PAPER_LANGS:
        prompts[lang] = {}
        for part in ("id_0_1000", "id_1000_2000"):
            path = DATA / part / f"{lang}.jsonl"
            for line in path.open(encoding="utf-8"):
                row = json.loads(line)
                prompts[lang][row["id"]] = row["instruction"]
    return marked, prompts


def test_detector_on_paper_data():
    """Precision/recall per language against the paper's translation-task id list."""
    marked, prompts = _paper_data()
    ids = {m["id"] for m in marked}
    report = {lang: evaluate(prompts[lang].items(), ids) for lang in PAPER_LANGS}
    print("\n" + "\n".join(f"{lang}: P={r['precision']:.3f} R={r['recall']:.3f} (tp {r['tp']}, fp {r['fp']}, "
                           f"fn {r['fn']}) misses={r['misses']}" for lang, r in report.items()))
    for lang, r in report.items():
        assert r["tp"] >= 15  # 17 marked ids fall in these 2000
        assert r["precision"] >= 0.9, (lang, r["false_alarms"])
    for lang in ("en", "de", "fr"):
        assert report[lang]["recall"] >= 0.9
    # es: 16/17; the Spanish row of alpagasus-1720 lost its instruction in translation
    # ("Tengo mucha ilusión de aprender español."), so it is no translation task.
    assert report["es"]["recall"] >= 0.9
    # the English instructions of all 88 listed ids (most outside these two files)
    assert evaluate(((m["id"], m["instruction"]) for m in marked), ids)["recall"] >= 0.95
    # voting across the parallel prompts recovers the lossy row
    voted = detect_translation_task_ids(prompts)
    present = ids & set(prompts["en"])
    assert voted == present
