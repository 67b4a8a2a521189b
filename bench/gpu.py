"""Generation on a GPU: lidr's hf engine vs transformers' `generate` (batch 1, and one static padded batch).

The same work for every engine: the demo's real prompts (chat template, few-shot format),
greedy, repetition penalty 1.1, every row run to the token limit (EOS and stop strings
off, so that a model with random weights does the same work as a trained one). Reports
tokens per second, seconds per 100 answers, and the model's FLOPs per token against the
GPU's measured bf16 matrix-multiply rate.

- lidr: `HFBackend(device="cuda")` + `run_batched`: continuous batching, shared prompt
  prefixes, a KV cache that grows in place, bf16 (`dtype: auto` on a GPU with bf16).
- hf-batch1: `model.generate` one prompt at a time, in the dtype given (default bfloat16).
- hf-static: `model.generate` on left-padded batches of the same size as lidr's.

The device machine this was written for cannot fetch the embedded model (nothing but the
working tree travels, 64 MiB), so `--random-like DIR` builds a model of DIR's config with
random weights and DIR's tokenizer (M0's folder: config.json and the tokenizer files, about
15 MB); `--model` takes a real model folder instead.

    python bench/gpu.py --random-like M0_DIR                 # on a machine with CUDA
    python bench/gpu.py --model PATH --n 256 --batch-size 128
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model folder (or lidr model spec)")
    src.add_argument("--random-like", type=Path, metavar="DIR",
                     help="random weights of DIR's config.json, with DIR's tokenizer files")
    p.add_argument("--n", type=int, default=128, help="answers for lidr and hf-static (default 128)")
    p.add_argument("--n-batch1", type=int, default=8, help="answers for hf-batch1 (default 8)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", help="the transformers baselines' dtype (default bfloat16)")
    p.add_argument("--skip", default="", help="comma-separated engines to skip: lidr,hf-batch1,hf-static")
    return p.parse_args(argv)


def random_model(like: Path, out: Path) -> Path:
    """A model of `like`'s config with random weights (seed 0), saved with `like`'s tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lidr.models import TOKENIZER_FILES

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(like))
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (like / name).is_file():
            shutil.copy2(like / name, out / name)
    return out


def bf16_tflops(seconds: float = 1.0) -> float:
    """Measured bf16 matrix-multiply rate on the GPU (8192^3 products)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12


def run_lidr(path, items, batch_size, max_new, rep):
    import torch

    from lidr.backends.hf import HFBackend

    backend = HFBackend(path, device="cuda")
    backend.decoder.eos_ids = set()  # every row to the token limit
    backend.generate([p for _, p, _ in items[:2]], max_new_tokens=2, repetition_penalty=rep)  # warm-up
    torch.cuda.synchronize()
    reasons, t0 = [], time.perf_counter()
    backend.run_batched([(k, p, []) for k, p, _ in items], batch_size=batch_size,
                        on_result=lambda k, g: reasons.append(g.finish_reason), max_new_tokens=max_new,
                        repetition_penalty=rep)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    assert reasons == ["length"] * len(items)  # no EOS, no stop strings: every row ran to the limit
    tokens = max_new * len(items)
    dtype = backend.model.dtype
    backend.close()
    return secs, tokens, str(dtype).removeprefix("torch.")


def run_hf(model, tok, items, batch_size, max_new, rep):
    """`model.generate` on left-padded batches of `batch_size` prompts (`tok` pads on the left),
    `min_new_tokens` = the limit."""
    import torch

    def gen(prompts):
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
        return model.generate(**enc, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                              repetition_penalty=rep, pad_token_id=tok.pad_token_id, temperature=None, top_p=None,
                              top_k=None)[:, enc.input_ids.shape[1]:]

    gen([items[0][1]])  # warm-up
    torch.cuda.synchronize()
    tokens, t0 = 0, time.perf_counter()
    for s in range(0, len(items), batch_size):
        tokens += gen([p for _, p, _ in items[s:s + batch_size]]).numel()
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return secs, tokens


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lidr.models import causal_lm, load_tokenizer, resolve_model
    from lidr.templates import choose_format

    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device (bench/generate.py measures the CPU)")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    common.print_machine(common.machine())
    print(f"device: {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda}); "
          f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    peak = bf16_tflops()
    with tempfile.TemporaryDirectory(prefix="lidr-bench-gpu-") as tmp:
        if args.random_like:
            path = random_model(args.random_like, Path(tmp) / "model")
            what = f"random weights of {args.random_like}'s config"
        else:
            path, what = resolve_model(args.model), args.model
        tok = load_tokenizer(path)
        fmt = choose_format(tok, "auto")
        items = common.demo_items(fmt, args.n)
        sub = items[:: max(1, len(items) // args.n_batch1)][: args.n_batch1]
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            shape = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in shape.parameters())
        print(f"model: {what}, {params / 1e6:.1f} M parameters, {2 * params / 1e9:.3f} GFLOP per token; "
              f"GPU bf16 matmul {peak:.0f} TFLOP/s (compute limit {peak * 1e12 / (2 * params):,.0f} tok/s)")
        prompt_tokens = [len(tok(p, add_special_tokens=False).input_ids) for _, p, _ in items]
        print(f"prompts: {len(items)} ({fmt.kind} format), mean {sum(prompt_tokens) / len(items):.0f} tokens; "
              f"{args.max_new_tokens} new tokens each; batch {args.batch_size}; hf-batch1 on {len(sub)}")
        results = {}
        if "lidr" not in skip:
            secs, tokens, dtype = run_lidr(path, items, args.batch_size, args.max_new_tokens, 1.1)
            results["lidr"] = (len(items), secs, tokens, f"HFBackend+run_batched, batch {args.batch_size}, {dtype}")
        if {"hf-batch1", "hf-static"} - skip:
            from transformers import AutoTokenizer

            # plain transformers, loaded once for both; a tokenizer of its own that pads on the left
            # (lidr's is shared: load_tokenizer)
            plain = causal_lm(path, dtype=getattr(torch, args.dtype)).to("cuda").eval()
            left = AutoTokenizer.from_pretrained(path, padding_side="left")
            if left.pad_token is None:
                left.pad_token = left.eos_token
            if "hf-batch1" not in skip:
                secs, tokens = run_hf(plain, left, sub, 1, args.max_new_tokens, 1.1)
                results["hf-batch1"] = (len(sub), secs, tokens, f"model.generate batch 1, {args.dtype}")
            if "hf-static" not in skip:
                secs, tokens = run_hf(plain, left, items, args.batch_size, args.max_new_tokens, 1.1)
                results["hf-static"] = (len(items), secs, tokens,
                                        f"model.generate, left-padded batches of {args.batch_size}, {args.dtype}")
            del plain
    rows = []
    for name, (n, secs, tokens, how) in results.items():
        rate = tokens / secs
        rows.append([name, n, tokens, round(secs, 2), round(rate, 1), round(100 * secs / n, 2),
                     f"{rate * 2 * params / (peak * 1e12):.2%}", how])
    print()
    print(common.table(["engine", "answers", "tokens", "seconds", "tok/s", "s per 100 answers",
                        "share of bf16 limit", "how"], rows))
    nan = float("nan")
    per_answer = {k: secs / n for k, (n, secs, _, _) in results.items()}
    lidr = per_answer.get("lidr")
    figures = {"speedup_vs_hf_batch1": per_answer["hf-batch1"] / lidr if lidr and "hf-batch1" in per_answer else nan,
               "speedup_vs_hf_static": per_answer["hf-static"] / lidr if lidr and "hf-static" in per_answer else nan,
               "lidr_tok_s": results["lidr"][2] / results["lidr"][1] if lidr else nan}
    print(common.keyvals(figures))


if __name__ == "__main__":
    main()
