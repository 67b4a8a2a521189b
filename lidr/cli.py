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
    from lidr.errors import BackendError
    from lidr.languages import UnknownLanguage
    from lidr.models import ModelError
    from lidr.pipeline.loop import StageConflict, StageNotReady
    from lidr.records import RecordError

    return (ConfigError, RecordError, ModelError, UnknownLanguage, StageConflict, StageNotReady,
            BackendError)


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


from lidr.eval.commands import eval_app  # noqa: E402  (lidr eval mgsm | alpaca | h2h | reward-accuracy)

app.add_typer(eval_app, name="eval")


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder (made by lidr run)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where report.html and summary.md go (default RUN_DIR)."),
    examples: int = typer.Option(2, "--examples", min=0, help="Example pairs per language and iteration."),
):
    """report.html (self-contained, figures embedded) and summary.md: metrics against M0, training, pairs."""

    def go():
        from lidr.report import write_report

        with console.status("writing the report"):
            written = write_report(run_dir, out=out, examples=examples)
        for problem in written.problems:
            console.print(f"[yellow]warning:[/] {problem}")
        if written.missing:
            console.print(f"no data yet for: {', '.join(written.missing)}")
        console.print(f"wrote {written.html} and {written.markdown} ({len(written.figures)} figures)")

    _guard(go)


@app.command("plan")
def plan_cmd(
    config: Optional[Path] = ConfigOpt,
    sets: Optional[list[str]] = SetOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (shows its finished stages)."),
):
    """What a run will do (stages, generations, tokens, training steps, launchers, evaluation),
    with the config and data checked as `lidr run` checks them; loads no model."""

    def go():
        from lidr.plan import make_plan, print_plan

        root = out or Path("runs") / (config.stem if config else "demo")
        saved = root / "config.yaml"
        cfg = (load_config(saved, sets, base={}) if config is None and saved.exists()
               else load_config(config, sets))
        print_plan(make_plan(cfg, root), console)

    _guard(go)


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
