"""Greedy decoding with continuous batching for a transformers causal LM.

transformers' `generate` keeps every row of a batch until its longest row ends: on the demo,
80 % of the row-steps went to rows that had already stopped (bench/generate.py), and each of
them paid for the 262k-token output layer. Here a row leaves the batch (and the KV cache) the
step it stops, and waiting prompts take the free places, the way vLLM and llama.cpp's server
schedule their slots. The results are the same as `generate`'s: greedy, the same repetition
penalty, EOS and per-row stop strings, left padding with position ids from the mask.

Two more things make a decoding step cheaper:
- the output layer runs on the last position of the live rows only, on a CPU as a blockwise
  `W @ h.T` (lidr/head.py: 1.3-4x faster there than `h @ W.T` for 4-256 rows of a 262k vocabulary);
- prompts are tokenized once, and sorted by length so rows that start together have little
  padding.

New rows join a running batch by left-padding the shorter of the two KV caches to the other's
length. That is done only for plain `DynamicLayer` / `DynamicSlidingWindowLayer` caches still
inside the sliding window; with any other cache the batch drains before the next one starts.
"""

from __future__ import annotations

import inspect
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from lidr.head import HalfHead, logits_t


@dataclass
class Generation:
    text: str  # the generated continuation (a stop string it ended on is kept)
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (token limit)


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


@dataclass
class _Row:
    key: object
    stops: list[str]
    max_new_tokens: int
    penalty: float
    new: list[int] = field(default_factory=list)  # generated token ids


class ContinuousDecoder:
    def __init__(self, model, tokenizer, eos_ids: set[int]):
        from transformers import DynamicCache

        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        self.device = next(model.parameters()).device
        self.new_cache = lambda: DynamicCache(config=model.config)
        self.body = model.base_model if model.base_model is not model else None
        head = model.get_output_embeddings()
        self.head_weight = head.weight if head is not None else None
        self.head_bias = getattr(head, "bias", None)
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        # transformers renames `past_key_values` to `cache` (5.2x); pass whichever this version takes.
        forward = (self.body or model).forward
        self.cache_kw = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        self.own_head = self.body is not None and self.head_weight is not None and self._own_head_matches()
        self.half_head = self._half_head() if self.own_head else None

    # -- one forward pass: the next token of every row -------------------------------------------

    def _step(self, ids, mask, pos, cache, seen, penalty) -> torch.Tensor:
        """Run the new tokens through the model (filling `cache`) and choose each row's next
        token greedily, after the repetition penalty (`penalty`: a column, or None)."""
        kw = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, self.cache_kw: cache, "use_cache": True}
        if not self.own_head:
            return _choose(self.model(**kw, logits_to_keep=1).logits[:, -1].float(), seen, penalty)
        h = self.body(**kw).last_hidden_state[:, -1]
        if self.half_head is not None and len(h) == 1 and float(h.abs().max()) < 6e4:
            return self._screened_choice(h, seen, penalty)
        return _choose(self._head(h), seen, penalty)

    def _head(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [rows, vocab] of hidden states `h`; with `tokens`, [rows, len(tokens)]
        for those vocabulary ids only (used without an output bias only)."""
        if tokens is not None:
            logits = F.linear(h, self.head_weight[tokens])
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
        cand = (approx[0] >= approx[0].max() - 2 * eps).nonzero()[:, 0]
        exact = self._head(h, cand)
        if penalty is not None:
            s = exact[0]
            hit = torch.isin(cand, seen[0])
            s[hit] = torch.where(s[hit] < 0, s[hit] * p, s[hit] / p)
        return cand[exact.argmax(-1)]

    def _own_head_matches(self) -> bool:
        """Our head (body + output layer) must give the model's own logits; a model with
        something else after its body (a logit scale, ...) falls back to its own forward."""
        ids = torch.tensor([[self.pad_id if self.tokenizer.bos_token_id is None else self.tokenizer.bos_token_id,
                             *self.tokenizer("Hello world", add_special_tokens=False).input_ids]], device=self.device)
        mask = torch.ones_like(ids)
        pos = torch.arange(ids.shape[1], device=self.device)[None]
        with torch.inference_mode():
            want = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1].float()
            h = self.body(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state[:, -1]
            got = self._head(h)
        self._probe = h
        tol = 1e-2 if self.head_weight.dtype != torch.float32 else 1e-3
        return bool(torch.allclose(got, want, rtol=tol, atol=tol * max(1.0, float(want.abs().max()))))

    def _half_head(self) -> HalfHead | None:
        """An fp16 screen for one-row steps on a CPU where it is faster and within its bound."""
        w = self.head_weight
        if self.device.type != "cpu" or w.dtype != torch.float32 or self.head_bias is not None:
            return None
        half = HalfHead(w)
        if not half.finite or not HalfHead.faster(w, half.half):
            return None
        with torch.inference_mode():
            approx, eps = half.approx(self._probe)
            exact = (w @ self._probe.float().T).T
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
        reqs = as_requests(items, max_new_tokens, repetition_penalty)
        if not reqs:
            return
        ids = self.tokenizer([r.prompt for r in reqs], add_special_tokens=False).input_ids
        order = sorted(range(len(reqs)), key=lambda i: len(ids[i]))
        pending = deque((_Row(reqs[i].key, list(reqs[i].stops), reqs[i].max_new_tokens, reqs[i].repetition_penalty),
                         ids[i]) for i in order)
        window = 2 + max((len(self.tokenizer(s, add_special_tokens=False).input_ids)
                          for r in reqs for s in r.stops), default=0)  # a stop string can straddle tokens
        refill_at = max(1, max_rows // 8)  # admit new rows in groups: each admission copies the cache

        rows: list[_Row] = []
        cache = mask = seen = nxt = penalty = None
        while rows or pending:
            free = max_rows - len(rows)
            if pending and free >= min(refill_at, len(pending)) and self._can_join(cache):
                group = [pending.popleft() for _ in range(min(free, len(pending)))]
                g_cache, g_mask, g_seen, g_nxt = self._prefill([t for _, t in group], [r for r, _ in group])
                if rows:
                    cache, mask, seen = _join(cache, mask, seen, g_cache, g_mask, g_seen, self.pad_id)
                    nxt = torch.cat([nxt, g_nxt])
                else:
                    cache, mask, seen, nxt = g_cache, g_mask, g_seen, g_nxt
                rows += [r for r, _ in group]
                penalty = _penalties(rows, self.device)

            keep = []
            for j, (row, t) in enumerate(zip(rows, nxt.tolist())):
                if t in self.eos_ids:
                    on_result(row.key, self._finish(row, "stop"))
                    continue
                row.new.append(t)
                if row.stops and any(s in self.tokenizer.decode(row.new[-window:], skip_special_tokens=True)
                                     for s in row.stops):
                    on_result(row.key, self._finish(row, "stop"))
                elif len(row.new) >= row.max_new_tokens:
                    on_result(row.key, self._finish(row, "length"))
                else:
                    keep.append(j)
            if len(keep) < len(rows):
                rows = [rows[j] for j in keep]
                if not rows:
                    cache = mask = seen = nxt = None
                    continue
                idx = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(idx)
                mask, seen, nxt = mask[idx], seen[idx], nxt[idx]
                penalty = _penalties(rows, self.device)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            seen = torch.cat([seen, nxt[:, None]], 1)  # kept for every row: a later row may need the penalty
            nxt = self._step(nxt[:, None], mask, mask.sum(-1, keepdim=True) - 1, cache, seen, penalty)

    def _prefill(self, prompts: list[list[int]], rows: list[_Row]):
        """Left-padded forward over new prompts: their cache, mask, ids for the penalty, first tokens."""
        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        # The penalty looks at real tokens only: padding repeats the row's first token instead.
        seen = torch.where(mask.bool(), ids, ids.gather(1, (width - mask.sum(1, keepdim=True)).clamp(max=width - 1)))
        cache = self.new_cache()
        nxt = self._step(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache, seen, _penalties(rows, self.device))
        return cache, mask, seen, nxt

    def _can_join(self, cache) -> bool:
        """New rows can join a running batch only while every cache layer still holds the
        whole sequence (a sliding-window layer that has dropped old positions cannot be padded)."""
        if cache is None:
            return True
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        for layer in cache.layers:
            if type(layer) is DynamicLayer:
                continue
            if type(layer) is not DynamicSlidingWindowLayer or layer.cumulative_length >= layer.sliding_window - 1:
                return False
        return True

    def _finish(self, row: _Row, reason: str) -> Generation:
        return Generation(self.tokenizer.decode(row.new, skip_special_tokens=True), reason)


def _penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> None:
    """transformers' RepetitionPenaltyLogitsProcessor, per row, in place: a token already in
    the row has its logit divided by the row's penalty (multiplied, if negative)."""
    s = logits.gather(1, seen)
    logits.scatter_(1, seen, torch.where(s < 0, s * penalty, s / penalty))


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


def _join(cache, mask, seen, g_cache, g_mask, g_seen, pad_id):
    """Append a group's rows to the running batch: left-pad the shorter cache (masked), concatenate."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    length = max(mask.shape[1], g_mask.shape[1])

    def pad(t, dim):  # zeros on the left of dimension `dim` up to `length`
        missing = length - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim)

    for a, b in zip(cache.layers, g_cache.layers):
        a.keys = torch.cat([pad(a.keys, 2), pad(b.keys, 2)])
        a.values = torch.cat([pad(a.values, 2), pad(b.values, 2)])
        if isinstance(a, DynamicSlidingWindowLayer):
            a.cumulative_length = length
    # padded penalty ids repeat each row's first id (see _prefill)
    pad_seen = lambda s: torch.cat([s[:, :1].expand(-1, length - s.shape[1]), s], 1)  # noqa: E731
    return (cache, torch.cat([pad(mask, 1), pad(g_mask, 1)]), torch.cat([pad_seen(seen), pad_seen(g_seen)]))
