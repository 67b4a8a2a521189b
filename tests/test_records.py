"""Run-folder files: appends survive crashes, resumed stages never duplicate, writes are atomic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lidr.records import (JsonlAppender, RecordError, atomic_write_json, load_records, read_jsonl,
                          remove_stale_temporaries)


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


def test_a_killed_process_loses_no_written_line(tmp_path):
    """Each line is flushed as written: a process killed before it closes its appender (no
    fsync yet, no close) leaves every line it wrote."""
    path = tmp_path / "r.jsonl"
    code = ("import os, sys; from lidr.records import JsonlAppender\n"
            f"w = JsonlAppender({str(path)!r}, sync_every=3600)\n"
            "for i in range(5): w.write({'id': i})\n"
            "os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert [r["id"] for r in load_records(path)] == [0, 1, 2, 3, 4]


def test_lines_are_synced_at_most_once_per_interval_and_at_close(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    with JsonlAppender(tmp_path / "r.jsonl", sync_every=3600) as w:
        for i in range(50):
            w.write({"id": i})
        assert synced == []
    assert len(synced) == 1  # at close
    synced.clear()
    with JsonlAppender(tmp_path / "s.jsonl", sync_every=0) as w:
        for i in range(3):
            w.write({"id": i})
    assert len(synced) == 3  # every line, nothing left for the close
    with JsonlAppender(tmp_path / "t.jsonl") as w:
        pass
    assert len(synced) == 3  # nothing written: nothing to sync


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


def test_a_killed_atomic_write_leaves_a_temporary_that_resume_removes(tmp_path):
    """SIGKILL between the temporary file's write and its rename leaves `.<name>.<random>.tmp`;
    remove_stale_temporaries (run when a stage is resumed) removes such files beside an output
    file and inside an output folder, and nothing else."""
    code = ("import os; from lidr import records\n"
            "os.replace = lambda *a: os.kill(os.getpid(), 9)\n"
            f"records.atomic_write_json({str(tmp_path / 'pairs.jsonl')!r}, {{'a': 1}})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    (left,) = tmp_path.glob(".pairs.jsonl.*.tmp")
    folder = tmp_path / "translations"
    (folder / "sub").mkdir(parents=True)
    stale = folder / "sub" / ".es.jsonl.x1y2.tmp"
    stale.write_text("{}")
    kept = [tmp_path / "pairs.jsonl.tmp", tmp_path / ".other.jsonl.x.tmp", folder / "es.jsonl"]
    for p in kept:
        p.write_text("{}")
    removed = remove_stale_temporaries([tmp_path / "pairs.jsonl", folder, tmp_path / "absent" / "x.jsonl"])
    assert sorted(removed) == sorted([left, stale])
    assert not left.exists() and not stale.exists() and all(p.exists() for p in kept)
