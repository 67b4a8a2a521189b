"""Training speed and memory: lidr's `train_dpo_nll` vs TRL's `DPOTrainer` vs a hand-written loop (DPO + NLL).

The same work for all three: the same preference pairs (real ones from a demo run folder when
one exists, rendered exactly as lidr's train stage renders them), the same model (M0, the
embedded Gemma 3 270M, fp32 on this CPU: `training.dtype: auto`), the same LoRA (r 16,
alpha 32, dropout 0, all-linear), batch 2, no gradient accumulation, one epoch,
lr 5e-5 cosine with 10 % warm-up, beta 0.5, NLL weight 1, max length 512, no gradient
checkpointing (lidr's default; TRL's default is on, so it is switched off for TRL), gradient
norm clipped at 1, AdamW without weight decay.

- lidr: `lidr.pipeline.train.train_dpo_nll`: reference log-probs in one no-grad pass,
  each prompt run once for both responses, the responses packed without padding, the frozen
  layers through oneDNN with prepacked weights, logits only at response positions, then merge +
  save (and a final scoring pass for metrics with --final-metrics: `training.final_metrics`,
  off by default).
- TRL: `DPOTrainer(loss_type=["sigmoid", "sft"], loss_weights=[1, 1])` with a peft_config
  (the reference is the base model with adapters disabled, scored every step), then
  merge + save.
- hand: a plain PyTorch loop (transformers + peft, none of lidr's trainer code): reference
  log-probs once before training (adapters disabled, inference mode, batched); each step one
  forward of the 2B right-padded prompt+chosen / prompt+rejected rows through the decoder
  body, the output layer and log_softmax only on the response positions, DPO sigmoid +
  NLL, backward, clip, fused AdamW, cosine schedule; then merge + save. The same batches
  as lidr (its shuffle with seed 0, sorted by prompt in windows, rewritten here), so the
  losses compare.

Each trainer runs in its own subprocess, so the peak resident memory (ru_maxrss at the
end) is its own. "train work" is what each must do to train: the reference pass + training
steps (lidr, hand) vs TRL's `trainer.train()`; "end to end" adds loading, tokenising,
lidr's final metrics pass (if on), and merge + save. speedup_vs_hand = hand train work /
lidr train work: >= 0.77 means lidr is within 1.3x of the hand loop.

    .venv/bin/python bench/train.py                  # 25 pairs: about 7-8 minutes on 2 cores
    .venv/bin/python bench/train.py --limit 2        # smoke test
    .venv/bin/python bench/train.py --skip trl       # lidr and the hand loop only
    python bench/train.py --device cuda --synthetic 64 --model DIR   # on a GPU (peak memory: the GPU's)
    python bench/train.py --device cuda --synthetic 64 --model DIR --no-cudnn-attention  # ... TRL and hand loop without cuDNN attention too
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
TRAINERS = ("lidr", "hand", "trl")
# the job, the same for every trainer
BETA, NLL_WEIGHT, LR, WARMUP_RATIO, MAX_LENGTH, SEED = 0.5, 1.0, 5e-5, 0.1, 512, 0
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


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
    p.add_argument("--skip", default="", help="trainers not to run, comma-separated: lidr, hand, trl")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each trainer (default: all cores)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where every trainer runs (default cpu; cuda: peak memory is the GPU's, allocated by torch)")
    p.add_argument("--no-cudnn-attention", action="store_true",
                   help="on a GPU, TRL and the hand loop too without cuDNN's attention kernel, as lidr trains "
                        "(lidr.models.gpu_attention); without it they keep torch's choice")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="N synthetic pairs from the demo prompts instead of a run's pairs")
    p.add_argument("--final-metrics", action="store_true",
                   help="lidr scores all pairs again after training (training.final_metrics)")
    p.add_argument("--trl-precompute-ref", action="store_true",
                   help="also let TRL precompute the reference log-probs (precompute_ref_log_probs=True)")
    # internal: one trainer in this process
    p.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- the pairs ---------------------------------------------------------------------------

def load_examples(args, fmt) -> tuple[list[dict], str]:
    """Rendered {"prompt", "chosen", "rejected"}, as lidr's train stage renders them."""
    from lidr.records import load_records

    if args.pairs is not None and not args.pairs.is_file():
        raise SystemExit(f"--pairs {args.pairs}: no such file")
    source = None if args.synthetic else args.pairs or next((p for p in DEFAULT_PAIRS if p.exists()), None)
    if source is not None:
        pairs = load_records(source)
        if not pairs:
            raise SystemExit(f"{source}: no pairs in the file")
        what = f"{source} (real pairs)"
    else:  # synthetic: the prompt's neighbours in its language (chosen) vs in English (rejected)
        rows = [json.loads(line) for line in common.DEMO_PROMPTS.read_text(encoding="utf-8").splitlines() if line]
        pairs = []
        for i in range(args.synthetic or 16):
            lang = common.DEMO_LANGS[1 + i % 3]
            near = [rows[(i + k) % len(rows)]["translations"] for k in (1, 2, 3)]
            pairs.append({"prompt": rows[i % len(rows)]["translations"][lang], "lang": lang,
                          "chosen": " ".join(t[lang] for t in near), "rejected": " ".join(t["en"] for t in near)})
        what = (f"{len(pairs)} synthetic pairs from the demo prompts"
                + ("" if args.synthetic else " (no run folder found)"))
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

    cfg = TrainingConfig(beta=BETA, nll_weight=NLL_WEIGHT, learning_rate=LR, epochs=1, batch_size=job["batch_size"],
                         gradient_accumulation=job["grad_accum"], lr_scheduler="cosine", warmup_ratio=WARMUP_RATIO,
                         max_length=MAX_LENGTH, lora=LoraConfig(**LORA),
                         dtype=job["dtype"], gradient_checkpointing=False,
                         final_metrics=job.get("final_metrics", False))
    work = Path(job["workdir"])
    start = time.perf_counter()
    s = train_dpo_nll(job["model"], job["examples"], work / "lidr-model", cfg, seed=SEED, log_dir=work / "lidr-log")
    total = time.perf_counter() - start
    steps = [json.loads(line) for line in (work / "lidr-log" / "metrics.jsonl").read_text().splitlines()]
    parts = {"ref": s["ref_seconds"], "train": s["train_seconds"]}
    if s.get("final_pass_seconds") is not None:  # only with training.final_metrics
        parts["final pass"] = s["final_pass_seconds"]
    parts["merge+save"] = s["save_seconds"]
    parts = {"load+tokenise": total - sum(parts.values()), **parts}
    return {"total": total, "work": s["ref_seconds"] + s["train_seconds"], "parts": parts, "steps": s["steps"],
            "dtype": s["dtype"], "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
            "losses": [r["loss"] for r in steps]}


def worker_trl(job: dict, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from lidr.models import causal_lm
    from lidr.pipeline.train import resolve_dtype

    dtype = resolve_dtype(job["dtype"])
    work = Path(job["workdir"])
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(job["model"])
    # from_pretrained without the Hub's kernels, as lidr loads: transformers' default fetches
    # layers from the Hub at .train(), which fails offline on a GPU
    model = causal_lm(job["model"], dtype=dtype)
    args = DPOConfig(
        output_dir=str(work / "trl-out"), beta=BETA, loss_type=["sigmoid", "sft"], loss_weights=[1.0, NLL_WEIGHT],
        max_length=MAX_LENGTH, per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=job["grad_accum"], num_train_epochs=1, learning_rate=LR,
        lr_scheduler_type="cosine", warmup_steps=WARMUP_RATIO, bf16=dtype == torch.bfloat16,
        use_cpu=job["device"] == "cpu",
        gradient_checkpointing=False, precompute_ref_log_probs=precompute, report_to="none", save_strategy="no",
        logging_steps=1, seed=SEED, dataloader_num_workers=0, disable_tqdm=True,
    )
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
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


def worker_hand(job: dict) -> dict:
    """A plain PyTorch DPO + NLL loop: transformers + peft only, none of lidr's trainer code."""
    import math
    import random

    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    from lidr.models import causal_lm  # from_pretrained without the Hub's kernels
    from lidr.pipeline.train import resolve_dtype  # the dtype the other workers get ("auto": fp32 here)

    dtype = resolve_dtype(job["dtype"])
    device = torch.device(job["device"])
    bs, accum, examples = job["batch_size"], job["grad_accum"], job["examples"]
    work = Path(job["workdir"])
    start = time.perf_counter()
    torch.manual_seed(SEED)

    # tokens: prompt and responses apart (the texts are rendered already), then concatenated
    tok = AutoTokenizer.from_pretrained(job["model"])
    pad = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
    enc = lambda key: tok([e[key] for e in examples], add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = []
    for p, c, r in zip(enc("prompt"), enc("chosen"), enc("rejected")):
        longest = max(len(c), len(r))
        if len(p) + longest > MAX_LENGTH:  # prompt loses its start (keeps half the room), responses their end
            p = p[len(p) - max(MAX_LENGTH - longest, min(len(p), MAX_LENGTH // 2)):]
            c, r = c[:MAX_LENGTH - len(p)], r[:MAX_LENGTH - len(p)]
        pairs.append((p, c, r))
    n = len(pairs)

    model = causal_lm(job["model"], dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    causal = model.get_base_model()
    body, head = causal.model, causal.get_output_embeddings()  # decoder (LoRA layers in place), output layer
    softcap = getattr(causal.config, "final_logit_softcapping", None)

    def batch(idx: list[int]):
        """2B right-padded rows, prompt+chosen then prompt+rejected; which positions predict a response token."""
        rows = [pairs[i][0] + pairs[i][1] for i in idx] + [pairs[i][0] + pairs[i][2] for i in idx]
        plen = torch.tensor([len(pairs[i][0]) for i in idx] * 2)[:, None]
        rlen = torch.tensor([len(x) for x in rows])[:, None]
        width = int(rlen.max())
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in rows])
        t = torch.arange(width - 1)[None]
        predicts = (t >= plen - 1) & (t < rlen - 1)  # position t predicts token t+1
        return (ids.to(device), (torch.arange(width)[None] < rlen).long().to(device), predicts.to(device),
                (rlen - plen).to(device))

    def seq_logps(ids, mask, predicts):
        """Summed log-prob of each row's response tokens: the head on the response positions only."""
        hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][predicts]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        lp = logits.log_softmax(-1).gather(-1, ids[:, 1:][predicts][:, None]).squeeze(-1)
        return lp.new_zeros(len(ids)).index_add(0, predicts.nonzero()[:, 0], lp)

    # reference log-probs, once: adapters off, longest pairs first, 2B pairs (4B rows) per forward
    t_ref = time.perf_counter()
    length = [len(p) + max(len(c), len(r)) for p, c, r in pairs]
    order = sorted(range(n), key=length.__getitem__, reverse=True)
    ref = torch.zeros(n, 2, device=device)
    model.eval()
    with torch.inference_mode(), model.disable_adapter():
        for s in range(0, n, 2 * bs):
            idx = order[s:s + 2 * bs]
            ids, mask, predicts, _ = batch(idx)
            ref[idx] = seq_logps(ids, mask, predicts).view(2, -1).T
    ref = ref.clone()  # a normal tensor outside inference mode
    model.train()

    # the batches: lidr's plan for a model whose batches it packs (sdpa attention, as here):
    # shuffle, sort by the prompts' token ids in windows of 50 batches, shuffle the batches
    rng = random.Random(SEED)
    shuffled = list(range(n))
    rng.shuffle(shuffled)
    batches = []
    for s in range(0, n, bs * 50):
        window = sorted(shuffled[s:s + bs * 50], key=lambda i: pairs[i][0])
        batches += [window[i:i + bs] for i in range(0, len(window), bs)]
    rng.shuffle(batches)
    groups = [batches[s:s + accum] for s in range(0, len(batches), accum)]  # one optimizer step each

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(WARMUP_RATIO * len(groups)), len(groups))
    t_train = time.perf_counter()
    losses = []
    for group in groups:
        in_step, step_loss = sum(map(len, group)), 0.0
        for idx in group:
            ids, mask, predicts, ntok = batch(idx)
            chosen, rejected = seq_logps(ids, mask, predicts).chunk(2)
            margin = BETA * ((chosen - ref[idx, 0]) - (rejected - ref[idx, 1]))
            per_pair = -F.logsigmoid(margin) + NLL_WEIGHT * (-chosen / ntok[:len(idx), 0])  # NLL: mean per token
            loss = per_pair.sum() / in_step  # the mean over the step's pairs
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
    t_save = time.perf_counter()
    merged = model.merge_and_unload()
    merged.save_pretrained(work / "hand-model", safe_serialization=True)
    tok.save_pretrained(work / "hand-model")
    end = time.perf_counter()
    return {"total": end - start, "work": t_save - t_ref,
            "parts": {"load+tokenise": t_ref - start, "ref": t_train - t_ref, "train": t_save - t_train,
                      "merge+save": end - t_save},
            "steps": len(groups), "dtype": str(dtype).removeprefix("torch."),
            "first_loss": losses[0], "last_loss": losses[-1], "losses": losses}


def run_worker(args) -> None:
    job = json.loads(args.job.read_text())
    import contextlib

    import torch

    from lidr.models import gpu_attention

    job["examples"] = [json.loads(line) for line in Path(job["examples_file"]).read_text().splitlines()]
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    # --no-cudnn-attention: the other trainers as lidr trains on a GPU (its own forwards always
    # leave cuDNN's attention out, since round 22): the baselines on the same kernels
    no_cudnn = job.get("no_cudnn_attention", False)
    with gpu_attention(torch.device(job["device"])) if no_cudnn else contextlib.nullcontext():
        if args.worker == "lidr":
            result = worker_lidr(job)
        elif args.worker == "hand":
            result = worker_hand(job)
        else:
            result = worker_trl(job, job.get("precompute", False))
    result["peak_rss_mb"] = peak_rss_mb()
    if job["device"] == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(job["result"]).write_text(json.dumps(result))


def spawn(name: str, job: dict, workdir: Path) -> dict:
    """Run one trainer in a fresh Python process; its result JSON."""
    job = {**job, "result": str(workdir / f"{name}.result.json")}
    job_file = workdir / f"{name}.job.json"
    job_file.write_text(json.dumps(job))
    log = workdir / f"{name}.log"
    kind = name.split("-")[0]  # lidr, hand, trl (trl-precompute: trl)
    # on a CPU every trainer runs there, lidr's too (Accelerate would take a GPU it sees)
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if job["device"] == "cpu" else {})}
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, __file__, "--worker", kind, "--job", str(job_file)],
                            stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
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
    if args.device == "cuda":
        import torch

        print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
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
    unknown = skip - set(TRAINERS)
    if unknown:
        raise SystemExit(f"--skip: unknown trainer(s) {', '.join(sorted(unknown))}; choose from {', '.join(TRAINERS)}")
    runs = [r for r in TRAINERS if r not in skip] + (["trl-precompute"] if args.trl_precompute_ref else [])
    results = {}
    with tempfile.TemporaryDirectory(prefix="lidr-bench-train-") as tmp:
        workdir = Path(tmp)
        ex_file = workdir / "examples.jsonl"
        ex_file.write_text("".join(json.dumps(e) + "\n" for e in examples))
        job = {"model": str(model), "examples_file": str(ex_file), "workdir": tmp, "batch_size": args.batch_size,
               "grad_accum": args.grad_accum, "dtype": args.dtype, "threads": args.threads,
               "final_metrics": args.final_metrics, "device": args.device,
               "no_cudnn_attention": args.no_cudnn_attention}
        for name in runs:
            print(f"running {name} ... load average {common.loadavg()}", flush=True)
            results[name] = spawn(name, {**job, "precompute": name == "trl-precompute"}, workdir)
    print(f"finished {time.strftime('%H:%M:%S')}, load average {common.loadavg()}")

    # peak memory: the process's resident set on a CPU; on a GPU, what torch allocated there
    peak, peak_label = ("peak_gpu_mb", "peak GPU MB") if args.device == "cuda" else ("peak_rss_mb", "peak RSS MB")
    rows = []
    for name, r in results.items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["parts"].items())
        rows.append([name, r["dtype"], r["steps"], round(r["work"], 1), round(r["work"] / n, 2), round(r["total"], 1),
                     round(r["total"] / n, 2), round(r[peak]), f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}",
                     parts])
    print()
    print(common.table(["trainer", "dtype", "steps", "train work s", "s/pair", "end-to-end s", "s/pair (e2e)",
                        peak_label, "loss first -> last", "seconds by part"], rows))

    nan = float("nan")
    lidr, trl = results.get("lidr"), results.get("trl")
    speed = trl["work"] / lidr["work"] if lidr and trl else nan
    speed_e2e = trl["total"] / lidr["total"] if lidr and trl else nan
    mem = lidr[peak] / trl[peak] if lidr and trl else nan
    print()
    verdict = "not run" if speed != speed else "met" if speed >= 4 and mem <= 1 else "NOT met"
    print(f"target: >= 4x TRL's pairs/s at no more peak memory: {verdict} ({speed:.2f}x train work, "
          f"{speed_e2e:.2f}x end to end, peak memory ratio {mem:.2f})")
    hand = results.get("hand")
    speed_hand = hand["work"] / lidr["work"] if lidr and hand else nan
    print(f"vs the hand-written loop: hand train work / lidr train work = {speed_hand:.2f} "
          f"(>= {1 / 1.3:.2f} means lidr is within 1.3x of the hand loop: "
          f"{'not run' if speed_hand != speed_hand else 'met' if speed_hand >= 1 / 1.3 else 'NOT met'}; "
          f"> 1: lidr is faster)")
    if lidr and hand:
        diff = max(abs(a - b) for a, b in zip(lidr["losses"], hand["losses"]))
        print(f"same batches, same loss: first step lidr {lidr['first_loss']:.6f}, hand {hand['first_loss']:.6f}; "
              f"largest step-loss difference over {min(len(lidr['losses']), len(hand['losses']))} steps {diff:.2g}")
    figures = {"speedup_vs_trl": speed, "peak_mem_ratio_vs_trl": mem, "speedup_vs_trl_end_to_end": speed_e2e,
               "lidr_s_per_pair": lidr["work"] / n if lidr else nan, "trl_s_per_pair": trl["work"] / n if trl else nan,
               "lidr_peak_mb": lidr[peak] if lidr else nan, "trl_peak_mb": trl[peak] if trl else nan,
               "speedup_vs_hand": speed_hand, "hand_s_per_pair": hand["work"] / n if hand else nan,
               "hand_peak_mb": hand[peak] if hand else nan}
    if "trl-precompute" in results and lidr:
        figures["speedup_vs_trl_precompute"] = results["trl-precompute"]["work"] / lidr["work"]
    figures["pairs"] = n
    print(common.keyvals(figures))


if __name__ == "__main__":
    main()
