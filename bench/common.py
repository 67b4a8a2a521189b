"""Helpers shared by the bench scripts: machine description, matmul / bandwidth
measurements, the demo prompts in lidr's format, a plain-text table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Library chatter would drown the tables (as lidr's CLI does).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_PROMPTS = ROOT / "lidr" / "data" / "demo_prompts.jsonl"
DEMO_LANGS = ("en", "es", "de", "fr")


def machine() -> dict:
    """CPU model, cores, threads, load, torch/transformers versions."""
    info = {"python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name")
        info["cpus"] = fields.get("CPU(s)")
        info["cores_per_socket"] = fields.get("Core(s) per socket")
        info["threads_per_core"] = fields.get("Thread(s) per core")
        flags = fields.get("Flags", "").split()
        info["simd"] = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    except (OSError, subprocess.CalledProcessError):
        pass
    import torch
    import transformers

    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["transformers"] = transformers.__version__
    info["loadavg_at_start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def print_machine(info: dict) -> None:
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def matmul_gflops(dtype_name: str, n: int = 1024, seconds: float = 2.0) -> float:
    """Measured square matmul rate (GFLOP/s) of torch on this CPU at the current thread count."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up (oneDNN/BLAS init)
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n ** 3 * reps / elapsed / 1e9


def int8_gops(n: int = 1024, seconds: float = 1.0) -> float:
    """Measured int8 product rate (GOP/s, multiply-adds x 2) of fbgemm's `quantized::linear_dynamic`
    (the kernel of lidr's int8 output layer, lidr/head.py) on n x n weights and n rows; nan
    where fbgemm is missing."""
    import torch

    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return float("nan")
    import warnings

    engine, torch.backends.quantized.engine = torch.backends.quantized.engine, "fbgemm"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice for quantized tensors
            w = torch.quantize_per_channel(torch.randn(n, n), torch.full((n,), 0.01, dtype=torch.double),
                                           torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(w, None)
        x = torch.randn(n, n)
        torch.ops.quantized.linear_dynamic(x, packed, True)  # warm-up
        reps, start = 0, time.perf_counter()
        while True:
            torch.ops.quantized.linear_dynamic(x, packed, True)
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2 * n ** 3 * reps / elapsed / 1e9
    finally:
        torch.backends.quantized.engine = engine


def memory_gbps(mb: int = 512, seconds: float = 1.5) -> float:
    """Measured read bandwidth (GB/s): summing a large fp32 tensor."""
    import torch

    x = torch.ones(mb * 2 ** 20 // 4)
    x.sum()
    reps, start = 0, time.perf_counter()
    while True:
        x.sum()
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return x.numel() * 4 * reps / elapsed / 1e9


def demo_items(fmt, n: int) -> list[tuple[tuple[str, str], str, list[str]]]:
    """The first n (id, lang) rows of the demo prompts, languages interleaved per id
    (id1 en/es/de/fr, id2 en/...), as (key, prompt string, stop strings) for run_batched."""
    rows = [json.loads(line) for line in DEMO_PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = []
    for row in rows:
        for lang in DEMO_LANGS:
            text = row["translations"][lang]
            items.append(((row["id"], lang), fmt.response_prompt(text, lang), fmt.response_stops(lang)))
            if len(items) == n:
                return items
    if len(items) < n:
        raise SystemExit(f"only {len(items)} demo prompt rows available, asked for {n}")
    return items


def table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if k and _num(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        if c != c:  # nan
            return "-"
        return f"{c:.3g}" if abs(c) < 10 else f"{c:.1f}" if abs(c) < 1000 else f"{c:.0f}"
    return "-" if c is None else str(c)


def _num(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
        return True
    except ValueError:
        return s == "-"


def keyvals(d: dict) -> str:
    """The final `key=value ...` line."""
    out = []
    for k, v in d.items():
        if isinstance(v, float):
            v = "nan" if v != v else f"{v:.4g}"
        out.append(f"{k}={v}")
    return " ".join(out)
