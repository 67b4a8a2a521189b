"""Language codes (ISO 639-1) -> English names, and the per-language words the prompt
templates need (the "Question:/Answer:" labels of the few-shot completion format)."""

from __future__ import annotations

# Languages the project knows: the paper's training and evaluation languages and the
# data sets' languages. Anything identifiable by the language identifier can be added.
LANGUAGES: dict[str, str] = {
    "ar": "Arabic",
    "bn": "Bengali",
    "de": "German",
    "en": "English",
    "es": "Spanish",
    "fr": "French",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "pt": "Portuguese",
    "ru": "Russian",
    "sw": "Swahili",
    "te": "Telugu",
    "th": "Thai",
    "zh": "Chinese",
}

# Labels of the few-shot completion format, in the language itself, so a base model
# keeps writing in that language. Languages without an entry use the English labels.
QA_LABELS: dict[str, tuple[str, str]] = {
    "en": ("Question", "Answer"),
    "es": ("Pregunta", "Respuesta"),
    "de": ("Frage", "Antwort"),
    "fr": ("Question", "Réponse"),
    "it": ("Domanda", "Risposta"),
    "pt": ("Pergunta", "Resposta"),
    "ru": ("Вопрос", "Ответ"),
}

# Two short solved examples per language for the few-shot completion format (written for
# this project). A language without examples gets the English ones plus an explicit
# "answer in <language>" line in the question.
FEW_SHOT: dict[str, list[tuple[str, str]]] = {
    "en": [
        ("Name three primary colors.", "The three primary colors are red, blue and yellow."),
        (
            "Give me one tip for drinking more water.",
            "Keep a filled water bottle on your desk so you can take a sip whenever you see it.",
        ),
    ],
    "es": [
        ("Nombra tres colores primarios.", "Los tres colores primarios son el rojo, el azul y el amarillo."),
        (
            "Dame un consejo para beber más agua.",
            "Ten una botella de agua llena en tu escritorio para beber un sorbo cada vez que la veas.",
        ),
    ],
    "de": [
        ("Nenne drei Grundfarben.", "Die drei Grundfarben sind Rot, Blau und Gelb."),
        (
            "Gib mir einen Tipp, wie ich mehr Wasser trinken kann.",
            "Stell dir eine volle Wasserflasche auf den Schreibtisch, damit du jedes Mal einen Schluck nimmst, wenn du sie siehst.",
        ),
    ],
    "fr": [
        ("Cite trois couleurs primaires.", "Les trois couleurs primaires sont le rouge, le bleu et le jaune."),
        (
            "Donne-moi un conseil pour boire plus d'eau.",
            "Garde une bouteille d'eau pleine sur ton bureau pour en boire une gorgée chaque fois que tu la vois.",
        ),
    ],
    "it": [
        ("Nomina tre colori primari.", "I tre colori primari sono il rosso, il blu e il giallo."),
        (
            "Dammi un consiglio per bere più acqua.",
            "Tieni una bottiglia d'acqua piena sulla scrivania, così ne bevi un sorso ogni volta che la vedi.",
        ),
    ],
    "ru": [
        ("Назови три основных цвета.", "Три основных цвета — красный, синий и жёлтый."),
        (
            "Дай мне один совет, как пить больше воды.",
            "Держи полную бутылку воды на столе, чтобы делать глоток каждый раз, когда её видишь.",
        ),
    ],
}

# One short parallel sentence pair per language, for the few-shot translation format.
TRANSLATION_EXAMPLE: dict[str, str] = {
    "en": "The weather is nice today, so we are going for a walk in the park.",
    "es": "Hoy hace buen tiempo, así que vamos a dar un paseo por el parque.",
    "de": "Heute ist schönes Wetter, also gehen wir im Park spazieren.",
    "fr": "Il fait beau aujourd'hui, alors nous allons nous promener dans le parc.",
    "it": "Oggi il tempo è bello, quindi andiamo a fare una passeggiata nel parco.",
    "pt": "O tempo está bom hoje, então vamos passear no parque.",
    "ru": "Сегодня хорошая погода, поэтому мы идём гулять в парк.",
}


class UnknownLanguage(ValueError):
    pass


def check_language(code: str) -> str:
    """Normalise a code and reject unknown ones, listing the known codes."""
    norm = str(code).strip().lower()
    if norm not in LANGUAGES:
        known = ", ".join(sorted(LANGUAGES))
        raise UnknownLanguage(f"unknown language code {code!r}; known codes: {known}")
    return norm


def name(code: str) -> str:
    return LANGUAGES[code]
