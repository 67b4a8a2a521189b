"""Generation with a transformers model: greedy, continuously batched (`decode.py`), CPU or GPU."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Callable, Iterable

import torch

from lidr import packed_linear
from lidr.backends.decode import ContinuousDecoder, Generation, Request
from lidr.models import default_device, load_model, load_tokenizer, pick_dtype, release_memory

__all__ = ["Generation", "HFBackend"]


class HFBackend:
    """Greedy batched generation; prompts are full strings with their special tokens."""

    name = "hf"

    def __init__(self, model_path: str | Path, dtype: str = "auto", device: str | None = None,
                 trust_remote_code: bool = False, packed_weights: bool = True, model=None):
        """`packed_weights`: on a CPU, fp32 linear layers run through oneDNN with weights
        reordered once (faster decoding steps; one more copy of the weights in memory, +1.06 GB
        RSS for gemma-3-270m; skipped when twice that is not free); see lidr/backends/decode.py.
        `model`: the model at `model_path` in memory, as `load_model` gives it (training's M_t+1:
        lidr/pipeline/train.py, `hand_over`), used where it has the device and dtype a load
        would give, instead of loading the files."""
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        if model is not None and (model.device.type != torch.device(self.device).type
                                  or model.dtype != pick_dtype(dtype, self.device)):
            model = None
        self.model = model if model is not None else load_model(
            model_path, dtype=dtype, device=self.device, trust_remote_code=trust_remote_code)
        self.model.requires_grad_(False)  # generation and scoring only
        self.eos_ids = self._eos_ids()
        self.decoder = ContinuousDecoder(self.model, self.tokenizer, self.eos_ids, packed_weights=packed_weights)

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        stops: list[list[str]] | None = None,
        repetition_penalty: float = 1.0,
    ) -> list[Generation]:
        """Greedy continuations, in the order of `prompts`; `stops[i]` lists the strings that end row i."""
        stops = stops or [[] for _ in prompts]
        out: list[Generation | None] = [None] * len(prompts)
        self.run_batched(list(zip(range(len(prompts)), prompts, stops)), batch_size=max(1, len(prompts)),
                         on_result=out.__setitem__, max_new_tokens=max_new_tokens,
                         repetition_penalty=repetition_penalty)
        return out

    def run_batched(
        self,
        items: Iterable[Request | tuple[object, str, list[str]]],
        *,
        batch_size: int,
        on_result: Callable[[object, Generation], None],
        advance: Callable[[int], None] = lambda n: None,
        max_new_tokens: int,
        repetition_penalty: float = 1.0,
    ) -> None:
        """Continuous batching: up to `batch_size` rows decode together, each result goes to
        `on_result` the moment its row ends, and a waiting prompt takes its place. A Request's
        own token limit or repetition penalty overrides the call's for that row."""

        def done(key, gen):
            on_result(key, gen)
            advance(1)

        self.decoder.run(list(items), max_rows=batch_size, max_new_tokens=max_new_tokens,
                         repetition_penalty=repetition_penalty, on_result=done)

    def take_model(self):
        """Hand the model over and close the rest (the decoder with its caches and screens): for
        the train stage, which would otherwise load the same files again. The frozen layers the
        decoder packed stay packed for the forward (`packed_linear.pack` adds the backward's
        copies; `packed_linear.unpack` restores them); all parameters are frozen."""
        model = self.model
        del self.model, self.decoder
        return model

    def close(self) -> None:
        # A packed layer's forward refers to the layer itself: a reference cycle that would keep
        # the model and its packed copies in memory until the next garbage collection.
        packed_linear.unpack(self.model)
        held = weakref.ref(self.model), weakref.ref(self.decoder)
        del self.model, self.decoder
        # Reference counting has freed them now, unless a cycle holds them: only then is a full
        # collection needed (0.3-0.4 s, walking every object that torch and transformers made).
        release_memory(collect=any(ref() is not None for ref in held))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
