"""Language identification (lidr.langid) with the real py3langid model."""

import pytest

from lidr import langid
from lidr.langid import clean_text, detect, is_language, language_verdict

RUN = ["en", "es", "de", "fr"]

SENTENCES = {
    "en": "The museum opens at nine in the morning, and tickets are cheaper if you buy them online.",
    "es": "El museo abre a las nueve de la mañana y las entradas son más baratas si las compras por internet.",
    "de": "Das Museum öffnet um neun Uhr morgens, und die Eintrittskarten sind online günstiger.",
    "fr": "Le musée ouvre à neuf heures du matin, et les billets sont moins chers si vous les achetez en ligne.",
    "it": "Il museo apre alle nove del mattino e i biglietti costano meno se li compri su internet.",
    "pt": "O museu abre às nove da manhã e os ingressos são mais baratos se você os comprar pela internet.",
    "ru": "Музей открывается в девять утра, а билеты дешевле, если покупать их через интернет.",
    "zh": "博物馆早上九点开门，如果在网上购买门票会更便宜。",
    "ja": "博物館は朝九時に開館し、チケットはオンラインで買うと安くなります。",
    "ko": "박물관은 오전 아홉 시에 문을 열고, 입장권은 온라인으로 사면 더 저렴합니다.",
    "ar": "يفتح المتحف في التاسعة صباحا، والتذاكر أرخص إذا اشتريتها عبر الإنترنت.",
    "th": "พิพิธภัณฑ์เปิดตอนเก้าโมงเช้า และตั๋วจะถูกกว่าถ้าคุณซื้อทางออนไลน์",
}


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_detect_real_sentences(lang):
    code, prob = detect(SENTENCES[lang])
    assert code == lang
    assert 0.0 < prob <= 1.0


@pytest.mark.parametrize("lang", RUN)
def test_detect_restricted_to_candidates(lang):
    code, prob = detect(SENTENCES[lang], candidates=RUN)
    assert code == lang
    assert prob > 0.9  # renormalised over four candidates: a clear decision


def test_restricted_choice_stays_in_candidates():
    # Italian restricted to en/es/de/fr must come out as one of them.
    code, _ = detect(SENTENCES["it"], candidates=RUN)
    assert code in RUN
    # unknown candidate codes are ignored; none known is an error
    assert detect(SENTENCES["es"], candidates=["es", "xx"])[0] == "es"
    with pytest.raises(ValueError):
        detect(SENTENCES["es"], candidates=["xx"])


def test_probability_is_normalised_not_a_log_score():
    code, prob = detect(SENTENCES["en"])
    assert 0.5 < prob <= 1.0


def test_nothing_to_identify():
    assert detect("") == (langid.UNDETERMINED, 0.0)
    assert detect("12345 + 678 = 999 !!!") == (langid.UNDETERMINED, 0.0)
    assert is_language("3.14159 * 2 = 6.28318", "en") is None


def test_clean_text_strips_code_numbers_and_markup():
    text = (
        "Aquí tienes el código:\n```python\nfor item in items:\n    print(item)\n```\n"
        "Visita https://example.com/page?x=1 o escribe a info@example.com. "
        "Usa `len(items)` para contar 42 elementos. <b>Listo</b>"
    )
    cleaned = clean_text(text)
    for gone in ("print", "item in", "https", "example", "len", "42", "<b>", "```"):
        assert gone not in cleaned
    assert "Aquí tienes el código" in cleaned and "Listo" in cleaned
    # Thai vowel marks (combining characters) are kept
    assert clean_text("ภาษาไทย 123!") == "ภาษาไทย"


def test_code_does_not_drag_towards_english():
    text = (
        "```python\ndef greet(name):\n    return 'Hello, ' + name + '! Welcome to the website, enjoy your stay.'\n```\n"
        "Esta función devuelve un saludo con el nombre de la persona."
    )
    assert detect(text, candidates=RUN)[0] == "es"
    assert is_language(text, "es", candidates=RUN) is True


@pytest.mark.parametrize("lang", RUN)
def test_is_language_on_run_languages(lang):
    for other in RUN:
        assert is_language(SENTENCES[other], lang, candidates=RUN) is (other == lang)


def test_is_language_too_short_to_tell():
    assert is_language("Sí, claro.", "es", min_chars=20) is None
    assert is_language("Sí, claro.", "es", min_chars=5, candidates=RUN) is True
    # digits and punctuation do not count towards min_chars
    assert is_language("1, 2, 3, 4, 5, 6, 7, 8, 9, 10 -- ok", "en", min_chars=20) is None


def test_is_language_other_script_is_false():
    # Restricted to en/es/de/fr, Korean text would still get one of the four as "most
    # likely": the script check says no.
    for lang in RUN:
        assert is_language(SENTENCES["ko"], lang, candidates=RUN) is False
        assert is_language(SENTENCES["ru"], lang, candidates=RUN) is False
    assert is_language(SENTENCES["ja"], "ja", candidates=["en", "zh", "ja"]) is True
    assert is_language(SENTENCES["zh"], "ja", candidates=["en", "zh", "ja"]) is False


def test_is_language_unknown_to_model():
    assert is_language(SENTENCES["en"], "xx") is None


def test_close_languages_need_candidates():
    # A short Spanish text: over all languages it may come out as Galician or Catalan;
    # among the run's languages it is Spanish.
    text = "Esto es divertido y muy bonito."
    assert is_language(text, "es", min_chars=10, candidates=RUN) is True


def test_model_loaded_once():
    langid.detect("hello there, how are you doing today?")
    first = langid._full
    langid.detect("bonjour, comment allez-vous aujourd'hui ?")
    assert langid._full is first
    a = langid._identifier(["en", "es"])
    assert langid._identifier(["es", "en"]) is a
    # restricting a copy leaves the full model untouched
    assert len(langid._full.labels) > 50


def test_weak_calls_are_cannot_tell():
    # Lists of names have no language to speak of: another language winning weakly is
    # "cannot tell", not "wrong language".
    names = "1. Spain\n2. Sweden\n3. Switzerland\n4. Singapore\n5. Somalia"
    verdict, why = language_verdict(names, "en", candidates=RUN)
    assert verdict is not False
    assert is_language("Spicy Tuna & Avocado Wrap", "en", min_chars=10, candidates=RUN) is not False
    # a clear English answer to a German prompt is wrong, with the reason spelled out
    verdict, why = language_verdict("Hello! How can I assist you today? May the Force be with you.", "de",
                                    candidates=RUN)
    assert verdict is False and why.startswith("identified as en")


def test_mixed_script_answer_in_its_language():
    # Russian prose around English names: mostly Latin letters, still a Russian answer.
    text = ("Вот плейлист для спокойной работы по выходным:\n1. Daft Punk - Harder, Better, Faster, Stronger\n"
            "2. The Glitch Mob - Drive It Like You Stole It\n3. Tycho - Awake")
    assert is_language(text, "ru", candidates=RUN + ["ru"]) is True
    verdict, why = language_verdict(SENTENCES["en"], "ru", candidates=RUN + ["ru"])
    assert verdict is False and "writing system" in why


def test_model_unpacked_once_into_the_cache_gives_the_same_answers(tmp_path, monkeypatch):
    """The first load unpacks py3langid's LZMA model and keeps the arrays in lidr's cache; later
    loads read them from there (a broken cache file is unpacked again): the same model."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    shipped = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    monkeypatch.setenv("LIDR_CACHE", str(tmp_path))
    texts = [*SENTENCES.values(), "ok", "Der Hund und the cat", "12345 !!"]
    from py3langid import modelio

    unpack = modelio.load_model
    for round_ in ("unpacked", "cached", "broken cache"):
        def load_model(path):
            assert round_ != "cached", "read from the cache, not unpacked again"
            return unpack(path)

        monkeypatch.setattr(modelio, "load_model", load_model)
        if round_ == "broken cache":
            (cached,) = (tmp_path / "langid").glob("py3langid-*")
            (cached / "nextmove.npy").write_bytes((cached / "nextmove.npy").read_bytes()[:1000])
        monkeypatch.setattr(langid, "_full", None)
        monkeypatch.setattr(langid, "_restricted", {})
        model = langid._load()
        assert [p.name for p in (tmp_path / "langid").iterdir() if p.name.startswith(".")] == []
        assert len(list((tmp_path / "langid").glob("py3langid-*"))) == 1
        assert model.nb_classes == shipped.nb_classes and model.tk_nextmove == shipped.tk_nextmove
        assert model.tk_row == shipped.tk_row and model.tk_output == shipped.tk_output
        assert (model.nb_ptc == shipped.nb_ptc).all() and (model.nb_pc == shipped.nb_pc).all()
        assert [model.rank(t)[:3] for t in texts] == [shipped.rank(t)[:3] for t in texts]


def test_combining_marks_kept_in_the_cache_are_those_of_a_full_scan(tmp_path, monkeypatch):
    """The marks found by scanning Unicode are written once and read back in later processes:
    the same character class, and the letter patterns built on it treat accents as letters."""
    import unicodedata

    monkeypatch.setenv("LIDR_CACHE", str(tmp_path))
    scanned = langid._combining_marks()
    cached = tmp_path / "langid" / f"marks-unicode-{unicodedata.unidata_version}.txt"
    assert cached.read_text(encoding="utf-8") == scanned
    monkeypatch.setattr(langid.unicodedata, "category", lambda c: pytest.fail("scanned again"))
    assert langid._combining_marks() == scanned
    import re
    assert re.fullmatch(f"[{scanned}]+", "\u0301\u0e34\u093f") and not re.search(f"[{scanned}]", "abc 123 !?")
