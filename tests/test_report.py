"""`lidr report`: report.html + summary.md from a run folder built here from synthetic files."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from lidr.cli import app
from lidr.config import dump_config, load_config
from lidr.report import write_report

LANGS = ["en", "es", "de", "fr"]
PNG = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _mgsm(acc: dict[str, float], off: dict[str, float]) -> dict:
    langs = {l: {"n": 20, "accuracy": acc[l], "accuracy_ci95": [round(acc[l] - 0.05, 4), round(acc[l] + 0.05, 4)],
                 "no_number": 1, "off_target_rate": off[l], "off_target_ci95": [0.0, 0.3], "langid_undecided": 0}
             for l in acc}
    return {"benchmark": "mgsm", "languages": langs, "average_accuracy": sum(acc.values()) / len(acc),
            "average_off_target_rate": sum(off.values()) / len(off)}


def _alpaca(win: float) -> dict:
    return {"benchmark": "x-alpacaeval",
            "languages": {l: {"n": 10, "off_target_rate": 0.1, "off_target_ci95": [0.02, 0.4], "langid_undecided": 0,
                              "hit_token_limit": 1, "win_rate": win, "win_rate_se": 5.0, "judged": 10,
                              "judge_failures": 0} for l in LANGS},
            "average_win_rate": win, "average_off_target_rate": 0.1,
            "judge": {"model": "judge-model", "url": "http://localhost:1/v1"}}


def _likelihood(mean: float) -> dict:
    return {"benchmark": "reference-likelihood",
            "languages": {l: {"n": 10, "tokens": 900, "mean_logprob": mean, "ci95": [mean - 0.1, mean + 0.1]}
                          for l in LANGS},
            "average_mean_logprob": mean}


HOSTILE = '<script>alert("x")</script><img src=x onerror=1>'


def make_run(root: Path, *, evaluation: bool = True, hostile: str = HOSTILE) -> Path:
    """A finished 2-iteration run folder with known numbers (no models: the report never reads them)."""
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(load_config(None)), encoding="utf-8")
    stages = {}
    for t in (1, 2):
        for i, stage in enumerate(("respond", "translate", "pairs", "train")):
            stages[f"iter-{t}/{stage}"] = {"status": "done", "seconds": 10.0 * (i + 1), "summary": {}}
        stages[f"iter-{t}/translate"]["summary"] = {"translations": {
            f"en-{l}": {"n": 8, "failed": 2, "failure_rate": 0.25} for l in LANGS[1:]}
            | {f"{l}-en": {"n": 8, "failed": 0, "failure_rate": 0.0} for l in LANGS[1:]}}
        it = run / f"iter-{t}"
        _write(it / "pairs.summary.json", {"kept": {l: 6 for l in LANGS},
                                           "dropped": {"en": {"translation_failed": 2},
                                                       "de": {"wrong_language": 1, "translation_failed": 1}}})
        rows = [{"id": f"p{i}", "lang": l, "prompt": f"Question {i} in {l}?", "chosen": f"Good answer {i}.",
                 "rejected": f"Bad answer {i}.", "kind": "translated_beats_native", "via": None}
                for l in LANGS for i in range(3)]
        rows[0].update(prompt=f"Explain {hostile} please", chosen=f"{hostile} & more " + "word " * 400,
                       rejected="x < y && y > z")
        _jsonl(it / "pairs.jsonl", rows)
        _jsonl(it / "train" / "metrics.jsonl", [
            {"step": s, "epoch": s / 4, "lr": 1e-5, "loss": 3 - 0.2 * s, "dpo_loss": 0.69 - 0.05 * s,
             "nll_loss": 2.3 - 0.1 * s, "reward_chosen": 0.1 * s, "reward_rejected": -0.1 * s,
             "reward_margin": 0.2 * s, "reward_accuracy": min(1.0, 0.25 * s), "seconds": 2.0, "elapsed": 2.0 * s}
            for s in range(1, 5)])
        _write(it / "train" / "summary.json", {
            "pairs": 24, "steps": 4, "seconds": 42.0,
            "initial": {"loss": 3.0, "dpo_loss": 0.693, "nll_loss": 2.3, "reward_margin": 0.0, "reward_accuracy": 0.0},
            "final": {"loss": 2.1, "dpo_loss": 0.3, "nll_loss": 1.8, "reward_margin": 1.5, "reward_accuracy": 0.9},
            "first_step": {"step": 1, "loss": 2.8}, "last_step": {"step": 4, "loss": 2.2}})
    if evaluation:
        stages["eval/M0"] = {"status": "done", "seconds": 99.0}
        ev = run / "eval"
        _write(ev / "M0" / "mgsm" / "summary.json",
               _mgsm({"en": 0.2, "es": 0.1, "de": 0.1, "fr": 0.1}, {"en": 0.0, "es": 0.3, "de": 0.2, "fr": 0.2}))
        _write(ev / "M2" / "mgsm" / "summary.json",
               _mgsm({"en": 0.35, "es": 0.15, "de": 0.05, "fr": 0.15}, {"en": 0.0, "es": 0.1, "de": 0.2, "fr": 0.25}))
        _write(ev / "M0" / "alpaca" / "summary.json", _alpaca(40.0))
        _write(ev / "M2" / "alpaca" / "summary.json", _alpaca(47.5))
        _write(ev / "M0" / "likelihood" / "summary.json", _likelihood(-2.0))
        _write(ev / "M2" / "likelihood" / "summary.json", _likelihood(-1.8))
        _write(ev / "h2h" / "M2-vs-M0" / "summary.json",
               {"a": "M2", "b": "M0", "languages": {l: {"n": 10, "win": 5, "tie": 2, "lose": 3, "win_rate": 0.6,
                                                        "failures": 0} for l in LANGS}})
        _write(ev / "reward-accuracy" / "iter-1" / "summary.json",
               {"languages": {l: {"n": 6, "agree": 5, "accuracy": 0.8333, "ci95": [0.4362, 0.9699], "failures": 0}
                              for l in LANGS}})
    _write(run / "state.json", {"stages": stages})
    return run


def _text(html_doc: str) -> str:
    """The visible text of the HTML, tags removed, whitespace collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html_doc))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One report of a run with every kind of result (figures take a few seconds to draw)."""
    run = make_run(tmp_path_factory.mktemp("full"))
    written = write_report(run)
    return run, written, written.html.read_text(encoding="utf-8"), written.markdown.read_text(encoding="utf-8")


def test_report_tables_show_change_against_m0(full):
    run, written, page, md = full
    assert written.html == run / "report.html" and written.markdown == run / "summary.md"
    assert written.problems == [] and written.missing == []
    text = _text(page)
    # MGSM accuracy en: 0.2 -> 0.35, with both 95 % intervals
    assert "| **en** | 0.200 [0.150, 0.250] n=20 | 0.350 (+0.150) [0.300, 0.400] n=20 |" in md
    assert '0.350<span class="d good">(+0.150)</span>' in page  # an improvement, coloured as one
    # off-target es 0.3 -> 0.1 is an improvement (lower is better); accuracy de 0.1 -> 0.05 is not
    assert '0.100<span class="d good">(-0.200)</span>' in page
    assert '0.050<span class="d bad">(-0.050)</span>' in page
    # X-AlpacaEval win rate (percent), reference likelihood, and the averages table
    assert "47.5 (+7.5)" in md and "-1.800 (+0.200)" in md
    assert "| **MGSM accuracy** | 0.125 | 0.175 (+0.050) |" in md
    # head-to-head, reward accuracy, training, pairs, translation, stage times
    assert "| **en** | 10 | 5 | 2 | 3 | 0.600 | 0 |" in md
    assert "0.833 [0.436, 0.970] 5/6" in md
    assert "3.000 → 2.100" in md and "0.000 → 0.900" in md
    assert "| iter-1 | **de** | 6 | 1 | 1 | 2 | 75.0 % |" in md
    assert "| **en-es** | 25.0 % 2/8 | 25.0 % 2/8 |" in md
    assert "| **iter-1** | 10.0 s | 20.0 s | 30.0 s | 40.0 s | **1 min 40 s** |" in md
    for heading in ("MGSM", "X-AlpacaEval", "Reference likelihood", "Head-to-head", "Reward accuracy",
                    "Training", "Preference pairs", "Self-translation", "Example pairs"):
        assert f">{heading}</h" in page and f"# {heading}\n" in md
    assert "No evaluation results" not in text
    # the header comes from config.yaml
    assert "gemma-3-270m" in text and "en (dominant); es, de, fr" in text


def test_figures_are_embedded_pngs_and_files(full):
    run, written, page, md = full
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    names = {p.stem for p in written.figures}
    assert {"mgsm-accuracy", "mgsm-off-target", "alpaca-win-rate", "alpaca-off-target", "likelihood",
            "h2h-M2-vs-M0", "reward-accuracy", "training", "pairs", "translation-failures"} <= names
    assert len(images) == len(written.figures) == page.count("<img")
    for data in images:
        png = base64.b64decode(data, validate=True)
        assert png.startswith(PNG)
        pixels = imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 300
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r"<(script|link)\b|src=\"(?!data:)|url\(", page)
    for path in written.figures:
        assert path.parent == run / "report" / "figures" and path.read_bytes().startswith(PNG)
        assert f"](report/figures/{path.name})" in md


def test_user_text_is_escaped_and_truncated(full):
    run, written, page, md = full
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "x &lt; y &amp;&amp; y &gt; z" in page
    assert "<script" not in md and "&lt;script&gt;" in md
    # the 2000-character answer is cut, with an ellipsis; 2 examples per language and iteration
    assert "word word…" in page and "word " * 200 not in page
    assert page.count('<div class="pair">') == 2 * len(LANGS) * 2


def test_run_without_evaluation_says_so(tmp_path):
    run = make_run(tmp_path, evaluation=False)
    written = write_report(run)
    text = _text(written.html.read_text(encoding="utf-8"))
    md = written.markdown.read_text(encoding="utf-8")
    assert "No evaluation results" in text and "Evaluation is missing" in text
    assert "No evaluation results" in md
    assert written.missing == ["Evaluation"]
    assert "3.000 → 2.100" in md  # the rest of the report is still there


def test_partial_and_unreadable_files_do_not_stop_the_report(tmp_path):
    run = make_run(tmp_path)
    (run / "eval" / "M1" / "mgsm").mkdir(parents=True)
    (run / "eval" / "M1" / "mgsm" / "summary.json").write_text("{not json", encoding="utf-8")
    (run / "iter-2" / "train" / "summary.json").unlink()
    with (run / "iter-2" / "train" / "metrics.jsonl").open("a") as f:
        f.write("{torn line\n")
    written = write_report(run)
    assert any("eval/M1/mgsm/summary.json" in p for p in written.problems)
    assert any("metrics.jsonl" in p for p in written.problems)
    assert "Files that could not be read" in written.html.read_text(encoding="utf-8")
    assert "0.350 (+0.150)" in written.markdown.read_text(encoding="utf-8")  # M2 still compared with M0


def test_cli(tmp_path):
    run = make_run(tmp_path, evaluation=False)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report.html").exists() and (run / "summary.md").exists()
    assert "report.html" in result.output

    out = tmp_path / "elsewhere"
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(out), "--examples", "1"])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count('<div class="pair">') == 1 * len(LANGS) * 2
    assert (out / "summary.md").exists() and (out / "report" / "figures" / "training.png").exists()

    not_a_run = tmp_path / "just-a-folder"
    not_a_run.mkdir()
    result = CliRunner().invoke(app, ["report", str(not_a_run)])
    assert result.exit_code == 2
    assert "not a run folder" in result.output and "config.yaml" in result.output
    assert not (not_a_run / "report.html").exists()

    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
