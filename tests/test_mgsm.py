"""MGSM evaluation: loading, scoring, confidence intervals, and scoring answers made elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lidr.eval.mgsm import load_mgsm, score, summarize, wilson
from lidr.records import RecordError, load_records

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mgsm"
needs_data = pytest.mark.skipif(not DATA.exists(), reason="shared/datasets/mgsm not present")


def test_wilson_interval():
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (0.2366, 0.7634)  # the textbook value for 5/10
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert wilson(0, 0) is None


def test_score_and_summary():
    item = {"id": 0, "question": "Janets Enten legen 16 Eier pro Tag ...", "gold": 18.0}
    right = score(item, "de", "Sie verkauft 9 Eier für je 2 Dollar. Die Antwort lautet 18.")
    wrong_lang = score(item, "de", "She sells nine eggs at two dollars each, so she makes 18 dollars every day.")
    wrong = score(item, "de", "Sie verdient jeden Tag 20 Dollar auf dem Bauernmarkt.")
    short = score(item, "de", "18")
    assert right["correct"] and not right["off_target"]
    assert wrong_lang["correct"] and wrong_lang["off_target"] and wrong_lang["detected_lang"] == "en"
    assert not wrong["correct"] and wrong["extracted"] == 20
    assert short["off_target"] is None  # too short to tell the language
    # A short Chinese answer has enough text (a CJK character carries about a word).
    zh = score({"id": 0, "question": "…", "gold": 1.0}, "zh", "2 匹蓝色纤维布料和 1 匹白色纤维布料。")
    assert zh["off_target"] is False and zh["detected_lang"] == "zh"
    s = summarize({"de": [right, wrong_lang, wrong, short]})["languages"]["de"]
    assert s["accuracy"] == 0.75 and s["off_target_rate"] == round(1 / 3, 4) and s["langid_undecided"] == 1


def test_bad_data_is_rejected(tmp_path):
    (tmp_path / "en.jsonl").write_text('{"query": "q", "response": "twelve"}\n')
    with pytest.raises(RecordError, match="en.jsonl:1: field 'response' is not a number"):
        load_mgsm(tmp_path, ["en"])
    with pytest.raises(RecordError, match="de.jsonl not found"):
        load_mgsm(tmp_path, ["de"])


@needs_data
def test_cli_scores_responses_made_elsewhere(tmp_path):
    data = load_mgsm(DATA, ["en", "de"], limit=3)
    rows = []
    for lang in ("en", "de"):
        for it in data[lang]:
            gold = int(it["gold"])
            rows.append({"lang": lang, "id": it["id"],
                         "response": f"Let me think step by step about it. The answer is {gold + (it['id'] == 2)}."})
    responses = tmp_path / "answers.jsonl"
    responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "lidr", "eval", "mgsm", "gemma-3-270m", "--data", str(DATA),
                        "--languages", "en,de", "--limit", "3", "--responses", str(responses), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["languages"]["en"]["accuracy"] == round(2 / 3, 4)
    assert summary["languages"]["en"]["off_target_rate"] == 0.0
    assert summary["languages"]["de"]["off_target_rate"] == 1.0  # English answers to German questions
    recs = load_records(out / "de.jsonl")
    assert [r["id"] for r in recs] == [0, 1, 2] and {"extracted", "gold", "correct", "detected_lang"} <= set(recs[0])
