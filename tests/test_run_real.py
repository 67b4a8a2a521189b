"""The whole loop on the real embedded model (Gemma 3 270M from PyPI): one iteration end
to end, a run killed (SIGKILL) inside each stage and resumed, and changed inputs refused.

Slow (a few minutes): short generations, 3 prompts in 3 languages. The first run on a
machine also converts the GGUF file once (about two minutes), cached in ~/.cache/lidr.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lidr.records import load_records

pytestmark = pytest.mark.slow

CONFIG = """\
model: gemma-3-270m
languages: {dominant: en, others: [es, de]}
prompts: {per_iteration: 3}
iterations: 1
generation: {max_new_tokens: 24, translation_max_new_tokens: 40, batch_size: 1}
training: {learning_rate: 5.0e-5, max_length: 192, batch_size: 2, gradient_accumulation: 1}
eval: {enabled: false}
"""
LANGS = ["en", "es", "de"]


def lidr(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lidr", *map(str, args)], capture_output=True, text=True,
                          timeout=1200, **kw)


def start(cfg: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lidr", "run", "-c", str(cfg), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def cfg_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def reference(cfg_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ref"
    r = lidr("run", "-c", cfg_file, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def by_id(path: Path) -> dict:
    recs = load_records(path)
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), f"duplicate records in {path}"
    return {r["id"]: r for r in recs}


def test_one_iteration_end_to_end(reference: Path):
    it = reference / "iter-1"
    for lang in LANGS:
        recs = by_id(it / "responses" / f"{lang}.jsonl")
        assert len(recs) == 3
        for r in recs.values():
            assert set(r) == {"id", "lang", "prompt", "response", "finish_reason"} and r["lang"] == lang
    for direction in ("en-es", "en-de", "es-en", "de-en"):
        for r in by_id(it / "translations" / f"{direction}.jsonl").values():
            assert set(r) == {"id", "src", "tgt", "text", "translation", "ok", "raw"}
            assert r["ok"] == (r["translation"] is not None)
    pairs = load_records(it / "pairs.jsonl")
    assert pairs, "no preference pairs kept"
    assert {p["kind"] for p in pairs} <= {"translated_beats_native", "native_beats_backtranslated", "translation_task"}
    for p in pairs:
        assert p["chosen"].strip() and p["chosen"] != p["rejected"]
    metrics = load_records(it / "train" / "metrics.jsonl")
    assert metrics and {"loss", "dpo_loss", "nll_loss", "reward_margin", "reward_accuracy"} <= set(metrics[0])
    # M1 is a plain model folder (LoRA merged) that loads without PEFT.
    model = it / "model"
    assert (model / "config.json").exists() and list(model.glob("*.safetensors"))
    from safetensors import safe_open

    for file in model.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            assert not [k for k in f.keys() if "lora" in k]
    # LoRA left the embedding as M0 has it: M1's file is M0's, linked, not written again
    # (lidr/checkpoint.py; M0's converted folder keeps it in a file of its own). M1 keeps M0's
    # fp32, also where a CPU with fast bf16 trains in bf16 (train.merge_lora_into_stored).
    from lidr.models import resolve_model

    summary = json.loads((it / "train" / "summary.json").read_text())
    assert summary["model_from"] == "memory"  # M0 as the generation engine held it, not loaded again
    assert summary["saved_dtype"] == "float32"
    assert summary["save_linked"] == ["model.embed_tokens.weight"] and summary["save_written"] == []
    assert os.path.samefile(model / "model-embed_tokens.safetensors",
                            resolve_model("gemma-3-270m") / "model-embed_tokens.safetensors")
    state = json.loads((reference / "state.json").read_text())["stages"]
    assert all(state[f"iter-1/{s}"]["status"] == "done" for s in ("respond", "translate", "pairs", "train"))
    assert "languages:" in (reference / "config.yaml").read_text()


def test_rerun_skips_and_changed_inputs_are_refused(reference: Path, tmp_path):
    r = lidr("run", "--out", reference)  # the folder's saved config: nothing to do
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("done, skipped") == 4
    r = lidr("run", "--out", reference, "--set", "training.beta=0.1")
    assert r.returncode == 2 and "iter-1/train (done): changed training" in r.stderr
    assert "--force" in r.stderr
    # --force redoes the one stage whose inputs changed; same pairs -> training is kept.
    before = (reference / "iter-1" / "pairs.jsonl").read_text()
    r = lidr("pairs", reference, "--iteration", "1", "--set", "pairs.max_line_repeats=9")
    assert r.returncode == 2 and "iter-1/pairs (done): changed pairs" in r.stderr
    r = lidr("pairs", reference, "--iteration", "1", "--set", "pairs.max_line_repeats=9", "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "redoing" in r.stderr and (reference / "iter-1" / "pairs.jsonl").read_text() == before


def test_a_resumed_stage_removes_a_killed_write_s_temporaries(reference: Path, tmp_path):
    """A stage killed between an atomic write's temporary file and its rename leaves the
    temporary; resuming the stage removes it (state.json's too) and redoes the stage."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run, ignore=lambda d, names: ["model", "train"] if d.endswith("iter-1") else [])
    state = json.loads((run / "state.json").read_text())  # as if killed inside pairs
    state["stages"]["iter-1/pairs"]["status"] = "running"
    del state["stages"]["iter-1/train"]
    (run / "state.json").write_text(json.dumps(state))
    (run / "iter-1" / "pairs.jsonl").unlink()
    stale = [run / "iter-1" / ".pairs.jsonl.k1ll3d.tmp", run / ".state.json.k1ll3d.tmp"]
    for p in stale:
        p.write_text('{"torn')
    r = lidr("pairs", run, "--iteration", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "iter-1/pairs: resuming" in r.stderr and not any(p.exists() for p in stale)
    assert (run / "iter-1" / "pairs.jsonl").read_text() == (reference / "iter-1" / "pairs.jsonl").read_text()


def _wait_and_kill(proc: subprocess.Popen, ready, timeout: float = 600) -> bool:
    """SIGKILL `proc` once `ready()` holds; False if the process ended first."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            return False
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for the stage")


def _status(out: Path, stage: str) -> str | None:
    try:
        return json.loads((out / "state.json").read_text())["stages"].get(f"iter-1/{stage}", {}).get("status")
    except (OSError, ValueError):
        return None


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_kill_in_every_stage_then_resume(cfg_file, reference: Path, tmp_path):
    out = tmp_path / "killed"
    it = out / "iter-1"
    killed = {}
    conditions = {
        # mid-stage: some records written, not all
        "respond": lambda: _status(out, "respond") == "running" and 1 <= _lines(it / "responses" / "es.jsonl") < 3,
        "translate": lambda: _status(out, "translate") == "running"
        and sum(_lines(p) for p in (it / "translations").glob("*.jsonl")) >= 2,
        # pairs takes well under a second: killed while running if caught, else right
        # after it finished (at the pairs/train boundary)
        "pairs": lambda: _status(out, "pairs") in ("running", "done"),
        "train": lambda: _status(out, "train") == "running" and _lines(it / "train" / "metrics.jsonl") >= 1,
    }
    for stage, ready in conditions.items():
        proc = start(cfg_file, out)
        killed[stage] = _wait_and_kill(proc, ready)
        assert killed[stage], f"the run ended before it could be killed in {stage}: {proc.stdout.read()[-3000:]}"
    proc = start(cfg_file, out)
    log = proc.communicate(timeout=1200)[0]
    assert proc.returncode == 0, log[-3000:]
    # killed last inside train: the final run skips the finished stages and resumes train
    assert "iter-1/train: resuming" in log and log.count("done, skipped") == 3
    # Nothing lost, nothing duplicated, and the same result as the uninterrupted run.
    ref = reference / "iter-1"
    for lang in LANGS:
        assert by_id(it / "responses" / f"{lang}.jsonl") == by_id(ref / "responses" / f"{lang}.jsonl")
    for path in (ref / "translations").glob("*.jsonl"):
        assert by_id(it / "translations" / path.name) == by_id(path)
    assert (it / "pairs.jsonl").read_text() == (ref / "pairs.jsonl").read_text()
    assert (it / "model" / "config.json").exists()
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    state = json.loads((out / "state.json").read_text())["stages"]
    assert all(state[f"iter-1/{s}"]["status"] == "done" for s in conditions)
