"""Bad input is rejected before any model loads, naming file, line and field."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from lidr.config import PromptsConfig, load_config
from lidr.models import ModelError, check_model_spec, resolve_model
from lidr.prompts import PromptsWarning, check_enough, load_prompts
from lidr.records import RecordError

LANGS = ["en", "es"]


def _write(folder, lang, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{lang}.jsonl").write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))


def _good(folder, n=4, langs=LANGS):
    for lang in langs:
        _write(folder, lang, [{"id": f"p{i}", "instruction": f"{lang} instruction {i}"} for i in range(n)])


def test_folder_source_loads_parallel_prompts(tmp_path):
    _good(tmp_path)
    ps = load_prompts(PromptsConfig(source=str(tmp_path)), LANGS)
    assert ps.ids == ["p0", "p1", "p2", "p3"]
    assert ps.text["es"]["p2"] == "es instruction 2"
    assert ps.slice(2, 2) == ["p2", "p3"]  # fresh prompts for iteration 2


def test_json_list_files_and_several_folders(tmp_path):
    for lang in LANGS:
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{lang}.json").write_text(json.dumps([{"id": 1, "instruction": f"{lang} one"}]))
    _write(tmp_path / "b", "en", [{"id": 2, "instruction": "en two"}])
    _write(tmp_path / "b", "es", [{"id": 2, "instruction": "es two"}])
    ps = load_prompts(PromptsConfig(source=[str(tmp_path / "a"), str(tmp_path / "b")]), LANGS)
    assert ps.ids == [1, 2]


@pytest.mark.parametrize(
    "rows, needle",
    [
        (['{"id": "p0", "instruction": "ok"}\n', '{"id": "p1", "instruction": \n'], "es.jsonl:2: malformed JSON"),
        ([{"id": "p0", "instruction": "ok"}, {"instruction": "no id"}], "es.jsonl:2: missing field 'id'"),
        ([{"id": "p0", "instruction": "ok"}, {"id": "p0", "instruction": "again"}],
         "es.jsonl:2: duplicate id 'p0' in field 'id' (first at line 1)"),
        ([{"id": "p0", "instruction": "   "}], "es.jsonl:1: field 'instruction' is missing or empty"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, rows, needle):
    _good(tmp_path, langs=["en"])
    _write(tmp_path, "es", rows)
    with pytest.raises(RecordError) as e:
        load_prompts(PromptsConfig(source=str(tmp_path)), LANGS)
    assert needle in str(e.value)


def test_missing_language_file(tmp_path):
    _good(tmp_path, langs=["en"])
    with pytest.raises(RecordError, match="no prompts for language 'es'.*found: en"):
        load_prompts(PromptsConfig(source=str(tmp_path)), LANGS)


def test_ids_not_parallel_warns_and_uses_the_intersection(tmp_path):
    _write(tmp_path, "en", [{"id": i, "instruction": f"en {i}"} for i in range(5)])
    _write(tmp_path, "es", [{"id": i, "instruction": f"es {i}"} for i in (0, 2, 4, 7)])
    with pytest.warns(PromptsWarning, match=r"en: 5, es: 4\); using the 3 ids present in all"):
        ps = load_prompts(PromptsConfig(source=str(tmp_path)), LANGS)
    assert ps.ids == [0, 2, 4]


def test_not_enough_prompts_for_the_iterations(tmp_path):
    _good(tmp_path, n=5)
    cfg = load_config(None, [f"prompts.source={tmp_path}", "prompts.per_iteration=3", "iterations=2",
                             "languages.others=[es]"])
    with pytest.raises(RecordError, match="need 6 parallel ids, but the source has 5"):
        check_enough(load_prompts(cfg.prompts, cfg.languages.all), cfg)


def test_builtin_demo_prompts_are_parallel_in_four_languages():
    ps = load_prompts(PromptsConfig(), ["en", "es", "de", "fr"])
    assert len(ps.ids) >= 32 and not ps.notes
    with pytest.raises(RecordError, match="built-in demo prompts have no ja"):
        load_prompts(PromptsConfig(), ["en", "ja"])


def test_model_paths_are_checked(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="model path not found"):
        check_model_spec(str(tmp_path / "missing-model"))
    with pytest.raises(ModelError, match="not found"):
        check_model_spec("./nothing/here.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        check_model_spec(str(tmp_path / "empty"))
    # A Hub id with no network fails at once with a clear message (no retry loop).
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="cannot be reached"):
        resolve_model("some-org/some-model")


def test_a_gguf_model_is_resolved_once_per_process(monkeypatch):
    """The built-in model's package assembles and hashes its GGUF file on every call: done once,
    and again only when the file changed."""
    import lidr.models as models

    package = importlib.import_module(models.ALIASES["gemma-3-270m"])
    calls = []
    assemble = package.assemble
    monkeypatch.setattr(package, "assemble", lambda *a, **k: calls.append(1) or assemble(*a, **k))
    monkeypatch.setattr(models, "_gguf_models", {})
    (models.cache_dir() / "models" / "gemma-3-270m.checked.json").unlink(missing_ok=True)
    hashed = []
    digest = models.file_digest
    monkeypatch.setattr(models, "file_digest", lambda p: hashed.append(p) or digest(p))
    first = resolve_model("gemma-3-270m")
    assert resolve_model("gemma-3-270m") == first and len(calls) == 1
    # the folder is named by the file's sha256, which the package has just checked: not hashed again
    gguf = models._gguf_models["gemma-3-270m"][0]
    assert not hashed and first.name == f"gemma-3-270m-{digest(gguf)}-{models.CONVERTED_LAYOUT}"
    # a GGUF file that changed since (here: its mtime) is assembled and checked again
    st = gguf.stat()
    try:
        os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))
        assert resolve_model("gemma-3-270m") == first and len(calls) == 2
    finally:
        os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_checked_built_in_model_is_not_hashed_again_in_the_next_process(monkeypatch):
    """The package's check hashes 253 MB (0.24 s): a later process trusts the record of a passed
    check while the file's size and mtime are the same, and checks again when they are not."""
    import lidr.models as models

    package = importlib.import_module(models.ALIASES["gemma-3-270m"])
    calls = []
    assemble = package.assemble
    monkeypatch.setattr(package, "assemble", lambda *a, **k: calls.append(1) or assemble(*a, **k))
    record = models.cache_dir() / "models" / "gemma-3-270m.checked.json"
    record.unlink(missing_ok=True)
    monkeypatch.setattr(models, "_gguf_models", {})
    first = resolve_model("gemma-3-270m")
    assert len(calls) == 1 and record.is_file()
    monkeypatch.setattr(models, "_gguf_models", {})  # as in a new process
    assert resolve_model("gemma-3-270m") == first and len(calls) == 1
    # a record of another size or mtime (the file changed since) is not trusted
    kept = json.loads(record.read_text())
    kept["file"][1] += 1
    record.write_text(json.dumps(kept))
    monkeypatch.setattr(models, "_gguf_models", {})
    assert resolve_model("gemma-3-270m") == first and len(calls) == 2
    assert json.loads(record.read_text())["file"][1] == kept["file"][1] - 1  # recorded again
    # nor a record of another sha256 (another release of the package)
    record.write_text(json.dumps({**kept, "sha256": "0" * 64}))
    monkeypatch.setattr(models, "_gguf_models", {})
    assert resolve_model("gemma-3-270m") == first and len(calls) == 3


def _lidr(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lidr", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_rejects_bad_input_before_any_work(tmp_path):
    _good(tmp_path / "prompts")
    _write(tmp_path / "prompts", "es", [{"id": "p0", "instruction": "ok"}, {"id": "p1", "instruction": ""}])
    out = tmp_path / "run"
    r = _lidr("run", "--out", str(out), "--set", f"prompts.source={tmp_path / 'prompts'}",
              "--set", "languages.others=[es]", cwd=tmp_path)
    assert r.returncode == 2
    assert "es.jsonl:2: field 'instruction' is missing or empty" in r.stderr
    assert not (out / "state.json").exists() and not (out / "config.yaml").exists()

    r = _lidr("run", "--out", str(out), "--set", "model=/no/such/model", cwd=tmp_path)
    assert r.returncode == 2 and "model path not found: /no/such/model" in r.stderr

    r = _lidr("pairs", str(out), "--iteration", "1", cwd=tmp_path)
    assert r.returncode == 2 and "has no config.json" not in r.stderr and "no config.yaml" in r.stderr


def test_stage_command_needs_the_stages_before_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = _lidr("config", cwd=tmp_path)
    (run / "config.yaml").write_text(cfg.stdout)
    r = _lidr("train", str(run), "--iteration", "1", cwd=tmp_path)
    assert r.returncode == 2 and "iter-1/train needs iter-1/respond to be finished first" in r.stderr
    r = _lidr("respond", str(run), "--iteration", "2", cwd=tmp_path)
    assert r.returncode == 2 and "needs iter-1/train to be finished first" in r.stderr
    r = _lidr("respond", str(run), "--iteration", "3", cwd=tmp_path)
    assert r.returncode == 2 and "--iteration must be between 1 and 2" in r.stderr
