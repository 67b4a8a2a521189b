"""The whole demo: wall time per stage, and how much of it is not model compute.

Default: runs `lidr run` on the built-in demo config in a fresh temp folder, in this
process, with evaluation off (`--set eval.enabled=false`: the loop's four stages only;
`--eval` keeps it, when eval data is configured). Timing hooks measure model compute:

- forward: every outermost call of a transformers model (the training body) or of lidr's
  `ResponseLogProbs` (training: body + output layer) or of the decoder's per-step forward
  (`ContinuousDecoder._step`: body + output layer + the greedy choice; `_verify`: the same
  for a lone row's step that checks guessed tokens; `_fill`: a shared prefix's forward,
  which for Gemma 3 runs outside any module call: lidr/backends/gemma3_body.py);
- backward: every `torch.autograd.backward` (`loss.backward()`), checkpoint
  recomputation included.

Everything else inside a stage is "overhead": model loading and saving, tokenising,
quantizing and packing the int8 copy of the output layer (built inside the first step of
several rows, and taken out of that step's time),
the decoder's stop checks, cache joins, decoding, JSONL I/O, pair
building, collation, optimizer steps, bookkeeping. The hooks themselves cost a few
microseconds per module call (counted as overhead).

    .venv/bin/python bench/demo.py                       # the demo: ~6-10 minutes on 2 cores
    .venv/bin/python bench/demo.py --run-dir runs/demo   # read an existing run's state.json
    .venv/bin/python bench/demo.py --scaling             # LONG (~30 min on 2 cores): 1 iteration at
                                                         # 16, 32, 64 prompts per language
    .venv/bin/python bench/demo.py --set prompts.per_iteration=1 --set generation.max_new_tokens=8 \
        --set iterations=1                               # smoke test

With --run-dir there are no hooks: the train stage's model time comes from its
train/summary.json (ref + train + final pass seconds, which include collation); the
generation stages' model time is unknown.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STAGES = ("respond", "translate", "pairs", "train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, help="report on an existing run folder instead of running")
    p.add_argument("--out", type=Path, help="run folder to create (default: a temp folder, removed after)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra lidr --set overrides")
    p.add_argument("--eval", action="store_true", help="keep the run's evaluation (off by default)")
    p.add_argument("--scaling", action="store_true",
                   help="LONG: one iteration at each of --sizes prompts per language, stage times side by side")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--sizes", default="16,32,64", help="prompts per language for --scaling")
    return p.parse_args(argv)


# ---- timing hooks ------------------------------------------------------------------------

class ModelTimer:
    """Seconds spent in outermost model forward calls and in autograd backward, process-wide."""

    def __init__(self):
        self.forward = self.backward = 0.0
        self.forward_calls = self.backward_calls = 0
        self._depth, self._t0 = 0, 0.0

    def install(self) -> None:
        import torch
        from transformers import PreTrainedModel

        from lidr.pipeline.train import ResponseLogProbs

        tracked = (PreTrainedModel, ResponseLogProbs)

        def enter():
            if self._depth == 0:
                self._t0 = time.perf_counter()
            self._depth += 1

        def leave():
            self._depth -= 1
            if self._depth == 0:
                self.forward += time.perf_counter() - self._t0
                self.forward_calls += 1

        def pre(module, _args):
            if isinstance(module, tracked):
                enter()

        def post(module, _args, _out):
            if isinstance(module, tracked):
                leave()

        # generation calls the model's body, then the output layer itself (lidr/head.py)
        from lidr.backends.decode import ContinuousDecoder

        def timed(method):
            def run(decoder, *args):
                enter()
                try:
                    return method(decoder, *args)
                finally:
                    leave()
            return run

        # a step, and a lone row's step with guessed tokens: each runs its output layer too
        ContinuousDecoder._step = timed(ContinuousDecoder._step)
        ContinuousDecoder._verify = timed(ContinuousDecoder._verify)
        ContinuousDecoder._fill = timed(ContinuousDecoder._fill)  # a shared prefix's forward
        build = ContinuousDecoder._build_int8_head

        def build_outside(decoder, *args):  # quantizing and packing the output layer: overhead
            t0 = time.perf_counter()
            try:
                return build(decoder, *args)
            finally:
                self.forward -= time.perf_counter() - t0  # the step around it adds it back

        ContinuousDecoder._build_int8_head = build_outside
        torch.nn.modules.module.register_module_forward_pre_hook(pre)
        torch.nn.modules.module.register_module_forward_hook(post, always_call=True)
        original = torch.autograd.backward

        def backward(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.backward += time.perf_counter() - t0
                self.backward_calls += 1

        torch.autograd.backward = backward  # Tensor.backward calls torch.autograd.backward

    def snapshot(self) -> tuple[float, float]:
        return self.forward, self.backward


def instrument_stages(timer: ModelTimer) -> dict[str, dict]:
    """Wrap Loop._execute: per stage key, wall seconds and model forward/backward seconds."""
    from lidr.pipeline.loop import Loop

    per_stage: dict[str, dict] = {}
    original = Loop._execute

    def _execute(self, key, *args, **kwargs):
        f0, b0 = timer.snapshot()
        t0 = time.perf_counter()
        try:
            return original(self, key, *args, **kwargs)
        finally:
            f1, b1 = timer.snapshot()
            per_stage[key] = {"wall": time.perf_counter() - t0, "forward": f1 - f0, "backward": b1 - b0}

    Loop._execute = _execute
    return per_stage


def run_lidr(out: Path, sets: list[str]) -> float:
    """`lidr run --out OUT --set ...` in this process; its wall seconds."""
    from lidr.cli import app

    argv = ["run", "--out", str(out)] + [x for s in sets for x in ("--set", s)]
    print(f"lidr {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    rc = app(argv, standalone_mode=False)
    if rc not in (None, 0):
        raise SystemExit(f"lidr run failed (exit {rc})")
    return time.perf_counter() - t0


# ---- reports -----------------------------------------------------------------------------

def stage_rows(run_dir: Path, per_stage: dict | None) -> tuple[list[list], dict]:
    """Rows (iteration, stage, seconds, forward, backward, overhead, overhead %) and totals."""
    state = json.loads((run_dir / "state.json").read_text())["stages"]
    rows, tot = [], {"loop": 0.0, "model": 0.0, "known": 0.0, "forward": 0.0, "backward": 0.0}
    keys = sorted((k for k in state if k.startswith("iter-")),
                  key=lambda k: (int(k.split("/")[0][5:]), STAGES.index(k.split("/")[1])))
    for key in keys:
        rec = state[key]
        it, stage = key.split("/")
        secs = rec.get("seconds") or 0.0
        fwd = bwd = None
        if per_stage is not None and key in per_stage:
            fwd, bwd = per_stage[key]["forward"], per_stage[key]["backward"]
        elif stage == "train" and (run_dir / it / "train" / "summary.json").exists():
            s = json.loads((run_dir / it / "train" / "summary.json").read_text())
            # ref + train (+ final pass, if on): forward and backward together (and collation, optimizer steps)
            fwd, bwd = s["ref_seconds"] + s["train_seconds"] + (s.get("final_pass_seconds") or 0.0), 0.0
        elif stage == "pairs":
            fwd, bwd = 0.0, 0.0  # no model
        tot["loop"] += secs
        if fwd is not None:
            model = fwd + bwd
            tot["model"] += model
            tot["known"] += secs
            tot["forward"] += fwd
            tot["backward"] += bwd
            other = secs - model
            from_summary = per_stage is None and stage == "train"
            rows.append([it, stage, round(secs, 1), round(fwd, 1), "in fwd" if from_summary else round(bwd, 1),
                         round(other, 1),
                         f"{100 * other / secs:.0f}%" if secs else "-"])
        else:
            rows.append([it, stage, round(secs, 1), None, None, None, "-"])
    return rows, tot


def extra_rows(run_dir: Path) -> str:
    """What each stage processed (responses, translations, pairs, train steps)."""
    state = json.loads((run_dir / "state.json").read_text())["stages"]
    out = []
    for key, rec in state.items():
        s = rec.get("summary") or {}
        if key.endswith("/respond"):
            out.append(f"{key}: {s.get('responses')} responses ({s.get('hit_token_limit')} hit the token limit)")
        elif key.endswith("/translate"):
            out.append(f"{key}: {sum(v['n'] for v in s.get('translations', {}).values())} translations")
        elif key.endswith("/pairs"):
            out.append(f"{key}: {sum((s.get('kept') or {}).values())} pairs kept")
        elif key.endswith("/train"):
            out.append(f"{key}: {s.get('pairs')} pairs, {s.get('steps')} steps; ref {s.get('ref_seconds')} s, "
                       f"train {s.get('train_seconds')} s, final pass {s.get('final_pass_seconds')} s, "
                       f"save {s.get('save_seconds')} s, peak RSS {s.get('peak_rss_mb')} MB")
    return "\n".join(out)


def report(run_dir: Path, per_stage: dict | None, wall: float | None) -> dict:
    rows, tot = stage_rows(run_dir, per_stage)
    print()
    print(common.table(["iteration", "stage", "seconds", "forward s", "backward s", "overhead s", "overhead"], rows))
    print(extra_rows(run_dir))
    share = 1 - tot["model"] / tot["known"] if tot["known"] else float("nan")
    if wall is not None:
        print(f"lidr run wall {wall:.1f} s; stages {tot['loop']:.1f} s; outside the loop stages (evaluation if on, imports, config, checks) "
              f"{wall - tot['loop']:.1f} s")
    print(f"model forward {tot['forward']:.1f} s + backward {tot['backward']:.1f} s of {tot['known']:.1f} s "
          f"measured stage time -> overhead share {100 * share:.1f} %"
          + ("" if tot["known"] == tot["loop"] else f" (stages without a model-time measure left out)"))
    state = json.loads((run_dir / "state.json").read_text())["stages"]
    evals = {k: v.get("seconds") or 0.0 for k, v in state.items() if k.startswith("eval/")}
    if evals:
        print("evaluation: " + ", ".join(f"{k} {v:.1f} s" for k, v in evals.items())
              + f"; total {sum(evals.values()):.1f} s")
    return {"loop_seconds": tot["loop"], "overhead_share": share, "wall_seconds": wall if wall is not None else float("nan"),
            "model_seconds": tot["model"], "eval_seconds": sum(evals.values()) if evals else float("nan")}


def targets(fig: dict) -> None:
    ok_time, ok_share = fig["loop_seconds"] < 360, fig["overhead_share"] < 0.10
    print(f"targets: loop stages < 6 min: {'met' if ok_time else 'NOT met'} ({fig['loop_seconds'] / 60:.1f} min); "
          f"non-model overhead < 10 %: {'met' if ok_share else 'NOT met'} ({100 * fig['overhead_share']:.1f} %)")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    common.print_machine(common.machine())
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    if args.run_dir:
        fig = report(args.run_dir, None, None)
        targets(fig)
        print(common.keyvals({k: fig[k] for k in ("loop_seconds", "overhead_share", "model_seconds")}
                             | {"overhead_scope": "train+pairs_only"}))
        return

    timer = ModelTimer()
    timer.install()
    per_stage = instrument_stages(timer)
    sets = list(args.sets) + ([] if args.eval else ["eval.enabled=false"])

    if not args.scaling:
        with tempfile.TemporaryDirectory(prefix="lidr-bench-demo-") as tmp:
            out = args.out or Path(tmp) / "demo"
            wall = run_lidr(out, sets)
            print(f"finished {time.strftime('%H:%M:%S')}, load average {common.loadavg()}")
            fig = report(out, per_stage, wall)
        targets(fig)
        print(common.keyvals({"loop_seconds": fig["loop_seconds"], "overhead_share": fig["overhead_share"],
                              "wall_seconds": fig["wall_seconds"], "model_seconds": fig["model_seconds"],
                              "eval_seconds": fig["eval_seconds"]}))
        return

    # --scaling: one iteration per size, fresh folders
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for n in sizes:
        per_stage.clear()
        with tempfile.TemporaryDirectory(prefix=f"lidr-bench-scale{n}-") as tmp:
            out = Path(tmp) / f"p{n}"
            print(f"--- {n} prompts per language, load average {common.loadavg()}", flush=True)
            wall = run_lidr(out, sets + ["iterations=1", f"prompts.per_iteration={n}"])
            results[n] = (report(out, per_stage, wall), {k.split("/")[1]: v["wall"] for k, v in per_stage.items()})
    print(f"finished {time.strftime('%H:%M:%S')}, load average {common.loadavg()}")
    rows = []
    for stage in STAGES:
        secs = [results[n][1].get(stage, float("nan")) for n in sizes]
        ratios = [f"{b / a:.2f}x" if a else "-" for a, b in zip(secs, secs[1:])]
        rows.append([stage, *[round(s, 1) for s in secs], *[round(s / (4 * n), 2) for s, n in zip(secs, sizes)], *ratios])
    loops = [results[n][0]["loop_seconds"] for n in sizes]
    rows.append(["all", *[round(s, 1) for s in loops], *[round(s / (4 * n), 2) for s, n in zip(loops, sizes)],
                 *[f"{b / a:.2f}x" for a, b in zip(loops, loops[1:])]])
    print()
    print(common.table(["stage", *[f"{n} p s" for n in sizes], *[f"s/row @{n}" for n in sizes],
                        *[f"{b}/{a}" for a, b in zip(sizes, sizes[1:])]], rows))
    print("(rows = prompts x 4 languages; a ratio of 2.00x per doubling is linear growth)")
    print(common.keyvals({**{f"loop_seconds_{n}": results[n][0]["loop_seconds"] for n in sizes},
                          **{f"overhead_share_{n}": results[n][0]["overhead_share"] for n in sizes},
                          "growth_per_doubling": (loops[-1] / loops[0]) ** (1 / max(1, len(sizes) - 1))}))


if __name__ == "__main__":
    main()
