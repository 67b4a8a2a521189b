"""Stage 4: train M_{t+1} from M_t on the preference pairs with DPO + NLL (method.md §2 step 4).

    L = -log σ(β·[(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])
        + α · (-log π(y_w|x) / |y_w|)

log-probs are summed over response tokens only; the NLL is the per-token mean on the chosen
response; the batch loss is the mean over pairs. This is TRL's DPOTrainer with
loss_type=["sigmoid", "sft"], loss_weights=[1, α] (see `dpo_nll_loss` for the one detail
where TRL differs). We write the loop out because on a CPU the output layer dominates a
262k-vocabulary model and TRL 1.16 scores every position there (it scores only the
response positions on Triton devices): here the head runs on response positions only, the
reference log-probs come from one no-grad pass before training, and no second copy of the
model is kept. The chosen and rejected responses of a pair share their prompt, so the body
runs on each prompt once and continues from its KV cache for both responses
(`ResponseLogProbs`; whole prompt+response sequences where a cache cannot be used, e.g. with
gradient checkpointing). Re-scoring all pairs after training (`final` in the summary) is
optional (`training.final_metrics`). Accelerate does device placement and gradient
accumulation, so the same code runs under `accelerate launch` (DDP, DeepSpeed ZeRO, FSDP;
`lidr.pipeline.train_worker`):

- the batches are planned as *global* batches (batch_size x processes pairs, the same for any
  process count at the same global size) and process r trains on the r-th slice of each;
  every pair's loss is weighted 1 / (pairs in its optimizer step), so the gradient is the mean
  over the step's pairs however they are split over processes and micro-batches;
- the reference (and final) log-probs are computed once, each process on its own share of the
  pairs, and summed across processes; every process makes the same number of forward calls
  (sharded models gather their weights collectively in each one);
- metrics are summed across processes each step; only the main process writes files and saves;
  a sharded model (FSDP, ZeRO-3) is gathered with `accelerator.get_state_dict` first.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import itertools
import json
import math
import random
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lidr.config import TrainingConfig
from lidr.head import TokenLogProbs, frozen_head_logps, token_logps
from lidr.models import gpu_attention

# Largest logits block (positions x vocab) built at once. Beyond it the head runs in chunks,
# each recomputed in the backward pass, so memory stays bounded on long GPU batches.
LOGITS_BLOCK = 2**28
# Pairs per forward in the no-grad scoring passes (reference, final metrics). Reference pass over
# 25 demo pairs on 2 CPU cores, packed (bench/README.md, round 15; noisy): 4 at a time 9.1-10.0 s,
# 8 at a time 6.5-9.1 s, 16 at a time 6.5-7.0 s. Kept at 8: a packed row's attention grows with the
# square of its length (before packing, round 3: 8 at a time 12.3 s, 16 at a time 13.0 s).
SCORE_PAIRS = 8


@dataclass
class Pair:
    """One tokenized preference pair: prompt, chosen and rejected token ids."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def __len__(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def truncate(pair: Pair, max_length: int, bos_id: int | None) -> tuple[Pair, bool, bool]:
    """Fit prompt + longest response into max_length: the prompt loses tokens from the left
    first (the start of a long few-shot context matters least; a leading BOS is kept), but
    keeps at least half the budget so the answer still has its question; then the responses
    lose tokens from the right. Returns (pair, prompt_cut, response_cut)."""
    p, longest = pair.prompt, max(len(pair.chosen), len(pair.rejected))
    if len(p) + longest <= max_length:
        return pair, False, False
    keep = max(max_length - longest, min(len(p), max_length // 2))
    prompt_cut = keep < len(p)
    if prompt_cut:
        head = p[:1] if bos_id is not None and p[0] == bos_id and keep > 1 else []
        p = head + p[len(p) - (keep - len(head)):]
    room = max_length - len(p)  # >= max_length // 2 >= 8: every response keeps tokens
    return Pair(p, pair.chosen[:room], pair.rejected[:room]), prompt_cut, longest > room


def tokenize_pairs(tokenizer, examples: list[dict], max_length: int) -> tuple[list[Pair], dict]:
    """Tokenize prompt and responses separately (the texts are fully rendered already, so no
    special tokens are added) and concatenate the ids, so the prompt/response boundary is exact."""
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = enc([e["prompt"] for e in examples])
    chosen = enc([e["chosen"] for e in examples])
    rejected = enc([e["rejected"] for e in examples])
    pairs, stats = [], {"truncated_pairs": 0, "truncated_prompts": 0, "truncated_responses": 0}
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        if not p or not c or not r:
            # the first response token is predicted from the last prompt position
            raise ValueError(f"pair {i}: prompt, chosen and rejected must each have at least one token")
        pair, cut_p, cut_r = truncate(Pair(p, c, r), max_length, tokenizer.bos_token_id)
        stats["truncated_pairs"] += cut_p or cut_r
        stats["truncated_prompts"] += cut_p
        stats["truncated_responses"] += cut_r
        pairs.append(pair)
    return pairs, stats


def collate(pairs: list[Pair], index: list[int], pad_id: int,
            weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """A batch of B pairs in the shared-prompt layout that `ResponseLogProbs` runs: the B prompts
    left-padded (their last tokens aligned, where the responses continue), and the 2B responses
    right-padded, the B chosen then the B rejected (as TRL's [chosen..., rejected...] layout).
    `weights`: each pair's weight in the loss (0 = a placeholder that only keeps processes in step)."""
    prompts = [pairs[i].prompt for i in index]
    responses = [pairs[i].chosen for i in index] + [pairs[i].rejected for i in index]
    pw, rw = max(map(len, prompts)), max(map(len, responses))
    return {
        "prompt_ids": torch.tensor([[pad_id] * (pw - len(p)) + p for p in prompts]),
        "prompt_attention_mask": torch.tensor([[0] * (pw - len(p)) + [1] * len(p) for p in prompts]),
        "response_ids": torch.tensor([y + [pad_id] * (rw - len(y)) for y in responses]),
        "response_attention_mask": torch.tensor([[1] * len(y) + [0] * (rw - len(y)) for y in responses]),
        "index": torch.tensor(index),
        "weight": torch.tensor(weights if weights is not None else [1.0] * len(index), dtype=torch.float32),
    }


def _token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap: float | None):
    """log p(target) for each row of hidden, in fp32 (a bf16 logsumexp over 262k logits is too coarse).
    targets: [rows] or [rows, k] (k targets scored from each row's one set of logits)."""
    if _blockwise_head(hidden, head):
        # the CPU output layer, blockwise, with its backward written out (lidr/head.py)
        k_targets = targets.view(len(targets), -1)
        if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
            out = TokenLogProbs.apply(hidden, head.weight, k_targets, softcap)
        else:  # scoring: one block at a time, nothing kept
            out = token_logps(hidden, head.weight, k_targets, softcap)
        return out.view(targets.shape)
    if _frozen_gpu_head(hidden, head):
        # LoRA on a GPU: the logits in row chunks, none kept for the backward (lidr/head.py)
        return frozen_head_logps(hidden, head.weight, targets.view(len(targets), -1), softcap).view(targets.shape)
    logits = head(hidden).float()
    if softcap is not None:  # Gemma 2-style final logit soft-capping, as in the model's own forward
        logits = torch.tanh(logits / softcap) * softcap
    lse = logits.logsumexp(-1)
    if targets.dim() == 1:
        return logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    return logits.gather(-1, targets) - lse[:, None]


def _plain_head(head: nn.Module) -> bool:
    """An output layer lidr/head.py computes from its weight: a plain bias-free Linear (not a
    PEFT or quantized wrapper), its weight whole (ZeRO-3 empties it)."""
    return type(head) is nn.Linear and head.bias is None and head.weight.dim() == 2


def _blockwise_head(hidden: torch.Tensor, head: nn.Module) -> bool:
    """The CPU output layer that lidr/head.py computes block by block."""
    return hidden.device.type == "cpu" and _plain_head(head)


def _frozen_gpu_head(hidden: torch.Tensor, head: nn.Module) -> bool:
    """A frozen output layer off the CPU, in one process, in the body's dtype. (Under FSDP or
    ZeRO-3 the weight is whole only inside the layer's own forward, which this path does not
    call; several processes keep autograd's path, untried with this one.)"""
    return (hidden.device.type != "cpu" and _plain_head(head) and not head.weight.requires_grad
            and head.weight.dtype == hidden.dtype
            and not (torch.distributed.is_available() and torch.distributed.is_initialized()))


def _head_logps(hidden: torch.Tensor, targets: torch.Tensor, causal: nn.Module) -> torch.Tensor:
    """`_token_logps` with the causal LM's output layer, in chunks of rows where the logits block
    would be large: without a backward pass small chunks cost nothing (and the CPU's blockwise
    scoring keeps one block whatever the rows); with one, each chunk is recomputed there
    (checkpoint), so its logits are not kept. (A GPU's frozen LoRA head chunks its rows itself
    and keeps no logits: `_frozen_gpu_head`.)"""
    head = causal.get_output_embeddings()
    softcap = getattr(causal.config.get_text_config(), "final_logit_softcapping", None)
    grad = torch.is_grad_enabled()
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]  # (ZeRO-3 empties .weight)
    step = max(1, (LOGITS_BLOCK if grad or _blockwise_head(hidden, head) else LOGITS_BLOCK // 8) // vocab)
    if len(hidden) <= step or _frozen_gpu_head(hidden, head):  # (the latter chunks its rows itself)
        return _token_logps(hidden, targets, head, softcap)
    chunk = lambda a, b: _token_logps(a, b, head, softcap)  # noqa: E731
    run = (lambda a, b: checkpoint(chunk, a, b, use_reentrant=False)) if grad else chunk
    return torch.cat([run(a, b) for a, b in zip(hidden.split(step), targets.split(step))])


def _cache_argument(body: nn.Module) -> str | None:
    """The body's name for the KV-cache argument: `cache` (transformers >= 5.x; `past_key_values`
    is its deprecated alias), `past_key_values` (older models), or None (no cache)."""
    try:
        params = inspect.signature(body.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((n for n in ("cache", "past_key_values") if n in params), None)


def _checkpointing(body: nn.Module) -> bool:
    """Activation checkpointing anywhere in the body (transformers' own, or torch's checkpoint
    wrapper as FSDP's activation checkpointing applies it): a recomputed layer would write the
    KV cache a second time, so transformers drops the cache there."""
    return any(getattr(m, "gradient_checkpointing", False) is True or type(m).__name__ == "CheckpointWrapper"
               for m in body.modules())


def _plain_dynamic_cache(config):
    """A `DynamicCache` for the model, if its layers are all plain `DynamicLayer` /
    `DynamicSlidingWindowLayer` (keys and values [batch, heads, tokens, dim] that the batch
    can be replicated in) for full or sliding-window causal attention; else None. (Chunked
    attention, KV sharing, linear-attention hybrids: the full-sequence path.)"""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        text = config.get_text_config(decoder=True)
        types = getattr(text, "layer_types", None) or []
        if getattr(text, "attention_chunk_size", None) is not None or set(types) - {"full_attention",
                                                                                "sliding_attention"}:
            return None
        cache = DynamicCache(config=config)
    except Exception:  # an older transformers, or a config DynamicCache cannot read
        return None
    plain = (DynamicLayer, DynamicSlidingWindowLayer)
    if cache.layers:
        ok = all(type(layer) in plain for layer in cache.layers)
    else:  # layers made on first use
        ok = getattr(cache, "layer_class_to_replicate", None) is DynamicLayer
    return cache if ok else None


def _can_pack(config, prompt_mask: torch.Tensor, response_mask: torch.Tensor) -> bool:
    """Whether `ResponseLogProbs` may pack the responses into one row with its own 4D mask: the
    attention is sdpa or eager (a 4D mask is used as given; flash-attention kernels take none),
    and every prompt + response is shorter than any sliding window, so that one mask serves the
    full and the sliding-window layers alike."""
    if not _packs(config):
        return False
    window = _sliding_window(config)
    if window is None:
        return True
    longest = (prompt_mask.sum(1).repeat(2) + response_mask.sum(1)).max()
    return bool(longest < window)


def _packs(config) -> bool:
    """Whether the attention takes a 4D mask as given (sdpa, eager; flash-attention kernels take
    none): `_can_pack`'s condition for every batch of the model (its window one is per batch)."""
    return getattr(config, "_attn_implementation", None) in ("sdpa", "eager")


def _sliding_window(config) -> int | None:
    """The model's sliding-window length where some layer uses one, else None."""
    text = config.get_text_config(decoder=True)
    window, types = getattr(text, "sliding_window", None), getattr(text, "layer_types", None)
    return None if types is not None and "sliding_attention" not in types else window


def _filled(cache) -> bool:
    """The body filled every layer of the cache it was given (a model that does not: the full path)."""
    return bool(cache.layers) and all(layer.keys is not None for layer in cache.layers)


class ResponseLogProbs(nn.Module):
    """Wraps a causal LM (or a PEFT model of one); forward returns, for each sequence, the summed
    log-prob of its response tokens and their count. The output layer runs only on the positions
    that predict a response token. A module (not a function) so that accelerate/DDP wrap one
    forward that does all of it (the body may run twice inside it).

    Two input layouts:

    - pairs (`collate`: prompt_ids, prompt_attention_mask, response_ids, response_attention_mask):
      each prompt is processed once, not once per response, and the first response token is
      predicted from the prompt's last position for chosen and rejected alike.
      - Packed (`_packed`): the whole batch runs in one row without padding. The B prompts go in
        as a prefix tree, so tokens several prompts begin with run once (a few-shot prompt's
        examples in one language: about 60 of a demo prompt's ~87 tokens). The 2B responses
        (chosen, then rejected) follow end to end. A block mask lets each token see exactly
        what it would see in its own full sequence, at the same positions. Used where one 4D
        mask serves every layer: sdpa or eager attention, and every prompt + response shorter
        than any sliding window.
      - Otherwise (`_shared`): the body runs once over the B left-padded prompts with a KV
        cache, then over the 2B right-padded responses on the cache replicated for chosen and
        rejected. The gradient reaches the prompt's computation through the cache.
      - Where the cache cannot be used (activation checkpointing on, or a model whose cache is
        not made of plain dynamic layers) the pairs are laid out as 2B full sequences and take
        the path below. All three give the same values up to float rounding.
    - full sequences (input_ids, attention_mask, response_mask, right-padded; response_mask marks
      the response tokens): the body runs on whole sequences. With `prefix_ids` [P], every
      sequence continues those same P tokens (a few-shot prompt's examples, which the evaluation's
      reference likelihood scores many answers after): the prefix runs once with a KV cache that
      every row reads (`_after_prefix`), where the full path would run it once per row. (Not the
      prefix tree of `_packed`: its mask is dense, so attention costs T^2 for a row of T tokens,
      and the evaluation's rows carry references of up to 256 tokens: 8 such rows make T ~ 2000,
      where attention would be about three quarters of the body's arithmetic on gemma-3-270m
      (by arithmetic); `_after_prefix` pads the rows instead.)"""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        # FSDP's transformer-based auto wrap looks for the decoder-layer classes here
        self._no_split_modules = list(getattr(lm, "_no_split_modules", None) or [])
        self.shared_prompt = True  # False: always the full-sequence path (tests compare the two)
        self.pack_batches = True  # False: never `_packed` (tests compare the paths)
        self._cache_arg: str | None | bool = False  # not looked up yet

    # FSDP2 (accelerate) shards the embeddings and output layer as their own units when it finds them
    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def tie_weights(self, *args, **kwargs):
        return self.lm.tie_weights(*args, **kwargs)

    def _causal(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm  # PEFT

    def forward(self, input_ids=None, attention_mask=None, response_mask=None, *, prompt_ids=None,
                prompt_attention_mask=None, response_ids=None, response_attention_mask=None, prefix_ids=None, **_):
        # every batch is a shape of its own: on a GPU, attention without cuDNN's per-shape plans
        # (the backward runs the kernel the forward chose; the trainer's backward runs inside it
        # too, for layers that gradient checkpointing runs again there)
        with gpu_attention((input_ids if input_ids is not None else prompt_ids).device):
            return self._forward(input_ids, attention_mask, response_mask, prompt_ids, prompt_attention_mask,
                                 response_ids, response_attention_mask, prefix_ids)

    def _forward(self, input_ids, attention_mask, response_mask, prompt_ids, prompt_attention_mask, response_ids,
                 response_attention_mask, prefix_ids):
        causal = self._causal()
        if input_ids is not None:
            if prefix_ids is not None:
                return self._after_prefix(causal, prefix_ids, input_ids, attention_mask, response_mask)
            return self._full(causal, input_ids, attention_mask, response_mask)
        body = causal.base_model
        cache = self._new_cache(causal)
        if cache is None:
            return self._full(causal, *_full_sequences(prompt_ids, prompt_attention_mask, response_ids,
                                                       response_attention_mask))
        if (self.pack_batches and _can_pack(causal.config, prompt_attention_mask, response_attention_mask)
                and bool(prompt_attention_mask[:, -1].all())):  # (every prompt has a token)
            return self._packed(causal, body, prompt_ids, prompt_attention_mask, response_ids,
                                response_attention_mask)
        return self._shared(causal, body, cache, prompt_ids, prompt_attention_mask, response_ids,
                            response_attention_mask)

    def _new_cache(self, causal):
        """A plain DynamicCache for the shared-prompt and prefix paths, or None where the body
        cannot fill one (no cache argument, activation checkpointing, other cache layers)."""
        body = causal.base_model
        if self._cache_arg is False:
            self._cache_arg = _cache_argument(body)
        if self.shared_prompt and self._cache_arg is not None and not _checkpointing(body):
            return _plain_dynamic_cache(causal.config)
        return None

    def _after_prefix(self, causal, prefix_ids, input_ids, attention_mask, response_mask):
        """Full sequences [B, W] (right-padded) that all continue `prefix_ids` [P]: the prefix runs
        once, its cache is copied to the B rows, and the rows run on top of it at positions P...
        No response token may sit in the prefix or start a row (each is predicted from a row
        position). Where the cache cannot serve (see `_new_cache`, or a sliding window that
        prefix + row would pass) the prefix is put in front of every row: the full path, the
        same values up to float rounding."""
        n, width = input_ids.shape
        prefix = prefix_ids.view(1, -1)
        p = prefix.shape[1]
        window = _sliding_window(causal.config)

        def full():  # the prefix in front of every row
            return self._full(causal, torch.cat([prefix.expand(n, -1), input_ids], 1),
                              torch.cat([attention_mask.new_ones(n, p), attention_mask], 1),
                              torch.cat([response_mask.new_zeros(n, p), response_mask], 1))

        cache = self._new_cache(causal)
        if cache is None or (window is not None and p + width >= window - 1) or bool(response_mask[:, 0].any()):
            return full()
        body = causal.base_model
        kw = {self._cache_arg: cache, "use_cache": True}
        body(input_ids=prefix, position_ids=torch.arange(p, device=prefix.device)[None], **kw)
        if not _filled(cache):
            self.shared_prompt = False  # the model did not fill the cache as expected: never again
            return full()
        for layer in cache.layers:  # the same prefix for every row
            layer.keys = layer.keys.expand(n, -1, -1, -1).contiguous()
            layer.values = layer.values.expand(n, -1, -1, -1).contiguous()
        mask = torch.cat([attention_mask.new_ones(n, p), attention_mask], 1)
        positions = (p + torch.arange(width, device=input_ids.device))[None].expand(n, -1)
        hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kw)[0]
        del cache, kw
        return _response_sums(hidden, input_ids, response_mask, causal)

    def _shared(self, causal, body, cache, prompt_ids, prompt_mask, response_ids, response_mask):
        """The prompts as left-padded rows with a KV cache, then the 2B responses as right-padded
        rows on the cache replicated for chosen and rejected."""
        kw = {self._cache_arg: cache, "use_cache": True}
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        h_prompt = body(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, **kw)[0]
        if not _filled(cache):
            self.shared_prompt = False  # the model did not fill the cache as expected: never again
            return self._full(causal, *_full_sequences(prompt_ids, prompt_mask, response_ids, response_mask))
        p_len = prompt_mask.sum(1)
        for layer in cache.layers:  # the same prompt for the chosen and the rejected row
            layer.keys = torch.cat([layer.keys, layer.keys])
            layer.values = torch.cat([layer.values, layer.values])
        positions = p_len.repeat(2)[:, None] + torch.arange(response_ids.shape[1], device=response_ids.device)
        mask = torch.cat([prompt_mask.repeat(2, 1), response_mask], 1)
        h_resp = body(input_ids=response_ids, attention_mask=mask, position_ids=positions, **kw)[0]
        del cache, kw
        # left padding: each prompt's last position is the last column
        return _pair_sums(h_prompt[:, -1], h_resp[:, :-1][response_mask[:, 1:].bool()], response_ids, response_mask,
                          causal)

    def _packed(self, causal, body, prompt_ids, prompt_mask, response_ids, response_mask):
        """The whole batch in one row without padding: the B prompts as a prefix tree (a token
        several prompts begin with, such as a few-shot prompt's examples in one language, once),
        then the 2B responses end to end. A block mask lets each token attend to its ancestors in
        the tree and each response token to its own prompt's path and its own response's earlier
        tokens, at the positions the full sequence gives it. On the demo's pairs the prompts were
        two thirds of a batch's tokens, and a batch of same-language pairs shares about 60 of each
        prompt's ~87 tokens."""
        n = len(prompt_ids)
        prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask)]
        tokens, depths, paths = _prefix_tree(prompts)
        dev = prompt_ids.device
        t = len(tokens)
        ancestors = torch.zeros(t, t, dtype=torch.bool, device=dev)
        for path in paths:  # a node's ancestors (and itself) are its path's first nodes
            idx = torch.tensor(path, device=dev)
            ancestors[idx[:, None], idx[None]] = torch.ones(len(path), len(path), dtype=torch.bool, device=dev).tril()
        real = response_mask.bool()
        row = real.nonzero()[:, 0]  # the response row of each packed response token
        offset = (response_mask.cumsum(1) - 1)[real]  # its index within its response
        pair = row % n
        last = torch.tensor([path[-1] for path in paths], device=dev)  # each prompt's last node
        to_tree = ancestors[last[pair]]
        to_response = (row[None] == row[:, None]) & (offset[None] <= offset[:, None])
        allowed = torch.cat([torch.cat([ancestors, ancestors.new_zeros(t, len(row))], 1),
                             torch.cat([to_tree, to_response], 1)])[None, None]
        if causal.config._attn_implementation != "sdpa":  # eager adds the mask to the scores
            dtype = causal.get_input_embeddings().weight.dtype
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
        p_len = prompt_mask.sum(1)
        ids = torch.cat([torch.tensor(tokens, dtype=response_ids.dtype, device=dev), response_ids[real]])
        positions = torch.cat([torch.tensor(depths, device=dev), p_len[pair] + offset])
        h = body(input_ids=ids[None], attention_mask=allowed, position_ids=positions[None], use_cache=False)[0][0]
        has_next = torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], 1)[real]
        return _pair_sums(h[last], h[t:][has_next], response_ids, response_mask, causal)

    def _full(self, causal, input_ids, attention_mask, response_mask):
        hidden = causal.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        return _response_sums(hidden, input_ids, response_mask, causal)


def _response_sums(hidden, input_ids, response_mask, causal) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of hidden states over `input_ids` [B, W] -> each row's summed log-prob of the tokens
    `response_mask` marks, and their count: position t predicts token t+1, and the output layer
    runs on those positions only."""
    predicts = response_mask[:, 1:].bool()
    logps = _head_logps(hidden[:, :-1][predicts], input_ids[:, 1:][predicts], causal)
    sums = logps.new_zeros(len(input_ids)).index_add(0, predicts.nonzero()[:, 0], logps)
    return sums, predicts.sum(1)


def _pair_sums(h_last, h_next, response_ids, response_mask, causal) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs layout's summed log-probs [2B] and response token counts, from each prompt's
    last hidden state `h_last` [B, d] and the hidden states of the response positions that
    predict a next response token `h_next`, row by row. Response token 0 is predicted from the
    prompt's last position, the same for chosen and rejected: one row, two targets; response
    position t predicts token t+1. One output-layer call for all rows (each call reads the
    whole layer)."""
    n = len(h_last)
    predicts = response_mask[:, 1:].bool()
    targets = response_ids[:, 1:][predicts]
    logps = _head_logps(torch.cat([h_last, h_next]),
                        torch.cat([response_ids[:, 0].view(2, n).T, targets[:, None].expand(-1, 2)]), causal)
    first = logps[:n].T.reshape(-1)  # [chosen..., rejected...]
    sums = first.index_add(0, predicts.nonzero()[:, 0], logps[n:, 0])
    return sums, response_mask.sum(1)


def _prefix_tree(prompts: list[list[int]]) -> tuple[list[int], list[int], list[list[int]]]:
    """Token sequences as a prefix tree: its nodes' tokens and depths (a node's position in each
    sequence through it), and each sequence's path of node indices. A prefix shared by several
    sequences is one chain of nodes."""
    tokens, depths, paths = [], [], []
    children: list[dict[int, int]] = [{}]  # children[0]: the root's; children[j + 1]: node j's
    for seq in prompts:
        here, path = children[0], []
        for depth, tok in enumerate(seq):
            j = here.get(tok)
            if j is None:
                j = here[tok] = len(tokens)
                tokens.append(tok)
                depths.append(depth)
                children.append({})
            path.append(j)
            here = children[j + 1]
        paths.append(path)
    return tokens, depths, paths


def _full_sequences(prompt_ids, prompt_mask, response_ids, response_mask):
    """The pairs layout of `collate` -> 2B right-padded prompt+response sequences (chosen rows,
    then rejected rows): input_ids, attention_mask, response_mask (marks the response tokens)."""
    pw, rw = prompt_ids.shape[1], response_ids.shape[1]
    p_len = prompt_mask.sum(1).repeat(2)[:, None]
    total = p_len + response_mask.sum(1)[:, None]
    t = torch.arange(int(total.max()), device=prompt_ids.device)[None]
    from_prompt = prompt_ids.repeat(2, 1).gather(1, (pw - p_len + t).clamp(max=pw - 1))
    from_response = response_ids.gather(1, (t - p_len).clamp(0, rw - 1))
    attention = (t < total).long()
    in_response = (t >= p_len).long() * attention
    # (a right-pad position holds some token of the row: it is masked, and nothing real comes after it)
    return torch.where(t < p_len, from_prompt, from_response), attention, in_response


def dpo_nll_loss(logps, ref_logps, ntokens, beta: float, nll_weight: float, weights=None):
    """DPO + NLL from per-sequence summed log-probs ([2B]: chosen then rejected) and response
    token counts. Returns the batch loss (the mean over pairs, or the `weights`-weighted sum)
    and per-pair terms (for metrics).

    The NLL is each chosen response's per-token mean, then the mean over pairs, as the method
    states. TRL's "sft" term instead averages over all chosen tokens of the batch at once
    (longer answers weigh more); the two agree when a batch holds one pair or equal lengths."""
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    reward_chosen, reward_rejected = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    dpo = -F.logsigmoid(reward_chosen - reward_rejected)
    nll = -chosen / ntokens.chunk(2)[0]
    per_pair = dpo + nll_weight * nll
    loss = per_pair.mean() if weights is None else (weights * per_pair).sum()
    return loss, {"dpo": dpo.detach(), "nll": nll.detach(), "chosen": reward_chosen.detach(),
                  "rejected": reward_rejected.detach()}


def resolve_dtype(name: str) -> torch.dtype:
    """"auto" = bfloat16 where the hardware computes it natively (CUDA with bf16, or a CPU
    with AVX512-BF16/AMX), else float32 (emulated bf16 on a CPU is slower than fp32)."""
    if name != "auto":
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    from lidr.models import cpu_has_fast_bf16

    if torch.cuda.is_available():  # without bf16: fp32 (fp16 weights would need loss scaling to train)
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def planned_steps(n_pairs: int, batch_size: int, gradient_accumulation: int, num_processes: int,
                  epochs: int) -> int:
    """Optimizer steps for n_pairs: ceil(global batches / accumulation) per epoch."""
    return math.ceil(math.ceil(n_pairs / (batch_size * num_processes)) / gradient_accumulation) * epochs


def plan_batches(keys: list, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort by `keys` within windows of 50 batches, shuffle the batch order. The keys are
    the pairs' lengths where batches run as padded rows (neighbours pad little), or their prompts'
    token ids where a batch runs packed (`ResponseLogProbs._packed`): neighbours then share the
    longest prefixes, such as a few-shot prompt's examples in one language, which run once."""
    order = list(range(len(keys)))
    rng.shuffle(order)
    batches, window = [], batch_size * 50
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window], key=keys.__getitem__)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def shard_batches(global_batches: list[list[int]], batch_size: int, num_processes: int,
                  gradient_accumulation: int) -> list[list[tuple[int, float]]]:
    """Global batches -> per-process micro-batches of (pair, loss weight), interleaved
    [g0 slice 0, g0 slice 1, ..., g1 slice 0, ...]: the order in which accelerate deals batches
    out (process r gets every num_processes-th, from the r-th), so process r trains on slice r
    of every global batch. A pair weighs num_processes x accumulation / (pairs in its optimizer
    step): accelerate divides the loss by the accumulation and DDP/FSDP/DeepSpeed average the
    gradients over processes, which leaves the mean over the step's pairs, even for a short last
    step. A process whose slice of a short last batch is empty gets a weight-0 placeholder pair
    (every process must run the same forward/backward passes)."""
    out = []
    for s in range(0, len(global_batches), gradient_accumulation):
        group = global_batches[s:s + gradient_accumulation]
        w = num_processes * gradient_accumulation / sum(map(len, group))
        for g in group:
            for r in range(num_processes):
                part = g[r * batch_size:(r + 1) * batch_size]
                out.append([(i, w) for i in part] if part else [(g[0], 0.0)])
    return out


STATS = ("dpo", "nll", "chosen", "rejected", "margin", "correct", "pairs")


def _sums(terms: dict[str, torch.Tensor], real: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair terms -> one vector of sums (STATS order), cheap to add up across processes.
    `real`: which pairs count (placeholders do not)."""
    margin = terms["chosen"] - terms["rejected"]
    keep = torch.ones_like(margin) if real is None else real.to(margin.dtype)
    return torch.stack([(terms[k] * keep).sum() for k in ("dpo", "nll", "chosen", "rejected")]
                       + [(margin * keep).sum(), ((margin > 0).to(margin.dtype) * keep).sum(), keep.sum()])


def _summarize(sums: torch.Tensor, nll_weight: float) -> dict[str, float]:
    """Sums -> the logged means over pairs (reward_accuracy: share of pairs with chosen reward > rejected)."""
    m = dict(zip(STATS, (sums / sums[-1]).tolist()))
    return {"loss": m["dpo"] + nll_weight * m["nll"], "dpo_loss": m["dpo"], "nll_loss": m["nll"],
            "reward_chosen": m["chosen"], "reward_rejected": m["rejected"], "reward_margin": m["margin"],
            "reward_accuracy": m["correct"]}


def _save_atomically(write: Callable[[Path], dict], tokenizer, out_dir: Path, source: Path) -> dict[str, list[str]]:
    """`write(folder)` the model into a sibling temp folder, then swap it in; an older out_dir
    goes only once the new one is whole. The tokenizer is the one loaded from `source`,
    unchanged: its files are copied. Returns what `write` returns."""
    from lidr.models import copy_tokenizer

    tmp, old = out_dir.with_name(f".{out_dir.name}.tmp"), out_dir.with_name(f".{out_dir.name}.old")
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    files = write(tmp)
    if not copy_tokenizer(source, tmp):
        tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return files


def _handed_model(lm, deltas: dict) -> tuple[nn.Module, Callable[[str, torch.Tensor], None]] | None:
    """The trained PEFT model `lm` made into M_{t+1} as loading its files will give it: its
    adapters taken out without merging (`unload`: the base layers, frozen and as M_t was
    loaded), in eval mode, and a `save_with_deltas` callback that copies each merged weight,
    as stored, into its parameter (rounded to the model's dtype as loading rounds it). None,
    where a delta has no parameter of its name and shape. Layers the decoder packed for the
    forward are unpacked: their copies hold M_t's weights (training packs fp32 layers only,
    and unpacks only those), and the next decoder packs M_t+1's."""
    from lidr import packed_linear

    base = lm.unload()
    packed_linear.unpack(base)
    weights = {name: p for name, p in base.named_parameters() if name in deltas}
    if any(name not in weights or tuple(weights[name].shape) != tuple(d.shape) for name, d in deltas.items()):
        return None
    base.eval()

    def copy_merged(name: str, merged: torch.Tensor) -> None:
        with torch.no_grad():
            weights[name].copy_(merged)

    return base, copy_merged


def _frozen_vocabulary(lm: nn.Module, vocab: list[torch.Tensor]) -> list[torch.Tensor]:
    """Of the vocabulary matrices `vocab` (as loaded), those training and the LoRA merge leave
    as they are: frozen, and not the base weight of a LoRA layer (a merge adds into it; a tied
    output layer with LoRA counts for the embedding too). `save_model` links one only if the
    model still holds that very parameter (moved to a device, perhaps: the same bytes), after
    checking its dtype, shape and sampled rows against the file."""
    from peft.tuners.lora import LoraLayer

    merged = {id(m.get_base_layer().weight) for m in lm.modules() if isinstance(m, LoraLayer)}
    return [w for w in vocab if not w.requires_grad and id(w) not in merged]


def merge_lora(model):
    """The PEFT model's base model with its LoRA deltas added: `merge_and_unload()`, with each
    merged weight written to new memory instead of added in place. The base weights of a
    model loaded on CPU are pages of the memory-mapped safetensors file, and writing into
    them copies every page first: 1.0-1.2 s for gemma-3-270m in place, 0.4-0.5 s this way
    (bench/fixed_costs.py), with the same weights bit for bit (the same add, `w + delta`
    rounded to w's dtype). Anything but plain LoRA linears (DoRA and other variants, LoRA
    biases, embeddings) and a weight shared with another layer (tied: an in-place add changes
    both) are left to PEFT's own merge."""
    if not _plain_lora(model):
        return model.merge_and_unload()
    with torch.no_grad():
        for _, m in _lora_layers(model):
            base = m.get_base_layer()
            for name in m.active_adapters:
                if name in m.lora_A:
                    w = base.weight
                    merged = torch.empty_like(w)
                    torch.add(w, m.get_delta_weight(name), out=merged)
                    base.weight = nn.Parameter(merged, requires_grad=w.requires_grad)
    return model.unload()


def merge_lora_into_stored(deltas: dict, model_path: str | Path, stored: torch.dtype):
    """M_t as its files hold it (in `stored`, e.g. fp32), with the LoRA deltas (`_lora_deltas`)
    added in that dtype: for LoRA trained over a narrower copy of the base (bf16), where
    `checkpoint.save_with_deltas` (the usual way) does not apply. Merged into the bf16
    copy instead, most of a small delta rounds away: on the demo's first iteration the bf16
    merge kept a change whose cosine with the learned delta was 0.49 (median of the 126 layers;
    relative error 0.89), so M1 was not the model training had found, and each iteration's
    rounding would compound on the last. The base is loaded again from the files (memory-mapped);
    its vocabulary matrices stay as loaded, for `save_model` to link. Plain LoRA linears only
    (`_plain_lora`)."""
    from lidr.models import causal_lm

    with _plain_loading():
        lm = causal_lm(model_path, dtype=stored)
    lm.requires_grad_(False)
    for name, delta in deltas.items():
        module, _, attr = name.rpartition(".")
        target = lm.get_submodule(module)
        weight = getattr(target, attr).detach().clone()  # (the loaded one is the file's memory map)
        delta.add_to(weight)
        setattr(target, attr, nn.Parameter(weight, requires_grad=False))
    return lm


def _lora_deltas(model) -> dict:
    """Each plain LoRA layer's change to its base weight (`_plain_lora`), by the weight's name in
    the base model, as a `checkpoint.LowRank`: PEFT's delta B @ A · α/r (transposed where the
    base layer stores its weight as [in, out]), the active adapters' factors side by side where
    there are several. Copies of the factors (a few MB), not the model: the model can be freed
    before they are written."""
    from lidr.checkpoint import LowRank

    deltas = {}
    for name, m in _lora_layers(model):
        adapters = [a for a in m.active_adapters if a in m.lora_A]
        if not adapters:
            continue
        up = torch.cat([m.lora_B[a].weight.detach() * m.scaling[a] for a in adapters], 1)  # [out, r]
        down = torch.cat([m.lora_A[a].weight.detach() for a in adapters], 0)  # [r, in]
        if m.fan_in_fan_out:  # PEFT's transpose(B @ A): the weight is (B @ A)^T = A^T @ B^T
            up, down = down.T.contiguous(), up.T.contiguous()
        shape = tuple(m.get_base_layer().weight.shape)
        deltas[name.removeprefix("base_model.model.") + ".weight"] = LowRank(shape, up, down)
    return deltas


def _deltas_apply(model_path: str | Path, deltas: dict, vocab: list[str]) -> bool:
    """Can `checkpoint.save_with_deltas` write M_{t+1} as M_t's files with `deltas` added? The
    files must hold every changed weight, and each vocabulary matrix (`vocab`) in a file of its
    own: else `save_model` puts it in one, for later saves to link."""
    from lidr.checkpoint import _weight_map

    stored = _weight_map(Path(model_path))
    per_file = collections.Counter(stored.values())
    return (bool(deltas) and set(deltas) <= set(stored) and bool(vocab)
            and all(n in stored and per_file[stored[n]] == 1 for n in vocab))


def _lora_layers(model) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _plain_lora(model) -> bool:
    """Only plain LoRA linears (no DoRA or other variants, no LoRA biases, not on embeddings),
    none merged yet, none on a weight another layer shares (tied: an add would change both)."""
    from peft.tuners.lora import Linear as LoraLinear

    uses = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return all(type(m) is LoraLinear and not m.merged and not getattr(m, "lora_variant", {})
               and not any(getattr(m, "lora_bias", {}).values()) and uses[id(m.get_base_layer().weight)] == 1
               for _, m in _lora_layers(model))


def _peft_config(cfg: TrainingConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")


@contextlib.contextmanager
def _plain_loading():
    """Load a model whole even where DeepSpeed ZeRO-3 is active (transformers would partition it)."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def _is_sharded(acc) -> bool:
    """Weights split across processes (FSDP, DeepSpeed ZeRO-3): no process holds the whole model."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return acc.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


def _consolidated_lm(acc, policy, model_path, cfg: TrainingConfig):
    """The trained causal LM, whole, on the main process (None elsewhere); LoRA not merged yet.
    Every process must call this: gathering a sharded model is collective."""
    if not _is_sharded(acc):
        return acc.unwrap_model(policy).lm if acc.is_main_process else None
    state = acc.get_state_dict(policy)  # full weights on the main process (FSDP: rank 0 only)
    if not acc.is_main_process:
        return None
    from lidr.models import causal_lm

    with _plain_loading():
        lm = causal_lm(model_path, dtype=torch.float32)
    if cfg.lora is not None:
        from peft import get_peft_model

        lm = get_peft_model(lm, _peft_config(cfg))
    state = {k.removeprefix("lm."): v for k, v in state.items()}
    missing, unexpected = lm.load_state_dict(state, strict=False)
    # tied weights (input embeddings = output layer) may be stored once
    names: dict[int, list[str]] = {}
    for n, p in lm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    tied = {n for group in names.values() if len(group) > 1 and any(g in state for g in group) for n in group}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"consolidated weights do not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return lm


def train_dpo_nll(model_path: str | Path, examples: list[dict], out_dir: str | Path, cfg: TrainingConfig,
                  seed: int, log_dir: str | Path,
                  progress: Callable[[int, int, dict], None] | None = None,
                  take_model: Callable[[], nn.Module] | None = None,
                  hand_over: Callable[[nn.Module], None] | None = None) -> dict:
    """Train the model at model_path on examples ({"prompt", "chosen", "rejected"}: fully rendered
    text) with DPO + NLL; save the result (LoRA merged) with its tokenizer to out_dir; write
    log_dir/metrics.jsonl (one line per optimizer step) and log_dir/summary.json. Returns the summary.

    `take_model`: returns the model at model_path already in memory, as loading it gives it (the
    generation engine's, `HFBackend.take_model`; its frozen layers may be packed for the forward),
    for LoRA training in one process (`launch.takes_model`): trained instead of loading the files
    again. Called where the files would be loaded, so that training holds the only reference (and
    frees the model before it returns). It saves the closing of the engine, the load and the
    forward's packing: 0.75 s against 1.48 s for gemma-3-270m (bench/fixed_costs.py, round 16).

    `hand_over`: where the model was taken and LoRA's deltas are added to the files as stored
    (`checkpoint.save_with_deltas`), it is called with M_{t+1} as loading out_dir gives it: the
    model trained, its adapters taken out and each changed weight copied from the merge as it is
    written, so that the next stage need not load those files again (`_handed_model`). Not
    called otherwise (other saves, gradient checkpointing, several processes).

    Under `accelerate launch` every process calls this with the same arguments; each trains on
    its share of every global batch, and only the main process writes files."""
    if not examples:
        raise ValueError("train_dpo_nll: no preference pairs to train on (every pair was filtered out?)")
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_scheduler

    from lidr.models import causal_lm, load_tokenizer, release_memory

    t0 = time.time()
    seed = cfg.seed if cfg.seed is not None else seed
    set_seed(seed)
    out_dir, log_dir = Path(out_dir), Path(log_dir)
    acc = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation)
    if acc.is_main_process:
        log_dir.mkdir(parents=True, exist_ok=True)
    n_proc = acc.num_processes
    dtype = resolve_dtype(cfg.dtype)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        # No dataloader goes through prepare() with the model, so DeepSpeed learns the micro-batch here.
        ds = acc.state.deepspeed_plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = cfg.batch_size

    tokenizer = load_tokenizer(model_path)  # shared with generation in this process (lidr/models.py)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    pairs, trunc = tokenize_pairs(tokenizer, examples, cfg.max_length)
    lengths = [len(p) for p in pairs]

    # LoRA: frozen base in `dtype`, adapters in fp32 (PEFT's default autocast_adapter_dtype).
    # Full fine-tuning: fp32 master weights with bf16 autocast, since a bf16 weight cannot
    # absorb an update as small as lr=5e-7 (it rounds away). (DeepSpeed and FSDP with
    # mixed_precision: bf16 keep the fp32 master copy themselves.)
    from_files = take_model is None
    if from_files:
        lm = causal_lm(model_path, dtype=dtype if cfg.lora else torch.float32)
    elif cfg.lora is None or n_proc > 1:
        raise ValueError("train_dpo_nll: a model in memory is taken for LoRA training in one process only")
    else:
        lm = take_model().to(acc.device)
        if lm.dtype != dtype:
            raise ValueError(f"train_dpo_nll: the model taken is {lm.dtype}, training loads {dtype}")
    for m in lm.modules():  # as TRL: dropout would make π differ from π_ref at step 0
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if cfg.gradient_checkpointing:
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    frozen_vocab = []  # the vocabulary matrices LoRA leaves as loaded: linked at the save, not written
    if cfg.lora is not None:
        from peft import get_peft_model

        from lidr.checkpoint import vocabulary_matrices

        vocab = list(vocabulary_matrices(lm).values())
        lm = get_peft_model(lm, _peft_config(cfg))
        frozen_vocab = _frozen_vocabulary(lm, vocab)
        del vocab  # (frozen_vocab keeps those it needs; the rest must not outlive the model)
    autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16,
                              enabled=cfg.lora is None and dtype == torch.bfloat16)
    packed = 0
    if (cfg.lora is not None and cfg.cpu_packed_weights and acc.device.type == "cpu"
            and acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU)):
        from lidr import packed_linear

        # the frozen base layers (not the output layer: lidr/head.py computes it from its weight)
        packed = packed_linear.pack(lm, skip=(lm.get_output_embeddings(),))
        packed_linear.fuse_lora(lm)  # each LoRA layer over a packed base in one autograd node
    elif not from_files:
        from lidr import packed_linear

        packed_linear.unpack(lm)  # layers a decoder packed: plain again, as training.cpu_packed_weights asks
    params = [p for p in lm.parameters() if p.requires_grad]
    # fused: one kernel updates all parameters (in a single process; sharded optimizers keep the default)
    fused = acc.distributed_type == DistributedType.NO and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, fused=fused or None)
    policy, optimizer = acc.prepare(ResponseLogProbs(lm), optimizer)
    # the norm over the trained parameters; in one process, those alone (3.6 -> 1.9 ms a step
    # for the demo's LoRA), where accelerate's FSDP path wants the wrapped model's own list
    clipped = (lambda: params) if acc.distributed_type == DistributedType.NO else policy.parameters
    packs = _packs(acc.unwrap_model(policy)._causal().config)  # batches in one row: order pairs by prompt
    accum = acc.gradient_accumulation_steps  # DeepSpeed's config may have set it

    def score_all(adapters: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One no-grad pass over all pairs, SCORE_PAIRS (at least) at a time: log-probs and token
        counts, [pairs, 2]. Packed batches in the order of their prompts' token ids (shared
        prefixes run once a batch), padded ones longest prompts first (the prompts pad least).
        Each process scores every num_processes-th batch; the results are summed across them."""
        order = sorted(range(len(pairs)), key=lambda i: pairs[i].prompt) if packs else sorted(
            range(len(pairs)), key=lambda i: (len(pairs[i].prompt), lengths[i]), reverse=True)
        size = max(SCORE_PAIRS, 2 * cfg.batch_size)
        chunks = [order[s:s + size] for s in range(0, len(order), size)]
        mine = chunks[acc.process_index::n_proc]
        logps, ntok = torch.zeros(len(pairs), 2, device=acc.device), torch.zeros(len(pairs), 2, device=acc.device)
        off = acc.unwrap_model(policy).lm.disable_adapter() if cfg.lora and not adapters else contextlib.nullcontext()
        policy.eval()
        with torch.no_grad(), off, autocast:
            for k in range(math.ceil(len(chunks) / n_proc)):
                # a process out of batches repeats one (result unused): every process runs as many forwards
                b = {key: v.to(acc.device) for key, v in collate(pairs, (mine + chunks)[k], pad_id).items()}
                lp, n = policy(**b)
                if k < len(mine):
                    logps[b["index"]], ntok[b["index"]] = lp.float().view(2, -1).T, n.float().view(2, -1).T
        policy.train()
        return acc.reduce(logps, "sum"), acc.reduce(ntok, "sum")

    # ([pairs, 2]).T.flatten() is the [chosen..., rejected...] layout of a batch
    sums_of = lambda lp, n: _sums(dpo_nll_loss(lp.T.flatten(), ref.T.flatten(), n.T.flatten(),  # noqa: E731
                                               cfg.beta, cfg.nll_weight)[1])
    # Reference log-probs, once: adapters off (LoRA) or the untouched weights (full fine-tuning).
    t_ref = time.time()
    ref, ref_ntok = score_all(adapters=False)
    initial = _summarize(sums_of(ref, ref_ntok), cfg.nll_weight)
    ref_seconds = time.time() - t_ref

    rng = random.Random(seed)

    def loader():
        """This epoch's batches: the same global batches for any process count, sharded."""
        keys = [p.prompt for p in pairs] if packs else lengths
        micro = shard_batches(plan_batches(keys, cfg.batch_size * n_proc, rng), cfg.batch_size, n_proc, accum)
        slots = [s for mb in micro for s in mb]
        starts = list(itertools.accumulate(map(len, micro), initial=0))
        return acc.prepare(torch.utils.data.DataLoader(
            slots, batch_sampler=[list(range(a, b)) for a, b in zip(starts, starts[1:])],
            collate_fn=lambda sl: collate(pairs, [i for i, _ in sl], pad_id, [w for _, w in sl])))

    total_steps = planned_steps(len(pairs), cfg.batch_size, accum, n_proc, cfg.epochs)
    # transformers' warm-up gives its first step lr 0 (as TRL's does): at least one step must
    # come after it, or a run of one step would train nothing
    warmup = min(math.ceil(cfg.warmup_ratio * total_steps), total_steps - 1)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    step, tokens, records, held = 0, 0, [], 0
    t_train = t_step = time.time()
    # "w": a (re)run always starts again from M_t, so an older log would only mislead.
    # Only the main process opens it (another one truncating it later would lose lines).
    metrics_file = open(log_dir / "metrics.jsonl", "w", encoding="utf-8") if acc.is_main_process else None
    with metrics_file or contextlib.nullcontext():
        for epoch in range(cfg.epochs):
            dl = loader()
            for i, batch in enumerate(dl):
                real = batch["weight"] > 0
                with acc.accumulate(policy):
                    with autocast:
                        logps, ntok = policy(**batch)
                    loss, terms = dpo_nll_loss(logps.float(), ref[batch["index"]].T.flatten(), ntok, cfg.beta,
                                               cfg.nll_weight, weights=batch["weight"])
                    with gpu_attention(acc.device):  # layers checkpointed run again in the backward
                        acc.backward(loss)  # divided by the accumulation inside
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(clipped(), 1.0)
                    optimizer.step()  # a no-op until the last micro-batch of the step
                    optimizer.zero_grad()
                held = held + _sums(terms, real)
                # tokens trained on: each prompt once, both responses, no padding (the body runs
                # fewer where prompts share a prefix in `_packed`, more on the full-sequence path)
                tokens += int((batch["prompt_attention_mask"].sum(1) * real).sum()
                              + (batch["response_attention_mask"].sum(1) * real.repeat(2)).sum())
                if not acc.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                step += 1
                step_sums, held, now = acc.reduce(held, "sum"), 0, time.time()  # the step's pairs, all processes
                rec = {"step": step, "epoch": round(epoch + (i + 1) / len(dl), 4), "lr": lr,
                       **_summarize(step_sums, cfg.nll_weight), "seconds": round(now - t_step, 3),
                       "elapsed": round(now - t0, 3)}
                t_step = now
                records.append(rec)
                if metrics_file is not None:
                    metrics_file.write(json.dumps(rec) + "\n")
                    metrics_file.flush()
                    if progress is not None:
                        progress(step, total_steps, rec)
    train_seconds = time.time() - t_train

    # π = π_ref at step 1, so the first step's reward accuracy says nothing: measure again on all
    # pairs (optional: one more forward pass over them).
    final, final_seconds = None, None
    if cfg.final_metrics:
        t_final = time.time()
        final = _summarize(sums_of(*score_all(adapters=True)), cfg.nll_weight)
        final_seconds = round(time.time() - t_final, 3)

    t_save = time.time()
    acc.wait_for_everyone()
    if packed:
        from lidr import packed_linear

        packed_linear.unpack(acc.unwrap_model(policy).lm)  # frees the packed copies before merging
    lm = _consolidated_lm(acc, policy, model_path, cfg)
    saved = {"linked": [], "written": []}
    # M_{t+1} keeps the dtype M_t's files hold (fp32 for the demo's model, bf16 for most
    # checkpoints): training in bf16 is a matter of compute, and a bf16 save would round away
    # most of an iteration's change to fp32 weights (merge_lora_into_stored)
    from lidr.checkpoint import save_model, save_with_deltas, stored_dtype, vocabulary_matrices

    save_dtype = stored_dtype(model_path) or dtype
    write_deltas = handed = None
    if lm is not None:  # the main process
        plain = cfg.lora is not None and _plain_lora(lm)  # LoRA whose deltas are all there is to add
        vocab_names = list(vocabulary_matrices(lm.get_base_model())) if plain else []
        deltas = _lora_deltas(lm) if plain else {}
        if plain and _deltas_apply(model_path, deltas, vocab_names):  # no merge in memory, no serialisation
            write_deltas = functools.partial(save_with_deltas, model_path, deltas=deltas)  # after the model is freed
            if hand_over is not None and not from_files and not cfg.gradient_checkpointing:
                handed = _handed_model(lm, deltas)  # (what the save does not need of the model is freed)
        else:
            if plain and save_dtype.itemsize > dtype.itemsize:
                lm = merge_lora_into_stored(deltas, model_path, save_dtype)
                frozen_vocab = list(vocabulary_matrices(lm).values())  # as loaded from model_path
            elif cfg.lora is not None:
                lm = merge_lora(lm)
            lm = lm.to(save_dtype)
            saved = _save_atomically(lambda tmp: save_model(lm, tmp, source=Path(model_path), as_loaded=frozen_vocab),
                                     tokenizer, out_dir, Path(model_path))
    acc.wait_for_everyone()
    del lm, policy, optimizer, params, frozen_vocab  # the caller reloads from disk; free the memory now
    acc.free_memory()  # collects garbage (gc.collect) as well
    release_memory(collect=False)
    if write_deltas is not None:
        # Written after the model is freed (the save needs only the LoRA factors): the files'
        # pages and the save's buffer come on top of nothing that training held.
        if handed is not None:
            write_deltas = functools.partial(write_deltas, on_merged=handed[1])
        files = _save_atomically(write_deltas, tokenizer, out_dir, Path(model_path))
        saved = {k: [n for n in vocab_names if n in files[k]] for k in ("linked", "written")}
    acc.wait_for_everyone()  # M_{t+1} is whole before any process returns
    if handed is not None:
        hand_over(handed[0])

    summary = {
        "pairs": len(pairs), "steps": step, "epochs": cfg.epochs, "lora": cfg.lora is not None,
        "dtype": str(dtype).removeprefix("torch."), "saved_dtype": str(save_dtype).removeprefix("torch."),
        "beta": cfg.beta, "nll_weight": cfg.nll_weight,
        "num_processes": n_proc, "distributed": str(acc.distributed_type.value),
        "effective_batch": cfg.batch_size * accum * n_proc, "packed_linears": packed,
        "model_from": "files" if from_files else "memory",  # loaded from model_path, or taken
        "tokens": int(acc.reduce(torch.tensor(tokens, device=acc.device), "sum")),
        **trunc,
        "seconds": round(time.time() - t0, 3), "ref_seconds": round(ref_seconds, 3),
        "train_seconds": round(train_seconds, 3), "seconds_per_step": round(train_seconds / max(step, 1), 3),
        "final_pass_seconds": final_seconds, "save_seconds": round(time.time() - t_save, 3),
        # vocabulary matrices taken from the model trained from (hard-linked; copied across file systems) or written
        "save_linked": saved["linked"], "save_written": saved["written"],
        "initial": initial, "first_step": records[0] if records else None,
        "last_step": records[-1] if records else None,
        # null unless training.final_metrics (then: all pairs scored again after training)
        "final": final, "final_reward_accuracy": final["reward_accuracy"] if final else None,
        "final_reward_margin": final["reward_margin"] if final else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "out_dir": str(out_dir),
    }
    if acc.is_main_process:
        from lidr.records import atomic_write_json

        atomic_write_json(log_dir / "summary.json", summary)
    return summary


__all__ = ["planned_steps", "train_dpo_nll"]
