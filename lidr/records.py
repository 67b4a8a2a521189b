"""Reading and writing the run folder's files safely.

JSONL stage outputs are appended one record at a time and flushed, so an interrupted
stage keeps everything it finished; a torn last line (a crash mid-write) is cut off
when the file is reopened. Whole files are written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator


class RecordError(ValueError):
    """Bad input in a data file, naming file, line and field."""


def _file_mode() -> int:
    """What a plain open() would give (mkstemp's temporary files are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _temporary(path: Path) -> tuple[str, str]:
    """The prefix and suffix of `atomic_write_bytes`'s temporary files for `path` (a random
    part goes between), which `remove_stale_temporaries` looks for."""
    return f".{path.name}.", ".tmp"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temporary(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def remove_stale_temporaries(outputs: Iterable[str | Path]) -> list[Path]:
    """Remove the temporary files that atomic_write_bytes leaves when its process is killed
    before the rename (`_temporary`: `.<name>.<random>.tmp`): beside each output, and inside an
    output folder. Called when an interrupted stage is resumed or redone, so no other process is
    writing them. Returns what was removed."""
    removed = []
    for out in map(Path, outputs):
        prefix, suffix = _temporary(out)
        found = list(out.parent.glob(f"{prefix}*{suffix}")) if out.parent.is_dir() else []
        if out.is_dir():
            found += out.rglob(f".*{suffix}")
        for p in found:
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a malformed line is a RecordError."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise RecordError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def load_records(path: str | Path) -> list[dict]:
    return [r for _, r in read_jsonl(path)] if Path(path).exists() else []


def repair_tail(path: Path) -> None:
    """Cut a torn last line left by a crash in the middle of a write."""
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with path.open("r+b") as f:
        f.truncate(cut)


class JsonlAppender:
    """Append records to a stage output, one flushed line each; knows the ids already there.

    Each line is flushed as it is written, so a killed process loses none. They reach the disk
    (fsync) at most `sync_every` seconds apart and at close: a machine that goes down loses at
    most that much, and repair_tail drops a torn last line. An fsync per line cost 0.7 ms, 0.1 s
    of the demo's generation stages."""

    def __init__(self, path: str | Path, key: str = "id", sync_every: float = 1.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self.done: set = {r[key] for r in load_records(self.path)}
        self.key = key
        self.sync_every = sync_every
        self._f = self.path.open("a", encoding="utf-8")
        self._synced = time.monotonic()
        self._unsynced = False

    def write(self, rec: dict) -> None:
        if rec[self.key] in self.done:  # never duplicate a record on resume
            return
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        self._unsynced = True
        if time.monotonic() - self._synced >= self.sync_every:
            self._sync()
        self.done.add(rec[self.key])

    def _sync(self) -> None:
        os.fsync(self._f.fileno())
        self._synced, self._unsynced = time.monotonic(), False

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            self._f.flush()
            if self._unsynced:
                self._sync()
        finally:
            self._f.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_digest(path: str | Path) -> str:
    """Content hash of a file, or of a folder's files (size + mtime for big weight files)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    elif path.exists():
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(b"<missing>")
    return h.hexdigest()[:16]


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
