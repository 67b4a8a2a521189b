"""Fixed costs of a stage, the plain way against lidr's, side by side in one process.

What the demo's loop pays per stage outside model compute (bench/demo.py counts it as
overhead), on the embedded gemma-3-270m:

- tokenizer: `AutoTokenizer.from_pretrained` (what lidr ran before round 7) against lidr's
  `load_tokenizer`, which runs it with automatic garbage collection paused (lidr/models.py);
  the ids of the demo prompts are compared;
- LoRA merge: PEFT's `merge_and_unload` against `lidr.pipeline.train.merge_lora` (new memory
  instead of in-place adds into the memory-mapped weights); the merged weights are compared;
- closing a generation backend: one full `gc.collect()` in this process (what `HFBackend.close`
  ran every time before round 7; now only when something still holds the model).

Each pair runs alternately, `--rounds` times; the table gives the median.

    .venv/bin/python bench/fixed_costs.py              # about a minute on 2 cores
    .venv/bin/python bench/fixed_costs.py --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each pair (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    return p.parse_args(argv)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def tokenizer_costs(model_dir: Path, rounds: int, texts: list[str]) -> dict:
    from transformers import AutoTokenizer

    import lidr.models as models

    def lidr_load():
        models._tokenizers.clear()  # as in a new process
        return models.load_tokenizer(model_dir)

    times: dict[str, list[float]] = {"plain": [], "lidr": []}
    same = True
    for _ in range(rounds):
        for name, fn in (("plain", lambda: AutoTokenizer.from_pretrained(model_dir)), ("lidr", lidr_load)):
            gc.collect()
            seconds, tok = timed(fn)
            times[name].append(seconds)
            if name == "plain":
                want = [tok(t).input_ids for t in texts]
            else:
                same = same and [tok(t).input_ids for t in texts] == want
            del tok
    return {k: statistics.median(v) for k, v in times.items()} | {"same_ids": same}


def merge_costs(model_dir: Path, rounds: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lidr.pipeline.train import merge_lora

    def lora_model():
        torch.manual_seed(0)
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
        return m

    times: dict[str, list[float]] = {"peft": [], "lidr": []}
    same = True
    for _ in range(rounds):
        merged = {}
        for name, fn in (("peft", lambda m: m.merge_and_unload()), ("lidr", merge_lora)):
            m = lora_model()
            gc.collect()
            seconds, out = timed(lambda: fn(m))
            times[name].append(seconds)
            merged[name] = out.state_dict()
            del m, out
        same = same and all(torch.equal(merged["peft"][k], merged["lidr"][k]) for k in merged["peft"])
        del merged
    return {k: statistics.median(v) for k, v in times.items()} | {"same_weights": same}


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls a renamed transformers method
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = common.machine()
    common.print_machine(info)
    from lidr.models import resolve_model
    from lidr.templates import choose_format

    model_dir = resolve_model("gemma-3-270m")
    import lidr.models as models

    fmt = choose_format(models.load_tokenizer(model_dir), "auto", None)  # also warms the file cache
    texts = [prompt for _, prompt, _ in common.demo_items(fmt, 32)]

    tok = tokenizer_costs(model_dir, args.rounds, texts)
    merge = merge_costs(model_dir, args.rounds)
    collect = statistics.median(timed(gc.collect)[0] for _ in range(max(args.rounds, 3)))
    tracked = len(gc.get_objects())

    rows = [
        ["tokenizer", "AutoTokenizer.from_pretrained", round(tok["plain"], 2),
         "load_tokenizer (gc paused)", round(tok["lidr"], 2), f"{tok['plain'] / tok['lidr']:.2f}x"],
        ["LoRA merge", "PEFT merge_and_unload", round(merge["peft"], 2),
         "merge_lora", round(merge["lidr"], 2), f"{merge['peft'] / merge['lidr']:.2f}x"],
        ["backend close", "gc.collect()", round(collect, 2), "none (model freed by refcount)", 0.0, "-"],
    ]
    print(f"medians of {args.rounds} alternating rounds; {tracked} objects tracked by gc in this process")
    print(common.table(["cost", "before", "s", "lidr", "s", "ratio"], rows))
    print(f"same ids on {len(texts)} demo prompts: {tok['same_ids']}; same merged weights: {merge['same_weights']}")
    print(common.keyvals({
        "tokenizer_plain_s": round(tok["plain"], 3), "tokenizer_lidr_s": round(tok["lidr"], 3), "merge_peft_s": round(merge["peft"], 3),
        "merge_lidr_s": round(merge["lidr"], 3), "gc_collect_s": round(collect, 3),
        "same_ids": tok["same_ids"], "same_weights": merge["same_weights"], "rounds": args.rounds,
    }))


if __name__ == "__main__":
    main()
