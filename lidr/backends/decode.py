"""Greedy decoding with continuous batching for a transformers causal LM.

transformers' `generate` keeps every row of a batch until its longest row ends: on the demo,
80 % of the row-steps went to rows that had already stopped (bench/generate.py), and each of
them paid for the 262k-token output layer. Here a row leaves the batch (and the KV cache) the
step it stops, and waiting prompts take the free places, the way vLLM and llama.cpp's server
schedule their slots. The results are the same as `generate`'s: greedy, the same repetition
penalty, EOS and per-row stop strings, left padding with position ids from the mask. Each
row may have its own token limit and penalty (`Request`).

What makes the work smaller, each exact (tests/test_decode.py checks every one against
`generate` on each prompt alone):
- prefill: prompts that begin alike (few-shot examples, a translation header) run their
  shared prefix once, as with vLLM's prefix caching (`_prefill`);
- the output layer runs on the last position of the live rows only; on a CPU with
  `packed_weights`, every frozen fp32 linear layer goes through oneDNN with its weights
  reordered once (lidr/packed_linear.py: decoding steps of 4-32 rows took 1.4-2x less time
  than through MKL; the output layer is reordered at its first full fp32 product, which the
  screens below leave for rare steps), else the output layer is a blockwise `W @ h.T`
  (lidr/head.py); for a single row, an fp16 copy screens the vocabulary and only the tokens
  that can still win get exact fp32 logits (`_screened_choice`); for several rows, an int8
  copy gives every token a bound on its logit, and only tokens whose bound reaches an exact
  logit get exact fp32 logits (`_int8_choice`; built once per process for an output layer,
  which LoRA leaves as it was: lidr/head.py, `Int8Head.of`). A bf16 output layer is screened
  by the int8 copy at every step where oneDNN runs the int8 product (CPUs with AMX or
  AVX512-VNNI), the exact logits then being bf16's;
- the KV cache grows in place: a step writes its new positions into spare room instead of
  concatenating (which copies the whole cache every step; `_growing`);
- the tail of a run, where one long answer decodes alone: guesses of its next tokens from its
  own prompt and answer are checked in one forward (prompt lookup decoding, `_draft`; twice
  as many after a check that kept them all), its positions screened by the int8 copy like the
  rows of a step (`_verify`).

New rows join a running batch by left-padding the shorter of the two KV caches to the other's
length, written once into a buffer with room (`_join`). That is done only for plain
`DynamicLayer` / `DynamicSlidingWindowLayer` caches (made growing) still inside the sliding
window; with any other cache the batch drains before the next one starts.
"""

from __future__ import annotations

import functools
import inspect
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from lidr import packed_linear
from lidr.backends.gemma3_body import Gemma3Body
from lidr.head import CHUNK, HalfHead, Int8Head, greedy_t, logits_t, penalized
from lidr.models import gpu_attention


@dataclass
class Generation:
    text: str  # the generated continuation (a stop string it ended on is kept)
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (token limit)


MIN_SHARED = 16  # tokens two prompts must share before their prefix runs once for both
PREFILL_ROWS = 16  # at most this many prompts (or their unshared rests) run through the model together
# What one more prefill forward costs, in padded tokens: on gemma-3-270m here a forward took
# ~40 ms + 1.7 ms per token (bench/README.md, round 14). The rests are split into chunks where
# the padding saved is worth another forward (`_chunk_bounds`).
PREFILL_FORWARD_TOKENS = 32
LOOKUP_NGRAM = 3  # a lone row's last 3 tokens are looked up earlier in its prompt and answer ...
LOOKUP_TOKENS = 10  # ... and up to 10 tokens that followed them are checked in one step;
LOOKUP_MAX_TOKENS = 64  # after a step that kept every guess, the next guesses twice as many, up to 64
LOOKUP_CONTEXT = 64  # of the occurrences, the one preceded by the longest run (up to 64) like the row's end
REFERENCES = 4  # tokens with the highest int8 bounds whose exact logits set the screen's bar
# The fp16 screen for one-row steps (HalfHead) is built at a decoder's 16th one-row step, not at
# its set-up: building it took 0.23-0.29 s in the demo (0.5 s with the once-per-process speed
# check) and it saved 12-17 ms a step, so it pays after about 16-24 steps: on a longer lone tail.
# The demo's stages took 0, 2, 9 and 0 one-row steps (bench/README.md, round 14): a build there
# cost more than it saved. Built at the 16th, a tail costs at most about twice the best choice.
HALF_HEAD_AFTER = 16


class Request(NamedTuple):
    """One row to generate. A plain (key, prompt, stops) tuple is a Request with the call's
    settings; the last two fields override them for this row (so rows with different limits,
    e.g. MGSM and X-AlpacaEval answers, can share one decoding run)."""

    key: object  # the result is reported under this key
    prompt: str  # the full prompt string, special tokens included
    stops: list[str]  # strings that end the row (kept in its text)
    max_new_tokens: int | None = None  # None: the call's max_new_tokens
    repetition_penalty: float | None = None  # None: the call's repetition_penalty


def as_requests(items, max_new_tokens: int, repetition_penalty: float) -> list[Request]:
    """Items (Requests or (key, prompt, stops) tuples) -> Requests with every setting filled in."""
    out = []
    for item in items:
        r = Request(*item)
        out.append(r._replace(
            max_new_tokens=max_new_tokens if r.max_new_tokens is None else r.max_new_tokens,
            repetition_penalty=repetition_penalty if r.repetition_penalty is None else r.repetition_penalty))
    return out


# The decoder's set-up checks (`_own_head_matches`, `_fast_body_matches`) answer for a kind of
# model, not for its weights' values: (own head, which fast body: "fused", "eager" or None) by
# `ContinuousDecoder._checks_key`. A run's models M0, M1, ... are one kind, so each later load
# skips the probe forwards (0.1 s for gemma-3-270m).
_CHECKED: dict[tuple, tuple[bool, str | None]] = {}


@dataclass
class _Row:
    key: object
    stops: list[str]
    max_new_tokens: int
    penalty: float
    prompt_ids: list[int]
    new: list[int] = field(default_factory=list)  # generated token ids
    guesses: int = LOOKUP_TOKENS  # how many tokens the row's next prompt lookup guesses (`_draft`)
    # the stops' last characters, or None where every token must be checked (`_may_end_a_stop`)
    stop_ends: set[str] | None = field(init=False)

    def __post_init__(self):
        ends = {s[-1] for s in self.stops if s}
        self.stop_ends = None if any(c.isspace() and c not in "\n\r" for c in ends) else ends


class ContinuousDecoder:
    """`packed_weights`: on a CPU, run the model's frozen fp32 linear layers through oneDNN
    with prepacked weights (`_pack`); this changes the model's layers in place."""

    # Decoding steps run 1-64 rows; the layout chosen for 16 served 1-64 as well as any (bench/README.md).
    ROWS_HINT = 16

    def __init__(self, model, tokenizer, eos_ids: set[int], packed_weights: bool = False):
        from transformers import DynamicCache

        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self._pieces: dict[int, str] = {}  # token id -> its text alone (`_may_end_a_stop`)
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        self.device = next(model.parameters()).device
        self.new_cache = lambda: _growing(DynamicCache(config=model.config))
        self.body = model.base_model if model.base_model is not model else None
        head = model.get_output_embeddings()
        self.head_weight = head.weight if head is not None else None
        self.head_bias = getattr(head, "bias", None)
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        # transformers renames `past_key_values` to `cache` (5.2x); pass whichever this version takes.
        forward = (self.body or model).forward
        self.cache_kw = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        self.window = _sliding_window(self.new_cache())
        self.packed_layers = self._pack() if packed_weights else 0
        self.pack_head, self.packed_head = False, None  # (set below; the check runs the plain product)
        self._probe = self._probe_inputs = None
        self.own_head = self.body is not None and self.head_weight is not None
        key = self._checks_key() if self.own_head else None
        known = _CHECKED.get(key)
        self.own_head = self.own_head and (known[0] if known else self._own_head_matches())
        # Gemma 3's body in fewer operator calls (lidr/backends/gemma3_body.py), where it gives
        # the probe's hidden states bit for bit; on a CPU only, where it was measured and tested
        # (on a GPU sdpa may pick another kernel for a mask laid out otherwise than transformers')
        # With lidr's C++ kernels for its small operators (lidr/kernels.py) first, then without.
        self.fast_body = Gemma3Body.of(self.body) if self.own_head and self.device.type == "cpu" else None
        # a "fused" answer says nothing of the body without the kernels (not built in this process)
        if self.fast_body is not None and known and (known[1] != "fused" or self.fast_body.fused):
            self.fast_body = None if known[1] is None else self.fast_body if known[1] == "fused" else self.fast_body.eager()
        elif self.fast_body is not None:
            if self.fast_body.fused and not self._fast_body_matches():
                self.fast_body = self.fast_body.eager()
            if not self.fast_body.fused and not self._fast_body_matches():
                self.fast_body = None
            known = None  # checked now: the answer to keep
        if key is not None and known is None:
            _CHECKED[key] = (self.own_head, None if self.fast_body is None else
                             "fused" if self.fast_body.fused else "eager")
        # The output layer goes through oneDNN too (where we compute it ourselves), but its
        # weight is reordered only at the first step that needs the whole fp32 product
        # (`_packed_head`): with the fp16 and int8 screens that is seldom or never, and packing
        # gemma-3-270m's took 0.4 s and 671 MB more memory.
        w = self.head_weight
        self.pack_head = bool(self.packed_layers and self.own_head and w.dtype == torch.float32 and not w.requires_grad)
        self.packed_layers += self.pack_head  # counted with the others, packed or not yet
        # the fp16 screen for one-row steps: None until the HALF_HEAD_AFTER-th such step builds it
        # (`_choose_from`), False where it is not used
        self.half_head = None if self.own_head else False
        self.one_row_steps = 0
        # an int8 screen (`_int8_choice`) for steps of several rows of an fp32 output layer, and for
        # every step of a bf16 one where oneDNN runs it (there is no fp16 screen for bf16, and
        # fbgemm's product was not faster than bf16's: bench/README.md, round 22). None until the
        # first such step builds it from that step's hidden states, False where it is not used.
        engine = Int8Head.default_engine()
        self.int8_head = None if (packed_weights and self.own_head and self.device.type == "cpu"
                                  and (w.dtype == torch.float32 and engine is not None
                                       or w.dtype == torch.bfloat16 and engine == "onednn")
                                  and self.head_bias is None and w.numel() >= Int8Head.MIN_PARAMS) else False
        self.int8_rows = 2 if w is None or w.dtype == torch.float32 else 1  # the fewest rows it screens
        self.int8_build_seconds = 0.0  # time spent building it (for the benchmarks' accounting)
        self.lookup = True  # prompt lookup for a lone row (see _draft)

    # -- one forward pass: the next token of every row -------------------------------------------

    def _step(self, ids, mask, pos, cache, seen, penalty) -> torch.Tensor:
        """Run the new tokens through the model (filling `cache`) and choose each row's next
        token greedily, after the repetition penalty (`penalty`: a column, or None)."""
        if not self.own_head:
            kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, self.cache_kw: cache, "use_cache": True}
            return _choose(self.model(**kw, logits_to_keep=1).logits[:, -1].float(), seen, penalty)
        return self._choose_from(self._hidden(ids, mask, pos, cache)[:, -1], seen, penalty)

    def _hidden(self, ids, mask, pos, cache) -> torch.Tensor:
        """The body's final hidden states [rows, new tokens, hidden], the new tokens' keys and
        values appended to `cache`; through `fast_body` while the cache holds every position."""
        if self.fast_body is not None and self._room(cache, ids.shape[1]):
            return self.fast_body(ids, mask, pos, cache)
        kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, self.cache_kw: cache, "use_cache": True}
        return self.body(**kw).last_hidden_state

    def _choose_from(self, h: torch.Tensor, seen, penalty) -> torch.Tensor:
        """The greedy next token of each row of final hidden states `h` [rows, hidden] (our own
        output layer), screened by the fp16 (one row) or int8 (several rows) copy where there is one."""
        if len(h) == 1 and self.half_head is not False and float(h.abs().max()) < 6e4:
            if self.half_head is None:
                self.one_row_steps += 1
                if self.one_row_steps >= HALF_HEAD_AFTER:
                    self.half_head = self._half_head() or False
            if self.half_head:
                return self._screened_choice(h, seen, penalty)
        if len(h) >= self.int8_rows and self.int8_head is not False and bool(torch.isfinite(h).all()):
            if self.int8_head is None:
                self._build_int8_head(h)
            chosen = self._int8_choice(h, seen, penalty)
            if chosen is not None:
                return chosen
        if (not self.softcap and self.head_bias is None and h.device.type == "cpu"
                and self.head_weight.dtype != torch.float32):  # bf16, fp16: lidr/head.py (fp32 is packed)
            chosen = greedy_t(self.head_weight, h, seen, penalty)
            if chosen is not None:
                return chosen
        return _choose(self._head(h), seen, penalty)

    def _head(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [rows, vocab] of hidden states `h`; with `tokens`, [rows, len(tokens)]
        for those vocabulary ids only (used without an output bias only)."""
        if tokens is not None:
            rows = self.head_weight.index_select(0, tokens)  # 3-4x faster than [tokens]
            if self.head_weight.dtype == torch.float32 or h.device.type != "cpu":
                logits = F.linear(h, rows)
            else:  # as the whole layer runs (`logits_t`, `greedy_t`): its bits, which ties in bf16 need
                logits = logits_t(rows, h).T
        elif self._packed_head() is not None:
            logits = packed_linear.linear(h, self.packed_head, self.head_bias)
        elif h.device.type == "cpu":
            logits = logits_t(self.head_weight, h).T  # see lidr/head.py
            if self.head_bias is not None:
                logits = logits + self.head_bias
        else:
            logits = F.linear(h, self.head_weight, self.head_bias)
        logits = logits.float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _screened_choice(self, h: torch.Tensor, seen, penalty) -> torch.Tensor:
        """The greedy choice of one row, exact, at half the output layer's memory traffic: fp16
        logits are within ±eps of the fp32 ones (lidr/head.py, HalfHead), so only tokens whose
        approximate score is within 2 eps of the best can be the argmax; those get exact fp32
        logits. Soft-capping (1-Lipschitz) and the penalty (max(p, 1/p)-Lipschitz) are monotone:
        applied to the approximate logits, they keep the order and widen the bound at most so."""
        approx, eps = self.half_head.approx(h)
        if self.softcap:
            approx = torch.tanh(approx / self.softcap) * self.softcap
        if penalty is not None:
            p = float(penalty[0, 0])
            _penalize(approx, seen, penalty)
            eps *= max(p, 1 / p)
        cand = (approx[0] >= approx[0].max() - 2 * eps).nonzero()[:, 0]  # sorted, distinct
        return cand[self._exact_logits(h, cand, seen, penalty).argmax(-1)]

    def _build_int8_head(self, h: torch.Tensor) -> None:
        import time

        start = time.perf_counter()
        self.int8_head = Int8Head.of(self.head_weight, h)
        self.int8_build_seconds += time.perf_counter() - start

    def _int8_choice(self, h: torch.Tensor, seen, penalty) -> torch.Tensor | None:
        """The greedy choice of several rows, exact, with the output layer run in int8 (lidr/head.py,
        Int8Head): each token's bound is at least its exact logit, so the exact logit of any
        token (minus the rounding slack) is a bar that the winner's bound must reach; only tokens
        that reach it get exact fp32 logits. Soft-capping and the penalty are monotone, so
        they keep bounds bounds (the penalty scales the slack by at most max(p, 1/p)).
        None (the caller runs the fp32 output layer) if too many tokens reach the bar."""
        upper, slack, chunk_max = self.int8_head.upper(h)  # upper: -inf past the vocabulary
        vocab = self.int8_head.vocab
        if self.softcap:  # increasing: the chunks' largest bounds stay theirs (and -inf stays below all)
            for x in (upper[:, :vocab], chunk_max):
                x.div_(self.softcap).tanh_().mul_(self.softcap)
        if penalty is not None:
            _penalize(upper, seen, penalty)
            # a penalty below 1 raises a seen token's bound: its chunk's largest bound too
            chunk_max.scatter_reduce_(1, seen // CHUNK, upper.gather(1, seen), reduce="amax")
            slack = slack * torch.maximum(penalty, 1 / penalty)[:, 0]
        # the bar: the best exact logit of the REFERENCES tokens with the highest bounds (a token
        # with a loose bound can top the bounds with a poor logit); they lie in the chunks with
        # the highest largest bounds
        top = _chunk_ids(chunk_max.topk(min(REFERENCES, chunk_max.shape[1]), dim=1).indices, vocab)
        best = top.gather(1, upper.gather(1, top).topk(min(REFERENCES, vocab), dim=1).indices)
        flat = best.unique()
        bar = self._exact_logits(h, flat, seen, penalty).gather(1, torch.searchsorted(flat, best)).amax(1)
        if self.head_weight.dtype != torch.float32:
            # Exact logits are the product's fp32 sums rounded to bf16, so a token whose sum is
            # below the bar's may round up to it (a tie, which the lowest id wins). Rounding to
            # nearest, soft-capping and the penalty are monotone and keep signs, so a token can
            # reach the bar only if its (capped, penalized) bound reaches the bar less 2^-7 of it
            # (twice bf16's half unit in the last place, relative; more than enough for fp16).
            bar = bar - bar.abs() * 2 ** -7
        bar = bar - slack
        # the tokens whose bound reaches their row's bar, read from the chunks that can hold one
        row, chunk = (chunk_max >= bar[:, None]).nonzero(as_tuple=True)
        pair, offset = (upper.view(len(h), -1, CHUNK)[row, chunk] >= bar[row, None]).nonzero(as_tuple=True)
        tokens = (chunk[pair] * CHUNK + offset).unique()  # sorted: ties go to the lowest id
        if len(tokens) > max(vocab // 16, 256):  # then the full fp32 product is as cheap
            return None
        return tokens[self._exact_logits(h, tokens, seen, penalty).argmax(1)]

    def _exact_logits(self, h: torch.Tensor, tokens: torch.Tensor, seen, penalty) -> torch.Tensor:
        """fp32 logits [rows, k] of the vocabulary ids `tokens` (sorted, distinct) for every row,
        soft-capped and with the repetition penalty on the tokens each row has seen."""
        logits = self._head(h, tokens)
        if penalty is not None:
            n = len(tokens)
            at = torch.searchsorted(tokens, seen).clamp_(max=n - 1)
            hit = torch.zeros(len(h), n + 1, dtype=torch.bool, device=h.device)  # column n: seen ids not in tokens
            hit.scatter_(1, torch.where(tokens[at] == seen, at, n), True)
            hit = hit[:, :n]
            logits = torch.where(hit, penalized(logits, penalty), logits)
        return logits

    def _checks_key(self) -> tuple:
        """What the set-up checks' answers depend on (`_CHECKED`): the model's class and config
        (not the path it was loaded from), its weights' dtype, the device, which layers are
        packed, the probe's first token, and transformers' version."""
        import json

        import transformers

        config = self.model.config.to_dict()
        config.pop("_name_or_path", None)
        return (type(self.model), json.dumps(config, sort_keys=True, default=str), self.head_weight.dtype,
                str(self.device), self.packed_layers, self.tokenizer.bos_token_id, self.pad_id, transformers.__version__)

    def _probe_state(self) -> tuple[torch.Tensor, tuple]:
        """The body's last hidden state for a short probe ("Hello world"), and the probe's
        (ids, mask, positions)."""
        if self._probe is None:
            ids = torch.tensor([[self.pad_id if self.tokenizer.bos_token_id is None else self.tokenizer.bos_token_id,
                                 *self.tokenizer("Hello world", add_special_tokens=False).input_ids]], device=self.device)
            mask = torch.ones_like(ids)
            pos = torch.arange(ids.shape[1], device=self.device)[None]
            with torch.inference_mode():
                h = self.body(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
            self._probe, self._probe_inputs = h, (ids, mask, pos)
        return self._probe, self._probe_inputs

    def _own_head_matches(self) -> bool:
        """Our head (body + output layer) must give the model's own logits; a model with
        something else after its body (a logit scale, ...) falls back to its own forward."""
        h, (ids, mask, pos) = self._probe_state()
        with torch.inference_mode():
            want = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1].float()
            got = self._head(h)
        tol = 1e-2 if self.head_weight.dtype != torch.float32 else 1e-3
        return bool(torch.allclose(got, want, rtol=tol, atol=tol * max(1.0, float(want.abs().max()))))

    def _fast_body_matches(self) -> bool:
        """`fast_body` gives the body's own hidden states for the probe, bit for bit (a
        transformers release that changed Gemma 3's arithmetic would fail here)."""
        h, inputs = self._probe_state()
        try:
            return torch.equal(self.fast_body(*inputs, self.new_cache())[:, -1], h)
        except Exception:  # an attribute or signature it does not know: transformers' forward
            return False

    def _pack(self) -> int:
        """Reorder the frozen fp32 CPU linear weights of the body for oneDNN once
        (lidr/packed_linear.py), where the copies fit in the memory free now; bf16 ones too on a
        CPU with fast bf16 (AMX, AVX512-BF16), where a bf16 model runs. Returns how many layers
        were packed."""
        from lidr.models import cpu_has_fast_bf16

        dtypes = (torch.float32, torch.bfloat16) if cpu_has_fast_bf16() else (torch.float32,)
        head = self.model.get_output_embeddings()
        layers = [m for m in self.model.modules() if packed_linear.eligible(m, dtypes) and m is not head]
        if self.device.type != "cpu" or not layers or not packed_linear.available():
            return 0
        if not packed_linear.fits(sum(m.weight.numel() * m.weight.element_size() for m in layers)):
            return 0
        return packed_linear.pack(self.model, rows_hint=self.ROWS_HINT, skip=(head,), backward=False, dtypes=dtypes)

    def _packed_head(self) -> torch.Tensor | None:
        """The output layer's weight in oneDNN's layout, reordered at the first call where the
        copy fits in the memory free then; None where it is not used (`pack_head`)."""
        if self.pack_head and self.packed_head is None:
            if packed_linear.fits(self.head_weight.numel() * 4):
                self.packed_head = packed_linear.pack_weight(self.head_weight, rows_hint=self.ROWS_HINT)
            else:  # the plain product from now on
                self.pack_head = False
                self.packed_layers -= 1
        return self.packed_head

    def _half_head(self) -> HalfHead | None:
        """An fp16 screen for one-row steps on a CPU where it is faster and within its bound
        (checked on the set-up's probe)."""
        w = self.head_weight
        if self.device.type != "cpu" or w.dtype != torch.float32 or self.head_bias is not None:
            return None
        half = HalfHead(w)
        if not half.finite or not HalfHead.faster(w, half.half):
            return None
        with torch.inference_mode():
            probe = self._probe_state()[0]
            approx, eps = half.approx(probe)
            exact = (w @ probe.float().T).T
        return half if float((approx - exact).abs().max()) <= eps / 2 else None

    # -- the decoding loop ---------------------------------------------------------------------

    @torch.inference_mode()
    def run(
        self,
        items: list[Request | tuple[object, str, list[str]]],
        *,
        max_rows: int,
        max_new_tokens: int,
        repetition_penalty: float = 1.0,
        on_result: Callable[[object, Generation], None],
    ) -> None:
        """Greedy continuations of the items, at most `max_rows` in the batch at once;
        `on_result(key, generation)` is called the moment a row finishes. `max_new_tokens`
        and `repetition_penalty` apply to the rows that do not set their own."""
        with gpu_attention(self.device):
            self._run(items, max_rows, max_new_tokens, repetition_penalty, on_result)

    def _run(self, items, max_rows: int, max_new_tokens: int, repetition_penalty: float, on_result) -> None:
        reqs = as_requests(items, max_new_tokens, repetition_penalty)
        if not reqs:
            return
        ids = self.tokenizer([r.prompt for r in reqs], add_special_tokens=False).input_ids
        order = sorted(range(len(reqs)), key=lambda i: len(ids[i]))
        pending = deque((_Row(reqs[i].key, list(reqs[i].stops), reqs[i].max_new_tokens, reqs[i].repetition_penalty,
                              ids[i]), ids[i]) for i in order)
        window = 2 + max((len(self.tokenizer(s, add_special_tokens=False).input_ids)
                          for r in reqs for s in r.stops), default=0)  # a stop string can straddle tokens
        refill_at = max(1, max_rows // 8)  # admit new rows in groups: each admission copies the cache

        rows: list[_Row] = []
        cache = mask = seen = nxt = penalty = None
        while rows or pending:
            free = max_rows - len(rows)
            if pending and free >= min(refill_at, len(pending)) and self._can_join(cache):
                group = [pending.popleft() for _ in range(min(free, len(pending)))]
                group_rows, g_cache, g_mask, g_seen, g_nxt = self._prefill(group)
                if rows:
                    cache, mask, seen = _join([(cache, mask, seen), (g_cache, g_mask, g_seen)])
                    nxt = torch.cat([nxt, g_nxt])
                else:
                    cache, mask, seen, nxt = g_cache, g_mask, g_seen, g_nxt
                rows += group_rows
                penalty = _penalties(rows, self.device)

            keep = []
            for j, (row, t) in enumerate(zip(rows, nxt.tolist())):
                reason = self._take(row, t, window)
                if reason:
                    on_result(row.key, self._finish(row, reason))
                else:
                    keep.append(j)
            if len(keep) < len(rows):
                if not keep:
                    rows, cache, mask, seen, nxt = [], None, None, None, None
                    continue
                order = _keep_rows(cache, keep, self.window is not False, self.device)
                rows = [rows[j] for j in order]
                idx = torch.tensor(order, device=self.device)
                mask, seen, nxt = mask[idx], seen[idx], nxt[idx]
                penalty = _penalties(rows, self.device)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            seen = torch.cat([seen, nxt[:, None]], 1)  # kept for every row: a later row may need the penalty
            draft = self._draft(rows, cache)
            if not draft:
                nxt = self._step(nxt[:, None], mask, mask.sum(-1, keepdim=True) - 1, cache, seen, penalty)
                continue
            # A lone row: check a guess of its next tokens in the same forward (see _draft).
            row, before = rows[0], cache.get_seq_length()
            chosen = self._verify(int(nxt), draft, mask, seen, penalty, cache)
            accepted = chosen[:-1]  # guessed tokens the model would have chosen
            # a row in a repetition loop: the next check takes twice as many guesses
            row.guesses = min(LOOKUP_MAX_TOKENS, 2 * row.guesses) if len(accepted) == len(draft) else LOOKUP_TOKENS
            cache.crop(-(len(draft) - len(accepted)))  # forget the rejected guesses
            assert cache.get_seq_length() == before + 1 + len(accepted)
            mask = torch.cat([mask, mask.new_ones(1, len(accepted))], 1)
            seen = torch.cat([seen, seen.new_tensor([accepted])], 1)
            nxt = nxt.new_tensor(chosen[-1:])  # taken at the top of the loop, as after a step
            for t in accepted:
                reason = self._take(row, t, window)
                if reason:
                    on_result(row.key, self._finish(row, reason))
                    rows, cache, mask, seen, nxt = [], None, None, None, None
                    break

    def _take(self, row: _Row, t: int, window: int) -> str | None:
        """Add token `t` to the row; the finish reason if the row ends there (EOS is not kept)."""
        if t in self.eos_ids:
            return "stop"
        row.new.append(t)
        if row.stops and self._may_end_a_stop(t, row.stop_ends) and any(
                s in self.tokenizer.decode(row.new[-window:], skip_special_tokens=True) for s in row.stops):
            return "stop"
        if len(row.new) >= row.max_new_tokens:
            return "length"
        return None

    def _may_end_a_stop(self, t: int, ends: set[str] | None) -> bool:
        """Can appending token `t` complete a stop string whose last characters are `ends`
        (`_Row.stop_ends`)? A stop that was not in the last window's text and is in this one
        overlaps the new token's text, so it ends there: the token's text holds the stop's last
        character. Its text alone is decoded once per token id; the window is decoded only where
        this says so (the demo's 3361 calls of `_take` took 0.079 s decoding every time, 0.037 s
        this way). Always true where the text alone may differ from the text in context: a lone
        token that decodes to nothing or to U+FFFD (part of a character: byte fallback,
        byte-level BPE), and (`ends` None) stops that end in a space or other white space but a
        line break (decoders strip leading spaces, and transformers' clean-up drops spaces before
        punctuation)."""
        if ends is None:
            return True
        piece = self._pieces.get(t)
        if piece is None:
            piece = self._pieces[t] = self.tokenizer.decode([t], skip_special_tokens=True)
        return not piece or "\ufffd" in piece or any(c in piece for c in ends)

    # -- a lone row: prompt lookup decoding ----------------------------------------------------

    def _draft(self, rows: list[_Row], cache) -> list[int]:
        """A guess of a lone row's next tokens: what followed an earlier occurrence of its last
        LOOKUP_NGRAM tokens, in its prompt or its answer (prompt lookup decoding, as in
        transformers' `prompt_lookup_num_tokens`). When the batch is down to one row (the tail
        of a run), a step reads all the weights for one token; checking guesses in that step
        costs little more, and each guess the model agrees with saves a step. The result is
        still exactly the greedy answer: only agreed guesses are kept.

        Of the occurrences, the one whose preceding tokens match the row's for longest
        (`lookup_start`): in a repetition loop whose period holds the same 3 tokens twice, the
        latest occurrence may be the wrong one of the two (bench/generate.py's prompts without
        the repetition penalty: a 128-token answer's checks alternately kept all 10 guesses and
        none). A row whose guesses were all kept guesses twice as many the next time
        (`_Row.guesses`): a loop goes on, and on gemma-3-270m here (bf16) a forward of 64
        positions took 73 ms against 42 ms for 11 (bench/README.md, round 23)."""
        if len(rows) != 1 or not self.lookup:
            return []
        row = rows[0]
        # the step adds its own token after the guesses, in the row's limit and in the cache
        n = int(min(row.guesses, row.max_new_tokens - len(row.new) - 1, self._spare(cache) - 1))
        if n < 1:
            return []
        context = row.prompt_ids + row.new
        start = lookup_start(context, LOOKUP_NGRAM, LOOKUP_CONTEXT)
        if start is None:
            return []
        # What followed the match, read on into the guess itself: a loop with a period shorter
        # than the guess goes on repeating.
        guess = list(context)
        for m in range(n):
            guess.append(guess[start + m])
        return guess[len(context):]

    def _verify(self, nxt: int, draft: list[int], mask, seen, penalty, cache) -> list[int]:
        """One forward over the lone row's next token and the guesses after it: the guesses the
        model's greedy choice agrees with, in order, then its own choice after them."""
        ids = torch.tensor([[nxt, *draft]], device=self.device)
        n = ids.shape[1]
        start = int(mask.sum()) - 1  # position of `nxt`
        full = torch.cat([mask, mask.new_ones(1, n - 1)], 1)
        pos = torch.arange(start, start + n, device=self.device)[None]
        if penalty is not None:  # the guesses come from the row's prompt and answer: all in `seen`
            seen, penalty = seen.expand(n, -1).contiguous(), penalty.expand(n, 1)
        if self.own_head:  # the positions are screened like the rows of a step
            best = self._choose_from(self._hidden(ids, full, pos, cache)[0], seen, penalty).tolist()
        else:
            kw = {"input_ids": ids, "attention_mask": full, "position_ids": pos, self.cache_kw: cache, "use_cache": True}
            best = _choose(self.model(**kw, logits_to_keep=n).logits[0].float(), seen, penalty).tolist()
        chosen = []
        for j, t in enumerate(best):
            chosen.append(t)
            if j == len(draft) or t != draft[j]:
                break
        return chosen

    def _room(self, cache, n: int) -> bool:
        """Can `n` more positions go into the cache and be taken back out (crop)? Only while
        every layer is plain and each sliding-window layer still holds the whole sequence."""
        return n <= self._spare(cache)

    def _spare(self, cache) -> float:
        """How many more positions `_room` allows (inf without a sliding window; -1, not even
        none, where the cache has layers the decoder does not handle)."""
        if self.window is False:
            return -1
        return float("inf") if self.window is None else self.window - 2 - cache.get_seq_length()

    def _prefill(self, group: list[tuple[_Row, list[int]]]):
        """The forward over new prompts: their rows (in the order of the cache), cache, mask,
        ids for the penalty, and first tokens.

        Prompts that begin alike (one language's few-shot examples, one translation direction's
        header) share that prefix's forward, as with vLLM's prefix caching: each prefix runs
        once, its cache is copied to the rows that start with it, and only the rest of each
        prompt runs per row. The rows' tokens then sit as [pads, prefix | pads, rest]: the
        mask hides the pads and positions count real tokens only. The rests run in chunks of
        rests of similar length (`_chunk_bounds`), so a short rest is not padded to the longest
        one in the group (the chunks' caches are then joined into one batch)."""
        clusters = self._shared_prefixes(group)
        prefix_of = [0] * len(group)  # each row's shared prefix (an index into clusters)
        shared = [0]  # tokens of each prefix that run once
        p_ids = p_mask = p_cache = None
        if clusters is not None:
            for c, (_, rows_of) in enumerate(clusters):
                for i in rows_of:
                    prefix_of[i] = c
            shared = [n for n, _ in clusters]
            p_ids, p_mask = _left_pad([group[rows_of[0]][1][:n] for n, rows_of in clusters], self.pad_id, self.device)
            p_cache = self.new_cache()
            self._fill(p_ids, p_mask, _positions(p_mask), p_cache)
        rest = [t[shared[prefix_of[i]]:] for i, (_, t) in enumerate(group)]

        # Chunks are joined by padding their caches: only while no sliding window has dropped positions.
        fits = self.window is None or (self.window and max(len(t) for _, t in group) < self.window - 1)
        order = sorted(range(len(group)), key=lambda i: len(rest[i]))
        bounds = _chunk_bounds([len(rest[i]) for i in order], PREFILL_ROWS) if fits else [(0, len(group))]
        # Each chunk's cache is written straight into its rows of buffers for the whole group,
        # where the join wants it (right-aligned to the longest chunk), so the join only zeroes
        # the pads: a copy of every chunk's cache less (`_JointBuffers`).
        prefix_width = 0 if p_mask is None else p_mask.shape[1]
        joint = _JointBuffers(len(group), prefix_width + len(rest[order[-1]])) if len(bounds) > 1 else None
        parts = []
        for start, end in bounds:
            chunk = order[start:end]
            rows = [group[i][0] for i in chunk]
            r_ids, r_mask = _left_pad([rest[i] for i in chunk], self.pad_id, self.device)
            cache = self.new_cache()
            if joint is not None:
                joint.place(cache, start, prefix_width + r_mask.shape[1])
            if p_cache is None:
                mask, ids = r_mask, r_ids
            else:
                which = torch.tensor([prefix_of[i] for i in chunk], device=self.device)
                self._rows_of(p_cache, which, cache)
                mask, ids = torch.cat([p_mask[which], r_mask], 1), torch.cat([p_ids[which], r_ids], 1)
            seen = _penalty_ids(ids, mask)
            pos = _positions(mask)[:, mask.shape[1] - r_mask.shape[1]:]
            nxt = self._step(r_ids, mask, pos, cache, seen, _penalties(rows, self.device))
            parts.append((rows, cache, mask, seen, nxt))

        rows = [row for part in parts for row in part[0]]
        return rows, *_join([part[1:4] for part in parts]), torch.cat([part[4] for part in parts])

    @staticmethod
    def _rows_of(cache, which: torch.Tensor, into) -> None:
        """`cache`'s rows `which` (a row may repeat) into the empty growing cache `into`: each
        layer's rows appended, so they land in a buffer with room for the rest of the prompt
        and the answer. A deep copy of the prefix cache and then a row selection copied every
        layer three times (the copy, the selection, and the next append into a new buffer);
        this copies each once, through a small gather."""
        for source, layer in zip(cache.layers, into.layers):
            layer.update(source.keys.index_select(0, which), source.values.index_select(0, which))

    def _shared_prefixes(self, group: list[tuple[_Row, list[int]]]) -> list[tuple[int, list[int]]] | None:
        """(prefix length, group indices) per prefix to share; None when none is worth sharing.

        Prompts sorted by their tokens sit next to those they share the most with; a run of
        them that shares at least MIN_SHARED first tokens becomes one prefix. A prompt that
        shares with none gets its first token as its "prefix". Sharing puts padding between
        prefix and rest, which a sliding-window layer would count as positions: it is used
        only when every row (prompt and answer) fits in the window, and with plain caches."""
        prompts = [t for _, t in group]
        if self.window is False or len(prompts) < 2 or min(map(len, prompts)) < 2:
            return None
        clusters: list[list] = []  # [shared length, indices]
        for i in sorted(range(len(prompts)), key=prompts.__getitem__):
            p = prompts[i]
            if clusters:
                n = common_length(prompts[clusters[-1][1][0]], p, min(clusters[-1][0], len(p) - 1))
                if n >= MIN_SHARED:
                    clusters[-1][0] = n
                    clusters[-1][1].append(i)
                    continue
            clusters.append([len(p) - 1, [i]])
        clusters = [(n if len(rows_of) > 1 else 1, rows_of) for n, rows_of in clusters]
        if all(len(rows_of) == 1 for _, rows_of in clusters):
            return None
        if self.window is not None:
            rest = max(len(prompts[i]) - n for n, rows_of in clusters for i in rows_of)
            width = max(n for n, _ in clusters) + rest  # [pads, prefix | pads, rest]
            if width + max(r.max_new_tokens for r, _ in group) >= self.window - 1:
                return None
        return clusters

    def _fill(self, ids, mask, pos, cache) -> None:
        """A forward that only fills the cache (a shared prefix)."""
        if self.own_head:
            self._hidden(ids, mask, pos, cache)
        else:
            kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, self.cache_kw: cache, "use_cache": True}
            self.model(**kw, logits_to_keep=1)

    def _can_join(self, cache) -> bool:
        """New rows can join a running batch only while every cache layer still holds the
        whole sequence (a sliding-window layer that has dropped old positions cannot be padded)."""
        return cache is None or self._room(cache, 0)

    def _finish(self, row: _Row, reason: str) -> Generation:
        return Generation(self.tokenizer.decode(row.new, skip_special_tokens=True), reason)


def _sliding_window(cache) -> int | None | bool:
    """The smallest sliding window of the cache's layers; None without one; False when a layer
    is of a kind the decoder does not pad (shared prefixes are then off)."""
    growing, growing_sliding = _layer_classes()
    windows = []
    for layer in cache.layers:
        if type(layer) is growing_sliding:
            windows.append(layer.sliding_window)
        elif type(layer) is not growing:
            return False
    return min(windows, default=None)


# -- the KV cache: room to grow, so a step writes only its new tokens ----------------------------

def _growing(cache):
    """`cache` with each plain `DynamicLayer` / `DynamicSlidingWindowLayer` replaced by its
    growing twin (`_layer_classes`); other kinds of layers stay."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    growing, growing_sliding = _layer_classes()
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = growing()
        elif type(layer) is DynamicSlidingWindowLayer:
            cache.layers[i] = growing_sliding(sliding_window=layer.sliding_window)
    return cache


def _grow_into(layer, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append a step's keys and values to the layer's, in place, and return the whole of each.

    transformers' `DynamicLayer.update` concatenates: every decoding step copies the whole KV
    cache of every layer (for 32 rows of ~200 tokens, 236 MB per step for gemma-3-270m; a
    quarter of an 8-row step's time in a profile, bench/README.md round 9). Here the layer's
    keys and values are views of buffers with room to spare, and a step writes only its new
    positions. Whatever else replaces `layer.keys` (rows leaving, a join, `crop`, a copied
    prefix) is taken into a new buffer on the next append, once; a view that still starts at
    the buffer's first row and position (rows cut off the end, positions cropped) is kept."""
    old_k, old_v = layer.keys, layer.values
    n = old_k.shape[-2] if old_k is not None and old_k.numel() else 0
    total = n + keys.shape[-2]
    buf = getattr(layer, "_buffers", None)
    slot = getattr(layer, "_slot", None)
    if buf is None and not n and slot is not None:  # its rows of a prefill group's buffers
        buf = layer._buffers = slot[0].views(*slot[1:], keys, values)
    if not (buf is not None and _holds(buf[0], keys, total) and _holds(buf[1], values, total)
            and (n == 0 or _starts(old_k, buf[0]) and _starts(old_v, buf[1]))):
        new = (_buffer(keys, len(keys), total), _buffer(values, len(values), total))
        if n:
            new[0][:, :, :n] = old_k
            new[1][:, :, :n] = old_v
        buf = layer._buffers = new
    rows = keys.shape[0]
    buf[0][:rows, :, n:total] = keys
    buf[1][:rows, :, n:total] = values
    return buf[0][:rows, :, :total], buf[1][:rows, :, :total]


def _buffer(like: torch.Tensor, rows: int, positions: int) -> torch.Tensor:
    """An empty buffer for `rows` rows of `like`'s heads and size, with room for `positions`
    positions and half as many again (at least 64 more): each position is copied O(1) times."""
    return like.new_empty(rows, like.shape[1], positions + max(64, positions // 2), like.shape[3])


def _holds(buf: torch.Tensor, new: torch.Tensor, total: int) -> bool:
    """Can `buf` hold `total` positions of `new`'s rows, heads, size and kind?"""
    return (buf.dtype == new.dtype and buf.device == new.device and buf.shape[0] >= new.shape[0]
            and buf.shape[1] == new.shape[1] and buf.shape[2] >= total and buf.shape[3] == new.shape[3])


def _starts(view: torch.Tensor, buf: torch.Tensor) -> bool:
    """Is `view` buf[:rows, :, :n] for some rows and n (the same memory, strides and heads)?"""
    return (view.data_ptr() == buf.data_ptr() and view.stride() == buf.stride() and view.shape[0] <= buf.shape[0]
            and view.shape[1] == buf.shape[1] and view.shape[2] <= buf.shape[2] and view.shape[3] == buf.shape[3])


@functools.cache
def _layer_classes():
    """The two growing layer classes (defined here so that transformers is imported only when
    a decoder is made)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    class GrowingLayer(DynamicLayer):
        """`DynamicLayer` whose update writes into spare room instead of concatenating."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = _grow_into(self, key_states, value_states)
            return self.keys, self.values

    class GrowingSlidingLayer(DynamicSlidingWindowLayer):
        """`DynamicSlidingWindowLayer`, growing in place while the whole sequence fits in the
        window (where the two keep and return the same states); past it, transformers' update."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self.record_past or self.cumulative_length + key_states.shape[-2] > self.sliding_window - 1:
                return super().update(key_states, value_states, *args, **kwargs)
            self.cumulative_length += key_states.shape[-2]
            self.keys, self.values = _grow_into(self, key_states, value_states)
            return self.keys, self.values

    return GrowingLayer, GrowingSlidingLayer


class _JointBuffers:
    """Buffers for a whole prefill group's KV cache, `rows` rows and `length` positions (and
    room to grow, as `_buffer` gives), made per layer at its first write. `place(cache, row,
    width)` gives the layers of a chunk's empty cache, `width` positions wide, its rows of them
    from `row` on, right-aligned to `length`: the chunk's prefill writes its keys and values
    where `_stacked` joins them, and the join only zeroes the pads in front."""

    def __init__(self, rows: int, length: int):
        self.rows, self.length = rows, length
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def place(self, cache, row: int, width: int) -> None:
        for i, layer in enumerate(cache.layers):
            layer._slot = (self, i, row, self.length - width)  # taken by its first write (`_grow_into`)

    def views(self, i: int, row: int, start: int, keys: torch.Tensor, values: torch.Tensor):
        """Layer i's rows from `row` (as many as `keys` has), positions from `start` on."""
        if i not in self.buffers:
            self.buffers[i] = (_buffer(keys, self.rows, self.length), _buffer(values, self.rows, self.length))
        return tuple(b[row:row + len(keys), :, start:] for b in self.buffers[i])


def _in_place(layers: list, length: int):
    """The buffers the layers' keys and values already sit in as `_stacked` would put them
    (`_JointBuffers`: rows one layer after another, right-aligned to `length`), else None."""
    slots = [getattr(layer, "_slot", None) for layer in layers]
    if slots[0] is None or slots[0][1] not in slots[0][0].buffers:
        return None
    joint, i = slots[0][:2]
    buffers, row = joint.buffers[i], 0
    for layer, slot in zip(layers, slots):
        start = length - layer.keys.shape[2]
        if slot != (joint, i, row, start):
            return None
        for t, buf in zip((layer.keys, layer.values), buffers):
            if not (t.data_ptr() == buf[row, :, start].data_ptr() and t.stride() == buf.stride()
                    and t.shape[1::2] == buf.shape[1::2]):
                return None
        row += len(layer.keys)
    return buffers if row == len(buffers[0]) else None


def _stacked(layers: list, length: int):
    """The layers' keys and values, their rows one group after another, each left-padded with
    zeros to `length` positions, written once into new buffers with room to grow (as
    `_grow_into` makes them): (keys, values) as views of the buffers, and the buffers. A
    `torch.cat` of padded copies made two copies of the whole cache, and the next step a third,
    into a buffer. Where they were written in place already (`_JointBuffers`), only the pads
    are zeroed."""
    buffers = _in_place(layers, length)
    if buffers is not None:
        row = 0
        for layer in layers:
            layer._slot = None
            for buf in buffers:
                buf[row:row + len(layer.keys), :, :length - layer.keys.shape[2]] = 0
            row += len(layer.keys)
        return tuple(buf[:, :, :length] for buf in buffers), buffers
    views, buffers = [], []
    for name in ("keys", "values"):
        states = [getattr(layer, name) for layer in layers]
        buf = _buffer(states[0], sum(map(len, states)), length)
        row = 0
        for t in states:
            start = length - t.shape[2]
            buf[row:row + len(t), :, :start] = 0
            buf[row:row + len(t), :, start:length] = t
            row += len(t)
        views.append(buf[:, :, :length])
        buffers.append(buf)
    return tuple(views), tuple(buffers)


def _keep_rows(cache, keep: list[int], plain: bool, device) -> list[int]:
    """Drop the batch's rows that are not in `keep` (ascending) from the KV cache and return
    the new row order. `batch_select_indices` copies every kept row of every layer each time
    a row stops (py-spy: 2.5 s of the demo's two iterations; 85 ms per row leaving a 32-row,
    236 MB cache against 5 ms this way, bench/fixed_costs.py). With `plain` layers
    (`DynamicLayer`, `DynamicSlidingWindowLayer`), the last kept rows move into the places of
    the dropped ones instead, and each layer is cut to the new batch size (a view): only the
    moved rows are copied. A row's place in the batch does not change its results."""
    m = len(keep)
    kept = set(keep)
    free = [j for j in range(m) if j not in kept]  # places of dropped rows, to be filled
    moved = [j for j in keep if j >= m]  # as many kept rows beyond the new batch size
    order = list(range(m))
    for place, j in zip(free, moved):
        order[place] = j
    if not plain:
        cache.batch_select_indices(torch.tensor(order, device=device))
        return order
    pairs = list(zip(free, moved))  # to < m <= fro: the rows do not overlap
    # One or two rows move (most often one row leaves): a row copy each, 0.5 ms for the demo's
    # 18 layers against 1.5 ms through index tensors (index + index_put per layer and tensor).
    by_index = len(pairs) > 2
    if by_index:
        to, fro = torch.tensor(free, device=device), torch.tensor(moved, device=device)
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        if by_index:
            layer.keys[to] = layer.keys[fro]
            layer.values[to] = layer.values[fro]
        else:
            for a, b in pairs:
                layer.keys[a].copy_(layer.keys[b])
                layer.values[a].copy_(layer.values[b])
        layer.keys, layer.values = layer.keys[:m], layer.values[:m]
    return order


def lookup_start(context: list[int], ngram: int, longest: int) -> int | None:
    """Where a guess of what follows `context` starts: the position just after an earlier
    occurrence of its last `ngram` tokens, choosing the occurrence preceded by the longest run
    of tokens equal to those before the context's end (counted up to `longest`), the latest
    of equals. None where the last `ngram` tokens do not occur earlier."""
    n = len(context)
    if n <= ngram:
        return None
    tail = context[-ngram:]
    best, best_run = None, 0
    for i in range(n - ngram - 1, -1, -1):  # occurrences context[i:i + ngram], latest first
        if context[i:i + ngram] != tail:
            continue
        run = ngram  # tokens matched backwards from the occurrence's end and the context's end
        while run < longest and run <= i + ngram - 1 and context[i + ngram - 1 - run] == context[n - 1 - run]:
            run += 1
        if run > best_run:
            best, best_run = i + ngram, run
            if run >= longest:
                break
    return best


def common_length(a: list[int], b: list[int], limit: int) -> int:
    """How many first tokens `a` and `b` share, counting at most `limit`."""
    return next((k for k in range(limit) if a[k] != b[k]), limit)


def _chunk_bounds(lengths: list[int], max_rows: int) -> list[tuple[int, int]]:
    """Split `lengths` (sorted, ascending) into runs [start, end) of at most `max_rows`, each run
    padded to its longest, so that the padded tokens plus PREFILL_FORWARD_TOKENS per run are
    fewest (an exact search over the split points: the rests of one group are a few dozen)."""
    n = len(lengths)
    cost, cut = [0] + [float("inf")] * n, [0] * (n + 1)  # best cost of the first j lengths; its last run's start
    for end in range(1, n + 1):
        for start in range(max(0, end - max_rows), end):  # on a tie the longest last run wins
            c = cost[start] + (end - start) * lengths[end - 1] + PREFILL_FORWARD_TOKENS
            if c < cost[end]:
                cost[end], cut[end] = c, start
    bounds, end = [], n
    while end:
        bounds.append((cut[end], end))
        end = cut[end]
    return bounds[::-1]


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids and attention mask, left-padded to the longest."""
    width = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (padding anywhere in the row)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _chunk_ids(chunks: torch.Tensor, vocab: int) -> torch.Tensor:
    """The vocabulary ids of chunks [rows, k] (`CHUNK` ids each), [rows, k * CHUNK]; the last
    chunk's missing ids repeat the vocabulary's last id."""
    ids = chunks[..., None] * CHUNK + torch.arange(CHUNK, device=chunks.device)
    return ids.flatten(-2).clamp_(max=vocab - 1)


def _penalty_ids(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ids the repetition penalty looks at: real tokens only, so a pad repeats the row's
    first real token instead."""
    return torch.where(mask.bool(), ids, ids.gather(1, mask.argmax(1, keepdim=True)))


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor, per row, in place: a token already in
    the row has its logit divided by the row's penalty (multiplied, if negative)."""
    logits.scatter_(1, seen, penalized(logits.gather(1, seen), penalty))


def _choose(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor | None) -> torch.Tensor:
    """Greedy next tokens from fp32 logits [rows, vocab], after the penalty."""
    if penalty is not None:
        _penalize(logits, seen, penalty)
    return logits.argmax(-1)


def _penalties(rows: list[_Row], device) -> torch.Tensor | None:
    """The rows' repetition penalties as a column, or None when no row has one."""
    if all(r.penalty == 1.0 for r in rows):
        return None
    return torch.tensor([[r.penalty] for r in rows], device=device)


def _join(parts: list[tuple]):
    """One batch from several: `parts` are (cache, mask, seen) of row groups, in order. Each
    group's cache is left-padded with zeros (masked) to the longest, and the rows are stacked,
    once, into buffers with room (`_stacked`): the decoder joins only growing layers that still
    hold the whole sequence (`_can_join`). The first cache object is reused for the result:
    returns (cache, mask, seen)."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    if len(parts) == 1:
        return parts[0]
    length = max(mask.shape[1] for _, mask, _ in parts)
    cache = parts[0][0]
    for i, layer in enumerate(cache.layers):
        (layer.keys, layer.values), layer._buffers = _stacked([c.layers[i] for c, _, _ in parts], length)
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = length
    # padded mask positions are 0; padded penalty ids repeat each row's first id (see _penalty_ids)
    pad_mask = lambda m: torch.cat([m.new_zeros(len(m), length - m.shape[1]), m], 1)  # noqa: E731
    pad_seen = lambda s: torch.cat([s[:, :1].expand(-1, length - s.shape[1]), s], 1)  # noqa: E731
    return cache, torch.cat([pad_mask(mask) for _, mask, _ in parts]), torch.cat([pad_seen(seen) for *_, seen in parts])
