"""`lidr plan` (lidr/plan.py): every recipe in configs/ plans against the real data, the counts
of a small config are exact, bad configs fail with exit 2 and say where, and no model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lidr.cli import app
from lidr.config import load_config
from lidr.plan import make_plan

REPO = Path(__file__).parents[1]
DATA = REPO.parent / "shared" / "datasets"
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
needs_data = pytest.mark.skipif(not (DATA / "alpagasus").is_dir(), reason=f"no datasets at {DATA}")


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Planning must never resolve (download, convert) or load a model."""
    import lidr.models

    def refuse(*a, **k):
        raise AssertionError("lidr plan tried to resolve or load a model")

    for name in ("resolve_model", "load_tokenizer"):
        monkeypatch.setattr(lidr.models, name, refuse)


def _shared_data() -> list[str]:
    a = DATA / "alpagasus"
    return ["--set", f"prompts.source=[{a / 'id_0_1000'},{a / 'id_1000_2000'}]",
            "--set", f"prompts.translation_task_ids={a / 'translation_instruction_ids.jsonl'}",
            "--set", f"eval.data={DATA}"]


def _plan(*args: str):
    return CliRunner().invoke(app, ["plan", *args], env={"COLUMNS": "250"})  # wide tables: no wrapping


def test_recipes_exist():
    assert {p.stem for p in RECIPES} >= {"llama3-8b-paper", "qwen2-7b-paper", "llama3-8b-lowres",
                                         "llama3-8b-translate-by-system"}


@needs_data
@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.stem != "llama3-8b-lowres"], ids=lambda p: p.stem)
def test_recipe_plans_on_the_paper_data(recipe, tmp_path):
    r = _plan("-c", str(recipe), "--out", str(tmp_path / "run"), *_shared_data())
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    # 1000 prompts x 5 languages; iteration 1 (ids 0-999) holds 7 listed translation tasks:
    # 993 translations each way per language, at most 993 + 4 x 1000 pairs, 16 per step
    assert "responses │ 5,000 │ 5,000" in out and "translations │ 7,944 │ 7,920" in out
    assert "pairs (at most) │ 4,993 │ 4,990" in out and "training steps (at most) │ 313 │ 312" in out
    plan = make_plan(load_config(recipe, [s for s in _shared_data() if s != "--set"]), tmp_path / "run")
    it1 = plan.iterations[0]
    assert it1.translation_tasks == 7 and it1.translations["en-ru"] == it1.translations["ru-en"] == 993
    assert it1.tokens["respond"].max == 5000 * 2400 and it1.tokens["translate"].max == 7944 * 4096
    assert plan.evaluation.models == ["M0", "M1", "M2"]
    assert [b["name"] for b in plan.evaluation.benchmarks] == ["MGSM", "X-AlpacaEval"]
    assert "accelerate launch --num_processes 8 --config_file" in out and "fsdp.yaml (FSDP2, bf16)" in out
    assert "vllm" in out and "effective batch 16" in out and "M0, M1, M2" in out
    if "translate-by-system" in recipe.stem:
        assert "translator openai: server http://localhost:8001/v1" in out
    else:
        assert "self-translation" in out


@needs_data
def test_lowres_recipe(tmp_path):
    recipe = REPO / "configs" / "llama3-8b-lowres.yaml"
    # the shared copy of the training prompts has th but not bn or sw: refused, naming the file
    r = _plan("-c", str(recipe), "--out", str(tmp_path / "run"), *_shared_data())
    assert r.exit_code == 2 and "no prompts for language 'bn'" in " ".join(r.output.split())
    # with bn/sw files (stand-ins here) it plans
    for part, ids in (("a", range(1000)), ("b", range(1000, 2000))):
        folder = tmp_path / part
        folder.mkdir()
        for lang in ("en", "th", "bn", "sw"):
            (folder / f"{lang}.jsonl").write_text(
                "".join(json.dumps({"id": i, "instruction": f"{lang} instruction {i}"}) + "\n" for i in ids))
    r = _plan("-c", str(recipe), "--out", str(tmp_path / "run"), "--set", f"eval.data={DATA}",
              "--set", f"prompts.source=[{tmp_path / 'a'},{tmp_path / 'b'}]", "--set", "prompts.translation_task_ids=null")
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "languages en, th, bn, sw" in out and "responses │ 4,000 │ 4,000" in out  # 1000 x 4 languages
    assert "MGSM │ bn de en es fr ja ru sw te th zh" in out


def _small(tmp_path: Path, **over) -> tuple[Path, list[str]]:
    """10 parallel prompts in en/es/de/fr; p3 (iteration 1) and p8 (iteration 2) are listed translation tasks."""
    folder = tmp_path / "prompts"
    folder.mkdir(exist_ok=True)
    for lang in ("en", "es", "de", "fr"):
        (folder / f"{lang}.jsonl").write_text(
            "".join(json.dumps({"id": f"p{i}", "instruction": f"{lang}: question {i}"}) + "\n" for i in range(10)))
    (tmp_path / "tasks.jsonl").write_text('{"id": "p3"}\n{"id": "p8"}\n')
    sets = [f"prompts.source={folder}", "prompts.per_iteration=5", f"prompts.translation_task_ids={tmp_path / 'tasks.jsonl'}",
            "prompts.detect_translation_tasks=false", "iterations=2", "languages.others=[es,de,fr]",
            "generation.max_new_tokens=50", "generation.translation_max_new_tokens=80",
            "training.batch_size=2", "training.gradient_accumulation=2", "training.epochs=2", "eval.enabled=false"]
    sets += [f"{k}={v}" for k, v in over.items()]
    return folder, sets


def test_small_config_counts_are_exact(tmp_path):
    _, sets = _small(tmp_path)
    plan = make_plan(load_config(None, sets), tmp_path / "run")
    it1, it2 = plan.iterations
    assert it1.prompt_ids == ("p0", "p4") and it2.prompt_ids == ("p5", "p9")
    assert it1.responses == {"en": 5, "es": 5, "de": 5, "fr": 5} and it1.n_responses == 20
    assert it1.translation_tasks == 1  # p3: its answers are never translated
    assert it1.translations == {"en-es": 4, "en-de": 4, "en-fr": 4, "es-en": 4, "de-en": 4, "fr-en": 4}
    assert it1.pairs_max == {"en": 4, "es": 5, "de": 5, "fr": 5}  # one dominant pair per non-task prompt
    assert it1.steps_max == 10  # ceil(ceil(19 / 2) / 2) x 2 epochs
    assert (it1.tokens["respond"].max, it1.tokens["translate"].max) == (20 * 50, 24 * 80)
    assert (it1.tokens["respond"].typical, it1.tokens["translate"].typical) == (20 * 50, 24 * 60)
    assert it2.translation_tasks == 1 and it2.n_translations == 24 and it2.n_pairs_max == 19
    assert plan.effective_batch == 4 and plan.evaluation is None and "disabled" in plan.eval_note
    assert [s.stage for s in plan.stages] == ["respond", "translate", "pairs", "train"]
    assert plan.stages[3].engine == "in process (1 process)"

    # the dominant_rejected policy decides the back-translations and dominant pairs
    _, sets = _small(tmp_path, **{"pairs.dominant_rejected": "last_language"})
    it1 = make_plan(load_config(None, sets), tmp_path / "run").iterations[0]
    assert it1.translations == {"en-es": 4, "en-de": 4, "en-fr": 4, "fr-en": 4} and it1.pairs_max["en"] == 4
    _, sets = _small(tmp_path, **{"pairs.dominant_rejected": "per_language"})
    it1 = make_plan(load_config(None, sets), tmp_path / "run").iterations[0]
    assert it1.n_translations == 24 and it1.pairs_max["en"] == 12 and it1.steps_max == 2 * 7  # 27 pairs

    # two processes: the global batch doubles, the steps halve (rounded up)
    _, sets = _small(tmp_path, **{"training.num_processes": 2})
    plan = make_plan(load_config(None, sets), tmp_path / "run")
    assert plan.iterations[0].steps_max == 6 and plan.effective_batch == 8  # ceil(ceil(19 / 4) / 2) x 2
    assert plan.stages[3].engine == "accelerate launch --num_processes 2 (DDP)"


def test_small_config_cli(tmp_path):
    _, sets = _small(tmp_path)
    r = _plan("--out", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "responses │ 20 │ 20" in out and "translations │ 24 │ 24" in out and "pairs (at most) │ 19 │ 19" in out
    assert "at most 5,840" in out  # 2 x (20 x 50 + 24 x 80) tokens
    assert "evaluation: disabled" in out


def test_bad_config_exit_2_with_file_line_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text("languages:\n  dominant: en\n  others: [es]\ntraining:\n  num_processes: 0\n")
    r = _plan("-c", "bad.yaml")
    assert r.exit_code == 2
    assert "bad.yaml:5: field 'training.num_processes'" in r.output
    Path("typo.yaml").write_text("generation:\n  max_new_token: 10\n")
    r = _plan("-c", "typo.yaml")
    assert r.exit_code == 2 and "typo.yaml:2: field 'generation.max_new_token': unknown field" in r.output
    r = _plan("--set", "training.accelerate_config=zero4", "--set", "training.num_processes=2")
    assert r.exit_code == 2 and "training.accelerate_config" in r.output and "zero4" in r.output
    r = _plan("--set", "prompts.source=no/such/folder")
    assert r.exit_code == 2 and "folder not found: no/such/folder" in r.output
