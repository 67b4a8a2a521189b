"""Evaluation inside `lidr run`, end to end on the real embedded model with a real judge
(llama-cpp-python's server on the same GGUF): M0 and M1 evaluated on MGSM and
X-AlpacaEval (answers, off-target, reference likelihood, win rate), M1 vs M0
head-to-head, reward accuracy of the pairs; a re-run skips it all; the report renders;
the judge's API key never reaches the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lidr.records import load_records

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
SECRET = "sk-lidr-test-secret-0123456789"

CONFIG = """\
model: gemma-3-270m
languages: {{dominant: en, others: [es]}}
prompts: {{per_iteration: 2}}
iterations: 1
generation: {{max_new_tokens: 16, translation_max_new_tokens: 32, batch_size: 8}}
training: {{learning_rate: 5.0e-5, max_length: 160, batch_size: 2}}
eval:
  data: {data}
  mgsm: {{languages: [en, es], limit: 2, max_new_tokens: 24}}
  alpaca: {{limit: 2, max_new_tokens: 16, likelihood_max_tokens: 32}}
  judge: {{url: "{url}", model: gemma-3-270m, api_key_env: LIDR_TEST_JUDGE_KEY, max_retries: 2, concurrency: 2,
          extra_body: {{grammar: 'root ::= "m" | "M"'}}}}
"""


def lidr(*args):
    env = {**os.environ, "LIDR_TEST_JUDGE_KEY": SECRET}
    env.pop("LIDR_DATA", None)
    return subprocess.run([sys.executable, "-m", "lidr", *map(str, args)], capture_output=True, text=True,
                          timeout=1800, env=env)


@pytest.fixture(scope="module")
def run_dir(llama_url, tmp_path_factory) -> Path:
    if not (DATA / "mgsm").is_dir():
        pytest.skip(f"evaluation data not found at {DATA}")
    cfg = tmp_path_factory.mktemp("cfg") / "eval.yaml"
    cfg.write_text(CONFIG.format(data=DATA, url=llama_url))
    out = tmp_path_factory.mktemp("runs") / "eval"
    r = lidr("run", "-c", cfg, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_every_model_is_evaluated(run_dir: Path):
    state = json.loads((run_dir / "state.json").read_text())["stages"]
    for k in (0, 1):
        assert state[f"eval/M{k}"]["status"] == "done"
        mgsm = json.loads((run_dir / "eval" / f"M{k}" / "mgsm" / "summary.json").read_text())
        assert set(mgsm["languages"]) == {"en", "es"} and all(v["n"] == 2 for v in mgsm["languages"].values())
        alpaca = json.loads((run_dir / "eval" / f"M{k}" / "alpaca" / "summary.json").read_text())
        for lang in ("en", "es"):
            v = alpaca["languages"][lang]
            assert v["n"] == 2 and v["judged"] == 2 and v["judge_failures"] == 0
            assert 0.0 <= v["win_rate"] <= 100.0
            # AlpacaEval's model_outputs format, ready for the official tool
            outputs = json.loads((run_dir / "eval" / f"M{k}" / "alpaca" / "model_outputs" / f"{lang}.json").read_text())
            assert len(outputs) == 2 and set(outputs[0]) == {"instruction", "output", "generator", "dataset"}
        lik = json.loads((run_dir / "eval" / f"M{k}" / "likelihood" / "summary.json").read_text())
        for v in lik["languages"].values():
            assert v["n"] == 2 and v["mean_logprob"] < 0 and v["ci95"][0] <= v["mean_logprob"] <= v["ci95"][1]
    # the trained model is a different model: its likelihood of the references moved
    lik0 = json.loads((run_dir / "eval" / "M0" / "likelihood" / "summary.json").read_text())
    lik1 = json.loads((run_dir / "eval" / "M1" / "likelihood" / "summary.json").read_text())
    assert lik0["languages"]["en"]["mean_logprob"] != lik1["languages"]["en"]["mean_logprob"]


def test_judged_comparisons(run_dir: Path):
    h2h = json.loads((run_dir / "eval" / "h2h" / "M1-vs-M0" / "summary.json").read_text())
    assert (h2h["a"], h2h["b"]) == ("M1", "M0")
    for v in h2h["languages"].values():
        assert v["win"] + v["tie"] + v["lose"] == v["n"] == 2
    ra = json.loads((run_dir / "eval" / "reward-accuracy" / "iter-1" / "summary.json").read_text())
    pairs = load_records(run_dir / "iter-1" / "pairs.jsonl")
    assert sum(v["n"] for v in ra["languages"].values()) == len(pairs)
    # The cache holds exactly one judgment per distinct (instruction, first, second) asked:
    # answers vs reference for M0 and M1 (identical answers of the two models share one),
    # M1 vs M0 in both orders, and the pairs.
    from lidr.eval import alpaca
    from lidr.eval.judge import JudgmentCache

    key = lambda *texts: JudgmentCache.key("gemma-3-270m", *texts)  # noqa: E731
    data = alpaca.load_alpaca(DATA / "x-alpacaeval", ["en", "es"], limit=2)
    answers = {k: alpaca.load_answers(run_dir / "eval" / f"M{k}" / "alpaca", ["en", "es"]) for k in (0, 1)}
    expected = set()
    for lang, items in data.items():
        for it in items:
            a0, a1 = answers[0][lang][it["id"]]["output"], answers[1][lang][it["id"]]["output"]
            for a in (a0, a1):
                first = alpaca.model_shown_first(0, lang, it["id"])
                expected.add(key(it["instruction"], *((a, it["reference"]) if first else (it["reference"], a))))
            expected |= {key(it["instruction"], a1, a0), key(it["instruction"], a0, a1)}
    for p in pairs:
        pk = f"{p['id']}|{p.get('kind', '')}|{p.get('via', '')}"
        first = alpaca.model_shown_first(0, p["lang"], pk)
        expected.add(key(p["prompt"], *((p["chosen"], p["rejected"]) if first else (p["rejected"], p["chosen"]))))
    cache = load_records(run_dir / "eval" / "judgments-cache.jsonl")
    assert {r["key"] for r in cache} == expected and len(cache) == len(expected)


def test_rerun_skips_and_report_renders(run_dir: Path):
    r = lidr("run", "--out", run_dir)  # lidr's messages go to stderr
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("eval/M0", "iter-1/respond", "iter-1/train", "eval/M1"):
        assert f"{stage}: done, skipped" in r.stderr, r.stderr[-3000:]
    r = lidr("report", run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    html = (run_dir / "report.html").read_text()
    assert "MGSM" in html and "data:image/png;base64," in html and "M1 vs M0" in html.replace("-vs-", " vs ")


def test_api_key_never_written(run_dir: Path):
    for p in run_dir.rglob("*"):
        if p.is_file() and p.suffix in {".json", ".jsonl", ".yaml", ".md", ".html", ".txt", ".log"}:
            assert SECRET not in p.read_text(errors="ignore"), p
