"""Run-folder files: appends survive crashes, resumed stages never duplicate, writes are atomic."""

from __future__ import annotations

import json

import pytest

from lidr.records import JsonlAppender, RecordError, atomic_write_json, load_records, read_jsonl


def test_torn_last_line_is_cut_and_ids_are_not_repeated(tmp_path):
    path = tmp_path / "r.jsonl"
    with JsonlAppender(path) as w:
        w.write({"id": 1, "x": "a"})
        w.write({"id": 2, "x": "b"})
    with path.open("a") as f:
        f.write('{"id": 3, "x": "tor')  # a crash in the middle of a write
    with JsonlAppender(path) as w:
        assert w.done == {1, 2}
        w.write({"id": 2, "x": "again"})  # already there: ignored
        w.write({"id": 3, "x": "c"})
    assert [r["id"] for r in load_records(path)] == [1, 2, 3]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2,,}\n')
    with pytest.raises(RecordError, match=rf"{path}:3: malformed JSON"):
        list(read_jsonl(path))


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"a": 1})
    atomic_write_json(tmp_path / "s.json", {"a": 2})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
