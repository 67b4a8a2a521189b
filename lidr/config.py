"""The run configuration: one YAML file, validated by pydantic, every field defaulted.

`lidr run` with no file uses `DEMO` (the embedded default). `load_config` layers a YAML
file and `--set key.sub=value` overrides on top of the defaults and reports errors with
the file, line and field they come from.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lidr.languages import LANGUAGES, check_language


class ConfigError(ValueError):
    """A configuration problem, already phrased for the user."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a key must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LanguagesConfig(_Section):
    dominant: str = Field("en", description="The dominant language (ISO 639-1), usually English.")
    others: list[str] = Field(
        default_factory=lambda: ["es", "de", "fr"],
        description="The non-dominant training languages (ISO 639-1).",
    )

    @field_validator("dominant")
    @classmethod
    def _known_dominant(cls, v: str) -> str:
        return check_language(v)

    @field_validator("others")
    @classmethod
    def _known_others(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one non-dominant language is needed")
        v = [check_language(x) for x in v]
        if len(set(v)) != len(v):
            raise ValueError(f"languages repeated: {v}")
        return v

    @model_validator(mode="after")
    def _dominant_not_other(self) -> "LanguagesConfig":
        if self.dominant in self.others:
            raise ValueError(f"dominant language {self.dominant!r} is also listed in others")
        return self

    @property
    def all(self) -> list[str]:
        return [self.dominant, *self.others]


class PromptsConfig(_Section):
    source: str | list[str] = Field(
        "builtin:demo",
        description=(
            "Where the parallel prompts come from: 'builtin:demo', a folder (or list of "
            "folders) holding <lang>.jsonl / <lang>.json files with an id and an "
            "instruction per row, or 'hf:<dataset id>' (needs network and `datasets`)."
        ),
    )
    per_iteration: int = Field(8, ge=1, description="Fresh prompts per language per iteration (paper: 1000).")
    id_field: str = Field("id", description="Field holding the prompt id (rows with one id are translations).")
    text_field: str = Field("instruction", description="Field holding the instruction text.")
    translation_task_ids: str | None = Field(
        None,
        description="Optional JSONL file of {id: ...} rows: prompts that are themselves translation tasks.",
    )
    detect_translation_tasks: bool = Field(
        True, description="Also detect translation-task prompts with the built-in multilingual detector."
    )


class GenerationConfig(_Section):
    backend: Literal["hf"] = Field("hf", description="Generation engine.")
    max_new_tokens: int = Field(96, ge=1, description="Response length limit (paper: 2400).")
    translation_max_new_tokens: int | None = Field(
        None, description="Translation length limit; null = 1.5 x max_new_tokens (paper: 4096)."
    )
    batch_size: int = Field(64, ge=1, description="Sequences generated together (CPU decoding is memory-bound: larger is faster).")
    repetition_penalty: float = Field(1.1, gt=0, description="For responses (paper: 1.1).")
    translation_repetition_penalty: float = Field(1.0, gt=0, description="For translations (paper: none).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto = bfloat16 where the CPU/GPU supports it, else float32."
    )
    system_prompt: str | None = Field(
        "You are a helpful assistant.", description="System prompt for chat-template models."
    )

    @property
    def translation_tokens(self) -> int:
        return self.translation_max_new_tokens or int(self.max_new_tokens * 1.5)


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    target_modules: list[str] | str = Field(
        "all-linear", description="PEFT target_modules; 'all-linear' = every linear layer but the head."
    )


class TrainingConfig(_Section):
    beta: float = Field(0.5, gt=0, description="DPO beta (paper: 0.5).")
    nll_weight: float = Field(1.0, ge=0, description="Weight of the NLL term on the chosen answer (paper: 1).")
    learning_rate: float = Field(5e-7, gt=0, description="Paper: 5e-7 (full fine-tuning of an 8B model).")
    epochs: int = Field(1, ge=1, description="Passes over the iteration's pairs.")
    batch_size: int = Field(2, ge=1, description="Pairs per forward/backward pass.")
    gradient_accumulation: int = Field(1, ge=1, description="Effective batch = batch_size x this (paper: 16).")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up.")
    max_length: int = Field(512, ge=16, description="Prompt + response tokens; longer pairs are truncated.")
    lora: LoraConfig | None = Field(
        default_factory=LoraConfig, description="LoRA settings; null = full fine-tuning."
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Weights dtype while training; auto = bfloat16 where supported."
    )
    seed: int | None = Field(None, description="Shuffling seed; null = the run's seed.")


class PairsConfig(_Section):
    dominant_rejected: Literal["one_per_prompt", "per_language", "last_language"] = Field(
        "one_per_prompt",
        description=(
            "Dominant-language pairs: one rejected back-translation per prompt, language "
            "chosen by seed (default); one per language; or the released code's behaviour."
        ),
    )
    max_line_repeats: int = Field(5, ge=2, description="Drop answers with a line repeated this often.")
    drop_empty: bool = Field(True, description="Drop pairs with an empty answer or translation.")
    drop_identical: bool = Field(True, description="Drop pairs whose chosen and rejected are the same text.")
    check_language: bool = Field(True, description="Require the chosen answer in the prompt's language.")
    min_langid_chars: int = Field(
        20, ge=0, description="Shorter chosen answers are not language-checked (too short to tell)."
    )


class Config(_Section):
    model: str = Field(
        "gemma-3-270m",
        description="Hugging Face id, local folder, .gguf file, or the built-in alias 'gemma-3-270m'.",
    )
    prompt_format: Literal["auto", "chat", "completion"] = Field(
        "auto",
        description="auto = chat template when the tokenizer has one, else few-shot completion.",
    )
    trust_remote_code: bool = Field(False, description="Run a model's own code from its folder (only if you trust it).")
    languages: LanguagesConfig = Field(default_factory=LanguagesConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    iterations: int = Field(2, ge=1, description="Self-improvement iterations (M0 -> M1 -> ...).")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    seed: int = Field(0, description="Seed for every random choice (pair policy, shuffling).")

    def section(self, *names: str) -> dict[str, Any]:
        """The config slice a stage depends on (for fingerprints)."""
        dump = self.model_dump(mode="json")
        return {n: dump[n] for n in names}


# The embedded default: a small base model, the built-in prompts, two iterations, sized
# to finish on a 2-core laptop CPU. LoRA with a learning rate fit for LoRA on a tiny model.
DEMO: dict[str, Any] = {
    "training": {"learning_rate": 5e-5, "batch_size": 2, "gradient_accumulation": 2},
}


def _deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def parse_override(item: str) -> tuple[list[str], Any]:
    """`training.beta=0.1` -> (['training', 'beta'], 0.1); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
    return keys, value


def _line_of(path: Path, loc: tuple) -> int | None:
    """Line in the YAML file where the field at `loc` is written (best effort)."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except Exception:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Defaults <- `base` (the demo when no file) <- YAML file <- --set overrides."""
    data: dict[str, Any] = copy.deepcopy(DEMO if path is None and base is None else (base or {}))
    file_data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            file_data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(file_data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        _deep_update(data, copy.deepcopy(file_data))
    set_keys: set[tuple[str, ...]] = set()
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
        set_keys.add(tuple(keys))
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, path, set_keys)) from None


def _explain(err: ValidationError, path: Path | None, set_keys: set[tuple[str, ...]]) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(x for x in item["loc"] if not (isinstance(x, str) and x in {"function-after", "list[str]", "str"}))
        field = ".".join(str(x) for x in loc)
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `lidr config --reference` lists every field)"
        where = "built-in defaults"
        if any(loc[: len(k)] == k for k in set_keys):
            where = "--set"
        elif path is not None:
            line = _line_of(path, loc)
            where = f"{path}:{line}" if line else str(path)
        lines.append(f"{where}: field '{field}': {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def config_reference() -> str:
    """Every field with its default and description, as YAML comments (for `lidr config`)."""
    out: list[str] = []

    def walk(model: type[BaseModel], indent: int) -> None:
        for name, f in model.model_fields.items():
            pad = "  " * indent
            if f.description:
                out.append(f"{pad}# {f.description}")
            ann = f.annotation
            sub = next(
                (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                None,
            )
            # lora is optional (null = full fine-tuning): shown as one value, not a section
            if sub is not None and name != "lora":
                out.append(f"{pad}{name}:")
                walk(sub, indent + 1)
            else:
                default = f.get_default(call_default_factory=True)
                if isinstance(default, BaseModel):
                    default = default.model_dump(mode="json")
                text = yaml.safe_dump({name: default}, sort_keys=False, allow_unicode=True).rstrip()
                out.extend(pad + ln for ln in text.splitlines())

    walk(Config, 0)
    return "\n".join(out) + "\n"


__all__ = [
    "Config",
    "ConfigError",
    "DEMO",
    "GenerationConfig",
    "LanguagesConfig",
    "LoraConfig",
    "PairsConfig",
    "PromptsConfig",
    "TrainingConfig",
    "LANGUAGES",
    "config_reference",
    "dump_config",
    "load_config",
]
