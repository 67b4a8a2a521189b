"""Prompt formats and the translation parser (method.md §2.1-2.2)."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models

from lidr.templates import OUT_CLOSE, OUT_OPEN, SRC_OPEN, choose_format, parse_translation

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _tok(chat: bool):
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hola mundo.</translation>", ("Hola mundo.", True)),
        ("  Hola\nmundo. </translation> trailing chatter", ("Hola\nmundo.", True)),
        (f"{OUT_OPEN}Hola</translation>", ("Hola", True)),  # repeated opening delimiter
        ("Hola mundo, y luego sigue sin cerrar", (None, False)),  # no closing delimiter: failed
        ("   </translation>", (None, False)),  # empty: failed
        # the model went on with the request's pattern before closing: failed
        ("Tokio.</source>\nEnglish: <translation>I am in Tokyo.</translation>", (None, False)),
        ("Tokio.\nGerman: <source>Hallo</translation>", (None, False)),
        ("", (None, False)),
    ],
)
def test_parse_translation(raw, expected):
    assert parse_translation(raw) == expected


def test_completion_format_uses_the_prompt_language():
    fmt = choose_format(_tok(chat=False), "auto")
    assert fmt.kind == "completion"
    p = fmt.response_prompt("¿Qué es el sol?", "es")
    assert p.startswith("<s>") and p.endswith("Pregunta: ¿Qué es el sol?\nRespuesta:")
    assert "\nPregunta:" in fmt.response_stops("es")
    assert fmt.clean_response(" El sol es una estrella.\nPregunta: otra", "es") == "El sol es una estrella."
    assert fmt.response_text("El sol.") == " El sol.</s>"  # ends with EOS so training teaches stopping
    # No few-shot examples for Thai: English labels and an explicit request.
    assert "(Answer in Thai.)" in fmt.response_prompt("สวัสดี", "th")


def test_translation_prompt_prefills_the_opening_delimiter():
    for chat in (False, True):
        fmt = choose_format(_tok(chat=chat), "auto")
        p = fmt.translation_prompt("The cat sleeps.", "en", "fr")
        assert p.endswith(OUT_OPEN) and SRC_OPEN + ("\n" if chat else "") + "The cat sleeps." in p
        assert "French" in p and fmt.translation_stops[0] == OUT_CLOSE


def test_chat_format_and_end_of_turn():
    fmt = choose_format(_tok(chat=True), "auto", system_prompt="You are a helpful assistant.")
    assert fmt.kind == "chat"
    p = fmt.response_prompt("Hi there", "en")
    assert p == "<s><|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
    assert fmt.response_text("Hello!") == "Hello!<|end|>\n"
    with pytest.raises(ValueError, match="no chat template"):
        choose_format(_tok(chat=False), "chat")
    assert choose_format(_tok(chat=True), "completion").kind == "completion"
