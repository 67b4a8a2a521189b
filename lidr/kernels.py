"""lidr's CPU kernels in C++ (`lidr/csrc/`), built once per machine; None where they cannot be.

Two places where a decoding step spent its time on small operators and passes over memory
rather than on the weights (bench/README.md, round 25):
- Gemma 3's norms, rotary embeddings, activation and residual sums (`gemma3_ops.cpp`): about a
  fifth of a bf16 step's body outside the linear layers and attention, eight operator calls per
  norm, seven per rotary embedding. Each group is one pass here with the eager operators' own
  roundings, so the hidden states stay equal to transformers' bit for bit
  (lidr/backends/gemma3_body.py).
- the int8 screen's bounds (`int8_bounds.cpp`): three passes over a [rows, vocabulary] result
  (lidr/head.py, `Int8Head.upper`) in one.

They are compiled by `torch.utils.cpp_extension` at the first `load()` on a machine (about 30 s;
`make setup` does it, as does `python -m lidr.kernels`) for that CPU (-march=native) and cached by
torch (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions) under a name that changes with
the sources, the flags and the CPU. Where they cannot be built (no C++ compiler or Python
headers) or the norms would not reproduce ATen's sums on this build of torch, `load()` returns
None and lidr runs PyTorch's operators (logged once). `LIDR_KERNELS=0` turns them off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
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
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        log.warning("lidr's C++ kernels were not built (%s: %s); using PyTorch's operators", type(e).__name__, first)
        return None
    lanes = _lanes(module)
    if lanes is None:
        log.warning("lidr's C++ norms do not reproduce this torch's sums; using PyTorch's operators")
        return None
    return Kernels(module, lanes)


def _build():
    from torch.utils.cpp_extension import load as load_extension

    code = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    digest = hashlib.sha256(code + " ".join(CFLAGS).encode() + _cpu().encode()).hexdigest()[:12]
    return load_extension(f"lidr_kernels_{digest}", [str(p) for p in SOURCES], extra_cflags=CFLAGS, verbose=False)


def _cpu() -> str:
    """The CPU's model and feature flags (Linux), else what `platform` knows of it: a cache
    shared by machines of different CPUs keeps one build for each."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags"))
    except OSError:
        import platform

        return platform.processor() or platform.machine()


def _lanes(module) -> int | None:
    """The vector width (8 or 16 floats) whose summation order gives `torch.sum`'s bits on rows
    of the lengths a norm sums; None if neither does. ATen sums float rows in 8-lane vectors
    even on an AVX-512 CPU (its sum kernel is not built for AVX-512 here), but that is ATen's
    choice, so it is measured rather than assumed."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(64, n, generator=gen).pow(2) for n in (16, 100, 256, 640, 1152, 2048, 4096)]
    for lanes in (8, 16):
        if all(torch.equal(module.row_sum(x, lanes), x.sum(-1)) for x in rows):
            return lanes
    return None


if __name__ == "__main__":  # `make setup`: build them now rather than in the first run
    kernels = load()
    print("lidr's C++ kernels: " + (f"built ({kernels.lanes}-lane sums)" if kernels else "not available"))
