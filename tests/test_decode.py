"""Continuous batching (lidr/backends/decode.py) gives what transformers' `generate` gives
one prompt at a time: greedy, repetition penalty, EOS, per-row stop strings, rows joining
and leaving a running batch, sliding-window caches."""

from __future__ import annotations

import os

import pytest
import torch

from lidr.backends.hf import HFBackend
from tiny import word_tokenizer

WORDS = ("the a cat dog sat ran on under mat tree big small red blue and then it was very happy "
         "sad one two three four five six seven eight nine ten").split()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _save_tiny(path, kind: str):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    fast = word_tokenizer(WORDS, join_with_spaces=True)
    ids = dict(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    if kind.startswith("gemma3"):
        # "gemma3": a sliding window shorter than prompt + answer, so the sliding layers drop
        # positions (new rows then wait for the batch to drain); "gemma3-wide": rows join mid-batch.
        config = Gemma3TextConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                  max_position_embeddings=256, sliding_window=8 if kind == "gemma3" else 64, final_logit_softcapping=30.0,
                                  layer_types=["sliding_attention", "full_attention"], **ids)
    else:
        config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=False, **ids)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharper logits than the tiny init: fewer near-ties between tokens
        model.get_output_embeddings().weight.mul_(8)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["gemma3", "gemma3-wide", "llama", "llama-mkl"])
def backend(request, tmp_path_factory):
    """The backend under test, and `b.plain`: the same model as transformers loads it, for the
    reference (the backend's own model has its linear layers packed for oneDNN, but with
    "-mkl", where they stay plain and the output layer is lidr.head's blockwise product)."""
    from transformers import AutoModelForCausalLM

    from lidr import packed_linear

    kind, packed = request.param.removesuffix("-mkl"), not request.param.endswith("-mkl")
    path = _save_tiny(tmp_path_factory.mktemp(request.param), kind)
    b = HFBackend(path, dtype="float32", device="cpu", packed_weights=packed)
    assert b.decoder.own_head  # the fast output layer reproduces the model's logits
    assert b.decoder.pack_head == (b.decoder.packed_layers > 0) == (packed and packed_linear.available())
    assert b.decoder.packed_head is None  # the output layer is packed at its first full product, not at load
    b.plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    b.kind = kind
    return b


PROMPTS = ["<s> the cat", "<s> a big red dog ran under the tree and then", "<s> one", "<s> two three four",
           "<s> it was very happy and sad", "<s> the small blue mat", "<s> seven eight nine ten one two three"]


def _reference(b: HFBackend, prompt: str, max_new_tokens: int, penalty: float, eos: int | None) -> list[int]:
    """transformers' generate on the prompt alone: no padding anywhere."""
    enc = b.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = b.plain.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=penalty,
                           eos_token_id=eos, pad_token_id=b.tokenizer.pad_token_id, temperature=None, top_p=None,
                           top_k=None)
    return out[0, enc.input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("max_rows", [1, 3, 16])
@pytest.mark.parametrize("own_head", [True, False])
def test_same_tokens_as_generate_one_prompt_at_a_time(backend, max_rows, own_head, monkeypatch):
    # An EOS id that some rows produce early and others never: rows then leave the batch at
    # different steps, and waiting prompts join the running batch.
    eos = _reference(backend, PROMPTS[0], 12, 1.3, None)[3]
    monkeypatch.setattr(backend.decoder, "own_head", own_head)
    monkeypatch.setattr(backend.decoder, "eos_ids", {eos})
    import lidr.backends.decode as decode

    joins, refused = [], []
    monkeypatch.setattr(decode, "_join", lambda *a, _join=decode._join: joins.append(1) or _join(*a))
    can_join = backend.decoder._can_join
    monkeypatch.setattr(backend.decoder, "_can_join", lambda c: can_join(c) or refused.append(1))
    results = {}
    backend.run_batched([(i, p, []) for i, p in enumerate(PROMPTS)], batch_size=max_rows,
                        on_result=results.__setitem__, max_new_tokens=12, repetition_penalty=1.3)
    assert sorted(results) == list(range(len(PROMPTS)))
    reasons = set()
    for i, p in enumerate(PROMPTS):
        ids = _reference(backend, p, 12, 1.3, eos)
        reason = "stop" if eos in ids else "length"
        want = backend.tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)
        assert (results[i].text, results[i].finish_reason) == (want, reason), p
        reasons.add((reason, len(ids)))
    assert len(reasons) > 1  # rows really ended at different steps
    if max_rows == 3:  # waiting prompts joined a running batch; past a short sliding window they waited
        assert joins and (bool(refused) == (backend.kind == "gemma3"))


def test_eos_and_stop_strings_end_each_row_where_they_occur(backend):
    ref = {p: _reference(backend, p, 12, 1.0, None) for p in PROMPTS}
    words = {p: backend.tokenizer.convert_ids_to_tokens(ids) for p, ids in ref.items()}
    # row 0 ends on EOS: make its 5th generated token the EOS id
    eos = ref[PROMPTS[0]][4]
    # row 1 ends on a stop string: its 3rd generated word
    stop_row, stop_word = PROMPTS[1], words[PROMPTS[1]][2]
    stops = [[stop_word] if p == stop_row else ["no such words here"] for p in PROMPTS]
    backend.eos_ids = backend.decoder.eos_ids = {eos}
    try:
        out = backend.generate(PROMPTS, max_new_tokens=12, stops=stops, repetition_penalty=1.0)
    finally:
        backend.eos_ids = backend.decoder.eos_ids = set()
    for p, got in zip(PROMPTS, out):
        ids = ref[p]
        end = ids.index(eos) if eos in ids else len(ids)  # EOS first: it is not part of the text
        reason = "stop" if end < len(ids) else "length"
        if p == stop_row:
            first = next(k for k in range(1, len(ids) + 1)
                         if stop_word in backend.tokenizer.decode(ids[:k], skip_special_tokens=True))
            if first <= end:
                end, reason = first, "stop"  # the stop string is kept
        assert (got.text, got.finish_reason) == (backend.tokenizer.decode(ids[:end], skip_special_tokens=True), reason), p


def test_results_arrive_row_by_row_and_progress_counts_each(backend):
    order, ticks = [], []
    backend.run_batched([(k, p, []) for k, p in enumerate(PROMPTS)], batch_size=2,
                        on_result=lambda k, g: order.append(k), advance=ticks.append, max_new_tokens=3)
    assert sorted(order) == list(range(len(PROMPTS))) and ticks == [1] * len(PROMPTS)
    assert backend.generate([], max_new_tokens=3) == []


@pytest.mark.parametrize("max_rows", [2, 16])
def test_rows_with_their_own_limit_and_penalty_share_a_run(backend, max_rows):
    """Requests that set their own token limit and repetition penalty (MGSM and
    X-AlpacaEval answers in one evaluation run) get what `generate` gives each alone."""
    from lidr.backends import Request, run_batched

    settings = [(12, 1.0), (5, 1.3), (9, None), (3, 1.0), (12, 1.3), (None, 1.0), (7, 1.5)]
    reqs = [Request(i, p, [], n, pen) for i, (p, (n, pen)) in enumerate(zip(PROMPTS, settings))]
    results, ticks = {}, []
    run_batched(backend, reqs, batch_size=max_rows, on_result=results.__setitem__, advance=ticks.append,
                max_new_tokens=10, repetition_penalty=1.2)  # the defaults of rows that set None
    assert len(ticks) == len(PROMPTS)
    for i, (p, (n, pen)) in enumerate(zip(PROMPTS, settings)):
        n, pen = n or 10, pen or 1.2
        want = backend.tokenizer.decode(_reference(backend, p, n, pen, None), skip_special_tokens=True)
        assert (results[i].text, results[i].finish_reason) == (want, "length"), (p, n, pen)


def test_engines_without_their_own_scheduler_get_one_call_per_setting(backend):
    """The generic path of `run_batched` (vLLM's): rows are grouped by their settings, and
    each group goes to `generate` with its own limit and penalty."""
    from lidr.backends import Request, run_batched

    calls = []

    class GenerateOnly:  # the hf engine seen through the plain interface only
        count_tokens = backend.count_tokens

        def generate(self, prompts, **kw):
            calls.append((len(prompts), kw["max_new_tokens"], kw["repetition_penalty"]))
            return backend.generate(prompts, **kw)

    reqs = [Request(i, p, [], 4 if i % 2 else 8, 1.3 if i % 2 else None) for i, p in enumerate(PROMPTS)]
    results = {}
    run_batched(GenerateOnly(), reqs, batch_size=3, on_result=results.__setitem__, max_new_tokens=6,
                repetition_penalty=1.0)
    assert sorted(calls) == [(1, 8, 1.0), (3, 4, 1.3), (3, 8, 1.0)]
    for i, p in enumerate(PROMPTS):
        n, pen = (4, 1.3) if i % 2 else (8, 1.0)
        assert results[i].text == backend.tokenizer.decode(_reference(backend, p, n, pen, None), skip_special_tokens=True)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_fp16_screened_output_layer_gives_the_same_tokens(backend, penalty, monkeypatch):
    """One-row steps with the fp16 screen (lidr/head.py, HalfHead) choose what the fp32 output
    layer chooses: the same tokens as `generate`, with soft-capping (gemma3) and the penalty."""
    from lidr.backends.decode import ContinuousDecoder
    from lidr.head import HalfHead

    import lidr.backends.decode as decode

    monkeypatch.setattr(HalfHead, "faster", staticmethod(lambda *a, **k: True))  # tiny heads are not faster
    decoder = ContinuousDecoder(backend.model, backend.tokenizer, set())
    assert decoder.half_head is None  # built at the HALF_HEAD_AFTER-th one-row step
    decoder.lookup = False  # every one-row step then goes through the screen
    screened = []
    choose = decoder._screened_choice
    monkeypatch.setattr(decoder, "_screened_choice", lambda *a: screened.append(1) or choose(*a))
    results = {}
    decoder.run([(i, p, []) for i, p in enumerate(PROMPTS)], max_rows=1, max_new_tokens=10,
                repetition_penalty=penalty, on_result=results.__setitem__)
    assert isinstance(decoder.half_head, HalfHead)
    # every choice is one row at a time (prefill included); the screen from the HALF_HEAD_AFTER-th on
    assert len(screened) == len(PROMPTS) * 10 - (decode.HALF_HEAD_AFTER - 1)
    for i, p in enumerate(PROMPTS):
        want = backend.tokenizer.decode(_reference(backend, p, 10, penalty, None), skip_special_tokens=True)
        assert results[i].text == want, p


def test_fp16_screen_bound_holds_and_keeps_the_argmax():
    """The screen's error bound holds on a realistic output layer, and the exact argmax is
    always among the tokens it keeps, even between near-tied tokens."""
    from lidr.head import HalfHead

    torch.manual_seed(0)
    w = torch.randn(50_000, 640) * 0.04
    w[7] = w[3] + 1e-6  # a near tie
    w[11] *= 1e-4  # weights in fp16's subnormal range
    half = HalfHead(w)
    for scale in (1.0, 30.0, 200.0):
        for _ in range(5):
            h = torch.randn(1, 640) * scale
            h[0, :8] = w[3, :8].sign() * scale * 4  # push tokens 3 and 7 to the top
            approx, eps = half.approx(h)
            exact = (w @ h.T).T
            assert float((approx - exact).abs().max()) <= eps
            kept = (approx[0] >= approx[0].max() - 2 * eps).nonzero()[:, 0]
            assert int(exact.argmax()) in kept.tolist() and len(kept) < 100


def _prefill_steps(backend, monkeypatch) -> list:
    """The shapes of the decoder's forwards inside its prefill (filled in as it runs)."""
    steps, in_prefill = [], []
    step, prefill = backend.decoder._step, backend.decoder._prefill
    monkeypatch.setattr(backend.decoder, "_step", lambda ids, *a: in_prefill and steps.append(ids.shape) or step(ids, *a))
    monkeypatch.setattr(backend.decoder, "_prefill",
                        lambda group: in_prefill.append(1) or (prefill(group), in_prefill.clear())[0])
    return steps


@pytest.mark.parametrize("chunk", [16, 2])
def test_prompts_that_begin_alike_share_their_prefix_forward(backend, chunk, monkeypatch):
    """Few-shot prompts of one language (one translation direction) begin with the same
    tokens: that prefix runs once for all of them, and every row still gets what `generate`
    gives its prompt alone, also when the rests run in several chunks (`chunk` rows each).
    With a sliding window shorter than prompt + answer (gemma3) the padding between prefix
    and rest would shift the window, so sharing is off there."""
    import lidr.backends.decode as decode

    monkeypatch.setattr(decode, "PREFILL_ROWS", chunk)
    steps = _prefill_steps(backend, monkeypatch)
    shot_a = "<s> the cat sat on the mat and then it ran under the big tree one two three four five six seven"
    shot_b = "<s> seven eight nine ten the dog was very happy and sad then a red cat sat on one small mat"
    prompts = [f"{shot_a} {t}" for t in ("the dog", "a big red", "nine ten one two", "it was")]
    prompts += [f"{shot_b} {t}" for t in ("blue", "the small cat ran")] + ["<s> five six seven"]
    fills = []
    fill = backend.decoder._fill
    monkeypatch.setattr(backend.decoder, "_fill", lambda ids, *a: fills.append(ids.shape) or fill(ids, *a))
    out = backend.generate(prompts, max_new_tokens=8, repetition_penalty=1.2)
    for p, got in zip(prompts, out):
        want = backend.tokenizer.decode(_reference(backend, p, 8, 1.2, None), skip_special_tokens=True)
        assert got.text == want, p
    if backend.kind == "gemma3":
        assert fills == []
    else:  # one forward over the three prefixes (two shared, the lone prompt's first token)
        assert len(fills) == 1 and fills[0][0] == 3
    prefill_rows = [rows for rows, width in steps]
    chunked = chunk == 2 and backend.kind != "gemma3"  # (past a sliding window, caches cannot be joined)
    assert sum(prefill_rows) == len(prompts)
    if chunked:  # runs of at most `chunk` rests (`_chunk_bounds` decides where)
        assert max(prefill_rows) == 2 and len(prefill_rows) >= 4
    else:  # the rests' padding is not worth another forward, or a sliding window forbids joining
        assert prefill_rows == [len(prompts)]


def test_prefill_splits_rests_of_far_apart_lengths(backend, monkeypatch):
    """The decoder's prefill takes `_chunk_bounds`' split: five short rests and two long ones
    after a shared prefix run in two forwards (one run of 7 would be padded to the longest),
    and every row still gets what `generate` gives its prompt alone."""
    if backend.kind == "gemma3":
        pytest.skip("past its sliding window the prefix is not shared and chunks cannot be joined")
    steps = _prefill_steps(backend, monkeypatch)
    shot = "<s> the cat sat on the mat and then it ran under the big tree one two three four five six seven"
    long = " ".join(["the dog was very happy and sad then a red cat sat on one small mat"] * 2)
    prompts = [f"{shot} {t}" for t in ("the dog", "a big", "nine", "it was", "blue")]
    prompts += [f"{shot} {long}", f"{shot} seven {long}"]
    out = backend.generate(prompts, max_new_tokens=4, repetition_penalty=1.2)
    for p, got in zip(prompts, out):
        want = backend.tokenizer.decode(_reference(backend, p, 4, 1.2, None), skip_special_tokens=True)
        assert got.text == want, p
    assert sorted(rows for rows, _ in steps) == [2, 5]  # the long rests apart from the short ones


def test_prefill_chunks_pad_least():
    """The rests of a prefill are split into runs of similar length where the padding saved
    is worth another forward: the split `_chunk_bounds` finds is the cheapest of all splits
    (padded tokens + PREFILL_FORWARD_TOKENS per run, at most max_rows per run)."""
    import itertools
    import random

    from lidr.backends.decode import PREFILL_FORWARD_TOKENS, _chunk_bounds

    def cost(lengths, bounds):
        return sum((e - s) * lengths[e - 1] + PREFILL_FORWARD_TOKENS for s, e in bounds)

    rng = random.Random(0)
    for _ in range(200):
        lengths = sorted(rng.randint(1, 120) for _ in range(rng.randint(1, 9)))
        max_rows = rng.randint(1, 5)
        bounds = _chunk_bounds(lengths, max_rows)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(0 < e - s <= max_rows for s, e in bounds)
        best = min(cost(lengths, list(zip((0, *cuts), (*cuts, len(lengths)))))
                   for k in range(len(lengths))
                   for cuts in itertools.combinations(range(1, len(lengths)), k)
                   if all(e - s <= max_rows for s, e in zip((0, *cuts), (*cuts, len(lengths)))))
        assert cost(lengths, bounds) == best
    # ten short rests and six long ones: two runs, not one padded to the longest
    assert _chunk_bounds([10] * 10 + [100] * 6, 16) == [(0, 10), (10, 16)]
    assert _chunk_bounds([5, 6, 7], 16) == [(0, 3)]  # close lengths: one forward


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_lone_row_guesses_ahead_and_keeps_the_greedy_answer(backend, penalty, monkeypatch):
    """Prompt lookup for a lone row: guesses taken from its own prompt and answer are checked
    in one forward, and only those the greedy choice agrees with are kept, so the answer
    is what `generate` gives (EOS, stop strings and the token limit inside accepted guesses
    included)."""
    repeating = "<s> one two three four five one two three four five one two three four five one two"
    prompts = [repeating, "<s> the cat sat on the mat the cat sat on the mat the cat", PROMPTS[1]]
    monkeypatch.setattr(backend.decoder, "eos_ids", set())  # as the reference: no EOS
    verified = []
    verify = backend.decoder._verify
    monkeypatch.setattr(backend.decoder, "_verify",
                        lambda nxt, draft, *a: verified.append((draft, verify(nxt, draft, *a))) or verified[-1][1])
    for max_new in (3, 20):
        results = {}
        backend.run_batched([(i, p, []) for i, p in enumerate(prompts)], batch_size=1,
                            on_result=results.__setitem__, max_new_tokens=max_new, repetition_penalty=penalty)
        for i, p in enumerate(prompts):
            ids = _reference(backend, p, max_new, penalty, None)
            want = backend.tokenizer.decode(ids, skip_special_tokens=True)
            assert (results[i].text, results[i].finish_reason) == (want, "length"), (p, max_new)
    if backend.kind == "gemma3":  # past its short window the cache cannot take guesses back
        assert verified == []
    else:  # guesses were checked, and some were right
        assert any(len(chosen) > 1 for _, chosen in verified)


def test_lookup_takes_the_occurrence_preceded_by_the_longest_match():
    """Prompt lookup's guess starts after the earlier occurrence of the last 3 tokens whose
    preceding tokens match the context's end for longest, the latest of equals: in a loop whose
    period holds the same 3 tokens twice (the generate benchmark's long answer had one), the
    latest occurrence is the wrong one of the two."""
    from lidr.backends.decode import lookup_start

    period = [1, 2, 3, 4, 5, 2, 3, 4, 6]  # "2 3 4" twice, followed by 5, then by 6
    context = [9, 8] + period * 3 + [1, 2, 3, 4]
    start = lookup_start(context, 3, 64)
    assert context[start] == 5 and start == len(context) - len(period)  # the latest "1 2 3 4"
    assert lookup_start([7, 2, 3, 4, 9, 1, 2, 3, 4, 8, 2, 3, 4], 3, 64) == 5 + 4  # the latest of equal runs
    assert lookup_start([1, 2, 3, 1, 2, 3], 3, 64) == 3
    assert lookup_start([5, 5, 5, 5], 3, 64) == 3  # overlapping occurrences
    assert lookup_start([1, 2, 3], 3, 64) is None and lookup_start([1, 2, 3, 4, 5], 3, 64) is None
    # the run is counted up to `longest`: past it the latest occurrence wins
    assert lookup_start([1, 2, 3, 4, 0, 2, 3, 4, 1, 2, 3, 4], 3, 3) == 8


def test_lone_rows_guesses_double_while_every_guess_is_kept(backend, monkeypatch):
    """A lone row whose guesses were all kept guesses twice as many at its next check, up to
    LOOKUP_MAX_TOKENS and the tokens it has left; a check that keeps fewer than all starts
    again at LOOKUP_TOKENS."""
    from lidr.backends import decode

    if backend.kind == "gemma3":
        pytest.skip("past its short window the cache cannot take guesses back")
    dec = backend.decoder
    verify = dec._verify
    for keep_all in (True, False):
        drafts = []

        def check(nxt, draft, *a):  # the real forward, then every guess kept (or none)
            drafts.append(len(draft))
            chosen = verify(nxt, draft, *a)
            return list(draft) + chosen[-1:] if keep_all else chosen[:1]

        monkeypatch.setattr(dec, "_verify", check)
        monkeypatch.setattr(dec, "eos_ids", set())
        prompt = "<s> one two three four five one two three four five one two three four five one two"
        backend.run_batched([(0, prompt, [])], batch_size=1, on_result=lambda *a: None, max_new_tokens=120)
        if keep_all and dec.window is None:  # the last check: what is left of the 120 tokens
            assert drafts[:3] == [10, 20, 40] and len(drafts) == 4 and drafts[3] < decode.LOOKUP_MAX_TOKENS
        elif keep_all:  # a sliding window: fewer, where the cache's room before it ends is less
            assert drafts[0] <= decode.LOOKUP_TOKENS and all(b <= 2 * a for a, b in zip(drafts, drafts[1:]))
            assert any(b > a for a, b in zip(drafts, drafts[1:]))
        else:
            assert len(drafts) > 3 and max(drafts) <= decode.LOOKUP_TOKENS  # (less near the limit or window)
            assert dec.window is not None or drafts[:10] == [decode.LOOKUP_TOKENS] * 10


def test_output_layer_is_packed_at_its_first_full_product_where_it_fits(tmp_path, monkeypatch):
    """The output layer's oneDNN copy is made at the first step that needs the whole fp32
    product, not at load; where the memory free then cannot hold it, the plain product runs
    instead. Either way the answers are transformers' own."""
    from transformers import AutoModelForCausalLM

    from lidr import packed_linear

    if not packed_linear.available():
        pytest.skip("oneDNN's packed linear operators are not in this torch build")
    path = _save_tiny(tmp_path, "llama")
    for room in (True, False):
        b = HFBackend(path, dtype="float32", device="cpu", packed_weights=True)
        b.plain, b.decoder.eos_ids = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), set()
        assert b.decoder.pack_head and b.decoder.packed_head is None and b.decoder.packed_layers == 7 * 2 + 1
        if not room:  # the body was packed at load; nothing more fits now
            monkeypatch.setattr(packed_linear, "memory_available", lambda: 0)
        for p in PROMPTS[:3]:
            want = b.tokenizer.decode(_reference(b, p, 8, 1.0, None), skip_special_tokens=True)
            assert b.generate([p], max_new_tokens=8)[0].text == want, (room, p)
        assert (b.decoder.packed_head is not None) == b.decoder.pack_head == room
        assert b.decoder.packed_layers == 7 * 2 + room
        b.close()


def test_closing_a_packed_backend_frees_its_model(tmp_path):
    """The generation model (and its packed weight copies) is gone when `close` returns, not at
    some later garbage collection (a packed layer refers to itself): training loads next. And
    without a full collection to find it."""
    import gc
    import weakref

    from lidr import packed_linear

    b = HFBackend(_save_tiny(tmp_path, "llama"), dtype="float32", device="cpu", packed_weights=True)
    assert b.decoder.packed_layers == (7 * 2 + 1 if packed_linear.available() else 0)
    model = weakref.ref(b.model)
    collections = []  # full ones: each walks every object in the process (0.3-0.4 s with the real model's)
    record = lambda phase, info: phase == "start" and info["generation"] == 2 and collections.append(info)  # noqa: E731
    gc.disable()  # no automatic collection may free it in the meantime
    gc.callbacks.append(record)
    try:
        b.close()
        assert model() is None
        assert collections == []  # freed by reference counting: no collection needed
    finally:
        gc.callbacks.remove(record)
        gc.enable()


def test_packing_follows_the_setting(tmp_path):
    """`generation.cpu_packed_weights` reaches the hf backend through `make_backend` (the loop's
    and the translator's way in), as `lidr eval`'s flag does: false leaves every layer plain."""
    from lidr import packed_linear
    from lidr.backends import make_backend
    from lidr.config import GenerationConfig

    assert GenerationConfig().cpu_packed_weights is True
    path = _save_tiny(tmp_path, "llama")
    for setting in (True, False):
        b = make_backend("hf", path, dtype="float32", cpu_packed_weights=setting)
        assert (b.decoder.packed_layers > 0) == (setting and packed_linear.available())
        assert any("forward" in vars(m) for m in b.model.modules()) == (setting and packed_linear.available())
        b.close()
    # and `lidr eval`'s --packed-weights/--no-packed-weights
    from lidr.eval.commands import _load_backend

    for setting in (True, False):
        b, _ = _load_backend(str(path), "auto", "float32", setting)
        assert (b.decoder.packed_layers > 0) == (setting and packed_linear.available())
        b.close()


@pytest.mark.parametrize("plain", [True, False])
def test_rows_leaving_the_batch_leave_the_others_cache_as_it_was(plain):
    """A finished row leaves the KV cache: every other row keeps its own keys and values, at the
    place the returned order gives it (plain layers: the last rows fill the holes, no full copy)."""
    from transformers import DynamicCache

    from lidr.backends.decode import _keep_rows

    cache = DynamicCache()
    keys = [torch.randn(6, 1, 5, 4) for _ in range(3)]
    for i, k in enumerate(keys):
        cache.update(k.clone(), -k, i)
    keep = [0, 2, 3, 5]
    order = _keep_rows(cache, keep, plain, torch.device("cpu"))
    assert sorted(order) == keep
    if plain:
        assert order == [0, 5, 2, 3]  # row 5 took the place of row 1; rows 2 and 3 did not move
    for layer, k in zip(cache.layers, keys):
        assert torch.equal(layer.keys, k[order]) and torch.equal(layer.values, -k[order])
    again = _keep_rows(cache, [1, 2], plain, torch.device("cpu"))
    assert again == [2, 1]  # row 2 took the place of row 0
    for layer, k in zip(cache.layers, keys):
        assert torch.equal(layer.keys, k[order][again]) and torch.equal(layer.values, -k[order][again])
    # two rows move (row by row), three rows move (through index tensors)
    for keep in ([0, 1, 6, 7], [0, 5, 6, 7]):
        cache = DynamicCache()
        keys = [torch.randn(8, 1, 5, 4) for _ in range(3)]
        for i, k in enumerate(keys):
            cache.update(k.clone(), -k, i)
        order = _keep_rows(cache, keep, plain, torch.device("cpu"))
        assert sorted(order) == keep and (not plain or order == [0, 5, 6, 7] or order == [0, 1, 6, 7])
        for layer, k in zip(cache.layers, keys):
            assert torch.equal(layer.keys, k[order]) and torch.equal(layer.values, -k[order])


@pytest.mark.parametrize("window", [None, 12])
def test_growing_kv_cache_keeps_what_transformers_keeps(window):
    """The decoder's KV cache (decode.py `_growing`) writes a step's new positions into spare
    room instead of concatenating; through every operation the decoder does on it (steps of
    one or more tokens, rows leaving, `crop`, a layer's tensors replaced as `_join` does, past
    a sliding window) it holds and returns what transformers' own layers do."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from lidr.backends.decode import _growing, _keep_rows

    def make():
        cache = DynamicCache()
        cache.layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=window) if window else DynamicLayer()]
        return cache

    torch.manual_seed(0)
    plain, grown = make(), _growing(make())
    assert [type(x).__name__ for x in grown.layers] == ["GrowingLayer", "GrowingSlidingLayer" if window else "GrowingLayer"]
    rows = 5

    def step(n):
        k, v = torch.randn(rows, 1, n, 4), torch.randn(rows, 1, n, 4)
        for i in range(2):
            want, got = plain.update(k, v, i), grown.update(k.clone(), v.clone(), i)
            assert all(torch.equal(a, b) for a, b in zip(want, got))

    def same():
        for a, b in zip(plain.layers, grown.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            assert a.get_seq_length() == b.get_seq_length()

    step(3)  # a prefill
    buffer = grown.layers[0].keys.data_ptr()
    for _ in range(4):
        step(1)
        same()
    assert grown.layers[0].keys.data_ptr() == buffer  # steps wrote into the same buffer: no copy
    for cache in (plain, grown):
        order = _keep_rows(cache, [0, 2, 4], True, torch.device("cpu"))
    rows = 3
    same()
    step(1)
    same()
    assert grown.layers[0].keys.data_ptr() == buffer  # rows leaving keep the buffer too
    plain.crop(-2), grown.crop(-2)  # rejected guesses
    same()
    step(2)
    same()
    for cache in (plain, grown):  # a join replaces the tensors: the next step takes them over
        for layer in cache.layers:
            layer.keys, layer.values = torch.cat([layer.keys, layer.keys]), torch.cat([layer.values, layer.values])
    rows = 6
    step(1)
    same()
    for _ in range(200):  # well past the room of the first buffer, and past the sliding window
        step(1)
    same()
    assert order == [0, 4, 2]


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("lengths", [(7, 5), (4, 9)])  # the running rows longer, or the new ones
def test_join_writes_growing_layers_once(window, lengths):
    """New rows joining a running batch (`_join`): the joined layers hold the running rows'
    keys and values, then the new rows', each left-padded with zeros to the longer length (as
    the mask and penalty ids are), in a buffer with room, so the steps after the join write
    into it instead of copying the cache again; they return what transformers' layers return
    for the same joined states."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from lidr.backends.decode import _growing, _join

    def make():
        cache = DynamicCache()
        cache.layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=window) if window else DynamicLayer()]
        return cache

    def left_pad(t, length):
        return torch.cat([t.new_zeros(*t.shape[:2], length - t.shape[2], *t.shape[3:]), t], 2)

    torch.manual_seed(0)
    (n, g), length = lengths, max(lengths)
    running, new = [torch.randn(3, 1, n, 4) for _ in range(2)], [torch.randn(2, 1, g, 4) for _ in range(2)]
    mask, g_mask = torch.ones(3, n, dtype=torch.long), torch.ones(2, g, dtype=torch.long)
    g_mask[:, 0] = 0  # a padded position in the new rows
    seen, g_seen = torch.randint(0, 50, (3, n)), torch.randint(0, 50, (2, g))
    cache, g_cache = _growing(make()), _growing(make())
    for i in range(2):
        cache.update(*running, i)
        g_cache.update(*new, i)
    grown, j_mask, j_seen = _join([(cache, mask, seen), (g_cache, g_mask, g_seen)])
    want = [torch.cat([left_pad(a, length), left_pad(b, length)]) for a, b in zip(running, new)]
    # the mask's padding is 0; the penalty ids' padding repeats each row's first id
    assert torch.equal(j_mask, torch.cat([torch.cat([m.new_zeros(len(m), length - m.shape[1]), m], 1)
                                          for m in (mask, g_mask)]))
    assert torch.equal(j_seen, torch.cat([torch.cat([x[:, :1].repeat(1, length - x.shape[1]), x], 1)
                                          for x in (seen, g_seen)]))
    plain = make()  # transformers' layers, given the joined states
    for i, (a, b) in enumerate(zip(plain.layers, grown.layers)):
        assert torch.equal(b.keys, want[0]) and torch.equal(b.values, want[1])
        plain.update(*want, i)
    buffers = [layer.keys.data_ptr() for layer in grown.layers]
    for _ in range(3):
        k, v = torch.randn(5, 1, 1, 4), torch.randn(5, 1, 1, 4)
        for i in range(2):
            expected, got = plain.update(k, v, i), grown.update(k, v, i)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert [layer.keys.data_ptr() for layer in grown.layers] == buffers  # no copy after the join


@pytest.mark.parametrize("placed", [(True, True, True), (True, False, True)])
def test_prefill_chunks_written_in_place_join_without_a_copy(placed, monkeypatch):
    """A prefill's chunks, each given its rows of the group's buffers (`_JointBuffers`), write
    their keys and values where the join puts them: `_join` then returns views of those buffers,
    with the pads in front of the shorter chunks zeroed (the buffers start as garbage, here
    NaN), equal to the copying join. A chunk that was not placed (its own buffers) makes the
    join copy as before, with the same result."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    import lidr.backends.decode as decode

    buffer = decode._buffer
    monkeypatch.setattr(decode, "_buffer", lambda *a: buffer(*a).fill_(float("nan")))

    def make():
        cache = DynamicCache()
        cache.layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=64)]
        return decode._growing(cache)

    def left_pad(t, length):
        return torch.cat([t.new_zeros(*t.shape[:2], length - t.shape[2], *t.shape[3:]), t], 2)

    torch.manual_seed(0)
    chunks = [(2, 3, 4), (3, 3, 6), (1, 3, 9)]  # rows, prefix positions, rest positions
    length = max(p + r for _, p, r in chunks)
    joint = decode._JointBuffers(sum(n for n, _, _ in chunks), length)
    parts, states, row = [], [], 0
    for (n, p, r), place in zip(chunks, placed):
        cache = make()
        if place:
            joint.place(cache, row, p + r)
        kv = [torch.randn(n, 1, p + r, 4) for _ in range(2)]
        for i in range(2):  # the shared prefix's rows, then the rest's forward
            cache.update(kv[0][:, :, :p], kv[1][:, :, :p], i)
            cache.update(kv[0][:, :, p:], kv[1][:, :, p:], i)
        mask, seen = torch.ones(n, p + r, dtype=torch.long), torch.randint(0, 50, (n, p + r))
        parts.append((cache, mask, seen))
        states.append(kv)
        row += n
    joined, _, _ = decode._join(parts)
    want = [torch.cat([left_pad(kv[j], length) for kv in states]) for j in range(2)]
    for i, layer in enumerate(joined.layers):
        assert torch.equal(layer.keys, want[0]) and torch.equal(layer.values, want[1])
        in_joint = layer.keys.data_ptr() == joint.buffers[i][0].data_ptr()
        assert in_joint == all(placed)  # no copy where every chunk wrote in place
    k, v = torch.randn(6, 1, 1, 4), torch.randn(6, 1, 1, 4)
    before = [layer.keys.data_ptr() for layer in joined.layers]
    for i in range(2):  # the next step appends into the same buffers
        got = joined.update(k, v, i)
        assert torch.equal(got[0], torch.cat([want[0], k], 2)) and torch.equal(got[1], torch.cat([want[1], v], 2))
    assert [layer.keys.data_ptr() for layer in joined.layers] == before


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_int8_screened_output_layer_gives_the_same_tokens(backend, penalty, monkeypatch):
    """Steps of several rows with the int8 screen (lidr/head.py, Int8Head) choose what the fp32
    output layer chooses: the same tokens as `generate`, with soft-capping (gemma3), the penalty,
    rows joining and leaving."""
    from lidr.backends.decode import ContinuousDecoder
    from lidr.head import Int8Head

    if backend.decoder.packed_layers == 0 or not Int8Head.available():
        pytest.skip("the int8 screen is for packed fp32 layers on x86 with fbgemm")
    monkeypatch.setattr(Int8Head, "MIN_PARAMS", 0)  # tiny heads are cheap in fp32
    decoder = ContinuousDecoder(backend.model, backend.tokenizer, set(), packed_weights=True)
    assert decoder.int8_head is None  # built at the first step of several rows
    screened = []  # per step of several rows: did the screen choose (None: it gave up)
    choose = decoder._int8_choice

    def counted(*a):
        chosen = choose(*a)
        screened.append(chosen is not None)
        return chosen

    monkeypatch.setattr(decoder, "_int8_choice", counted)
    results = {}
    decoder.run([(i, p, []) for i, p in enumerate(PROMPTS)], max_rows=3, max_new_tokens=10,
                repetition_penalty=penalty, on_result=results.__setitem__)
    assert isinstance(decoder.int8_head, Int8Head) and len(screened) > 10 and all(screened)
    for i, p in enumerate(PROMPTS):
        want = backend.tokenizer.decode(_reference(backend, p, 10, penalty, None), skip_special_tokens=True)
        assert results[i].text == want, p


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_int8_screen_checks_a_lone_rows_guesses(backend, penalty, monkeypatch):
    """A lone row's guesses (prompt lookup) are checked through the int8 screen, each position
    a row with the guesses before it counted for the penalty, and the answer is `generate`'s."""
    from lidr.backends.decode import ContinuousDecoder
    from lidr.head import Int8Head

    if backend.decoder.packed_layers == 0 or not Int8Head.available():
        pytest.skip("the int8 screen is for packed fp32 layers on x86 with fbgemm")
    if backend.kind == "gemma3":
        pytest.skip("past its short window the cache cannot take guesses back")
    monkeypatch.setattr(Int8Head, "MIN_PARAMS", 0)
    decoder = ContinuousDecoder(backend.model, backend.tokenizer, set(), packed_weights=True)
    screened = []  # rows of each int8 choice: with max_rows=1 only a guess check has several
    choose = decoder._int8_choice
    monkeypatch.setattr(decoder, "_int8_choice", lambda h, *a: screened.append(len(h)) or choose(h, *a))
    prompts = ["<s> one two three four five one two three four five one two three four five one two",
               "<s> the cat sat on the mat the cat sat on the mat the cat"]
    results = {}
    decoder.run([(i, p, []) for i, p in enumerate(prompts)], max_rows=1, max_new_tokens=20,
                repetition_penalty=penalty, on_result=results.__setitem__)
    assert any(n > 1 for n in screened)
    for i, p in enumerate(prompts):
        want = backend.tokenizer.decode(_reference(backend, p, 20, penalty, None), skip_special_tokens=True)
        assert results[i].text == want, p
    Int8Head.forget()


def _choice_decoder(w: torch.Tensor, int8_head, softcap: float | None = None):
    """A ContinuousDecoder with only what `_int8_choice` reads: the output layer `w` (no bias,
    not packed) and its int8 screen."""
    from lidr.backends.decode import ContinuousDecoder

    dec = object.__new__(ContinuousDecoder)
    dec.head_weight, dec.head_bias, dec.softcap = w, None, softcap
    dec.pack_head, dec.packed_head = False, None
    dec.int8_head = int8_head
    return dec


@pytest.fixture(params=["onednn", "fbgemm"])
def int8_engine(request):
    """Each int8 product this machine runs (lidr/head.py, Int8Head.engines): the screen's bound
    and choice must hold for both, whichever a machine uses first."""
    from lidr.head import Int8Head

    if request.param not in Int8Head.engines():
        pytest.skip(f"no {request.param} int8 product on this machine")
    return request.param


@pytest.fixture(params=["kernel", "pytorch"])
def bounds_pass(request, monkeypatch):
    """How `Int8Head.upper` adds up its bounds: lidr's C++ kernel (lidr/kernels.py, where it
    builds) or PyTorch's three passes (elsewhere): the bound must hold through both."""
    from lidr import head, kernels

    if request.param == "kernel" and kernels.load() is None:
        pytest.skip("lidr's C++ kernels are not built here")
    if request.param == "pytorch":
        monkeypatch.setattr(head, "_kernels", lambda: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_screen_bound_holds_and_keeps_the_argmax(int8_engine, dtype, bounds_pass):
    """Every token's int8 bound is at least its exact logit (in float64), on an output layer
    (fp32 or bf16) with large rows, near ties and hidden states with outlier channels (also
    channels that were not outliers when the screen was built), so the exact argmax always
    reaches the bar."""
    from lidr.head import CHUNK, Int8Head

    torch.manual_seed(0)
    w = torch.randn(70_000, 256) * 0.04  # three blocks of 32768 rows, the last one partial
    w[7] = w[3] + 1e-6  # a near tie
    w[11] *= 30  # a large row
    w[12] = 0  # an all-zero row
    w = w.to(dtype).float()  # the values a bf16 layer holds
    calibration = torch.randn(4, 256) * 5
    calibration[:, :8] = 150
    head = Int8Head(w.to(dtype), calibration, int8_engine)
    assert set(head.outliers.tolist()) >= set(range(8))
    for scale in (1.0, 10.0, 100.0):
        for shift in (0, 100):  # shift: outliers in channels the screen did not take for outliers
            h = torch.randn(6, 256) * scale
            h[:, :8] += 150
            h[:, 100:104] += shift
            h[0] = w[3].sign() * scale * 4  # tokens 3 and 7 at the top
            # the worst case for token 5: every weight's rounding error counts the same way
            s5 = head.extra[-1, 5]
            h[1] = (w[5] - s5 * (w[5] / s5).round()).sign() * scale
            h[1, head.outliers] = 0
            padded, slack, chunk_max = head.upper(h)
            # the last chunk and block are partial: their missing ids are -inf
            assert padded.shape == (6, 69 * CHUNK) and bool((padded[:, 70_000:] == float("-inf")).all())
            upper = padded[:, :70_000]
            exact = h.double() @ w.double().T
            # each chunk's largest bound
            assert torch.equal(chunk_max, torch.stack([c.amax(1) for c in upper.split(CHUNK, 1)], 1))
            assert bool((upper.double() >= exact - 1e-9).all())
            bar = exact.gather(1, upper.topk(4, dim=1).indices).amax(1, keepdim=True) - slack.double()[:, None]
            winners = exact.argmax(1)
            assert bool((upper.double().gather(1, winners[:, None]) >= bar).all())
            if shift == 0:  # a tight screen when the outliers are where they were
                assert int((upper.double() >= bar).sum(1).max()) < 2000


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("penalty", [None, 0.7, 1.3])
def test_int8_choice_reads_only_the_chunks_that_can_win(int8_engine, softcap, penalty):
    """The screen's choice (`_int8_choice`: references from the chunks with the highest largest
    bounds, candidates only from chunks whose largest bound reaches the bar) is the fp32 greedy
    choice, on a vocabulary whose last chunk and block are partial, with soft-capping and a
    penalty that lowers (1.3) or raises (0.7) the seen tokens, which win where 0.7 lifts them."""
    from lidr.backends.decode import _choose
    from lidr.head import Int8Head

    torch.manual_seed(0)
    w = torch.randn(70_000, 256) * 0.04
    h = torch.randn(6, 256) * 3
    h[:, :4] += 60  # outlier channels
    w[69_990] = w[int((h[0] @ w.T).argmax())] * 0.999  # row 0's runner-up, in the partial last chunk
    dec = _choice_decoder(w, Int8Head(w, h, int8_engine), softcap)
    # seen ids: each row's runner-up and random others
    exact = h @ w.T
    runner_up = exact.topk(2, dim=1).indices[:, 1]
    seen = torch.cat([runner_up[:, None], torch.randint(0, 70_000, (6, 30))], 1)
    col = None if penalty is None else torch.full((6, 1), penalty)
    want = exact.clone()
    if softcap:
        want = torch.tanh(want / softcap) * softcap
    want = _choose(want, seen, col)
    got = dec._int8_choice(h, seen, col)
    assert got is not None and torch.equal(got, want)
    if penalty == 0.7:  # the raised runners-up won somewhere
        assert bool((want == runner_up).any())
    # The bounds' buffer is kept between steps: a smaller step, then a larger one (the buffer
    # grows) choose as the fp32 layer does, and the soft-capping and penalties done in place
    # left its padding past the vocabulary at -inf.
    for rows in ([1, 3], list(range(6)) * 2):
        idx = torch.tensor(rows)
        got = dec._int8_choice(h[idx], seen[idx], None if col is None else col[idx])
        assert torch.equal(got, want[idx])
    assert len(dec.int8_head._out) == 12 and bool((dec.int8_head._out[:, 70_000:] == float("-inf")).all())


@pytest.mark.parametrize("penalty", [None, 1.3])
def test_int8_choice_of_a_bf16_layer_is_its_greedy_choice_at_rounded_ties(int8_engine, penalty):
    """A bf16 output layer's logits are fp32 sums rounded to bf16, and its greedy choice takes the
    lowest id among equal rounded logits (`greedy_t`). Where the bound is tight (the logits in the
    outlier channels, which the screen runs in fp32) a token whose sum is below another's can
    still round to the same value and win: the screen's bar leaves room for that rounding, and
    for the best logit's own rounding above every bound."""
    from lidr.head import Int8Head, greedy_t

    torch.manual_seed(0)
    d = 256
    w = (torch.randn(70_000, d) * 0.04).bfloat16()
    w[10] = w[20] = 0
    w[10, 0], w[10, 1] = 100, 0.30078125  # sum 100.30078: rounds up to 100.5 in bf16
    w[20, 0], w[20, 1] = 100, 0.4453125  # sum 100.4453: a higher sum, the same 100.5
    calibration = torch.randn(4, d)
    calibration[:, :16] = 150  # channels 0-15 are the outliers
    h = torch.zeros(3, d)
    h[:, :2] = 1.0
    h[:, 16:] = torch.randn(3, d - 16) * 1e-3  # (small: the int8 part's bound stays tight)
    h = h.bfloat16()
    dec = _choice_decoder(w, Int8Head(w, calibration, int8_engine))
    assert set(range(16)) <= set(dec.int8_head.outliers.tolist())
    seen = torch.randint(100, 70_000, (3, 20))
    col = None if penalty is None else torch.full((3, 1), penalty)
    want = greedy_t(w, h, seen, col)
    assert want.tolist() == [10, 10, 10]  # the tie at 100.5 goes to the lower id
    assert torch.equal(dec._int8_choice(h, seen, col), want)


@pytest.mark.parametrize("rows", [5, 40])
def test_int8_choice_of_a_bf16_layer_matches_greedy_t_bit_for_bit_at_many_rows(int8_engine, rows):
    """The candidates' exact bf16 logits are the bits of the whole layer's product (`greedy_t`'s
    layout, W @ h.T): for 33 or more rows `F.linear` on the candidates' rows gave other bits in
    about 1 of 10^4 logits (review of round 23), which at bf16's frequent ties changed choices.
    Many tokens here have exact sums within ~1e-7 of a bf16 rounding midpoint."""
    from lidr.head import Int8Head, greedy_t

    torch.manual_seed(1)
    vocab, d, per = 70_000, 640, 20
    h = torch.randn(rows, d) * 0.3
    h[:, :rows] = 0
    h[torch.arange(rows), torch.arange(rows)] = 10.0  # one large channel per row
    h = h.bfloat16()
    hd = h.double()
    w = torch.randn(vocab, d) * 0.004
    midpoint = 13.03125  # between bf16's 13.0 and 13.0625
    ids = torch.randperm(vocab)[:rows * per].view(rows, per)
    for r in range(rows):
        for v in ids[r].tolist():  # three weights set so that the row's exact sum is near the midpoint
            wv = (torch.randn(d) * 0.004).bfloat16().double()
            wv[:rows] = 0
            channels = [r, *(rows + hd[r, rows:].abs().topk(8).indices[torch.randperm(8)[:2]]).tolist()]
            wv[channels] = 0
            for ch in channels:
                wv[ch] = float(torch.tensor((midpoint - float(wv @ hd[r])) / float(hd[r, ch])).bfloat16())
            w[v] = wv.float()
    w = w.bfloat16()
    dec = _choice_decoder(w, Int8Head(w, h, int8_engine))
    seen = ids[:, ::7].contiguous()
    for penalty in (None, 1.3, 0.7):
        col = None if penalty is None else torch.full((rows, 1), penalty)
        got = dec._int8_choice(h, seen, col)
        assert got is not None and torch.equal(got, greedy_t(w, h, seen, col)), penalty


def test_onednn_int8_engine_only_where_its_sums_are_exact():
    """oneDNN's int8 product is used only where it sums exactly (VNNI or AMX). Limited to
    AVX-512 without VNNI, its saturating int16 pairs broke the bound: the check finds that and
    the screen takes fbgemm (a process of its own, as oneDNN reads the limit once)."""
    import subprocess
    import sys

    from lidr.head import Int8Head
    from lidr.models import cpu_flags

    if "onednn" not in Int8Head.engines():
        pytest.skip("no exact oneDNN int8 product on this machine")
    code = "from lidr.head import Int8Head, _onednn_int8_exact; print(_onednn_int8_exact(), Int8Head.engines())"
    for isa, want in (("AVX512_CORE", "False ['fbgemm']"), ("ALL", "True ['onednn', 'fbgemm']")):
        if isa == "AVX512_CORE" and "avx512f" not in cpu_flags():
            continue
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want, (isa, out.stdout, out.stderr[-500:])


def test_a_cache_the_decoder_does_not_handle_has_no_room():
    """With cache layers the decoder cannot pad or crop (`window` False), no rows join and no
    guesses are checked, not even zero positions' worth."""
    from lidr.backends.decode import ContinuousDecoder

    dec = object.__new__(ContinuousDecoder)
    dec.window = False
    assert not dec._room(object(), 0) and not dec._can_join(object()) and dec._spare(object()) < 0


@pytest.mark.parametrize("kind", ["gemma3", "llama"])
def test_bf16_model_with_the_int8_screen_answers_as_its_bf16_output_layer(tmp_path, kind, monkeypatch):
    """A bf16 model's steps, one row or several, are screened by the oneDNN int8 copy where the
    CPU has int8 matrix instructions, with the answers of its plain bf16 output layer (rows joining
    and leaving, the penalty, a lone row's guesses)."""
    from lidr.head import Int8Head

    if Int8Head.default_engine() != "onednn":
        pytest.skip("the int8 screen runs for bf16 layers with oneDNN's int8 product only")
    monkeypatch.setattr(Int8Head, "MIN_PARAMS", 0)  # tiny heads are cheap in bf16
    path = _save_tiny(tmp_path, kind)
    b = HFBackend(path, dtype="bfloat16", device="cpu", packed_weights=True)
    try:
        dec = b.decoder
        assert dec.int8_head is None and dec.int8_rows == 1
        screened = []
        choose = dec._int8_choice
        monkeypatch.setattr(dec, "_int8_choice", lambda h, *a: screened.append((len(h), choose(h, *a))) or screened[-1][1])
        answers = {}
        for name in ("int8", "bf16"):
            got = {}
            for rows in (3, 1):
                b.run_batched([(i, p, []) for i, p in enumerate(PROMPTS)], batch_size=rows, max_new_tokens=12,
                              repetition_penalty=1.2, on_result=lambda k, g, rows=rows: got.__setitem__((rows, k), g.text))
            answers[name] = got
            if name == "int8":
                assert isinstance(dec.int8_head, Int8Head) and dec.int8_head.engine == "onednn"
                assert {n for n, _ in screened} >= {1, 3} and all(c is not None for _, c in screened)
            dec.int8_head = False  # the second run: the bf16 output layer only
        assert answers["int8"] == answers["bf16"]
    finally:
        b.close()
        Int8Head.forget()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_model_int8_screen_gives_the_same_answers(dtype):
    """The embedded gemma-3-270m (262k-token output layer, outlier channels in its final hidden
    states): the int8 screen chooses every token of several-row steps itself (no fallback to the
    whole output layer) and the answers are those of its fp32 or bf16 output layer."""
    from lidr.head import Int8Head
    from lidr.models import cpu_has_fast_bf16, resolve_model
    from lidr.templates import choose_format

    if not Int8Head.available():
        pytest.skip("no int8 product on this machine")
    if dtype == "bfloat16" and not (cpu_has_fast_bf16() and Int8Head.default_engine() == "onednn"):
        pytest.skip("the int8 screen runs for bf16 layers with oneDNN's int8 product only")
    import json
    from importlib.resources import files

    rows = [json.loads(line) for line in files("lidr").joinpath("data/demo_prompts.jsonl").read_text().splitlines()]
    b = HFBackend(resolve_model("gemma-3-270m"), dtype=dtype, device="cpu", packed_weights=True)
    try:
        fmt = choose_format(b.tokenizer, "auto")
        items = [((r["id"], lang), fmt.response_prompt(r["translations"][lang], lang), fmt.response_stops(lang))
                 for r in rows[:2] for lang in ("en", "es", "de", "fr")]
        dec, answers, screened = b.decoder, {}, []
        choose = dec._int8_choice
        dec._int8_choice = lambda *a: screened.append(choose(*a)) or screened[-1]
        for name in ("int8", "whole"):
            got = {}
            b.run_batched(items, batch_size=8, max_new_tokens=24, repetition_penalty=1.1, on_result=got.__setitem__)
            answers[name] = got
            dec.int8_head = False  # the second run: the whole output layer only
        assert len(screened) > 10 and all(c is not None for c in screened)
        assert answers["int8"] == answers["whole"]
    finally:
        b.close()


def test_int8_bound_is_reached_by_the_worst_cases(int8_engine, bounds_pass):
    """The two rounding terms of the int8 bound are each reached (within a few %) by an input
    made to reach them, so neither can be smaller: a token whose every weight rounds by almost
    s/2 the same way (weight term), and a row whose every activation rounds by almost t/2
    (activation term). The bound still holds on both."""
    from lidr.head import Int8Head

    torch.manual_seed(0)
    d, sigma, tau = 256, 1e-3, 0.05
    w = torch.randn(40_000, d) * 0.04
    calibration = torch.randn(4, d)
    calibration[:, :8] = 150
    head = Int8Head(w, calibration, int8_engine)
    rest = torch.ones(d, dtype=torch.bool)
    rest[head.outliers] = False
    c0 = int(rest.nonzero()[0])  # the channel that sets each scale
    w[5] = 0.499 * sigma  # rounds to 0: every weight off by 0.499 of its scale sigma
    w[5, c0] = 127 * sigma
    w[6] = torch.randint(1, 128, (d,)) * sigma  # on the grid of its scale: no weight error
    w[6, c0] = 127 * sigma
    head = Int8Head(w, calibration, int8_engine)
    assert torch.equal(head.outliers, (~rest).nonzero()[:, 0])
    h = torch.zeros(2, d)
    h[0, rest] = 127 * tau  # on the activations' grid (t = tau): no activation error
    h[1, rest] = 0.499 * tau  # rounds to 0: every activation off by 0.499 t
    h[1, c0] = 127 * tau
    upper, *_ = head.upper(h)
    exact = h.double() @ w.double().T
    worst = [(h[0, rest].double() * w[5, rest].double()).sum() - h[0, c0].double() * w[5, c0],  # q = 0 but at c0
             (h[1, rest].double() * w[6, rest].double()).sum() - h[1, c0].double() * w[6, c0]]  # h = 0 but at c0
    for row, token in ((0, 5), (1, 6)):
        gap = float(upper[row, token].double() - exact[row, token])
        assert 0 <= gap <= 0.05 * float(worst[row]), (row, gap, float(worst[row]))


def test_int8_copy_is_reused_for_the_same_output_layer_only():
    """A later backend whose output layer holds the same bytes (every iteration's model under
    LoRA) gets the int8 copy already built; one changed weight builds a new copy, whose
    bounds hold for the changed layer."""
    from lidr.head import Int8Head, fingerprint

    if not Int8Head.available():
        pytest.skip("fbgemm's int8 kernels are not in this torch build")
    torch.manual_seed(0)
    w = torch.randn(40_000, 128) * 0.04
    h = torch.randn(3, 128)
    try:
        first = Int8Head.of(w, h)
        assert Int8Head.of(w.clone(), h * 2) is first  # another tensor, the same bytes
        changed = w.clone()
        changed[31_000, 5] += 1.0  # one weight, in the last block
        assert fingerprint(changed) != fingerprint(w)
        assert fingerprint(w.view(128, 40_000)) != fingerprint(w)  # the shape counts too
        second = Int8Head.of(changed, h)
        assert second is not first and Int8Head.of(changed, h) is second
        with torch.inference_mode():  # as a decoder uses it: its bounds' buffer is made here
            inside = second.upper(h)[0].clone()
        upper, *_ = second.upper(h)  # and a later caller outside inference mode writes into it
        assert torch.equal(upper, inside)
        exact = h.double() @ changed.double().T
        assert float(upper[:, 31_000].double().sub(exact[:, 31_000]).min()) >= 0  # the bound of the changed row
        assert Int8Head.of(w, h) is not first  # only the last copy is kept
    finally:
        Int8Head.forget()


def test_bf16_model_packs_its_layers_on_a_cpu_with_fast_bf16(tmp_path):
    """A bf16 model's body is packed for oneDNN where bf16 is fast, with the same answers as the
    plain layers give (at these few rows the packed products are the same bits:
    tests/test_packed_linear.py; a long prefill's may differ in the last bf16 bit)."""
    from lidr import packed_linear
    from lidr.models import cpu_has_fast_bf16

    if not (packed_linear.available() and cpu_has_fast_bf16()):
        pytest.skip("bf16 layers are packed only on an x86-64 CPU with fast bf16")
    path = _save_tiny(tmp_path, "llama")
    answers = {}
    for packed in (True, False):
        b = HFBackend(path, dtype="bfloat16", device="cpu", packed_weights=packed)
        assert b.decoder.packed_layers == (7 * 2 if packed else 0)  # the output layer is not packed in bf16
        answers[packed] = [g.text for g in b.generate(PROMPTS, max_new_tokens=10, repetition_penalty=1.2)]
        b.close()
    assert answers[True] == answers[False]


def test_a_second_model_of_the_same_kind_skips_the_set_up_checks(tmp_path, monkeypatch):
    """The probe forwards that check the decoder's own head and fast body answer for a kind of
    model (class, config, dtype, device, packing): a second load of the same kind (M1 after M0,
    saved elsewhere, other weights) takes their answers and decodes the same as a first load;
    a model of another config is checked."""
    from lidr.backends import decode

    monkeypatch.setattr(decode, "_CHECKED", {})
    first = _save_tiny(tmp_path / "m0", "gemma3")
    a = HFBackend(first, dtype="float32", device="cpu")
    assert a.decoder.own_head and len(decode._CHECKED) == 1
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float32)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)  # other weights, the same kind
    other.save_pretrained(tmp_path / "m1")
    for f in first.glob("tokenizer*"):
        (tmp_path / "m1" / f.name).write_bytes(f.read_bytes())
    ran = []
    for name in ("_own_head_matches", "_fast_body_matches"):
        real = getattr(decode.ContinuousDecoder, name)
        monkeypatch.setattr(decode.ContinuousDecoder, name, lambda self, real=real, name=name: ran.append(name) or real(self))
    b = HFBackend(tmp_path / "m1", dtype="float32", device="cpu")
    assert ran == [] and b.decoder.own_head == a.decoder.own_head
    assert (b.decoder.fast_body is None) == (a.decoder.fast_body is None)
    monkeypatch.setattr(decode, "_CHECKED", {})
    checked = HFBackend(tmp_path / "m1", dtype="float32", device="cpu")  # a new process's first load
    assert ran and checked.decoder.own_head == b.decoder.own_head
    gen = lambda backend: [g.text for g in backend.generate(PROMPTS, max_new_tokens=8)]  # noqa: E731
    assert gen(b) == gen(checked)
    ran.clear()
    HFBackend(_save_tiny(tmp_path / "llama", "llama"), dtype="float32", device="cpu")
    assert "_own_head_matches" in ran  # another kind: checked


def test_bf16_greedy_choice_is_taken_blockwise_with_the_same_answers(tmp_path, monkeypatch):
    """A bf16 model's next tokens come from lidr.head.greedy_t (the argmax taken block by block,
    the repetition penalty applied to the seen ids' fp32 logits): the answers are those of the
    full logits' argmax, with and without a penalty."""
    from lidr.backends import decode

    path = _save_tiny(tmp_path, "llama")  # (the tiny gemma3 soft-caps its logits: the full ones)
    b = HFBackend(path, dtype="bfloat16", device="cpu")
    assert b.decoder.own_head and not b.decoder.softcap
    real = decode.greedy_t
    for penalty in (1.0, 1.3):
        used = []
        monkeypatch.setattr(decode, "greedy_t", lambda w, h, *a: used.append(len(h)) or real(w, h, *a))
        blockwise = [g.text for g in b.generate(PROMPTS, max_new_tokens=12, repetition_penalty=penalty)]
        assert used and max(used) > 1
        monkeypatch.setattr(decode, "greedy_t", lambda w, h, *a: None)  # the full logits' argmax
        assert [g.text for g in b.generate(PROMPTS, max_new_tokens=12, repetition_penalty=penalty)] == blockwise


@pytest.mark.slow
def test_stop_strings_are_found_at_the_same_token_when_the_window_is_decoded_less():
    """The decoder decodes a row's last tokens to look for its stop strings only after a token
    whose own text could end one (`_may_end_a_stop`); with the real Gemma 3 tokenizer (byte
    fallback for rare characters, special tokens) every text here stops at the same token as
    when the window is decoded after every token, for stops that end in a letter, a colon, a
    line break, a space, '>' or a character spelled in bytes (𓀀: four tokens that each decode
    to U+FFFD alone)."""
    from types import SimpleNamespace

    from lidr.backends.decode import ContinuousDecoder, _Row
    from lidr.models import load_tokenizer, resolve_model
    from lidr.templates import OUT_CLOSE, SRC_OPEN

    tok = load_tokenizer(resolve_model("gemma-3-270m"))
    stop_sets = [["\nQuestion:", "\n\n\n"], ["\nPregunta:", "\n\n\n"], [OUT_CLOSE, SRC_OPEN], ["Answer: "], ["mundo"],
                 ["é\n"], ["😀"], ["日本"], ["𓀀"], ["ꙮ!"]]
    texts = ["Bread keeps best in a sealed box.\n\nQuestion: what", "Hola mundo\nPregunta: y",
             "traducción </translation> más", "Answer: 42 and Answer:  7", "café\n\n\n\nfin",
             "a 😀 smile 😀😀 and 日本語 text 日本", "<b>bold</b><translation>x</translation>",
             "naïve résumé é\né", "ends with a colon: yes\nQuestion:", "glyphs 𓀀𐌰 then ꙮ! and 𓀀"]
    probe = SimpleNamespace(tokenizer=tok, _pieces={})
    checked = decoded = tokens = 0
    for stops in stop_sets:
        ends = _Row("k", stops, 8, 1.0, []).stop_ends
        assert (ends is None) == (stops == ["Answer: "])  # a stop ending in a space: every token
        window = 2 + max(len(tok(s, add_special_tokens=False).input_ids) for s in stops)
        for text in texts:
            ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]

            def found(n):
                return any(s in tok.decode(ids[:n][-window:], skip_special_tokens=True) for s in stops)

            every = next((n for n in range(1, len(ids) + 1) if found(n)), None)
            may = [ContinuousDecoder._may_end_a_stop(probe, t, ends) for t in ids]
            fewer = next((n for n in range(1, len(ids) + 1) if may[n - 1] and found(n)), None)
            assert fewer == every, (stops, text)
            checked += every is not None
            if ends is not None:
                tokens, decoded = tokens + len(ids), decoded + sum(may)
    assert checked >= 10  # most texts do hold a stop
    assert decoded < tokens / 2  # and most tokens are not followed by a decode of the window


def test_decoding_on_a_gpu_leaves_cudnn_attention_out(backend, monkeypatch, recorded_attention):
    """On a GPU the decoder's attention runs without cuDNN's kernel, which plans anew for every
    shape (each step's keys are one longer): 158.6 against 25.5 ms a step on an H200
    (bench/README.md, round 21). A run makes every step inside `gpu_attention`, for its own
    device (the flags it sets: test_models.py)."""
    import lidr.backends.decode as decode

    steps = []
    monkeypatch.setattr(decode, "gpu_attention", recorded_attention)
    step = backend.decoder._step
    monkeypatch.setattr(backend.decoder, "_step", lambda *a: steps.append(recorded_attention.inside) or step(*a))
    backend.generate(PROMPTS[:3], max_new_tokens=4)
    assert recorded_attention.devices == [backend.decoder.device] and steps and all(steps)
