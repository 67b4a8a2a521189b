"""Generation engines behind one interface: `generate(prompts, max_new_tokens=, stops=,
repetition_penalty=) -> list[Generation]` and `count_tokens(text)`. The stages only see
this interface; `run_batched` hands them the items (hf and openai schedule rows themselves)."""

from __future__ import annotations

from typing import Callable, Iterable

from lidr.backends.decode import Generation, Request, as_requests
from lidr.backends.hf import HFBackend

__all__ = ["Generation", "HFBackend", "Request", "make_backend", "run_batched"]


def make_backend(name: str, model_path, dtype: str = "auto", trust_remote_code: bool = False, *,
                 server=None, vllm=None, cpu_packed_weights: bool = True, model=None):
    """`model_path`: the local model (hf, vllm), or the local model whose tokenizer formats
    prompts for the server (openai). Engines other than hf are imported only when chosen.
    `cpu_packed_weights`, `model` (that folder's model in memory): hf, see HFBackend."""
    if name == "hf":
        return HFBackend(model_path, dtype=dtype, trust_remote_code=trust_remote_code, packed_weights=cpu_packed_weights,
                         model=model)
    if name == "openai":
        from lidr.backends.openai import OpenAIBackend

        if server is None:
            raise ValueError("the openai backend needs a server (url, model)")
        return OpenAIBackend(server, model_path, trust_remote_code=trust_remote_code)
    if name == "vllm":
        from lidr.backends.vllm import VLLMBackend

        return VLLMBackend(model_path, dtype=dtype, trust_remote_code=trust_remote_code, settings=vllm)
    raise ValueError(f"unknown generation backend {name!r} (available: hf, vllm, openai)")


def run_batched(
    backend,
    items: Iterable[Request | tuple[object, str, list[str]]],
    *,
    batch_size: int,
    on_result: Callable[[object, Generation], None],
    advance: Callable[[int], None] = lambda n: None,
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
) -> None:
    """Generate for the items (`Request`s, or (key, prompt, stop strings) tuples); results go
    to `on_result` as they come. A Request's own token limit or repetition penalty overrides
    the call's for that row.

    A backend with its own `run_batched` schedules the rows itself: hf decodes with continuous
    batching (`decode.py`: a row's result arrives the step it ends), openai sends one request
    per row. Any other engine (vllm, which schedules inside `generate`) gets chunks of
    `batch_size` items with the same settings, sorted by prompt length, and results arrive
    chunk by chunk.
    """
    if hasattr(backend, "run_batched"):
        return backend.run_batched(items, batch_size=batch_size, on_result=on_result, advance=advance,
                                   max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    reqs = as_requests(items, max_new_tokens, repetition_penalty)
    reqs.sort(key=lambda r: (r.max_new_tokens, r.repetition_penalty, backend.count_tokens(r.prompt)))
    start = 0
    while start < len(reqs):
        first = reqs[start]
        batch = [r for r in reqs[start : start + batch_size]
                 if (r.max_new_tokens, r.repetition_penalty) == (first.max_new_tokens, first.repetition_penalty)]
        outs = backend.generate([r.prompt for r in batch], stops=[r.stops for r in batch],
                                max_new_tokens=first.max_new_tokens, repetition_penalty=first.repetition_penalty)
        for r, out in zip(batch, outs):
            on_result(r.key, out)
        advance(len(batch))
        start += len(batch)
