"""lidr/direct_io.py: big files written and read start to end around the page cache give the
same bytes as plain files, whatever the sizes, and fall back to the cache where they must."""

from __future__ import annotations

import errno
import os
import random

import pytest

import lidr.direct_io as dio
from lidr.direct_io import ALIGN, Reader, Writer

SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, dio.CHUNK - 1, dio.CHUNK, dio.CHUNK + 5, 2 * dio.CHUNK + ALIGN + 123]


def _pieces(data: bytes, seed: int):
    """`data` cut at random places, some pieces empty, some longer than a chunk."""
    rng, at = random.Random(seed), 0
    while at < len(data):
        n = rng.choice([0, 1, 7, ALIGN - 3, ALIGN, 100_000, dio.CHUNK + 17])
        yield data[at:at + n]
        at += n


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _takes_direct(folder) -> bool:
    """Does the file system under `folder` open files with O_DIRECT (asked of it directly)?"""
    if not dio._DIRECT:
        return False
    try:
        fd = os.open(folder / ".probe", os.O_WRONLY | os.O_CREAT | dio._DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.remove(folder / ".probe")
    return True


@pytest.mark.parametrize("direct", [True, False])
def test_the_file_holds_exactly_what_was_written(tmp_path, direct):
    for i, n in enumerate(SIZES):
        data, path = _data(n, i), tmp_path / f"f{i}"
        with Writer(path, direct=direct) as w:
            assert w.direct == (direct and _takes_direct(tmp_path))  # the path under test taken
            for piece in _pieces(data, i):
                w.write(piece)
        assert path.read_bytes() == data, n  # the padding of the last block cut off
        assert w.size == n and w.direct == (direct and _takes_direct(tmp_path))  # no write refused


def test_direct_writes_leave_the_file_out_of_the_cache_and_reads_then_go_direct(tmp_path):
    """Where the file system takes O_DIRECT (ext4 here), the written file is not in the page
    cache; a `Reader` sees that and reads it with O_DIRECT too; a file read once through the
    cache is read through it."""
    path = tmp_path / "big"
    data = _data(3 * dio.CHUNK + 999)
    with Writer(path) as w:
        w.write(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        uncached = not dio.cached(fd, len(data))
    finally:
        os.close(fd)
    if not (w.direct and uncached):  # tmpfs since Linux 6.6 takes O_DIRECT but is all cache
        pytest.skip("this file system does not take O_DIRECT, or keeps direct writes in memory")
    with Reader(path) as r:
        assert r.direct
        got = bytearray(len(data))
        r.readinto(got)
    assert got == data
    path.read_bytes()  # now in the cache
    with Reader(path) as r:
        assert not r.direct


@pytest.mark.parametrize("direct", [True, False])
def test_reads_and_skips_from_anywhere_give_the_files_bytes(tmp_path, direct):
    path = tmp_path / "f"
    data = _data(2 * dio.CHUNK + 5000, 1)
    path.write_bytes(data)
    rng = random.Random(2)
    with Reader(path, direct=direct) as r:
        assert r.direct == (direct and _takes_direct(tmp_path))
        at = 0
        while at < len(data):
            skip = min(rng.choice([0, 0, 1, 13, ALIGN + 1, dio.CHUNK // 3]), len(data) - at)
            r.skip(skip)
            at += skip
            n = min(rng.choice([1, 100, ALIGN, ALIGN + 7, dio.CHUNK + 3]), len(data) - at)
            buf = bytearray(n)
            r.readinto(buf)
            assert buf == data[at:at + n], at
            at += n
        with pytest.raises(EOFError, match=str(path)):
            r.readinto(bytearray(1))


def _refuse_direct_writes(monkeypatch, code: int, calls: list, after: int = 0):
    """os.write failing with `code` on a file opened with O_DIRECT, after `after` direct calls."""
    import fcntl

    real_write = os.write

    def write(fd, buf):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & dio._DIRECT:
            calls.append(len(buf))
            if len(calls) > after:
                raise OSError(code, os.strerror(code))
        return real_write(fd, buf)

    monkeypatch.setattr(dio.os, "write", write)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


@pytest.mark.parametrize("after", [0, 1, 2])
@pytest.mark.parametrize("n", [5000, dio.CHUNK + 10, 2 * dio.CHUNK + 777])
def test_a_refused_direct_write_goes_on_through_the_cache(tmp_path, monkeypatch, n, after):
    """A direct write refused (EINVAL, as for a device that wants another alignment) at the
    first, second or third call, the padded last block among them, is not an error: the rest
    goes through the page cache from where the file stands, and the file is whole, unpadded."""
    path = tmp_path / "f"
    with Writer(path) as w:
        if not w.direct:
            pytest.skip("this file system does not take O_DIRECT")
        calls: list = []
        _refuse_direct_writes(monkeypatch, errno.EINVAL, calls, after)
        data = _data(n, 3)
        w.write(data)
    assert len(calls) == min(after + 1, -(-n // dio.CHUNK)) and w.direct == (len(calls) <= after)
    assert path.read_bytes() == data


def test_a_failing_direct_write_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    """EIO (or ENOSPC) on a direct write is raised, not hidden in the page cache, and nothing
    is left open."""
    before = _open_fds()
    with pytest.raises(OSError, match="Input/output"):
        with Writer(tmp_path / "f") as w:
            if not w.direct:
                pytest.skip("this file system does not take O_DIRECT")
            _refuse_direct_writes(monkeypatch, errno.EIO, [])
            w.write(_data(dio.CHUNK + 5))
    assert _open_fds() == before


def test_an_error_in_the_callers_block_leaves_no_tail_written(tmp_path):
    """The caller's error (a short source, say) closes the file without writing what waits in
    the buffer, rather than making it look complete."""
    path = tmp_path / "f"
    with pytest.raises(RuntimeError):
        with Writer(path) as w:
            w.write(_data(dio.CHUNK + 100))
            raise RuntimeError("the source ended early")
    assert path.stat().st_size == dio.CHUNK  # the full buffer written, not the 100 bytes after it


def test_without_o_direct_both_use_the_cache(tmp_path, monkeypatch):
    """Where the OS has no O_DIRECT nor preadv (macOS), plain reads and writes."""
    monkeypatch.setattr(dio, "_DIRECT", 0)
    monkeypatch.delattr(dio.os, "preadv", raising=False)
    path = tmp_path / "f"
    data = _data(dio.CHUNK + 3)
    with Writer(path) as w:
        w.write(data)
    assert not w.direct and path.read_bytes() == data
    with Reader(path, direct=True) as r:
        assert not r.direct
        buf = bytearray(len(data))
        r.readinto(buf)
    assert buf == data


def test_a_failed_write_is_raised_to_the_writer(tmp_path, monkeypatch):
    """A write that fails for good (the disk full) is raised to the caller, at its next full
    buffer or at close, not lost."""
    def disk_full(fd, buf):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dio.os, "write", disk_full)
    before = _open_fds()
    for n in (10, 3 * dio.CHUNK):  # at close, and at the first full buffer
        with pytest.raises(OSError, match="No space"):
            with Writer(tmp_path / f"f{n}", direct=False) as w:
                w.write(_data(n))
        assert _open_fds() == before, n  # the file closed all the same
