"""The run folder: where every stage's output lives, and state.json.

    RUN_DIR/config.yaml                  resolved configuration
    RUN_DIR/state.json                   stages started/finished, with input fingerprints
    RUN_DIR/iter-<t>/responses/<lang>.jsonl
    RUN_DIR/iter-<t>/translations/<src>-<tgt>.jsonl
    RUN_DIR/iter-<t>/pairs.jsonl, pairs.dropped.jsonl, pairs.summary.json
    RUN_DIR/iter-<t>/train/metrics.jsonl, summary.json
    RUN_DIR/iter-<t>/model/              M_t
    RUN_DIR/eval/M<k>/{mgsm,alpaca,likelihood}/   evaluation of M_k (summary.json each)
    RUN_DIR/eval/h2h/M<k>-vs-M0/, eval/reward-accuracy/iter-<t>/   with a judge
    RUN_DIR/eval/judgments-cache.jsonl   every judgment, keyed by judge and texts
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lidr.records import atomic_write_json

STAGES = ("respond", "translate", "pairs", "train")


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def iter(self, t: int) -> Path:
        return self.root / f"iter-{t}"

    def responses(self, t: int) -> Path:
        return self.iter(t) / "responses"

    def translations(self, t: int) -> Path:
        return self.iter(t) / "translations"

    def pairs(self, t: int) -> Path:
        return self.iter(t) / "pairs.jsonl"

    def dropped(self, t: int) -> Path:
        return self.iter(t) / "pairs.dropped.jsonl"

    def pairs_summary(self, t: int) -> Path:
        return self.iter(t) / "pairs.summary.json"

    def train_log(self, t: int) -> Path:
        return self.iter(t) / "train"

    def model(self, t: int) -> Path:
        return self.iter(t) / "model"

    def eval_dir(self, k: int) -> Path:
        """Evaluation of M_k: mgsm/, alpaca/, likelihood/ (each with summary.json)."""
        return self.root / "eval" / f"M{k}"

    def h2h_dir(self, a: int, b: int) -> Path:
        return self.root / "eval" / "h2h" / f"M{a}-vs-M{b}"

    def reward_accuracy_dir(self, t: int) -> Path:
        return self.root / "eval" / "reward-accuracy" / f"iter-{t}"

    def eval_outputs(self, k: int) -> list[Path]:
        return [self.eval_dir(k), self.h2h_dir(k, 0), self.reward_accuracy_dir(k)]

    def outputs(self, t: int, stage: str) -> list[Path]:
        """What a stage writes (removed when the stage is redone with --force)."""
        return {
            "respond": [self.responses(t)],
            "translate": [self.translations(t)],
            "pairs": [self.pairs(t), self.dropped(t), self.pairs_summary(t)],
            "train": [self.train_log(t), self.model(t)],
        }[stage]


class State:
    """state.json: for each 'iter-<t>/<stage>', its status, input fingerprint and timing."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict] = {}
        if path.exists():
            self.stages = json.loads(path.read_text(encoding="utf-8")).get("stages", {})

    def get(self, key: str) -> dict | None:
        return self.stages.get(key)

    def start(self, key: str, inputs: dict) -> None:
        self.stages[key] = {"status": "running", "inputs": inputs, "started": time.time()}
        self.save()

    def finish(self, key: str, seconds: float, summary: dict | None = None) -> None:
        rec = self.stages[key]
        rec.update(status="done", finished=time.time(), seconds=round(seconds, 2))
        if summary:
            rec["summary"] = summary
        self.save()

    def forget(self, key: str) -> None:
        self.stages.pop(key, None)
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {"stages": self.stages})
