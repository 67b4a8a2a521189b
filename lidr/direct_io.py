"""Reading and writing big files start to end, around the page cache where that is faster.

A saved model's weights are written once and, in the process that wrote them, read at most
once more (the next train stage adds its LoRA deltas to them: `checkpoint.save_with_deltas`).
Through the page cache, every new page of such a file is one more page of memory to find: on
the benchmark VM (2 cores, a Firecracker guest) writing gemma-3-270m's 401 MB body took
0.5-1.1 s, nearly all of it kernel time, where O_DIRECT took 0.17-0.19 s; reading the file back
took 0.06 s from the cache, 0.25 s with O_DIRECT and 0.9 s through the cache from the disk
(bench/README.md, round 24). On other machines the page cache costs less, and O_DIRECT writes
go at the disk's speed: for checkpoints of several GB (an 8B model), it also keeps them from
pushing everything else out of the cache, as checkpointing libraries do.

`Writer` writes with O_DIRECT where the file system takes it (not tmpfs before Linux 6.6, for
one) and through the cache where it does not, or where a direct write is refused (EINVAL).
`Reader` reads through the cache where the file is there (three pages sampled without waiting:
`cached`), else with O_DIRECT.
Both go through one page-aligned buffer of their own, as O_DIRECT requires aligned memory,
offsets and lengths; `Writer` pads the last block and cuts the file back to its length."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

ALIGN = 4096  # O_DIRECT's alignment: a page (devices' logical blocks are 512 or 4096 bytes)
CHUNK = 8 << 20  # bytes per read or write call
_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the OS has none (macOS): plain reads and writes


class Writer:
    """A new file at `path` (truncated if it exists), written start to end by `write`; `close`
    (or the end of a `with` block without an error) writes the rest and closes it. `direct`:
    whether writes bypass the page cache (False once a direct write was refused, after which the
    cache takes the rest)."""

    def __init__(self, path: str | Path, direct: bool = True):
        self.path = Path(path)
        self._buf = mmap.mmap(-1, CHUNK)  # page-aligned
        self._view = memoryview(self._buf)
        self._filled = 0  # bytes waiting in the buffer
        self.size = 0  # bytes written so far, the buffer's included
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.fd, self.direct = -1, False
        if direct and _DIRECT:
            try:
                self.fd, self.direct = os.open(self.path, flags | _DIRECT, 0o666), True
            except OSError:  # EINVAL: a file system without O_DIRECT
                pass
        if self.fd < 0:
            self.fd = os.open(self.path, flags, 0o666)

    def write(self, data) -> None:
        """Append `data` (bytes, or any buffer: a tensor's `.numpy()`)."""
        data = memoryview(data).cast("B")
        while len(data):
            n = min(len(data), CHUNK - self._filled)
            self._view[self._filled:self._filled + n] = data[:n]
            self._filled += n
            self.size += n
            data = data[n:]
            if self._filled == CHUNK:
                self._flush(CHUNK)

    def close(self) -> None:
        """Write what is left and close the file."""
        if self.fd < 0:
            return
        try:
            if self._filled:
                tail = self._filled
                if self.direct:  # whole blocks only: pad with zeros, then cut the file back
                    padded = -(-tail // ALIGN) * ALIGN
                    self._view[tail:padded] = bytes(padded - tail)
                    tail = padded
                self._flush(tail)
                os.ftruncate(self.fd, self.size)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file without writing what is left (after an error: the caller's, or a
        write's, whose buffer would otherwise go out again)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(BufferError):  # a raised error's traceback may hold a view:
            self._view.release()  # the map goes with it
            self._buf.close()

    def _flush(self, n: int) -> None:
        """Write the buffer's first n bytes, and empty it."""
        done = 0
        while done < n:
            try:
                done += os.write(self.fd, self._view[done:n])
            except OSError as e:
                # EINVAL: O_DIRECT refused (an alignment this device or file system wants);
                # anything else (EIO, ENOSPC) is an error, not to be hidden in the page cache
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                # The rest through the page cache: a failed write wrote nothing, so the file's
                # offset stands after what was written
                import fcntl

                self.direct = False
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_DIRECT)
        self._filled = 0

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller failed: what waits in the buffer is not written after the error
            self.abort()


def cached(fd: int, size: int) -> bool:
    """Are the first, middle and last pages of the open file in the page cache? (Read without
    waiting: RWF_NOWAIT gives EAGAIN for a page that would need the disk.) True where the OS
    cannot tell, so that the caller keeps to ordinary reads."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None or not hasattr(os, "preadv"):
        return True
    page = bytearray(ALIGN)
    for offset in {0, size // 2 // ALIGN * ALIGN, max(size - 1, 0) // ALIGN * ALIGN}:
        try:
            os.preadv(fd, [page], offset, nowait)
        except BlockingIOError:
            return False
        except OSError:  # EOPNOTSUPP and the like: cannot tell
            return True
    return True


class Reader:
    """The file at `path`, read start to end: `readinto` fills a buffer from where the last read
    stopped, `skip` moves on. From the page cache where the file is there (`cached`), else with
    O_DIRECT. EOFError where the file ends first."""

    def __init__(self, path: str | Path, direct: bool | None = None):
        self.path = Path(path)
        self.offset = 0  # the next byte to give
        self._buf = self._view = None  # direct reads' buffer
        self._start = self._end = 0  # the file's bytes [start, end) are in it
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.size = os.fstat(self.fd).st_size
            if direct is None:
                direct = not cached(self.fd, self.size)
            self.direct = bool(direct and _DIRECT and hasattr(os, "preadv"))
            if self.direct:
                self._buf = mmap.mmap(-1, CHUNK)  # page-aligned
                self._view = memoryview(self._buf)
                try:
                    direct_fd = os.open(self.path, os.O_RDONLY | _DIRECT | getattr(os, "O_CLOEXEC", 0))
                except OSError:  # a file system without O_DIRECT
                    self.direct = False
                else:
                    os.close(self.fd)
                    self.fd = direct_fd
        except BaseException:
            self.close()
            raise

    def skip(self, n: int) -> None:
        self.offset += n

    def readinto(self, out) -> None:
        """Fill `out` (any writable buffer) with the next len(out) bytes."""
        out = memoryview(out).cast("B")
        if self.offset + len(out) > self.size:
            raise EOFError(f"{self.path}: ends at byte {self.size}, before byte {self.offset + len(out)}")
        if not self.direct:
            got = 0
            while got < len(out):
                if hasattr(os, "preadv"):  # into `out` itself
                    n = os.preadv(self.fd, [out[got:]], self.offset + got)
                else:  # (macOS)
                    piece = os.pread(self.fd, len(out) - got, self.offset + got)
                    n = len(piece)
                    out[got:got + n] = piece
                if n <= 0:
                    raise EOFError(f"{self.path}: ends before byte {self.offset + len(out)}")
                got += n
            self.offset += got
            return
        got = 0
        while got < len(out):
            if not self._start <= self.offset < self._end:
                self._fill(self.offset // ALIGN * ALIGN)
            n = min(len(out) - got, self._end - self.offset)
            at = self.offset - self._start
            out[got:got + n] = self._view[at:at + n]
            got += n
            self.offset += n

    def _fill(self, start: int) -> None:
        """The buffer from the aligned offset `start` on, as much of the file as it holds."""
        n = os.preadv(self.fd, [self._view], start)
        if n <= 0:
            raise EOFError(f"{self.path}: ends before byte {start}")
        self._start, self._end = start, start + n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._view is not None:
            with contextlib.suppress(BufferError):  # a raised error's traceback may hold a view
                self._view.release()
                self._buf.close()
            self._view = None

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
