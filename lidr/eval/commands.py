"""`lidr eval ...`: evaluate any model, outside or inside a run folder.

    lidr eval mgsm MODEL            MGSM accuracy and off-target rate per language
    lidr eval alpaca MODEL          X-AlpacaEval answers, off-target, reference likelihood,
                                    win rate against the reference with a judge
    lidr eval h2h A B               head-to-head between two models, judged in both orders
    lidr eval reward-accuracy RUN   does a judge agree with the run's preference pairs?

MODEL is a model spec (alias, folder, .gguf, hub id) or a run folder with --iteration N;
for h2h, `RUN_DIR@N` names M_N of a run. Results go to RUN_DIR/eval/M<N>/… for run
models, else to evals/<model>/….
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import typer

from lidr.config import ConfigError, EndpointConfig, load_config
from lidr.console import console, progress
from lidr.eval.mgsm import MGSM_LANGUAGES

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a model: MGSM, X-AlpacaEval, head-to-head, reward accuracy.")

JudgeUrl = typer.Option(None, "--judge-url", help="OpenAI-compatible base URL of the judge, e.g. http://localhost:8000/v1.")
JudgeModel = typer.Option(None, "--judge-model", help="Model name the judge server expects (e.g. gpt-4-turbo).")
JudgeKeyEnv = typer.Option("OPENAI_API_KEY", "--judge-key-env", help="Environment variable with the judge's API key.")
JudgeConcurrency = typer.Option(8, "--judge-concurrency", help="Judge requests in flight at once.")
JudgeTimeout = typer.Option(120.0, "--judge-timeout", help="Seconds per judge request.")
JudgeRetries = typer.Option(5, "--judge-retries", help="Retries with backoff on 429/5xx/timeouts.")
JudgeExtra = typer.Option(None, "--judge-extra-body", help="JSON merged into every judge request, e.g. "
                          "'{\"guided_choice\": [\"m\", \"M\"]}' (vLLM) to constrain the reply.")
JudgeCache = typer.Option(None, "--judge-cache", help="Judgment cache file (default: next to the results).")
Seed = typer.Option(0, "--seed", help="Seed of the per-item answer order shown to the judge.")
PackedWeights = typer.Option(True, "--packed-weights/--no-packed-weights",
                             help="On an x86-64 CPU, fp32 linear layers through oneDNN with prepacked weights "
                                  "(faster; one more copy of the weights in memory). As generation.cpu_packed_weights.")


def _guard(fn):
    from lidr.cli import _guard as guard

    guard(fn)


def _model_arg(model: str, iteration: Optional[int]) -> tuple[str, str, Optional[Path]]:
    """(model spec, tag, run folder): a spec as is, RUN_DIR with --iteration N (0 = M0), or RUN_DIR@N."""
    if iteration is None and "@" in model and Path(model.rsplit("@", 1)[0]).is_dir():
        model, n = model.rsplit("@", 1)
        if not n.isdigit():
            raise ConfigError(f"{model}@{n}: expected RUN_DIR@N with N a number (0 = the base model)")
        iteration = int(n)
    run_dir = Path(model)
    if (run_dir / "config.yaml").exists() and (run_dir / "state.json").exists():
        if iteration is None:
            raise ConfigError(f"{model} is a run folder: say which model with --iteration N (0 = the base model)")
        if iteration == 0:
            return load_config(run_dir / "config.yaml", base={}).model, "M0", run_dir
        path = run_dir / f"iter-{iteration}" / "model"
        if not (path / "config.json").exists():
            raise ConfigError(f"{path} does not exist: iteration {iteration} has not finished training")
        return str(path), f"M{iteration}", run_dir
    if iteration is not None:
        raise ConfigError(f"--iteration needs a run folder; {model} is not one")
    return model, model.strip("/").replace("/", "--"), None


def _eval_dir(tag: str, run_dir: Optional[Path]) -> Path:
    return run_dir / "eval" / tag if run_dir else Path("evals") / tag


def _languages(text: str) -> list[str]:
    from lidr.languages import check_language

    return [check_language(l) for l in text.split(",") if l.strip()]


def _load_backend(spec: str, prompt_format: str, dtype: str, packed_weights: bool = True):
    from lidr.backends import make_backend
    from lidr.models import check_model_spec, resolve_model
    from lidr.templates import choose_format

    check_model_spec(spec)
    path = resolve_model(spec)
    with console.status(f"loading {path}"):
        backend = make_backend("hf", path, dtype=dtype, cpu_packed_weights=packed_weights)
    return backend, choose_format(backend.tokenizer, prompt_format)


def _judge(url: Optional[str], model: Optional[str], key_env: str, concurrency: int, timeout: float,
           retries: int, extra: Optional[str], cache: Path, required: bool = False):
    if url is None and model is None:
        if required:
            raise ConfigError("this needs a judge: pass --judge-url and --judge-model")
        return None
    if not url or not model:
        raise ConfigError("--judge-url and --judge-model go together")
    from lidr.eval.judge import make_judge

    try:
        extra_body = json.loads(extra) if extra else None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--judge-extra-body: not valid JSON ({e})") from None
    endpoint = EndpointConfig(url=url, model=model, api_key_env=key_env, timeout=timeout,
                              max_retries=retries, concurrency=concurrency, extra_body=extra_body)
    return make_judge(endpoint, cache)


def _alpaca_folder(data: Optional[str]) -> Path:
    """The x-alpacaeval folder: --data (that folder or a root holding it), else $LIDR_DATA."""
    from lidr.eval.alpaca import ALPACA_DIR
    from lidr.records import RecordError

    value = data or os.environ.get("LIDR_DATA")
    if not value:
        raise RecordError("no X-AlpacaEval data: pass --data FOLDER (the x-alpacaeval folder, or a folder "
                          "holding it) or set $LIDR_DATA")
    folder = Path(value).expanduser()
    if (folder / ALPACA_DIR).is_dir():
        folder = folder / ALPACA_DIR
    if not folder.is_dir():
        raise RecordError(f"--data {value}: folder not found")
    return folder


# ---- MGSM ------------------------------------------------------------------------------
@eval_app.command("mgsm")
def eval_mgsm(
    model: str = typer.Argument(..., help="Model spec (alias, folder, .gguf, hub id) or a run folder."),
    iteration: Optional[int] = typer.Option(None, "--iteration", "-i", help="With a run folder: M<N> (0 = base)."),
    data: Optional[str] = typer.Option(None, "--data", help="Folder of <lang>.jsonl (query, response) or hf:<id>; "
                                       "default $LIDR_DATA/mgsm, else hf:juletxara/mgsm."),
    languages: str = typer.Option(",".join(MGSM_LANGUAGES), "--languages", "-l", help="Comma-separated language codes."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N problems per language."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    batch_size: int = typer.Option(64, "--batch-size"),
    prompt_format: str = typer.Option("auto", "--prompt-format", help="auto | chat | completion"),
    dtype: str = typer.Option("auto", "--dtype"),
    packed_weights: bool = PackedWeights,
    responses: Optional[Path] = typer.Option(None, "--responses", help="Score answers made elsewhere (no model)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where records and summary.json go."),
):
    """MGSM accuracy (final number = gold) and off-target rate per language, with 95 % CIs."""

    def go():
        from lidr.eval import mgsm

        langs = _languages(languages)
        spec, tag, run_dir = _model_arg(model, iteration)
        default = f"{os.environ['LIDR_DATA']}/mgsm" if os.environ.get("LIDR_DATA") else "hf:juletxara/mgsm"
        folder = _mgsm_data(data or default, langs)
        items = mgsm.load_mgsm(folder, langs, limit)
        dest = out or _eval_dir(tag, run_dir) / "mgsm"
        started = time.time()
        if responses is not None:
            summary = mgsm.score_responses(responses, items, dest)
        else:
            backend, fmt = _load_backend(spec, prompt_format, dtype, packed_weights)
            with progress() as bar:
                summary = mgsm.evaluate_mgsm(backend, fmt, items, dest, max_new_tokens=max_new_tokens,
                                             batch_size=batch_size, progress=bar)
        _print_mgsm(summary, tag, time.time() - started, dest)

    _guard(go)


def _mgsm_data(data: str, langs: list[str]) -> Path:
    if not data.startswith("hf:"):
        return Path(data)
    from lidr.models import _hub_reachable
    from lidr.records import RecordError

    if not _hub_reachable():
        raise RecordError(f"--data {data}: the Hugging Face Hub cannot be reached; pass a local folder "
                          "of <lang>.jsonl files (fields query, response) with --data")
    import datasets  # the hub layout: one config per language, columns question / answer_number

    from lidr.models import cache_dir
    from lidr.records import atomic_write_jsonl

    folder = cache_dir() / "data" / data[3:].replace("/", "--")
    for lang in langs:
        if not (folder / f"{lang}.jsonl").exists():
            ds = datasets.load_dataset(data[3:], lang, split="test")
            atomic_write_jsonl(folder / f"{lang}.jsonl",
                               [{"query": r["question"], "response": str(r["answer_number"])} for r in ds])
    return folder


def _ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def _print_mgsm(summary: dict, tag: str, seconds: float, dest: Path) -> None:
    from rich.table import Table

    table = Table(title=f"MGSM, {tag} ({seconds:.0f} s) -> {dest}")
    for col in ("lang", "n", "accuracy", "95% CI", "off-target", "95% CI", "no number"):
        table.add_column(col, justify="right")
    for lang, v in summary["languages"].items():
        table.add_row(lang, str(v["n"]), _num(v["accuracy"]), _ci(v["accuracy_ci95"]), _num(v["off_target_rate"]),
                      _ci(v["off_target_ci95"]), str(v["no_number"]))
    console.print(table)
    console.print(f"average accuracy {summary['average_accuracy']}, "
                  f"average off-target rate {summary['average_off_target_rate']}")


# ---- X-AlpacaEval ------------------------------------------------------------------------
@eval_app.command("alpaca")
def eval_alpaca(
    model: str = typer.Argument(..., help="Model spec or a run folder (with --iteration)."),
    iteration: Optional[int] = typer.Option(None, "--iteration", "-i", help="With a run folder: M<N> (0 = base)."),
    data: Optional[str] = typer.Option(None, "--data", help="The x-alpacaeval folder (prompts/, reference-gpt-4-turbo/) "
                                       "or a folder holding it; default $LIDR_DATA."),
    languages: Optional[str] = typer.Option(None, "--languages", "-l", help="Comma-separated; default: every "
                                            "language with reference answers."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N instructions per language."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    batch_size: int = typer.Option(64, "--batch-size"),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty"),
    prompt_format: str = typer.Option("auto", "--prompt-format", help="auto | chat | completion"),
    dtype: str = typer.Option("auto", "--dtype"),
    packed_weights: bool = PackedWeights,
    likelihood: bool = typer.Option(True, "--likelihood/--no-likelihood", help="Reference-answer log-likelihood."),
    likelihood_max_tokens: int = typer.Option(256, "--likelihood-max-tokens"),
    judge_url: Optional[str] = JudgeUrl,
    judge_model: Optional[str] = JudgeModel,
    judge_key_env: str = JudgeKeyEnv,
    judge_concurrency: int = JudgeConcurrency,
    judge_timeout: float = JudgeTimeout,
    judge_retries: int = JudgeRetries,
    judge_extra: Optional[str] = JudgeExtra,
    judge_cache: Optional[Path] = JudgeCache,
    seed: int = Seed,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where answers, model_outputs/ and summary.json go."),
):
    """X-AlpacaEval: answers per language (AlpacaEval model_outputs export), off-target rate,
    reference likelihood, and win rate against gpt-4-turbo references with an LLM judge."""

    def go():
        from lidr.eval import alpaca
        from lidr.eval import likelihood as lik

        spec, tag, run_dir = _model_arg(model, iteration)
        folder = _alpaca_folder(data)
        langs = _languages(languages) if languages else alpaca.reference_languages(folder)
        items = alpaca.load_alpaca(folder, langs, limit)
        dest = out or _eval_dir(tag, run_dir) / "alpaca"
        judge = _judge(judge_url, judge_model, judge_key_env, judge_concurrency, judge_timeout, judge_retries,
                       judge_extra, judge_cache or dest.parent.parent / "judgments-cache.jsonl")
        started = time.time()
        backend, fmt = _load_backend(spec, prompt_format, dtype, packed_weights)
        failures = None
        try:
            with progress() as bar:
                alpaca.generate_answers(backend, fmt, items, dest, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, repetition_penalty=repetition_penalty, progress=bar)
                alpaca.export_model_outputs(dest, items, generator=tag)
                if judge is not None:
                    failures = alpaca.judge_against_reference(judge, items, dest, seed=seed, progress=bar)
                lik_summary = None
                if likelihood:
                    lik_summary = lik.reference_loglik(backend.model, backend.tokenizer, fmt, items,
                                                       dest.parent / "likelihood", max_tokens=likelihood_max_tokens,
                                                       batch_size=min(batch_size, 8), progress=bar)
        finally:
            if judge is not None:
                judge.close()
        summary = alpaca.summarize(dest, items, judge.describe() if judge else None, failures)
        _print_alpaca(summary, lik_summary, tag, time.time() - started, dest)
        if summary["judge_failures"]:
            console.print(f"[yellow]{summary['judge_failures']} judgments failed (not cached); run the same "
                          "command again to retry only those.[/]")

    _guard(go)


def _print_alpaca(summary: dict, lik: Optional[dict], tag: str, seconds: float, dest: Path) -> None:
    from rich.table import Table

    table = Table(title=f"X-AlpacaEval, {tag} ({seconds:.0f} s) -> {dest}")
    for col in ("lang", "n", "win rate %", "± SE", "judge failures", "off-target", "95% CI", "ref. logprob", "95% CI"):
        table.add_column(col, justify="right")
    for lang, v in summary["languages"].items():
        lv = (lik or {}).get("languages", {}).get(lang, {})
        table.add_row(lang, str(v["n"]), _num(v["win_rate"], ".2f"), _num(v["win_rate_se"], ".2f"),
                      str(v["judge_failures"]), _num(v["off_target_rate"]), _ci(v["off_target_ci95"]),
                      _num(lv.get("mean_logprob")), _ci(lv.get("ci95")))
    console.print(table)
    console.print(f"average win rate {summary['average_win_rate']}, "
                  f"average off-target rate {summary['average_off_target_rate']}"
                  + (f", average reference logprob {lik['average_mean_logprob']}" if lik else ""))


# ---- head-to-head and reward accuracy ----------------------------------------------------------
@eval_app.command("h2h")
def eval_h2h(
    model_a: str = typer.Argument(..., help="Model A: a spec, or RUN_DIR@N for M_N of a run."),
    model_b: str = typer.Argument(..., help="Model B, the same way (e.g. runs/demo@0)."),
    data: Optional[str] = typer.Option(None, "--data", help="The x-alpacaeval folder (or a folder holding it); "
                                       "default $LIDR_DATA."),
    languages: Optional[str] = typer.Option(None, "--languages", "-l", help="Comma-separated; default: every "
                                            "language with instructions."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N instructions per language."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens"),
    batch_size: int = typer.Option(64, "--batch-size"),
    repetition_penalty: float = typer.Option(1.1, "--repetition-penalty"),
    prompt_format: str = typer.Option("auto", "--prompt-format"),
    dtype: str = typer.Option("auto", "--dtype"),
    packed_weights: bool = PackedWeights,
    judge_url: Optional[str] = JudgeUrl,
    judge_model: Optional[str] = JudgeModel,
    judge_key_env: str = JudgeKeyEnv,
    judge_concurrency: int = JudgeConcurrency,
    judge_timeout: float = JudgeTimeout,
    judge_retries: int = JudgeRetries,
    judge_extra: Optional[str] = JudgeExtra,
    judge_cache: Optional[Path] = JudgeCache,
    out: Optional[Path] = typer.Option(None, "--out", "-o"),
):
    """Head-to-head win/tie/lose per language on X-AlpacaEval instructions: each pair of
    answers is judged in both orders; disagreeing orders count as a tie. Answers already
    made by `lidr eval alpaca` (or lidr run's evaluation) are reused."""

    def go():
        from lidr.eval import alpaca
        from lidr.eval.h2h import answers_from, head_to_head

        sides = [_model_arg(m, None) for m in (model_a, model_b)]
        folder = _alpaca_folder(data)
        langs = _languages(languages) if languages else alpaca.alpaca_languages(folder)
        items = alpaca.load_alpaca(folder, langs, limit)
        (_, tag_a, run_a), (_, tag_b, run_b) = sides
        dest = out or (_eval_dir("h2h", run_a if run_a == run_b else None) / f"{tag_a}-vs-{tag_b}")
        judge = _judge(judge_url, judge_model, judge_key_env, judge_concurrency, judge_timeout, judge_retries,
                       judge_extra, judge_cache or dest.parent.parent / "judgments-cache.jsonl", required=True)
        started = time.time()
        try:
            answers = []
            for spec, tag, run_dir in sides:
                ans_dir = _eval_dir(tag, run_dir) / "alpaca"
                existing = alpaca.load_answers(ans_dir, langs)
                if any(it["id"] not in existing[l] for l, its in items.items() for it in its):
                    backend, fmt = _load_backend(spec, prompt_format, dtype, packed_weights)
                    with progress() as bar:
                        alpaca.generate_answers(backend, fmt, items, ans_dir, max_new_tokens=max_new_tokens,
                                                batch_size=batch_size, repetition_penalty=repetition_penalty,
                                                progress=bar)
                    backend.close()
                wanted = {l: {it["id"] for it in its} for l, its in items.items()}
                answers.append({l: {i: r for i, r in recs.items() if i in wanted[l]}
                                for l, recs in answers_from(ans_dir, langs).items()})
            with progress() as bar:
                summary = head_to_head(judge, answers[0], answers[1], dest, name_a=tag_a, name_b=tag_b, progress=bar)
        finally:
            judge.close()
        _print_h2h(summary, time.time() - started, dest)

    _guard(go)


def _print_h2h(summary: dict, seconds: float, dest: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{summary['a']} vs {summary['b']} ({seconds:.0f} s) -> {dest}")
    for col in ("lang", "n", "win", "tie", "lose", "win rate", "failures"):
        table.add_column(col, justify="right")
    for lang, v in summary["languages"].items():
        table.add_row(lang, str(v["n"]), str(v["win"]), str(v["tie"]), str(v["lose"]), _num(v["win_rate"]),
                      str(v["failures"]))
    console.print(table)


@eval_app.command("reward-accuracy")
def eval_reward_accuracy(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    iteration: int = typer.Option(1, "--iteration", "-i", help="Whose pairs (iter-N/pairs.jsonl)."),
    judge_url: Optional[str] = JudgeUrl,
    judge_model: Optional[str] = JudgeModel,
    judge_key_env: str = JudgeKeyEnv,
    judge_concurrency: int = JudgeConcurrency,
    judge_timeout: float = JudgeTimeout,
    judge_retries: int = JudgeRetries,
    judge_extra: Optional[str] = JudgeExtra,
    judge_cache: Optional[Path] = JudgeCache,
    seed: int = Seed,
):
    """Share of the run's preference pairs on which the judge prefers chosen over rejected."""

    def go():
        from rich.table import Table

        from lidr.eval.h2h import reward_accuracy
        from lidr.records import RecordError, load_records
        from lidr.rundir import RunDir

        run = RunDir(run_dir)
        if not run.pairs(iteration).exists():
            raise RecordError(f"{run.pairs(iteration)} not found: run the pairs stage of iteration {iteration} first")
        pairs = load_records(run.pairs(iteration))
        judge = _judge(judge_url, judge_model, judge_key_env, judge_concurrency, judge_timeout, judge_retries,
                       judge_extra, judge_cache or run.root / "eval" / "judgments-cache.jsonl", required=True)
        try:
            with progress() as bar:
                summary = reward_accuracy(judge, pairs, run.reward_accuracy_dir(iteration), seed=seed, progress=bar)
        finally:
            judge.close()
        table = Table(title=f"reward accuracy, {run.pairs(iteration)}")
        for col in ("lang", "pairs", "judge agrees", "accuracy", "95% CI", "failures"):
            table.add_column(col, justify="right")
        for lang, v in summary["languages"].items():
            table.add_row(lang, str(v["n"]), str(v["agree"]), _num(v["accuracy"]), _ci(v["ci95"]), str(v["failures"]))
        console.print(table)

    _guard(go)
