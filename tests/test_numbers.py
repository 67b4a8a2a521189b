"""Answer-number extraction (lidr.eval.numbers) on answers written as models write them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lidr.eval.numbers import extract_answer, numbers_equal, parse_gold

MGSM = Path("/work/shared/datasets/mgsm")
LANGS = ["bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"]

# (lang, model answer, expected number): reasoning first, then a final answer phrase.
CASES = [
    # en
    ("en", "Janet's ducks lay 16 eggs. She uses 3 + 4 = 7, so 16 - 7 = 9 remain. "
           "She sells them at $2 each: 9 * 2 = $18. The answer is 18.", 18),
    ("en", "He bought the house for $80,000 and spent $50,000 on repairs, so $130,000 in total. "
           "The value rose to $200,000. Profit: 200,000 - 130,000 = 70,000.\nThe answer is $70,000.", 70000),
    ("en", "Each ticket costs $3.50 and she buys 4, so 4 x 3.50 = 14.\n\n**Final answer: $14.00**", 14),
    ("en", "Step 1: 20 - 5 = 15 degrees.\nStep 2: it drops 20 more.\n15 - 20 = -5\n\nThe answer is -5.", -5),
    ("en", "She ate 1/4 of the pie and then another 1/4, which leaves 1/2.\nThe answer is 1/2.", 0.5),
    ("en", "The train covers 60 miles per hour for 3 hours.\nSo the distance is **180 miles**.", 180),
    ("en", "#### Step 1\nThere are 12 boxes with 6 each.\n#### Step 2\n12 * 6 = 72\n\n#### 72", 72),
    ("en", "We have 9 eggs at $2 each, so 9 \\times 2 = 18.\n\nThe final answer is $\\boxed{18}$.", 18),
    ("en", "In 2023 she earned 40% more: 50 * 1.4 = 70. Therefore, Janet earns 70 dollars.", 70),
    # es
    ("es", "Los patos ponen 16 huevos. Come 3 y usa 4, quedan 9. Los vende a 2 $ cada uno: 9 × 2 = 18 $. "
           "La respuesta es 18.", 18),
    ("es", "Compró la casa por 80.000 $ y gastó 50.000 $ en reparaciones. El valor subió un 150 %, "
           "a 200.000 $. Ganancia: 200.000 − 130.000 = 70.000.\nLa respuesta es 70.000 $.", 70000),
    ("es", "Cada kilo cuesta 2,5 € y compra 3 kilos: 3 × 2,5 = 7,5.\nRespuesta: 7,5 €", 7.5),
    ("es", "Gana 1.250 € al mes durante 2 meses.\n**Respuesta final:** 2.500 €", 2500),
    # de
    ("de", "Janets Enten legen 16 Eier. Sie isst 3 und backt mit 4, also bleiben 9. "
           "9 × 2 $ = 18 $.\nDie Antwort lautet 18.", 18),
    ("de", "Das Haus kostet 80.000 € plus 50.000 € Reparaturen = 130.000 €. Neuer Wert: 200.000 €.\n"
           "Gewinn: 200.000 € − 130.000 € = 70.000 €.\nDie Antwort ist 70.000 €.", 70000),
    ("de", "Ein Liter kostet 1,5 €, er kauft 3 Liter: 3 · 1,5 = 4,5.\nAntwort: 4,50 €", 4.5),
    ("de", "Sie verdient 1.234,5 € pro Woche und 2 Wochen lang: 2.469 €.\nDie Antwort lautet 2.469,00 €.", 2469),
    ("de", "Die Temperatur sinkt von 3 °C um 8 Grad.\n3 − 8 = −5\n\n**−5 °C**", -5),
    # fr
    ("fr", "Les canes pondent 16 œufs. Elle en mange 3 et en utilise 4 : il en reste 9. "
           "9 × 2 $ = 18 $.\nLa réponse est 18.", 18),
    ("fr", "La maison coûte 80 000 € et les travaux 50 000 €, soit 130 000 €. Elle vaut 200 000 €.\n"
           "Bénéfice : 200 000 − 130 000 = 70 000.\nRéponse : 70\u202f000 €", 70000),
    ("fr", "Il parcourt 2,5 km par jour pendant 3 jours : 3 × 2,5 = 7,5.\nLa réponse finale est 7,5 km.", 7.5),
    ("fr", "Le prix est de 1\u00a0250 € par mois, pendant 12 mois.\nLa réponse est 15\u00a0000 €.", 15000),
    # ru
    ("ru", "Утки несут 16 яиц. Она съедает 3 и использует 4, остаётся 9. 9 × 2 = 18 долларов.\nОтвет: 18", 18),
    ("ru", "Дом стоил 80 000 руб., ремонт — 50 000 руб. Новая стоимость 200 000 руб.\n"
           "Прибыль: 200 000 − 130 000 = 70 000.\nОтвет — 70 000 рублей.", 70000),
    ("ru", "Кусок весит 0,5 кг, всего 7 кусков: 7 × 0,5 = 3,5.\n**Ответ:** 3,5 кг.", 3.5),
    ("ru", "Он зарабатывает 1.200 рублей в день, 5 дней.\nОтвет равен 6.000 руб.", 6000),
    # zh
    ("zh", "珍妮特的鸭子每天下16个蛋。她吃掉3个，用掉4个，剩下16-3-4=9个。每个2美元，9×2=18美元。\n答案是18。", 18),
    ("zh", "房子80,000美元，维修50,000美元，共130,000美元。现在价值200,000美元。\n"
           "利润为200,000-130,000=70,000美元。\n答案：70,000", 70000),
    ("zh", "每本书 12 元，买了 5 本，共 60 元，找零 100-60=40 元。\n最终答案是 $\\boxed{40}$。", 40),
    ("zh", "一共有１２个苹果，分给３个人，每人４个。\n答案是４。", 4),
    # ja
    ("ja", "アヒルは1日に16個の卵を産みます。3個食べて4個使うので、16-3-4=9個残ります。"
           "9×2=18ドル。\n答えは18ドルです。", 18),
    ("ja", "家は80,000ドル、修理に50,000ドル。価値は200,000ドルになりました。\n"
           "利益は200,000-130,000=70,000ドル。\n答え：70,000ドル", 70000),
    ("ja", "1個150円のりんごを4個買うので、150×4=600円です。\n答えは600円です。", 600),
    ("ja", "彼は毎月1.5万円を貯金し、12か月で18万円になります。\n答えは18万円です。", 180000),
    ("ja", "3人に6個ずつ配るので、合計は十八個です。\n答えは十八個です。", 18),
    # th
    ("th", "เป็ดออกไข่วันละ 16 ฟอง กิน 3 ใช้ 4 เหลือ 9 ฟอง ขายฟองละ 2 ดอลลาร์ 9 × 2 = 18\nคำตอบคือ 18", 18),
    ("th", "มีไข่ ๑๖ ฟอง กิน ๓ ฟอง ใช้ ๔ ฟอง เหลือ ๙ ฟอง ขายได้ ๙ × ๒ = ๑๘ ดอลลาร์\nคำตอบคือ ๑๘ ดอลลาร์", 18),
    ("th", "บ้านราคา 80,000 ดอลลาร์ ซ่อม 50,000 ดอลลาร์ มูลค่าใหม่ 200,000\nดังนั้นคำตอบคือ 70,000 ดอลลาร์", 70000),
    ("th", "ราคาชิ้นละ ฿25 ซื้อ 4 ชิ้น 25 × 4 = 100\nคำตอบ: ฿100", 100),
    # sw
    ("sw", "Bata hutaga mayai 16. Anakula 3 na kutumia 4, yanabaki 9. 9 × $2 = $18.\nJibu ni 18.", 18),
    ("sw", "Nyumba iligharimu $80,000 na matengenezo $50,000. Thamani mpya ni $200,000.\n"
           "Faida = 200,000 - 130,000 = 70,000.\nJibu ni $70,000.", 70000),
    ("sw", "Kila kitabu ni shilingi 1,500 na ananunua 3: 3 × 1,500 = 4,500.\nJibu: shilingi 4,500", 4500),
    # bn
    ("bn", "হাঁসগুলো প্রতিদিন ১৬টি ডিম দেয়। সে ৩টি খায় এবং ৪টি ব্যবহার করে, বাকি ৯টি। ৯ × ২ = ১৮ ডলার।\n"
           "উত্তর হল ১৮।", 18),
    ("bn", "বাড়ির দাম ৮০,০০০ ডলার, মেরামত ৫০,০০০ ডলার। নতুন মূল্য ২,০০,০০০ ডলার।\n"
           "লাভ = ২,০০,০০০ - ১,৩০,০০০ = ৭০,০০০\nউত্তরঃ ৭০,০০০ ডলার", 70000),
    ("bn", "প্রতিটি কলমের দাম ₹15, সে 6টি কেনে: 15 × 6 = 90।\nউত্তর হলো ₹90।", 90),
    ("bn", "মোট দূরত্ব 1,00,000 মিটার।\nউত্তরটি হল 1,00,000।", 100000),
    # te
    ("te", "బాతులు రోజుకు 16 గుడ్లు పెడతాయి. 3 తింటుంది, 4 వాడుతుంది, 9 మిగులుతాయి. 9 × 2 = 18 డాలర్లు.\n"
           "సమాధానం: 18", 18),
    ("te", "గుడ్లు ౧౬, తిన్నవి ౩, వాడినవి ౪, మిగిలినవి ౯. ౯ × ౨ = ౧౮.\nసమాధానం ౧౮ డాలర్లు.", 18),
    ("te", "ఇల్లు $80,000, మరమ్మతులు $50,000, కొత్త విలువ $200,000.\nలాభం 200,000 - 130,000.\n"
           "సమాధానం: $70,000", 70000),
    ("te", "ఒక్కో పెన్ ₹12, 5 పెన్నులు: 12 × 5 = 60.\nకాబట్టి జవాబు 60 రూపాయలు.", 60),
]


@pytest.mark.parametrize("lang,text,expected", CASES)
def test_model_answers(lang, text, expected):
    got = extract_answer(text, lang)
    assert numbers_equal(got, expected), f"{got!r} != {expected}"
    assert numbers_equal(extract_answer(text), expected)  # language unknown: generic rules


def test_every_mgsm_language_has_three_cases():
    assert all(sum(c[0] == lang for c in CASES) >= 3 for lang in LANGS)


@pytest.mark.parametrize("text,lang,expected", [
    ("1,250", "en", 1250), ("3.5", "en", 3.5), ("1.250", "de", 1250), ("3,5", "de", 3.5),
    ("1.250", "en", 1.25), ("0,125", "fr", 0.125), ("1,234,567.89", "en", 1234567.89),
    ("1.234.567,89", "es", 1234567.89), ("1 200", "fr", 1200), ("1'200", None, 1200),
    ("$18", None, 18), ("18$", None, 18), ("€18", None, 18), ("18 €", None, 18), ("18€", None, 18),
    ("¥18", None, 18), ("₹18", None, 18), ("R$18", None, 18), ("18 dollars", None, 18), ("25%", None, 25),
    ("-$5", None, -5), ("x = −7", None, -7), ("pages 3-5", None, 5), ("20 - 5", None, 5),
    ("It is 18.", None, 18), ("答案是18。", "zh", 18), ("So it is 18!", None, 18),
    ("Devanagari १२३४", None, 1234), ("Arabic-Indic ٤٢", None, 42), ("Full width ２０２", None, 202),
    ("On 12.05.2023 the price was 7.", None, 7), ("At 3:30 she had 12.", None, 12),
    ("\\boxed{1{,}200}", None, 1200), ("\\boxed{\\dfrac{3}{4}}", None, 0.75),
    ("#### 1,200", None, 1200), ("答えは二十五個", "ja", 25), ("答案是一百零五", "zh", 105),
    ("Answer: 5. Then 6 more steps were taken.", "en", 5),
])
def test_number_forms(text, lang, expected):
    assert numbers_equal(extract_answer(text, lang), expected)


def test_last_answer_phrase_wins_over_later_numbers():
    text = "The answer is 12? No: 16 - 4 = 12 is wrong. The answer is 14. (Checked over 3 days.)"
    assert extract_answer(text, "en") == 14


@pytest.mark.parametrize("text", [
    "", "I don't know.", "The answer is unknown.", "La respuesta es: no se puede saber.",
    "答案是：无法确定。", "Ответ: недостаточно данных.", "**Step one**", "\\boxed{x}",
])
def test_no_number_is_none(text):
    assert extract_answer(text) is None
    assert not numbers_equal(extract_answer(text), 0)


def test_numbers_equal_and_parse_gold():
    assert numbers_equal(18.0000001, 18) and not numbers_equal(18.01, 18)
    assert numbers_equal(0.0, 0) and not numbers_equal(None, 0)
    assert parse_gold("18") == 18 and parse_gold("2,125") == 2125 and parse_gold(" 114,200 ") == 114200
    with pytest.raises(ValueError):
        parse_gold("n/a")


# One final sentence per language, as a model would end its answer.
FINAL = {
    "en": "First 16 - 3 - 4 = 9, then 9 * 2 = 18.\nThe answer is {}.",
    "es": "Primero 16 - 3 - 4 = 9, luego 9 × 2 = 18.\nLa respuesta es {}.",
    "de": "Zuerst 16 - 3 - 4 = 9, dann 9 × 2 = 18.\nDie Antwort lautet {}.",
    "fr": "D'abord 16 - 3 - 4 = 9, puis 9 × 2 = 18.\nLa réponse est {}.",
    "ru": "Сначала 16 - 3 - 4 = 9, затем 9 × 2 = 18.\nОтвет: {}.",
    "zh": "首先 16 - 3 - 4 = 9，然后 9 × 2 = 18。\n答案是{}。",
    "ja": "まず 16 - 3 - 4 = 9、次に 9 × 2 = 18。\n答えは{}です。",
    "th": "ก่อนอื่น 16 - 3 - 4 = 9 แล้ว 9 × 2 = 18\nคำตอบคือ {}",
    "sw": "Kwanza 16 - 3 - 4 = 9, kisha 9 × 2 = 18.\nJibu ni {}.",
    "bn": "প্রথমে 16 - 3 - 4 = 9, তারপর 9 × 2 = 18।\nউত্তর হল {}।",
    "te": "మొదట 16 - 3 - 4 = 9, తర్వాత 9 × 2 = 18.\nసమాధానం: {}.",
}
NATIVE_ZERO = {"bn": "০", "th": "๐", "te": "౦"}


def _golds(lang):
    path = MGSM / f"{lang}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} absent")
    return [json.loads(line)["response"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("lang", LANGS)
def test_mgsm_golds_round_trip(lang):
    golds = _golds(lang)
    assert len(golds) == 250
    for gold in golds:
        value = parse_gold(gold)
        assert value == int(value) >= 0
        for text in (FINAL[lang].format(gold), FINAL[lang].format(f"**{gold}**")):
            assert numbers_equal(extract_answer(text, lang), value), (lang, gold)
            assert numbers_equal(extract_answer(text), value), (lang, gold)
        if lang in NATIVE_ZERO:  # the same gold in the language's own digits
            native = "".join(chr(ord(NATIVE_ZERO[lang]) + int(c)) if c.isdigit() else c for c in gold)
            assert numbers_equal(extract_answer(FINAL[lang].format(native), lang), value), (lang, native)
