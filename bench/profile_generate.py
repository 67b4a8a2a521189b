"""Where lidr's generation time goes: one decoding step's cost against the batch size, the
output layer's share of it, and generate's time outside the model forward.

    .venv/bin/python bench/profile_generate.py              # about 1-2 minutes on 2 cores
    .venv/bin/python bench/profile_generate.py --batches 1,2 --steps 2   # smoke test

(1) decode step: the fp32 model with a KV cache of the demo prompts (~90 tokens), one new token
    per row, as lidr's decoder runs it (body, then its output layer on the last position;
    layers packed for oneDNN unless --no-packed); seconds per step and per row-step for each
    batch size, and the output layer (640 -> 262144) alone on the same rows. If a step's cost
    grows with the rows in it, rows that already stopped but stay in the batch cost as much
    as live ones.
(2) generate: lidr's `HFBackend.generate` on --rows demo prompts for --new-tokens tokens
    (no early stop), time inside the model forward vs the whole call.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,4,8,16,32,64")
    p.add_argument("--steps", type=int, default=6, help="timed decode steps per batch size")
    p.add_argument("--rows", type=int, default=32, help="rows for the generate measurement")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-packed", action="store_true", help="plain MKL layers (generation.cpu_packed_weights: false)")
    args = p.parse_args(argv)
    import torch

    from lidr.backends.hf import HFBackend
    from lidr.models import resolve_model
    from lidr.templates import choose_format

    if args.threads:
        torch.set_num_threads(args.threads)
    common.print_machine(common.machine())
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    fp32 = common.matmul_gflops("float32", seconds=1.5)
    backend = HFBackend(resolve_model("gemma-3-270m"), dtype="float32", packed_weights=not args.no_packed)
    model, tok, dec = backend.model, backend.tokenizer, backend.decoder
    print(f"{dec.packed_layers} linear layers packed for oneDNN (generation.cpu_packed_weights)")
    params = sum(x.numel() for x in model.parameters())
    fmt = choose_format(tok, "auto")
    sizes = [int(b) for b in args.batches.split(",")]
    items = common.demo_items(fmt, max(max(sizes), args.rows))
    head = model.get_output_embeddings()

    rows = []
    with torch.inference_mode():
        for b in sizes:
            enc = tok([pr for _, pr, _ in items[:b]], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model(**enc, use_cache=True, logits_to_keep=1)
            past, mask = out.past_key_values, enc.attention_mask
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            times = []
            for _ in range(args.steps + 1):  # the first step is a warm-up
                mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
                t0 = time.perf_counter()
                # lidr's step: the body (lidr/backends/gemma3_body.py for Gemma 3), then its
                # output layer on the last position (decode.py)
                h = dec._hidden(nxt, mask, mask.sum(-1, keepdim=True) - 1, past)[:, -1]
                nxt = dec._head(h).argmax(-1, keepdim=True)
                times.append(time.perf_counter() - t0)
            step = sum(times[1:]) / args.steps
            h = torch.randn(b, head.in_features)
            dec._head(h)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                dec._head(h)
            head_s = (time.perf_counter() - t0) / args.steps
            gflops = b * 2 * params / step / 1e9
            rows.append([b, round(1000 * step, 1), round(1000 * step / b, 1), round(b / step, 1),
                         f"{100 * head_s / step:.0f}%", round(gflops, 1), f"{100 * gflops / fp32:.0f}%"])
            print(f"batch {b}: {1000 * step:.0f} ms/step  load {common.loadavg()}", flush=True)
    print()
    print(common.table(["batch", "ms/step", "ms/row-step", "tok/s", "output layer share", "GFLOP/s",
                        "% fp32 matmul"], rows))

    # (2) lidr's generate: time inside the model forward (body + output layer) vs the whole call
    fwd = {"s": 0.0}
    forward = backend.decoder._step

    def timed(*a):
        t0 = time.perf_counter()
        out = forward(*a)
        fwd["s"] += time.perf_counter() - t0
        return out

    backend.decoder._step = timed
    batch = items[: args.rows]
    # no stop strings and no EOS so every row runs the full length; the stopping check still runs
    backend.decoder.eos_ids = set()
    t0 = time.perf_counter()
    backend.generate([pr for _, pr, _ in batch], max_new_tokens=args.new_tokens,
                     stops=[["\x00never\x00"] for _ in batch], repetition_penalty=1.1)
    total = time.perf_counter() - t0
    print(f"\nHFBackend.generate, {len(batch)} rows x {args.new_tokens} new tokens: {total:.1f} s, "
          f"model forward {fwd['s']:.1f} s ({100 * fwd['s'] / total:.0f}%), outside forward "
          f"{total - fwd['s']:.1f} s (logits processors, stop checks, cache bookkeeping, decoding)")
    b_small, b_big = rows[0], rows[-1]
    print(common.keyvals({"fp32_gflops": fp32, f"ms_per_step_b{b_small[0]}": b_small[1],
                          f"ms_per_step_b{b_big[0]}": b_big[1],
                          f"ms_per_row_step_b{b_big[0]}": b_big[2],
                          "generate_outside_forward_share": (total - fwd["s"]) / total}))


if __name__ == "__main__":
    main()
