"""Half-precision weights on a CPU without bf16: what fbgemm's product with fp16 weights and
fp32 activations (`torch.ops.quantized.linear_prepack_fp16` / `linear_dynamic_fp16`) would give
lidr's generation. Measured in round 6 and not used by lidr (bench/README.md says why).

(1) layers: the output layer (262144 x 640) and 18 gate / 18 down layers of gemma-3-270m's
    shapes, random weights, packed fp32 through oneDNN (as lidr runs them) against fbgemm fp16,
    median of 5, at 1-64 rows; and an exact screen of the output layer (fp16 logits, then exact
    fp32 logits for the tokens within the error bound) against packed fp32 + argmax;
(2) packing: seconds to pack the output layer for fbgemm, in one piece and in blocks of rows;
(3) workload: generate.py's prompts (penalty 1.1, 128 new tokens) through two backends in one
    process, lidr as shipped and the same with all 127 layers through fbgemm fp16 (not exact),
    runs alternated; seconds, and how many answers are the same.

    .venv/bin/python bench/fp16_weights.py                      # about 4 minutes on 2 cores
    .venv/bin/python bench/fp16_weights.py --skip workload      # (1) and (2) only
    .venv/bin/python bench/fp16_weights.py --rows 1,4 --n 2 --max-new-tokens 8 --rounds 1   # smoke test

Ends with one line: `speedup_fp16_workload=... identical=... pack_model_seconds=...`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HIDDEN, VOCAB, FFN = 640, 262144, 2048
BLOCK = 8192  # output-layer rows per fbgemm pack (packing it whole is 3x slower)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,4,8,16,32,64", help="rows per product in (1)")
    p.add_argument("--skip", default="", help="comma-separated: layers, pack, workload")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--n", type=int, default=32, help="prompts in (3)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--rounds", type=int, default=2, help="alternated runs of each backend in (3)")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def fp16_packs(weight, block: int = BLOCK) -> list:
    import torch

    w = weight.detach()
    return [torch.ops.quantized.linear_prepack_fp16(w[i:i + block], None) for i in range(0, w.shape[0], block)]


def fp16_linear(x, packs):
    import torch

    outs = [torch.ops.quantized.linear_dynamic_fp16(x, p) for p in packs]
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def screened_choice(h, packs, weight, max_row_norm: float):
    """Exact greedy choice of each row of h: fbgemm's fp16 logits are within eps of the fp32 ones
    (weights rounded to fp16: 2^-11 of each; fp32 sums of `d` products, in both: d 2^-24 of their
    absolute sum each, rounded up to d 2^-22 together; fp16 subnormals: 2^-25 of a weight
    absolutely, at most d 2^-25 max|h|), so only tokens within 2 eps of a row's best can win;
    those get exact fp32 logits."""
    import torch

    d = h.shape[1]
    approx = fp16_linear(h, packs)
    eps = ((2 ** -11 + d * 2 ** -22) * max_row_norm * h.norm(dim=1, keepdim=True)
           + d * 2 ** -24 * h.abs().amax(1, keepdim=True))
    cand = (approx >= approx.amax(1, keepdim=True) - 2 * eps).any(0).nonzero()[:, 0]
    exact = torch.nn.functional.linear(h, weight[cand])
    return cand[exact.argmax(-1)], len(cand)


def layers(rows: list[int]) -> None:
    import torch

    from lidr import packed_linear

    torch.manual_seed(0)
    print("(1) layers, median of 5 (ms): packed fp32 (oneDNN) | fbgemm fp16 | ratio")
    out = [["layer", "rows", "fp32 packed", "fp16", "fp32 / fp16"]]
    shapes = {"output layer": [(VOCAB, HIDDEN)], "18 gate layers": [(FFN, HIDDEN)] * 18,
              "18 down layers": [(HIDDEN, FFN)] * 18}
    head_w = None
    for name, shape in shapes.items():
        ws = [torch.randn(o, i) * 0.02 for o, i in shape]
        fp32 = [packed_linear.pack_weight(w, rows_hint=16) for w in ws]
        fp16 = [fp16_packs(w) for w in ws]
        for r in rows:
            x = torch.randn(r, shape[0][1])
            a = median_ms(lambda: [packed_linear.linear(x, p) for p in fp32])
            b = median_ms(lambda: [fp16_linear(x, p) for p in fp16])
            out.append([name, r, round(a, 1), round(b, 1), round(a / b, 2)])
        if name == "output layer":
            head_w, head_fp32, head_fp16 = ws[0], fp32[0], fp16[0]
    print(common.table(out[0], out[1:]))

    print("\n    exact screen of the output layer (fp16 logits, exact fp32 for the tokens within the bound)")
    print("    against packed fp32 logits + argmax; hidden states with a clear best token:")
    norm = float(head_w.norm(dim=1).max())
    out = [["rows", "fp32 + argmax ms", "screen ms", "ratio", "tokens kept", "same choices"]]
    for r in rows:
        h = torch.randn(r, HIDDEN) * 3
        h[:, :8] = head_w[5, :8].sign() * 20
        a = median_ms(lambda: packed_linear.linear(h, head_fp32).argmax(-1))
        b = median_ms(lambda: screened_choice(h, head_fp16, head_w, norm))
        got, kept = screened_choice(h, head_fp16, head_w, norm)
        same = bool((got == packed_linear.linear(h, head_fp32).argmax(-1)).all())
        out.append([r, round(a, 1), round(b, 1), round(a / b, 2), kept, same])
    print(common.table(out[0], out[1:]))


def packing() -> float:
    """Seconds to pack the output layer for fbgemm in blocks of BLOCK rows (also whole, and with
    two threads, printed)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from lidr import packed_linear

    w = torch.randn(VOCAB, HIDDEN) * 0.02
    t0 = time.perf_counter()
    torch.ops.quantized.linear_prepack_fp16(w, None)
    whole = time.perf_counter() - t0
    t0 = time.perf_counter()
    fp16_packs(w)
    blocks = time.perf_counter() - t0
    chunks = [w[i:i + BLOCK] for i in range(0, VOCAB, BLOCK)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda c: torch.ops.quantized.linear_prepack_fp16(c, None), chunks))
    threads = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed_linear.pack_weight(w, rows_hint=16)
    onednn = time.perf_counter() - t0
    print(f"\n(2) packing the output layer ({VOCAB} x {HIDDEN}): fbgemm fp16 whole {whole:.2f} s, in blocks of "
          f"{BLOCK} rows {blocks:.2f} s, blocks on two threads {threads:.2f} s; oneDNN fp32 (lidr) {onednn:.2f} s")
    return blocks


def to_fp16(backend) -> float:
    """Every linear layer of backend's model (and its output layer) through fbgemm fp16, in
    place; returns the seconds it took. The decoder's fp16 screen and packed head are dropped."""
    import types

    import torch
    from torch import nn

    model, dec = backend.model, backend.decoder
    head = model.get_output_embeddings()
    t0 = time.perf_counter()

    def fp16_forward(packs):
        def forward(x):
            y = fp16_linear(x.reshape(-1, x.shape[-1]).contiguous(), packs)
            return y.view(*x.shape[:-1], y.shape[-1])
        return forward

    for m in model.modules():
        if type(m) is nn.Linear and m is not head:
            m.forward = fp16_forward(fp16_packs(m.weight))
    head_packs = fp16_packs(head.weight)
    seconds = time.perf_counter() - t0
    exact_head = dec._head
    dec.half_head, dec.pack_head, dec.packed_head = False, False, None  # head16 below computes the logits

    def head16(self, h, tokens=None):
        if tokens is not None:
            return exact_head(h, tokens)
        logits = fp16_linear(h, head_packs).float()
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    dec._head = types.MethodType(head16, dec)
    return seconds


def workload(args) -> tuple[float, int, int, float]:
    from generate import run_lidr

    from lidr.backends.hf import HFBackend
    from lidr.models import resolve_model
    from lidr.templates import choose_format

    path = resolve_model(args.model)
    # fp32 both: fbgemm's fp16 product takes fp32 activations (`dtype: auto` is bf16 on a CPU
    # with fast bf16, where this script failed from round 17 on until round 25)
    shipped = HFBackend(path, dtype="float32")
    half = HFBackend(path, dtype="float32", packed_weights=False)
    pack_seconds = to_fp16(half)
    items = common.demo_items(choose_format(shipped.tokenizer, "auto"), args.n)
    print(f"\n(3) workload: {len(items)} prompts, penalty {args.repetition_penalty}, up to {args.max_new_tokens} "
          f"new tokens; fbgemm packing of the whole model {pack_seconds:.2f} s")
    seconds, texts = {"fp32": [], "fp16": []}, {}
    for r in range(args.rounds):
        for name, backend in (("fp32", shipped), ("fp16", half)):
            texts[name], secs, _ = run_lidr(backend, items, 64, args.max_new_tokens, args.repetition_penalty)
            seconds[name].append(secs)
            print(f"    round {r + 1}: {name} {secs:.2f} s   load {common.loadavg()}", flush=True)
    same = sum(texts["fp32"][k] == texts["fp16"][k] for k in texts["fp32"])
    ratio = sum(seconds["fp32"]) / sum(seconds["fp16"])
    print(f"    lidr as shipped {' / '.join(f'{s:.1f}' for s in seconds['fp32'])} s, fp16 weights "
          f"{' / '.join(f'{s:.1f}' for s in seconds['fp16'])} s: {ratio:.2f}x; answers the same {same}/{len(items)}")
    return ratio, same, len(items), pack_seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    warnings.filterwarnings("ignore", message=".*deprecated.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    common.print_machine(common.machine())
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        print("fbgemm is not in this torch build (it is on x86-64): nothing to measure")
        return
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    nan = float("nan")
    figures = {"speedup_fp16_workload": nan, "identical": nan, "n": nan, "pack_model_seconds": nan,
               "pack_head_seconds": nan}
    if "layers" not in skip:
        layers([int(r) for r in args.rows.split(",")])
    if "pack" not in skip:
        figures["pack_head_seconds"] = packing()
    if "workload" not in skip:
        ratio, same, n, pack = workload(args)
        figures.update(speedup_fp16_workload=ratio, identical=same, n=n, pack_model_seconds=pack)
    print(common.keyvals(figures))


if __name__ == "__main__":
    main()
