"""llama.cpp with parallel sequences (continuous batching), through llama-cpp-python's
low-level bindings (libllama).

llama-cpp-python's own server (0.3.36) has no parallel slots: it holds one lock around
the model and answers one request at a time. llama.cpp's C++ `llama-server --parallel N`
instead decodes N sequences together: every step is one `llama_decode` holding the next
token of each running sequence plus the prompt tokens of any sequence just admitted to
a free slot, and a finished sequence's slot takes the next prompt at once. This module
does the same on the same GGUF file, so the comparison with lidr is against llama.cpp's
batching, not against a serial server.

Greedy, with HF-style repetition penalty (every token of the prompt and the answer so
far; llama.cpp's sampler would only look at the last 64) so the answers match lidr's,
and per-row stop strings checked on the decoded text.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Seq:
    key: object
    prompt: list[int]
    stops: list[str]
    pos: int = 0
    out: list[int] = field(default_factory=list)
    text: bytes = b""
    seen: set = field(default_factory=set)


class LlamaBatched:
    def __init__(self, gguf: str, slots: int = 8, ctx_per_slot: int = 1024, threads: int = 2):
        import llama_cpp as L
        from llama_cpp._logger import set_verbose

        set_verbose(False)  # llama.cpp's load/graph chatter to stderr: errors only
        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        cp = L.llama_context_default_params()
        cp.n_ctx = slots * ctx_per_slot
        cp.n_seq_max = slots
        cp.n_batch = cp.n_ctx  # a whole step (new prompts + one token per running row) in one decode call
        cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.slots, self.ctx_per_slot = slots, ctx_per_slot
        self.batch = L.llama_batch_init(cp.n_batch, 0, 1)
        self.capacity = cp.n_batch
        self.mem = L.llama_get_memory(self.ctx)

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (self.L.llama_token * (len(raw) + 8))()
        n = self.L.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, True)  # "<bos>" text -> BOS
        if n < 0:
            raise RuntimeError("tokenize failed")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.L.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        return buf.raw[:n] if n > 0 else b""

    def run(self, items, *, max_new_tokens: int, repetition_penalty: float = 1.0) -> dict:
        """items: (key, prompt text, stop strings). Returns {key: generated text (stop string kept)}."""
        L = self.L
        queue, active, results = list(items), {}, {}
        free = list(range(self.slots))
        L.llama_memory_clear(self.mem, True)
        while queue or active:
            entries = []  # (token, pos, slot, wants logits)
            for slot, seq in active.items():  # one new token per running row
                entries.append((seq.out[-1], seq.pos, slot, True))
            while queue and free:  # admit new prompts to free slots (prefill in the same step)
                key, prompt, stops = queue.pop(0)
                toks = self.tokenize(prompt)
                if len(toks) + max_new_tokens > self.ctx_per_slot:
                    raise ValueError(f"prompt of {len(toks)} tokens + {max_new_tokens} > ctx per slot")
                if len(entries) + len(toks) > self.capacity:
                    queue.insert(0, (key, prompt, stops))
                    break
                slot = free.pop(0)
                seq = _Seq(key, toks, stops, seen=set(toks))
                active[slot] = seq
                for i, t in enumerate(toks):
                    entries.append((t, i, slot, i == len(toks) - 1))
            b = self.batch
            for i, (tok, pos, slot, want) in enumerate(entries):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
                b.seq_id[i][0] = slot
            b.n_tokens = len(entries)
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for i, (tok, pos, slot, want) in enumerate(entries):
                if not want:
                    continue
                seq = active[slot]
                seq.pos = pos + 1
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).copy()
                if repetition_penalty != 1.0 and seq.seen:
                    ids = np.fromiter(seq.seen, dtype=np.int64)
                    v = logits[ids]
                    logits[ids] = np.where(v > 0, v / repetition_penalty, v * repetition_penalty)
                nxt = int(logits.argmax())
                done = bool(L.llama_vocab_is_eog(self.vocab, nxt))
                if not done:
                    seq.out.append(nxt)
                    seq.seen.add(nxt)
                    seq.text += self.piece(nxt)
                    text = seq.text.decode("utf-8", errors="ignore")
                    done = any(s in text for s in seq.stops) or len(seq.out) >= max_new_tokens
                if done:
                    results[seq.key] = seq.text.decode("utf-8", errors="replace")
                    L.llama_memory_seq_rm(self.mem, slot, -1, -1)
                    del active[slot]
                    free.append(slot)
        return results

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


def timed_run(gguf, items, *, slots, ctx_per_slot, max_new_tokens, repetition_penalty, threads=2):
    """(texts, seconds, load seconds), after a short warm-up."""
    t0 = time.perf_counter()
    eng = LlamaBatched(gguf, slots=slots, ctx_per_slot=ctx_per_slot, threads=threads)
    load = time.perf_counter() - t0
    try:
        eng.run(items[:1], max_new_tokens=2, repetition_penalty=repetition_penalty)
        start = time.perf_counter()
        texts = eng.run(items, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
        return texts, time.perf_counter() - start, load
    finally:
        eng.close()
