"""Turn (instruction, language) into the text a model is given, and parse translations.

Two formats:
- chat: the tokenizer's own chat template (instruct models);
- completion: a short few-shot "Question:/Answer:" text in the prompt's language, for
  base models such as the embedded Gemma 3 270M, which loop and echo under a chat
  template.

Every prompt string already holds its special tokens (BOS, template tokens), so it is
always tokenized with add_special_tokens=False, in generation and in training alike.
`response_text` gives what follows the prompt in training: the answer plus the marker
that ends a response (EOS for completion, the template's end-of-turn for chat), so the
trained model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lidr import languages as L

# Delimiters of the translation request (method.md §2.2): the source between SRC_*,
# the result between OUT_*. The assistant turn is pre-filled with OUT_OPEN so the model
# starts translating at once; a result without OUT_CLOSE is a failed translation.
SRC_OPEN, SRC_CLOSE = "<source>", "</source>"
OUT_OPEN, OUT_CLOSE = "<translation>", "</translation>"


@dataclass
class PromptFormat:
    kind: Literal["chat", "completion"]
    tokenizer: object
    system_prompt: str | None = None

    # ---- responses ------------------------------------------------------------------
    def response_prompt(self, instruction: str, lang: str) -> str:
        if self.kind == "chat":
            return self._chat([("user", instruction)])
        q, a = L.QA_LABELS.get(lang, L.QA_LABELS["en"])
        shots = L.FEW_SHOT.get(lang)
        if shots is None:  # no examples in this language: English ones + explicit request
            shots = L.FEW_SHOT["en"]
            instruction = f"{instruction}\n(Answer in {L.name(lang)}.)"
        parts = [f"{q}: {sq}\n{a}: {sa}\n\n" for sq, sa in shots]
        return self._bos() + "".join(parts) + f"{q}: {instruction.strip()}\n{a}:"

    def response_stops(self, lang: str) -> list[str]:
        """Strings that end a response besides EOS (the next few-shot question)."""
        if self.kind == "chat":
            return []
        q, _ = L.QA_LABELS.get(lang, L.QA_LABELS["en"])
        return [f"\n{q}:", "\n\n\n"]

    def clean_response(self, raw: str, lang: str) -> str:
        """Generated text -> the answer: cut at a stop string, trim whitespace."""
        for stop in self.response_stops(lang):
            raw = raw.split(stop, 1)[0]
        return raw.strip()

    def response_text(self, answer: str) -> str:
        """What follows the prompt in a training example: answer + end-of-response marker."""
        if self.kind == "chat":
            return answer + self._end_of_turn()
        return " " + answer.strip() + (self.tokenizer.eos_token or "")

    # ---- translations ---------------------------------------------------------------
    def translation_prompt(self, text: str, src: str, tgt: str) -> str:
        s, t = L.name(src), L.name(tgt)
        if self.kind == "chat":
            request = (
                f"Translate the following text from {s} into {t}. The text is between "
                f"{SRC_OPEN} and {SRC_CLOSE}. Write only the {t} translation, between "
                f"{OUT_OPEN} and {OUT_CLOSE}.\n\n{SRC_OPEN}\n{text.strip()}\n{SRC_CLOSE}"
            )
            return self._chat([("user", request)]) + OUT_OPEN
        header = f"Translate the text from {s} into {t}.\n"
        shot = ""
        if src in L.TRANSLATION_EXAMPLE and tgt in L.TRANSLATION_EXAMPLE:
            shot = (
                f"{header}{s}: {SRC_OPEN}{L.TRANSLATION_EXAMPLE[src]}{SRC_CLOSE}\n"
                f"{t}: {OUT_OPEN}{L.TRANSLATION_EXAMPLE[tgt]}{OUT_CLOSE}\n\n"
            )
        return self._bos() + shot + f"{header}{s}: {SRC_OPEN}{text.strip()}{SRC_CLOSE}\n{t}: {OUT_OPEN}"

    # Besides the closing delimiter: a source delimiter means the model has left its
    # translation to continue the request's pattern (a new source text, or a wrong
    # closing tag). That translation has failed; stopping there saves the tokens it would
    # spend running to the limit.
    translation_stops = [OUT_CLOSE, SRC_OPEN, SRC_CLOSE]

    # ---- helpers --------------------------------------------------------------------
    def _bos(self) -> str:
        return self.tokenizer.bos_token or ""

    def _messages(self, turns: list[tuple[str, str]]) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": r, "content": c} for r, c in turns]

    def _chat(self, turns: list[tuple[str, str]]) -> str:
        msgs = self._messages(turns)
        try:
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:
            # Some templates (e.g. Gemma 2) reject a system turn: fold it into the user turn.
            if not self.system_prompt:
                raise
            merged = [{"role": "user", "content": f"{self.system_prompt}\n\n{turns[0][1]}"}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def _end_of_turn(self) -> str:
        """The template's text after an assistant message (e.g. '<|eot_id|>')."""
        marker = "\x00LIDR\x00"
        prompt = self._chat([("user", "hi")])
        try:
            full = self.tokenizer.apply_chat_template(
                self._messages([("user", "hi"), ("assistant", marker)]), tokenize=False
            )
        except Exception:
            full = None
        if full and full.startswith(prompt) and marker in full:
            return full.split(marker, 1)[1]
        return self.tokenizer.eos_token or ""


def parse_translation(raw: str) -> tuple[str | None, bool]:
    """Text the model generated after the pre-filled OUT_OPEN -> (translation, ok).

    The translation is what lies before OUT_CLOSE; without OUT_CLOSE (the model ran out
    of tokens or wandered off), with a source delimiter before it (the model went on with
    the request's pattern) or with nothing inside, the translation has failed.
    """
    if OUT_CLOSE not in raw:
        return None, False
    text = raw.split(OUT_CLOSE, 1)[0].strip()
    if SRC_OPEN in text or SRC_CLOSE in text:
        return None, False
    if text.startswith(OUT_OPEN):  # some models repeat the pre-filled delimiter
        text = text[len(OUT_OPEN):].strip()
    return (text, True) if text else (None, False)


def choose_format(tokenizer, requested: str, system_prompt: str | None = None) -> PromptFormat:
    """auto: the chat template if the tokenizer has one, else few-shot completion."""
    if requested == "auto":
        kind = "chat" if getattr(tokenizer, "chat_template", None) else "completion"
    elif requested == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format is 'chat' but the model's tokenizer has no chat template")
    else:
        kind = requested
    return PromptFormat(kind=kind, tokenizer=tokenizer, system_prompt=system_prompt)
