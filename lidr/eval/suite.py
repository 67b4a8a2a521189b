"""The configured evaluation of one model (the run config's `eval` section), shared by
`lidr run` (M0 … Mn) and the `lidr eval` commands.

`prepare` checks the data before any model loads; `evaluate_model` runs, for one
model: MGSM (accuracy, off-target), X-AlpacaEval answers (off-target, and win rate
against the reference when a judge is set) and the reference likelihood. The answers
of both benchmarks come from one decoding run. Each part writes its own folder under
the model's eval folder and resumes where it stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lidr.config import EvalConfig
from lidr.eval.mgsm import MGSM_LANGUAGES
from lidr.languages import check_language
from lidr.records import RecordError


@dataclass
class EvalPlan:
    root: Path  # the data folder (layout of shared/datasets)
    mgsm: dict[str, list[dict]] | None = None
    alpaca: dict[str, list[dict]] | None = None
    notes: list[str] = field(default_factory=list)


def data_root(cfg: EvalConfig) -> Path | None:
    value = cfg.data or os.environ.get("LIDR_DATA")
    return Path(value).expanduser() if value else None


def prepare(cfg: EvalConfig, run_langs: list[str]) -> EvalPlan | None:
    """Load and check the evaluation data (errors name the file); None when evaluation is
    off or no data folder is configured."""
    from lidr.eval.alpaca import ALPACA_DIR, alpaca_languages, load_alpaca
    from lidr.eval.mgsm import load_mgsm

    root = data_root(cfg)
    if not cfg.enabled or root is None:
        return None
    if not root.is_dir():
        src = "eval.data" if cfg.data else "$LIDR_DATA"
        raise RecordError(f"{src}: evaluation data folder {root} does not exist")
    plan = EvalPlan(root)
    if cfg.mgsm is not None:
        langs = [check_language(l) for l in (cfg.mgsm.languages or MGSM_LANGUAGES)]
        plan.mgsm = load_mgsm(root / "mgsm", langs, cfg.mgsm.limit)
    if cfg.alpaca is not None:
        folder = root / ALPACA_DIR
        available = alpaca_languages(folder)
        if cfg.alpaca.languages:
            langs = [check_language(l) for l in cfg.alpaca.languages]
        else:
            langs = [l for l in run_langs if l in available]
            missing = [l for l in run_langs if l not in available]
            if missing:
                plan.notes.append(f"X-AlpacaEval has no data for {', '.join(missing)} in {folder}")
        plan.alpaca = load_alpaca(folder, langs, cfg.alpaca.limit) if langs else None
    return plan


def evaluate_model(backend, fmt, plan: EvalPlan, cfg: EvalConfig, out_dir: Path, *, generator: str,
                   batch_size: int, repetition_penalty: float = 1.0, judge=None, seed: int = 0,
                   progress=None) -> dict:
    """Run every configured benchmark on one loaded model; returns the headline numbers."""
    from lidr.eval import alpaca, answers, likelihood, mgsm

    out: dict = {}
    # MGSM and X-AlpacaEval answers decode in one run (each row with its own limit and
    # penalty): one tail of long answers instead of two.
    sets = []
    if plan.mgsm:
        sets.append(mgsm.answer_set(fmt, plan.mgsm, out_dir / "mgsm", max_new_tokens=cfg.mgsm.max_new_tokens,
                                    repetition_penalty=1.0))
    if plan.alpaca:
        sets.append(alpaca.answer_set(fmt, plan.alpaca, out_dir / "alpaca", max_new_tokens=cfg.alpaca.max_new_tokens,
                                      repetition_penalty=repetition_penalty))
    answers.generate(backend, sets, batch_size=batch_size, progress=progress)

    if plan.mgsm:
        s = mgsm.write_summary(out_dir / "mgsm", list(plan.mgsm))
        out["mgsm_accuracy"], out["mgsm_off_target"] = s["average_accuracy"], s["average_off_target_rate"]
    if plan.alpaca:
        dest = out_dir / "alpaca"
        alpaca.export_model_outputs(dest, plan.alpaca, generator)
        failures = None
        if judge is not None:
            failures = alpaca.judge_against_reference(judge, plan.alpaca, dest, seed=seed, progress=progress)
        s = alpaca.summarize(dest, plan.alpaca, judge.describe() if judge else None, failures)
        out["alpaca_off_target"], out["alpaca_win_rate"] = s["average_off_target_rate"], s["average_win_rate"]
        out["judge_failures"] = s["judge_failures"]
        if cfg.alpaca.likelihood and hasattr(backend, "model"):
            s = likelihood.reference_loglik(backend.model, backend.tokenizer, fmt, plan.alpaca, out_dir / "likelihood",
                                            max_tokens=cfg.alpaca.likelihood_max_tokens,
                                            batch_size=max(1, min(batch_size, 8)), progress=progress)
            out["reference_logprob"] = s["average_mean_logprob"]
    return out
