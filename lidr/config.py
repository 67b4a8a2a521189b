"""The run configuration: one YAML file, validated by pydantic, every field defaulted.

`lidr run` with no file uses `DEMO` (the embedded default). `load_config` layers a YAML
file and `--set key.sub=value` overrides on top of the defaults and reports errors with
the file, line and field they come from.
"""

from __future__ import annotations

import copy
import math
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
    backend: Literal["hf", "vllm", "openai"] = Field(
        "hf",
        description=(
            "Generation engine: hf (transformers, CPU or GPU), vllm (vLLM's offline engine, "
            "generation.vllm), openai (an OpenAI-compatible server, generation.server)."
        ),
    )
    max_new_tokens: int = Field(96, ge=1, description="Response length limit (paper: 2400).")
    translation_max_new_tokens: int | None = Field(
        None, description="Translation length limit; null = 1.5 x max_new_tokens (paper: 4096)."
    )
    translation_length_ratio: float | None = Field(
        4.0, gt=0,
        description=(
            "A translation is also cut (and fails) at this many times its source's tokens, plus 16: "
            "a repetition loop on a short text then ends early instead of running to the limit. "
            "null = translation_max_new_tokens only (paper)."
        ),
    )
    batch_size: int = Field(64, ge=1, description="Most sequences decoded at once (continuous batching: a finished row's place goes to the next prompt).")
    repetition_penalty: float = Field(1.1, gt=0, description="For responses (paper: 1.1).")
    translation_repetition_penalty: float = Field(1.0, gt=0, description="For translations (paper: none).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto = bfloat16 where the CPU/GPU supports it, else float32."
    )
    system_prompt: str | None = Field(
        "You are a helpful assistant.", description="System prompt for chat-template models."
    )
    cpu_packed_weights: bool = Field(
        True,
        description=(
            "backend hf on an x86-64 CPU (fp32; bf16 too with AMX or AVX512-BF16): run the linear layers through oneDNN with weights reordered "
            "once (lidr/packed_linear.py; decoding steps of 4-32 rows 1.4-2x faster in "
            "bench/README.md; costs memory, one more copy of the weights: +1.06 GB RSS for gemma-3-270m; "
            "skipped when twice that is not free). With it, an output layer of 16 M parameters or more also "
            "gets an int8 copy that screens the greedy choice of decoding steps exactly: fp32 steps of several "
            "rows (oneDNN on CPUs with VNNI/AMX int8, else fbgemm), bf16 steps of any rows where oneDNN's "
            "int8 product is exact (lidr/head.py, Int8Head; 0.19 GB, 0.27 GB after a 64-row step, and 0.6-2 s to build for "
            "gemma-3-270m, at the first such step; kept for the process's later backends whose output layer "
            "has the same bytes, as LoRA "
            "leaves it). Also used by the translator's hf engine."
        ),
    )
    server: EndpointConfig | None = Field(
        None,
        description=(
            "backend openai: the server (vLLM serve, SGLang, llama.cpp server, hosted API). It must "
            "serve the model being generated with: the run's model in iteration 1, M_{t-1} after."
        ),
    )
    tokenizer: str | None = Field(
        None,
        description=(
            "backend openai: local model spec whose tokenizer formats prompts and counts tokens "
            "(must be the served model's); null = the run's model. Later iterations use M_{t-1}'s."
        ),
    )
    vllm: VllmConfig = Field(default_factory=lambda: VllmConfig(), description="backend vllm: engine settings.")

    @model_validator(mode="after")
    def _server_for_openai(self) -> "GenerationConfig":
        if self.backend == "openai" and self.server is None:
            raise ValueError(
                "backend 'openai' needs generation.server: {url: http://HOST:PORT/v1, model: NAME}, "
                "an OpenAI-compatible server that serves the run's model"
            )
        return self

    @property
    def translation_tokens(self) -> int:
        return self.translation_max_new_tokens or int(self.max_new_tokens * 1.5)

    def translation_limit(self, source_tokens: int) -> int:
        """Token limit of one translation whose source text has `source_tokens` tokens."""
        if self.translation_length_ratio is None:
            return self.translation_tokens
        return min(self.translation_tokens, math.ceil(self.translation_length_ratio * source_tokens) + 16)


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
    gradient_accumulation: int = Field(
        1, ge=1, description="Effective batch = batch_size x this x num_processes (paper: 16)."
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up.")
    max_length: int = Field(512, ge=16, description="Prompt + response tokens; longer pairs are truncated.")
    lora: LoraConfig | None = Field(
        default_factory=LoraConfig, description="LoRA settings; null = full fine-tuning."
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Weights dtype while training; auto = bfloat16 where supported. The trained "
        "model is saved in the dtype of the files it was trained from (LoRA deltas added to those weights)."
    )
    seed: int | None = Field(None, description="Shuffling seed; null = the run's seed.")
    num_processes: int = Field(
        1, ge=1,
        description="Training processes (one per GPU); > 1 runs the train stage under `accelerate launch`.",
    )
    accelerate_config: str | None = Field(
        None,
        description=(
            "accelerate config YAML for the launch: a path, or a name from configs/accelerate "
            "(ddp, fsdp, deepspeed-zero2, deepspeed-zero3); null = plain data parallel (DDP)."
        ),
    )
    gradient_checkpointing: bool = Field(
        False,
        description=(
            "Recompute activations in the backward pass (less memory, ~30 % slower; each prompt then "
            "runs once per response, as the KV cache that shares it is off)."
        ),
    )
    cpu_packed_weights: bool = Field(
        True,
        description=(
            "LoRA on an x86-64 CPU: run the frozen linear layers through oneDNN with weights reordered once "
            "(lidr/packed_linear.py; ~20 % faster layers in the bench's training steps), each plain LoRA "
            "adapter on top of one in the same autograd node (~4 % faster steps); costs memory: "
            "+1.3 GB RSS for gemma-3-270m."
        ),
    )
    final_metrics: bool = Field(
        False,
        description=(
            "After training, score all pairs again to report the reward accuracy and margin on every "
            "pair (summary.json `final`); costs one forward pass over the pairs (~20 % of the stage on "
            "the demo). Off: the report shows the last step's batch metrics instead."
        ),
    )


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


class EndpointConfig(_Section):
    """An OpenAI-compatible server (vLLM serve, SGLang, llama.cpp server, a hosted API)."""

    url: str = Field(..., description="Base URL, e.g. http://localhost:8000/v1.")
    model: str = Field(..., description="The model name the server expects.")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key (never written anywhere)."
    )
    timeout: float = Field(120.0, gt=0, description="Seconds per request before it counts as timed out.")
    max_retries: int = Field(5, ge=0, description="Retries (exponential backoff) on 429, 5xx, timeouts.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    extra_body: dict[str, Any] | None = Field(
        None,
        description=(
            "Extra fields sent with every request, e.g. to constrain a judge's reply: "
            "{guided_choice: [m, M]} for vLLM, {grammar: 'root ::= \"m\" | \"M\"'} for llama.cpp."
        ),
    )


class VllmConfig(_Section):
    """vLLM's offline engine (backend vllm); each replica runs in its own process."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica (tensor parallelism).")
    data_parallel_size: int = Field(
        1, ge=1, description="Replicas, each on its own tensor_parallel_size GPUs; rows are split among them."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may take.")
    max_model_len: int | None = Field(None, ge=16, description="Context length; null = the model's own.")
    enforce_eager: bool = Field(False, description="Skip CUDA graph capture (starts faster, decodes slower).")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="More keyword arguments for vllm.LLM, passed as they are."
    )


class TranslatorConfig(_Section):
    """Who translates in the translate stage when it is not the model being trained."""

    backend: Literal["hf", "vllm", "openai"] = Field("hf", description="Engine of the translator.")
    model: str | None = Field(
        None,
        description=(
            "hf / vllm: the translator model (alias, folder, .gguf, hub id). openai: a local model "
            "spec with the served model's tokenizer (or set tokenizer)."
        ),
    )
    server: EndpointConfig | None = Field(None, description="backend openai: the translator's server.")
    tokenizer: str | None = Field(None, description="backend openai: tokenizer model spec; null = model.")
    prompt_format: Literal["auto", "chat", "completion"] = Field(
        "auto", description="The translator's prompt format; auto = chat template when it has one."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="hf / vllm weights dtype.")
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="backend vllm: engine settings.")

    @model_validator(mode="after")
    def _complete(self) -> "TranslatorConfig":
        if self.backend == "openai":
            if self.server is None:
                raise ValueError("translator backend 'openai' needs translator.server: {url: ..., model: ...}")
            if not (self.tokenizer or self.model):
                raise ValueError(
                    "translator backend 'openai' needs translator.tokenizer (or translator.model): a local "
                    "model spec with the served model's tokenizer, to format the translation prompts"
                )
        elif not self.model:
            raise ValueError(f"translator backend {self.backend!r} needs translator.model")
        return self

    def identity(self) -> dict[str, Any]:
        """What decides the translations (for fingerprints): not timeouts, retries, engine sizes."""
        out = self.model_dump(mode="json", exclude={"vllm"})
        if out.get("server"):
            out["server"] = {k: out["server"][k] for k in ("url", "model")}
        return out


class MgsmEvalConfig(_Section):
    languages: list[str] | None = Field(
        None, description="MGSM languages; null = all 11 (bn de en es fr ja ru sw te th zh)."
    )
    limit: int | None = Field(None, ge=1, description="First N problems per language; null = all 250.")
    max_new_tokens: int = Field(256, ge=1, description="Answer length limit.")


class AlpacaEvalConfig(_Section):
    languages: list[str] | None = Field(
        None, description="X-AlpacaEval languages; null = the run's languages that have reference answers."
    )
    limit: int | None = Field(None, ge=1, description="First N instructions per language; null = all 805.")
    max_new_tokens: int = Field(512, ge=1, description="Answer length limit (paper: 2400).")
    likelihood: bool = Field(
        True, description="Mean per-token log-likelihood of the reference answers (judge-free)."
    )
    likelihood_max_tokens: int = Field(
        256, ge=1, description="Reference answers are cut at this many tokens for the likelihood."
    )


class EvalConfig(_Section):
    enabled: bool = Field(True, description="Evaluate M0 and every trained model inside `lidr run`.")
    data: str | None = Field(
        None,
        description=(
            "Folder in the layout of shared/datasets (mgsm/<lang>.jsonl, x-alpacaeval/prompts/, "
            "x-alpacaeval/reference-gpt-4-turbo/); null = $LIDR_DATA, else evaluation is skipped."
        ),
    )
    mgsm: MgsmEvalConfig | None = Field(default_factory=MgsmEvalConfig, description="null = skip MGSM.")
    alpaca: AlpacaEvalConfig | None = Field(default_factory=AlpacaEvalConfig, description="null = skip X-AlpacaEval.")
    judge: EndpointConfig | None = Field(
        None, description="LLM judge for win rates, head-to-head and reward accuracy; null = judge-free signals only."
    )
    batch_size: int | None = Field(None, ge=1, description="Generation batch; null = generation.batch_size.")


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
    eval: EvalConfig = Field(default_factory=EvalConfig)
    translator: TranslatorConfig | None = Field(
        None,
        description=(
            "Who translates in the translate stage; null = the model being trained (self-translation, "
            "the method). Another model or server gives the paper's translate-by-system ablation."
        ),
    )
    seed: int = Field(0, description="Seed for every random choice (pair policy, shuffling).")

    def section(self, *names: str) -> dict[str, Any]:
        """The config slice a stage depends on (for fingerprints)."""
        dump = self.model_dump(mode="json")
        return {n: dump[n] for n in names}


# The embedded default: a small base model, the built-in prompts, two iterations, sized
# to finish on a 2-core laptop CPU. LoRA with a learning rate fit for LoRA on a tiny model.
# Its evaluation is small too (8 items per language, the run's languages): enough to see
# the machinery and the direction of change, not to measure an effect.
DEMO: dict[str, Any] = {
    "training": {"learning_rate": 5e-5, "batch_size": 2, "gradient_accumulation": 2},
    # A smoke-scale evaluation (8 items per language: 95 % intervals of about +-0.3) sized to
    # take under 4 minutes for M0, M1 and M2 on a 2-core CPU; `lidr eval` runs the full sets.
    "eval": {
        "mgsm": {"languages": ["en", "es", "de", "fr"], "limit": 8, "max_new_tokens": 96},
        "alpaca": {"limit": 8, "max_new_tokens": 64, "likelihood_max_tokens": 64},
    },
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
            if sub is not None and f.get_default(call_default_factory=True) is not None:
                out.append(f"{pad}{name}:")
                walk(sub, indent + 1)
            elif sub is not None:  # an optional section, off by default: its fields, commented out
                out.append(f"{pad}{name}: null")
                start = len(out)
                out.append(f"{pad}# {name}:")
                walk(sub, indent + 1)
                out[start + 1:] = [ln if ln.lstrip().startswith("#") else f"{pad}# {ln[len(pad):]}"
                                   for ln in out[start + 1:]]
            else:
                if f.is_required():
                    out.append(f"{pad}{name}: ...  # required")
                    continue
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
    "EndpointConfig",
    "EvalConfig",
    "DEMO",
    "GenerationConfig",
    "LanguagesConfig",
    "LoraConfig",
    "PairsConfig",
    "PromptsConfig",
    "TrainingConfig",
    "TranslatorConfig",
    "VllmConfig",
    "LANGUAGES",
    "config_reference",
    "dump_config",
    "load_config",
]
