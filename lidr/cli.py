"""The `lidr` command: the whole loop (`run`) or one stage of one iteration."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

# Library chatter (weight-loading bars, deprecation notes) would drown lidr's own progress.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

from lidr.config import ConfigError, config_reference, dump_config, load_config
from lidr.console import console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Language Imbalance Driven Rewarding: a model improves itself in many languages.",
)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config; default: the built-in demo.")
SetOpt = typer.Option(None, "--set", help="Override a config field, e.g. --set training.beta=0.1 (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Redo stages whose inputs changed instead of refusing.")


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def _user_errors():
    from lidr.languages import UnknownLanguage
    from lidr.models import ModelError
    from lidr.pipeline.loop import StageConflict, StageNotReady
    from lidr.records import RecordError

    return (ConfigError, RecordError, ModelError, UnknownLanguage, StageConflict, StageNotReady)


def _make_loop(config: Optional[Path], sets: Optional[list[str]], out: Path, force: bool):
    """Config: the -c file and --set overrides; else the run folder's saved config; else the demo."""
    from lidr.pipeline.loop import Loop
    from lidr.records import atomic_write_text

    saved = out / "config.yaml"
    if config is None and saved.exists():
        cfg = load_config(saved, sets, base={})
    else:
        cfg = load_config(config, sets)
    loop = Loop(cfg, out, force=force)
    problems = loop.conflicts()
    if problems and not force:
        raise _conflict(problems)
    atomic_write_text(saved, dump_config(cfg))
    return loop


def _conflict(problems: list[str]):
    from lidr.pipeline.loop import StageConflict

    return StageConflict(
        "the configuration or inputs changed for work already done in this run folder:\n  "
        + "\n  ".join(problems)
        + "\nRe-run with --force to redo those stages (and what depends on them), or use another --out."
    )


def _guard(fn):
    try:
        fn()
    except _user_errors() as e:
        _fail(str(e))


@app.command()
def run(
    config: Optional[Path] = ConfigOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/demo, or runs/<config name>)."),
    sets: Optional[list[str]] = SetOpt,
    force: bool = ForceOpt,
):
    """Run every iteration: respond, translate, pairs, train; resumes an interrupted run."""
    out = out or Path("runs") / (config.stem if config else "demo")
    _guard(lambda: _make_loop(config, sets, out, force).run_all())


def _stage_command(stage: str, doc: str):
    def command(
        run_dir: Path = typer.Argument(..., help="An existing run folder (made by lidr run)."),
        iteration: int = typer.Option(1, "--iteration", "-i", help="Which iteration (1 = trains M1 from M0)."),
        sets: Optional[list[str]] = SetOpt,
        force: bool = ForceOpt,
    ):
        def go():
            if not (run_dir / "config.yaml").exists():
                raise ConfigError(f"{run_dir} has no config.yaml: start it with `lidr run --out {run_dir}`")
            loop = _make_loop(None, sets, run_dir, force)
            if not 1 <= iteration <= loop.cfg.iterations:
                raise ConfigError(f"--iteration must be between 1 and {loop.cfg.iterations}")
            loop.run_stage(iteration, stage)
            loop.release_backend()

        _guard(go)

    command.__doc__ = doc
    app.command(name=stage)(command)


_stage_command("respond", "Stage 1: the model answers the iteration's prompts in every language.")
_stage_command("translate", "Stage 2: the model translates its own answers (dominant <-> others).")
_stage_command("pairs", "Stage 3: build preference pairs from the language imbalance.")
_stage_command("train", "Stage 4: DPO + NLL training of the next model.")


eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a model: MGSM accuracy and off-target rate.")
app.add_typer(eval_app, name="eval")


def _eval_model(model: str, iteration: Optional[int]) -> tuple[str, str, Optional[Path]]:
    """(model spec, tag, run folder): a spec as is, or RUN_DIR with --iteration N (0 = M0)."""
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


@eval_app.command("mgsm")
def eval_mgsm(
    model: str = typer.Argument(..., help="Model spec (alias, folder, .gguf, hub id) or a run folder."),
    iteration: Optional[int] = typer.Option(None, "--iteration", "-i", help="With a run folder: M<N> (0 = base)."),
    data: str = typer.Option("hf:juletxara/mgsm", "--data", help="Folder of <lang>.jsonl (query, response) or hf:<id>."),
    languages: str = typer.Option(",".join(["bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh"]),
                                  "--languages", "-l", help="Comma-separated language codes."),
    limit: Optional[int] = typer.Option(None, "--limit", help="First N problems per language."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    batch_size: int = typer.Option(64, "--batch-size"),
    prompt_format: str = typer.Option("auto", "--prompt-format", help="auto | chat | completion"),
    dtype: str = typer.Option("auto", "--dtype"),
    responses: Optional[Path] = typer.Option(None, "--responses", help="Score answers made elsewhere (no model)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where records and summary.json go."),
):
    """MGSM accuracy (final number = gold) and off-target rate per language, with 95 % CIs."""

    def go():
        import time

        from lidr.eval import mgsm
        from lidr.languages import check_language

        langs = [check_language(l) for l in languages.split(",") if l.strip()]
        spec, tag, run_dir = _eval_model(model, iteration)
        folder = _mgsm_data(data, langs)
        items = mgsm.load_mgsm(folder, langs, limit)
        dest = out or ((run_dir / "eval" / tag / "mgsm") if run_dir else Path("evals") / tag / "mgsm")
        started = time.time()
        if responses is not None:
            summary = mgsm.score_responses(responses, items, dest)
        else:
            from lidr.backends import make_backend
            from lidr.models import check_model_spec, resolve_model
            from lidr.templates import choose_format

            check_model_spec(spec)
            path = resolve_model(spec)
            with console.status(f"loading {path}"):
                backend = make_backend("hf", path, dtype=dtype)
            fmt = choose_format(backend.tokenizer, prompt_format)
            from lidr.console import progress

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


def _print_mgsm(summary: dict, tag: str, seconds: float, dest: Path) -> None:
    from rich.table import Table

    table = Table(title=f"MGSM, {tag} ({seconds:.0f} s) -> {dest}")
    for col in ("lang", "n", "accuracy", "95% CI", "off-target", "95% CI", "no number"):
        table.add_column(col, justify="right")
    fmt = lambda ci: f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"
    for lang, v in summary["languages"].items():
        off = "-" if v["off_target_rate"] is None else f"{v['off_target_rate']:.3f}"
        table.add_row(lang, str(v["n"]), f"{v['accuracy']:.3f}", fmt(v["accuracy_ci95"]), off,
                      fmt(v["off_target_ci95"]), str(v["no_number"]))
    console.print(table)
    console.print(f"average accuracy {summary['average_accuracy']}, "
                  f"average off-target rate {summary['average_off_target_rate']}")


@app.command("config")
def config_cmd(
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    reference: bool = typer.Option(False, "--reference", help="Every field with its description."),
):
    """Print the resolved configuration (validated), or the documented reference."""
    if reference:
        sys.stdout.write(config_reference())
        return
    _guard(lambda: sys.stdout.write(dump_config(load_config(config, sets))))


if __name__ == "__main__":
    app()
