"""Training speed and memory: lidr's `train_dpo_nll` vs TRL's `DPOTrainer` (DPO + NLL).

The same work for both: the same preference pairs (real ones from a demo run folder when
one exists, rendered exactly as lidr's train stage renders them), the same model (M0, the
embedded Gemma 3 270M, fp32 on this CPU: `training.dtype: auto`), the same LoRA (r 16,
alpha 32, dropout 0, all-linear), batch 2, no gradient accumulation, one epoch,
lr 5e-5 cosine with 10 % warm-up, beta 0.5, NLL weight 1, max length 512, no gradient
checkpointing (lidr's default; TRL's default is on, so it is switched off for TRL).

- lidr: `lidr.pipeline.train.train_dpo_nll`: reference log-probs in one no-grad pass,
  each prompt run once for both responses, logits only at response positions, then merge +
  save (and a final scoring pass for metrics with --final-metrics: `training.final_metrics`,
  off by default).
- TRL: `DPOTrainer(loss_type=["sigmoid", "sft"], loss_weights=[1, 1])` with a peft_config
  (the reference is the base model with adapters disabled, scored every step), then
  merge + save.

Each trainer runs in its own subprocess, so the peak resident memory (ru_maxrss at the
end) is its own. "train work" is what both must do to train: lidr's reference pass +
training steps vs TRL's `trainer.train()`; "end to end" adds loading, tokenising,
lidr's final metrics pass (if on), and merge + save.

    .venv/bin/python bench/train.py                  # 25 pairs: about 5 minutes on 2 cores
    .venv/bin/python bench/train.py --limit 2        # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEFAULT_PAIRS = [Path("/tmp/fresh/runs/demo/iter-1/pairs.jsonl"), common.ROOT / "runs/demo/iter-1/pairs.jsonl"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=Path, default=None,
                   help="pairs.jsonl of a run (default: the first of %s that exists, else "
                        "synthetic pairs from the demo prompts)" % ", ".join(map(str, DEFAULT_PAIRS)))
    p.add_argument("--limit", type=int, default=None, help="use only the first N pairs")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--dtype", default="auto", help="lidr training.dtype; TRL gets the dtype it resolves to")
    p.add_argument("--skip", default="", help="lidr or trl")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each trainer (default: all cores)")
    p.add_argument("--final-metrics", action="store_true",
                   help="lidr scores all pairs again after training (training.final_metrics)")
    p.add_argument("--trl-precompute-ref", action="store_true",
                   help="also let TRL precompute the reference log-probs (precompute_ref_log_probs=True)")
    # internal: one trainer in this process
    p.add_argument("--worker", choices=["lidr", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the pairs ---------------------------------------------------------------------------

def load_examples(args, fmt) -> tuple[list[dict], str]:
    """Rendered {"prompt", "chosen", "rejected"}, as lidr's train stage renders them."""
    from lidr.records import load_records

    source = args.pairs or next((p for p in DEFAULT_PAIRS if p.exists()), None)
    if source is not None:
        pairs = load_records(source)
        what = f"{source} (real pairs)"
    else:  # synthetic: the prompt's neighbours in its language (chosen) vs in English (rejected)
        rows = [json.loads(line) for line in common.DEMO_PROMPTS.read_text(encoding="utf-8").splitlines() if line]
        pairs = []
        for i in range(16):
            lang = common.DEMO_LANGS[1 + i % 3]
            near = [rows[(i + k) % len(rows)]["translations"] for k in (1, 2, 3)]
            pairs.append({"prompt": rows[i]["translations"][lang], "lang": lang,
                          "chosen": " ".join(t[lang] for t in near), "rejected": " ".join(t["en"] for t in near)})
        what = "16 synthetic pairs from the demo prompts (no run folder found)"
    if args.limit:
        pairs = pairs[: args.limit]
    examples = [{"prompt": fmt.response_prompt(p["prompt"], p["lang"]), "chosen": fmt.response_text(p["chosen"]),
                 "rejected": fmt.response_text(p["rejected"])} for p in pairs]
    return examples, what


# ---- workers (each in its own process) ------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker_lidr(job: dict) -> dict:
    from lidr.config import LoraConfig, TrainingConfig
    from lidr.pipeline.train import train_dpo_nll

    cfg = TrainingConfig(beta=0.5, nll_weight=1.0, learning_rate=5e-5, epochs=1, batch_size=job["batch_size"],
                         gradient_accumulation=job["grad_accum"], lr_scheduler="cosine", warmup_ratio=0.1,
                         max_length=512, lora=LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear"),
                         dtype=job["dtype"], gradient_checkpointing=False,
                         final_metrics=job.get("final_metrics", False))
    work = Path(job["workdir"])
    start = time.perf_counter()
    s = train_dpo_nll(job["model"], job["examples"], work / "lidr-model", cfg, seed=0, log_dir=work / "lidr-log")
    total = time.perf_counter() - start
    steps = [json.loads(line) for line in (work / "lidr-log" / "metrics.jsonl").read_text().splitlines()]
    parts = {"ref": s["ref_seconds"], "train": s["train_seconds"]}
    if s.get("final_pass_seconds") is not None:  # only with training.final_metrics
        parts["final pass"] = s["final_pass_seconds"]
    parts["merge+save"] = s["save_seconds"]
    parts = {"load+tokenise": total - sum(parts.values()), **parts}
    return {"total": total, "work": s["ref_seconds"] + s["train_seconds"], "parts": parts, "steps": s["steps"],
            "dtype": s["dtype"], "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"]}


def worker_trl(job: dict, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from lidr.pipeline.train import resolve_dtype

    dtype = resolve_dtype(job["dtype"])
    work = Path(job["workdir"])
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype)
    args = DPOConfig(
        output_dir=str(work / "trl-out"), beta=0.5, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
        max_length=512, per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=job["grad_accum"], num_train_epochs=1, learning_rate=5e-5,
        lr_scheduler_type="cosine", warmup_steps=0.1, bf16=dtype == torch.bfloat16, use_cpu=True,
        gradient_checkpointing=False, precompute_ref_log_probs=precompute, report_to="none", save_strategy="no",
        logging_steps=1, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(job["examples"]),
                         peft_config=peft)
    t_train = time.perf_counter()
    out = trainer.train()
    t_save = time.perf_counter()
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(work / "trl-model", safe_serialization=True)
    tok.save_pretrained(work / "trl-model")
    end = time.perf_counter()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"total": end - start, "work": t_save - t_train,
            "parts": {"load+tokenise": t_train - start, "train": t_save - t_train, "merge+save": end - t_save},
            "steps": out.global_step, "dtype": str(dtype).removeprefix("torch."),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def run_worker(args) -> None:
    job = json.loads(args.job.read_text())
    job["examples"] = [json.loads(line) for line in Path(job["examples_file"]).read_text().splitlines()]
    if job.get("threads"):
        import torch

        torch.set_num_threads(job["threads"])
    if args.worker == "lidr":
        result = worker_lidr(job)
    else:
        result = worker_trl(job, job.get("precompute", False))
    result["peak_rss_mb"] = peak_rss_mb()
    Path(job["result"]).write_text(json.dumps(result))


def spawn(name: str, job: dict, workdir: Path) -> dict:
    """Run one trainer in a fresh Python process; its result JSON."""
    job = {**job, "result": str(workdir / f"{name}.result.json")}
    job_file = workdir / f"{name}.job.json"
    job_file.write_text(json.dumps(job))
    log = workdir / f"{name}.log"
    kind = "trl" if name.startswith("trl") else "lidr"
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, __file__, "--worker", kind, "--job", str(job_file)],
                            stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.stdout.write(log.read_text()[-3000:])
        raise SystemExit(f"{name} worker failed (exit {rc}); log {log}")
    return json.loads(Path(job["result"]).read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    from lidr.models import load_tokenizer, resolve_model
    from lidr.templates import choose_format

    common.print_machine(common.machine())
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    model = resolve_model(args.model)
    tok = load_tokenizer(model)
    fmt = choose_format(tok, "auto")
    examples, what = load_examples(args, fmt)
    n = len(examples)
    lengths = [len(tok(e["prompt"] + e["chosen"], add_special_tokens=False).input_ids) +
               len(tok(e["rejected"], add_special_tokens=False).input_ids) for e in examples]
    print(f"pairs: {n} from {what}; mean prompt+chosen+rejected {sum(lengths) / n:.0f} tokens; "
          f"batch {args.batch_size} x accumulation {args.grad_accum}")

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    runs = [r for r in ("lidr", "trl") if r not in skip] + (["trl-precompute"] if args.trl_precompute_ref else [])
    results = {}
    with tempfile.TemporaryDirectory(prefix="lidr-bench-train-") as tmp:
        workdir = Path(tmp)
        ex_file = workdir / "examples.jsonl"
        ex_file.write_text("".join(json.dumps(e) + "\n" for e in examples))
        job = {"model": str(model), "examples_file": str(ex_file), "workdir": tmp, "batch_size": args.batch_size,
               "grad_accum": args.grad_accum, "dtype": args.dtype, "threads": args.threads,
               "final_metrics": args.final_metrics}
        for name in runs:
            print(f"running {name} ... load average {common.loadavg()}", flush=True)
            results[name] = spawn(name, {**job, "precompute": name == "trl-precompute"}, workdir)
    print(f"finished {time.strftime('%H:%M:%S')}, load average {common.loadavg()}")

    rows = []
    for name, r in results.items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["parts"].items())
        rows.append([name, r["dtype"], r["steps"], round(r["work"], 1), round(r["work"] / n, 2), round(r["total"], 1),
                     round(r["total"] / n, 2), round(r["peak_rss_mb"]), f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}",
                     parts])
    print()
    print(common.table(["trainer", "dtype", "steps", "train work s", "s/pair", "end-to-end s", "s/pair (e2e)",
                        "peak RSS MB", "loss first -> last", "seconds by part"], rows))

    nan = float("nan")
    lidr, trl = results.get("lidr"), results.get("trl")
    speed = trl["work"] / lidr["work"] if lidr and trl else nan
    speed_e2e = trl["total"] / lidr["total"] if lidr and trl else nan
    mem = lidr["peak_rss_mb"] / trl["peak_rss_mb"] if lidr and trl else nan
    print()
    print(f"target: >= 4x TRL's pairs/s at no more peak memory: "
          f"{'met' if speed >= 4 and mem <= 1 else 'NOT met'} ({speed:.2f}x train work, {speed_e2e:.2f}x end to end, "
          f"peak memory ratio {mem:.2f})")
    figures = {"speedup_vs_trl": speed, "peak_mem_ratio_vs_trl": mem, "speedup_vs_trl_end_to_end": speed_e2e,
               "lidr_s_per_pair": lidr["work"] / n if lidr else nan, "trl_s_per_pair": trl["work"] / n if trl else nan,
               "lidr_peak_mb": lidr["peak_rss_mb"] if lidr else nan, "trl_peak_mb": trl["peak_rss_mb"] if trl else nan}
    if "trl-precompute" in results and lidr:
        figures["speedup_vs_trl_precompute"] = results["trl-precompute"]["work"] / lidr["work"]
    figures["pairs"] = n
    print(common.keyvals(figures))


if __name__ == "__main__":
    main()
