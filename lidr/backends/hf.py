"""Generation with transformers' `generate`, batched, on CPU or GPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from lidr.models import default_device, load_model, load_tokenizer


@dataclass
class Generation:
    text: str  # the generated continuation (a stop string it ended on is kept)
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (token limit)


class HFBackend:
    """Greedy batched generation; prompts are full strings with their special tokens."""

    name = "hf"

    def __init__(self, model_path: str | Path, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False):
        self.device = device or default_device()
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        # Left padding: every row's continuation then starts at the same position.
        self.tokenizer.padding_side = "left"
        self.model = load_model(model_path, dtype=dtype, device=self.device, trust_remote_code=trust_remote_code)
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        stops: list[list[str]] | None = None,
        repetition_penalty: float = 1.0,
    ) -> list[Generation]:
        """Greedy continuations; `stops[i]` lists the strings that end row i."""
        stops = stops or [[] for _ in prompts]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos_ids) or None,
        )
        if any(stops):
            # Each row stops as soon as it ends with a stop string, instead of running
            # on to the token limit.
            kwargs["stopping_criteria"] = StoppingCriteriaList(
                [TailStop(self.tokenizer, stops, enc.input_ids.shape[1])]
            )
        out = self.model.generate(**enc, **kwargs)
        new = out[:, enc.input_ids.shape[1]:].tolist()
        results = []
        for row, row_stops in zip(new, stops):
            cut = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            ids = row if cut is None else row[:cut]
            ids = [t for t in ids if t != self.tokenizer.pad_token_id]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            stopped = cut is not None or any(s in text for s in row_stops)
            results.append(Generation(text=text, finish_reason="stop" if stopped else "length"))
        return results

    def close(self) -> None:
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class TailStop(StoppingCriteria):
    """Stop a row once its recent text contains a stop string.

    transformers' own `stop_strings` pre-computes a table over the whole vocabulary for
    every new set of strings (about 40 s for Gemma's 262k tokens on a laptop CPU);
    decoding the last few tokens of each row per step costs microseconds instead.
    """

    def __init__(self, tokenizer, stops: list[list[str]], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len
        every = {s for row in stops for s in row}
        longest = max(len(tokenizer(s, add_special_tokens=False).input_ids) for s in every)
        self.window = longest + 2  # a stop string can straddle token boundaries

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window):].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        done = [any(s in t for s in row) for t, row in zip(texts, self.stops)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
