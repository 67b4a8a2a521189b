"""Prompt sources: parallel instructions per language, checked before any model loads.

Sources (config `prompts.source`):
- `builtin:demo`: everyday instructions in en/es/de/fr written for this project;
- a folder, or a list of folders, of `<lang>.jsonl` (one object a line) or `<lang>.json`
  (a list of objects) files, each row with an id and an instruction (field names from
  `prompts.id_field` / `prompts.text_field`); rows with the same id in different
  languages are translations of one another;
- `hf:<dataset id>`: a Hugging Face dataset with one config per language (needs the
  network and `pip install lidr[hub]`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lidr.config import Config, PromptsConfig
from lidr.languages import LANGUAGES
from lidr.records import RecordError, read_jsonl


class PromptsWarning(UserWarning):
    pass


@dataclass
class PromptSet:
    ids: list  # parallel ids, in source order
    text: dict[str, dict]  # lang -> id -> instruction
    notes: list[str] = field(default_factory=list)  # what the loader had to say (dropped ids ...)

    def slice(self, iteration: int, per_iteration: int) -> list:
        """Fresh prompts each iteration: iteration t takes the t-th block of ids."""
        return self.ids[(iteration - 1) * per_iteration : iteration * per_iteration]


def load_prompts(cfg: PromptsConfig, langs: list[str]) -> PromptSet:
    src = cfg.source
    if src == "builtin:demo":
        return _load_builtin(langs)
    if isinstance(src, str) and src.startswith("hf:"):
        return _load_hub(src[3:], cfg, langs)
    folders = [Path(s) for s in (src if isinstance(src, list) else [src])]
    per_lang: dict[str, dict] = {l: {} for l in langs}
    for folder in folders:
        if not folder.is_dir():
            raise RecordError(f"prompts.source: folder not found: {folder}")
        for lang in langs:
            rows = _read_lang_file(folder, lang, cfg, per_lang[lang])
            per_lang[lang].update(rows)
    return _intersect(per_lang, langs)


def _read_lang_file(folder: Path, lang: str, cfg: PromptsConfig, seen: dict) -> dict:
    jsonl, js = folder / f"{lang}.jsonl", folder / f"{lang}.json"
    if jsonl.exists():
        rows = read_jsonl(jsonl)
        path = jsonl
    elif js.exists():
        path = js
        try:
            data = json.loads(js.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RecordError(f"{js}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise RecordError(f"{js}: expected a JSON list of objects")
        rows = ((i + 1, r) for i, r in enumerate(data))  # "line" = item number for .json
    else:
        present = sorted(p.stem for p in folder.glob("*.json*"))
        raise RecordError(
            f"{folder}: no prompts for language '{lang}' (expected {lang}.jsonl or {lang}.json; "
            f"found: {', '.join(present) or 'nothing'})"
        )
    out: dict = {}
    lines: dict = {}
    unit = "line" if path.suffix == ".jsonl" else "item"
    for lineno, rec in rows:
        where = f"{path}:{lineno}" if unit == "line" else f"{path} item {lineno}"
        if not isinstance(rec, dict):
            raise RecordError(f"{where}: expected a JSON object")
        if cfg.id_field not in rec or rec[cfg.id_field] in (None, ""):
            raise RecordError(f"{where}: missing field '{cfg.id_field}'")
        pid = rec[cfg.id_field]
        if isinstance(pid, (list, dict)):
            raise RecordError(f"{where}: field '{cfg.id_field}' must be a string or a number")
        text = rec.get(cfg.text_field)
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"{where}: field '{cfg.text_field}' is missing or empty")
        if pid in out or pid in seen:
            first = lines.get(pid, "an earlier folder")
            raise RecordError(f"{where}: duplicate id {pid!r} in field '{cfg.id_field}' (first at {first})")
        out[pid] = text.strip()
        lines[pid] = f"{unit} {lineno}"
    return out


def _load_builtin(langs: list[str]) -> PromptSet:
    path = resources.files("lidr") / "data" / "demo_prompts.jsonl"
    per_lang: dict[str, dict] = {l: {} for l in langs}
    with resources.as_file(path) as p:
        available: set[str] = set()
        for lineno, rec in read_jsonl(p):
            available |= set(rec["translations"])
            for lang in langs:
                if lang in rec["translations"]:
                    per_lang[lang][rec["id"]] = rec["translations"][lang]
    missing = [l for l in langs if not per_lang[l]]
    if missing:
        raise RecordError(
            f"the built-in demo prompts have no {', '.join(missing)}; they exist in "
            f"{', '.join(sorted(available))}. Use your own prompts (prompts.source)."
        )
    return _intersect(per_lang, langs)


def _load_hub(dataset: str, cfg: PromptsConfig, langs: list[str]) -> PromptSet:
    try:
        import datasets
    except ImportError:
        raise RecordError("prompts.source 'hf:...' needs the datasets package: pip install 'lidr[hub]'") from None
    from lidr.models import _hub_reachable

    if not _hub_reachable():
        raise RecordError(f"prompts.source hf:{dataset}: the Hugging Face Hub cannot be reached from this machine")
    per_lang = {}
    for lang in langs:
        ds = datasets.load_dataset(dataset, lang, split="train")
        per_lang[lang] = {r[cfg.id_field]: r[cfg.text_field] for r in ds}
    return _intersect(per_lang, langs)


def _intersect(per_lang: dict[str, dict], langs: list[str]) -> PromptSet:
    """Keep the ids present in every language; warn with the counts if some are not."""
    first = per_lang[langs[0]]
    common = [i for i in first if all(i in per_lang[l] for l in langs[1:])]
    notes = []
    if any(len(per_lang[l]) != len(common) for l in langs):
        counts = ", ".join(f"{l}: {len(per_lang[l])}" for l in langs)
        note = f"prompt ids are not parallel across languages ({counts}); using the {len(common)} ids present in all"
        notes.append(note)
        warnings.warn(note, PromptsWarning, stacklevel=3)
    return PromptSet(ids=common, text={l: {i: per_lang[l][i] for i in common} for l in langs}, notes=notes)


def check_enough(prompts: PromptSet, cfg: Config) -> None:
    need = cfg.iterations * cfg.prompts.per_iteration
    if len(prompts.ids) < need:
        raise RecordError(
            f"prompts: {cfg.iterations} iterations x prompts.per_iteration {cfg.prompts.per_iteration} "
            f"need {need} parallel ids, but the source has {len(prompts.ids)}"
        )


def load_id_list(path: str | Path) -> set:
    """A JSONL file of {"id": ...} rows (e.g. the paper's translation-task ids)."""
    ids = set()
    for lineno, rec in read_jsonl(path):
        if "id" not in rec:
            raise RecordError(f"{path}:{lineno}: missing field 'id'")
        ids.add(rec["id"])
    return ids


def translation_task_ids(prompts: PromptSet, cfg: PromptsConfig, dominant: str, ids: list) -> set:
    """Prompts that themselves ask for a translation: from the id list and/or the detector."""
    marked = set()
    if cfg.translation_task_ids:
        marked |= load_id_list(cfg.translation_task_ids) & set(ids)
    if cfg.detect_translation_tasks:
        from lidr.pipeline.translation_tasks import is_translation_task

        marked |= {i for i in ids if is_translation_task(prompts.text[dominant][i])}
    return marked


__all__ = ["LANGUAGES", "PromptSet", "PromptsWarning", "check_enough", "load_prompts", "translation_task_ids"]
