"""One training process under `accelerate launch` (stage 4 on several GPUs).

    accelerate launch --num_processes N [--config_file F] -m lidr.pipeline.train_worker JOB.json

JOB.json (written by `lidr.pipeline.launch`): {"model": folder, "examples": JSONL of
{"prompt", "chosen", "rejected"} (rendered text), "out_dir", "log_dir", "seed",
"training": the config's training section}. Every process runs `train_dpo_nll` on the
same job; accelerate has set up the process group, each process trains on its share.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: accelerate launch [...] -m lidr.pipeline.train_worker JOB.json")
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))

    from lidr.config import TrainingConfig
    from lidr.pipeline.train import train_dpo_nll
    from lidr.records import read_jsonl

    cfg = TrainingConfig.model_validate(job["training"])
    examples = [rec for _, rec in read_jsonl(job["examples"])]
    train_dpo_nll(job["model"], examples, job["out_dir"], cfg, seed=job["seed"], log_dir=job["log_dir"])
    # Tear the process group down before exiting, as accelerate's `end_training` does, rather
    # than leave gloo's threads to interpreter exit. (One CI run of the two-process test lost a
    # worker to "terminate called without an active exception", SIGABRT; 11 reruns did not.)
    from accelerate import PartialState

    PartialState().destroy_process_group()


if __name__ == "__main__":
    main()
