"""lidr's CPU kernels in C++ (`lidr/csrc/`), built once per machine; None where they cannot be.

Two places where a decoding step spent its time on small operators and passes over memory
rather than on the weights (bench/README.md, round 25):
- Gemma 3's norms, rotary embeddings, activation and residual sums (`gemma3_ops.cpp`): 22-26 %
  of a bf16 decoding step's layer time, eight operator calls per norm, seven per rotary
  embedding. Each group is one pass here with the eager operators' own
  roundings, so the hidden states stay equal to transformers' bit for bit
  (lidr/backends/gemma3_body.py).
- the int8 screen's bounds (`int8_bounds.cpp`): three passes over a [rows, vocabulary] result
  (lidr/head.py, `Int8Head.upper`) in one.

They are compiled by `torch.utils.cpp_extension` (with ninja, a dependency of lidr) at the first
`load()` on a machine (about 35 s; `make setup` does it, as does `python -m lidr.kernels`) for that
CPU (-march=native), into `TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions)/lidr/, under
a name that changes with the sources, the flags, the CPU, torch, Python and the compiler. Where
they cannot be built (no C++ compiler or Python headers) or the norms would not reproduce ATen's
sums on this build of torch, `load()` returns None and lidr runs PyTorch's operators, with the
same results (logged once per process). `LIDR_KERNELS=0` turns them off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCES = [Path(__file__).resolve().parent / "csrc" / name
           for name in ("module.cpp", "gemma3_ops.cpp", "int8_bounds.cpp")]
HEADERS = [Path(__file__).resolve().parent / "csrc" / "kernels.h"]
# No fused multiply-add where the source does not ask for one: every product and sum rounds on
# its own, as in the eager operators. The machine's own vector instructions: the build is per CPU
# (see `_build`). OpenMP: ATen's parallel_for runs on torch's threads only where the kernel is
# compiled with it (its symbols come from the libgomp torch loads).
CFLAGS = ["-O3", "-ffp-contract=off", "-march=native", "-fopenmp"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernels:
    """The built extension (`module`) and the vector width ATen sums float rows with on this
    build of torch (`lanes`, found by `_lanes`), which the fused norms follow."""
    module: object
    lanes: int


def enabled() -> bool:
    return os.environ.get("LIDR_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def load() -> Kernels | None:
    """The kernels, built on first use; None where they are off, cannot be built, or would not
    give ATen's bits (the reason is logged once)."""
    if not enabled():
        return None
    try:
        module = _build()
    except Exception as e:  # no compiler, no headers, a failed build: PyTorch's operators instead
        log.warning("lidr's C++ kernels were not built (%s: %s); using PyTorch's operators", type(e).__name__,
                    _reason(e))
        return None
    lanes = _lanes(module)
    if lanes is None:
        log.warning("lidr's C++ norms do not reproduce this torch's sums; using PyTorch's operators")
        return None
    return Kernels(module, lanes)


def _build():
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH; CXX names another)")
    cpp_extension.verify_ninja_availability()  # raises "Ninja is required to load C++ extensions"
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory / "lidr.lock"):
        # torch's own lock file, left by a build that was killed (SIGKILL, a timeout): torch would
        # wait for it forever. Under our lock no other lidr process is building here.
        stale = directory / "lock"
        if stale.exists():
            log.warning("removing %s, left by a build that did not finish", stale)
            stale.unlink(missing_ok=True)
        return cpp_extension.load(directory.name, [str(p) for p in SOURCES], extra_cflags=CFLAGS,
                                  build_directory=str(directory), verbose=False)


def build_directory() -> Path:
    """Where this machine's build lives. Its name changes with what the build depends on: the
    sources (their text and where they are: torch rebuilds what it finds built from sources
    elsewhere, so two checkouts would take turns) and flags, the CPU (-march=native), torch (its
    headers and ABI), Python and the compiler; ninja does not see torch's headers change (system
    headers to it), so an upgraded torch needs a new name."""
    from torch.utils import cpp_extension

    code = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    from lidr.models import cpu_flags

    cpu = " ".join(sorted(cpu_flags())) or platform.machine()  # -march=native builds for these
    deps = "\n".join([str(SOURCES[0].parent), " ".join(CFLAGS), cpu, torch.__version__,
                      str(torch._C._GLIBCXX_USE_CXX11_ABI), sys.version, os.environ.get("CXX", "c++")])
    name = f"lidr_kernels_{hashlib.sha256(code + deps.encode()).hexdigest()[:12]}"
    return Path(cpp_extension.get_default_build_root()) / "lidr" / name


@contextlib.contextmanager
def _exclusive(path: Path):
    """An exclusive lock on `path` for the block (POSIX `flock`: released when the process ends,
    however it ends); no lock where there is no `fcntl` (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _reason(e: Exception) -> str:
    """The line of a build error that says why: torch's message starts with the whole compiler
    command line, and the compiler's own "error:" lines follow."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return next((ln for ln in lines if "error:" in ln.lower() and len(ln) < 300), lines[0][:300] if lines else "")


def _lanes(module) -> int | None:
    """The vector width (8 or 16 floats) whose summation order gives `torch.sum`'s bits on rows
    of the lengths a norm sums; None if neither does. ATen sums float rows in 8-lane vectors
    even on an AVX-512 CPU (its sum kernel is not built for AVX-512 here), but that is ATen's
    choice, so it is measured rather than assumed."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(64, n, generator=gen).pow(2) for n in (5, 7, 16, 100, 256, 640, 1152, 2048, 4096)]
    for lanes in (8, 16):
        if all(torch.equal(module.row_sum(x, lanes), x.sum(-1)) for x in rows):
            return lanes
    return None


if __name__ == "__main__":  # `make setup`: build them now rather than in the first run
    kernels = load()
    print("lidr's C++ kernels: " + (f"built ({kernels.lanes}-lane sums)" if kernels else "not available"))
