"""How stage 4 runs: in this process, or under `accelerate launch` on several GPUs.

`training.num_processes` > 1 (or a `training.accelerate_config`) runs the training as

    accelerate launch --num_processes N [--config_file F] -m lidr.pipeline.train_worker JOB.json

and waits for it: JOB.json and the examples go to the iteration's train/ folder, the
launch's output to train/launch.log, and the progress bar follows train/metrics.jsonl.
accelerate sets up the processes (DDP, DeepSpeed ZeRO, FSDP, as its config says); nothing
distributed is written by hand. Ready accelerate configs: configs/accelerate/<name>.yaml.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from lidr.config import ConfigError, TrainingConfig
from lidr.records import atomic_write_json, atomic_write_jsonl

WORKER = "lidr.pipeline.train_worker"


def accelerate_config_dirs() -> list[Path]:
    """Where a config given by name is looked up: ./configs/accelerate, then the checkout's."""
    here = Path.cwd() / "configs" / "accelerate"
    shipped = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
    return [here] if here.resolve() == shipped else [here, shipped]


def resolve_accelerate_config(spec: str | None) -> Path | None:
    """training.accelerate_config -> an existing YAML file (a path, or a name such as 'fsdp')."""
    if spec is None:
        return None
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.suffix == "" and len(p.parts) == 1:
        for d in accelerate_config_dirs():
            if (d / f"{spec}.yaml").is_file():
                return d / f"{spec}.yaml"
    names = sorted({f.stem for d in accelerate_config_dirs() if d.is_dir() for f in d.glob("*.yaml")})
    raise ConfigError(f"field 'training.accelerate_config': {spec!r} is not a file nor a known name "
                      f"({', '.join(names) or 'no configs/accelerate folder found'})")


def read_accelerate_config(path: Path) -> dict:
    """The accelerate config, checked by accelerate itself (unknown keys, missing distributed_type)."""
    import yaml

    try:
        from accelerate.commands.config.config_args import load_config_from_file

        load_config_from_file(str(path))
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - any parse problem is a config problem
        raise ConfigError(f"field 'training.accelerate_config': {path}: not a valid accelerate config ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"field 'training.accelerate_config': {path}: expected a mapping")
    return data


def launched(cfg: TrainingConfig) -> bool:
    """Whether stage 4 runs under accelerate launch (else in the calling process)."""
    return cfg.num_processes > 1 or cfg.accelerate_config is not None


def check(cfg: TrainingConfig) -> None:
    """Before any work: the accelerate config, if any, exists and accelerate accepts it."""
    conf = resolve_accelerate_config(cfg.accelerate_config)
    if conf is not None:
        read_accelerate_config(conf)


def launch_args(cfg: TrainingConfig) -> list[str]:
    """`accelerate launch` options for this training config."""
    args = ["--num_processes", str(cfg.num_processes)]
    conf = resolve_accelerate_config(cfg.accelerate_config)
    if conf is not None:
        args += ["--config_file", str(conf)]
        if "main_process_port" not in read_accelerate_config(conf):
            args += ["--main_process_port", "0"]  # a free port: two runs on one node do not collide
    else:  # plain DDP, one process per GPU (or per CPU share); dtype handling is lidr's own
        args += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", "0"]
    return args


def launch_command(cfg: TrainingConfig, job: Path | str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_args(cfg), "-m", WORKER, str(job)]


def describe(cfg: TrainingConfig) -> str:
    """One line for `lidr plan`: how stage 4 runs."""
    if not launched(cfg):
        return "in process (1 process)"
    conf = resolve_accelerate_config(cfg.accelerate_config)
    if conf is None:
        return f"accelerate launch --num_processes {cfg.num_processes} (DDP)"
    data = read_accelerate_config(conf)
    kind = str(data.get("distributed_type", "?"))
    if kind == "DEEPSPEED":
        kind += f" ZeRO-{(data.get('deepspeed_config') or {}).get('zero_stage', '?')}"
    elif kind == "FSDP":
        kind += str((data.get("fsdp_config") or {}).get("fsdp_version", 1))
    mp = data.get("mixed_precision")
    return (f"accelerate launch --num_processes {cfg.num_processes} --config_file {conf} "
            f"({kind}{', ' + mp if mp and mp != 'no' else ''})")


def train(model_path: str | Path, examples: list[dict], out_dir: str | Path, cfg: TrainingConfig, seed: int,
          log_dir: str | Path, progress: Callable[[int, int, dict], None] | None = None,
          take_model: Callable | None = None, hand_over: Callable | None = None) -> dict:
    """Stage 4, in process or under accelerate launch (same arguments and result as train_dpo_nll;
    `take_model` only where `takes_model` says so; `hand_over` is not called under a launch)."""
    if not launched(cfg):
        from lidr.pipeline.train import train_dpo_nll

        return train_dpo_nll(model_path, examples, out_dir, cfg, seed=seed, log_dir=log_dir, progress=progress,
                             take_model=take_model, hand_over=hand_over)
    if take_model is not None:
        raise ValueError("train: a model in memory cannot go to processes under accelerate launch")
    return train_launched(model_path, examples, out_dir, cfg, seed, log_dir, progress)


def takes_model(cfg: TrainingConfig, model) -> bool:
    """Whether stage 4 can train `model`, M_t already in memory as loading its files gives it (the
    generation engine's: `HFBackend.take_model`), instead of loading them again: LoRA (the base
    stays frozen) in this process, in the dtype training loads."""
    from lidr.pipeline.train import resolve_dtype

    return (not launched(cfg) and cfg.lora is not None
            and next(model.parameters()).dtype == resolve_dtype(cfg.dtype))


def train_launched(model_path, examples, out_dir, cfg: TrainingConfig, seed: int, log_dir,
                   progress: Callable[[int, int, dict], None] | None = None) -> dict:
    import torch

    from lidr.pipeline.train import planned_steps

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # processes on CPU, gloo backend
    elif torch.cuda.device_count() < cfg.num_processes:
        raise ConfigError(f"field 'training.num_processes': {cfg.num_processes} processes (one per GPU), but "
                          f"this machine shows {torch.cuda.device_count()} GPU(s)")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    metrics, summary_path, log = log_dir / "metrics.jsonl", log_dir / "summary.json", log_dir / "launch.log"
    for stale in (metrics, summary_path):  # from an interrupted earlier try
        stale.unlink(missing_ok=True)
    atomic_write_jsonl(log_dir / "examples.jsonl", examples)
    job = log_dir / "job.json"
    atomic_write_json(job, {"model": str(model_path), "examples": str(log_dir / "examples.jsonl"),
                            "out_dir": str(out_dir), "log_dir": str(log_dir), "seed": seed,
                            "training": cfg.model_dump(mode="json")})
    cmd = launch_command(cfg, job)
    total = planned_steps(len(examples), cfg.batch_size, cfg.gradient_accumulation, cfg.num_processes, cfg.epochs)
    seen = 0
    with open(log, "w", encoding="utf-8") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while True:
                rc = proc.poll()
                seen = _follow(metrics, seen, total, progress)
                if rc is not None:
                    break
                time.sleep(0.5)
        except BaseException:  # Ctrl-C or a crash here: do not leave the training processes behind
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
    if rc != 0 or not summary_path.exists():
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
        raise RuntimeError(f"training under accelerate launch failed (exit code {rc}); see {log}. Its end:\n{tail}")
    return json.loads(summary_path.read_text(encoding="utf-8"))


def _follow(metrics: Path, seen: int, total: int, progress) -> int:
    """Report the metric lines written since the last look; returns how many have been seen."""
    if progress is None or not metrics.exists():
        return seen
    lines = metrics.read_text(encoding="utf-8").splitlines()
    for line in lines[seen:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line still being written
            break
        progress(rec["step"], total, rec)
        seen += 1
    return seen


__all__ = ["check", "describe", "launch_command", "launched", "resolve_accelerate_config", "train"]
