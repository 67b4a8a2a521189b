"""Generation engines behind one interface: `generate(prompts, max_new_tokens=, stops=,
repetition_penalty=) -> list[Generation]` and `count_tokens(text)`. The stages only see
this interface; `run_batched` hands them the items (hf and openai schedule rows themselves)."""

from __future__ import annotations

from typing import Callable, Iterable

from lidr.backends.hf import Generation, HFBackend


def make_backend(name: str, model_path, dtype: str = "auto", trust_remote_code: bool = False, *,
                 server=None, vllm=None):
    """`model_path`: the local model (hf, vllm), or the local model whose tokenizer formats
    prompts for the server (openai). Engines other than hf are imported only when chosen."""
    if name == "hf":
        return HFBackend(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
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
    items: Iterable[tuple[object, str, list[str]]],
    *,
    batch_size: int,
    on_result: Callable[[object, Generation], None],
    advance: Callable[[int], None] = lambda n: None,
    **gen_kwargs,
) -> None:
    """Generate for (key, prompt, stop strings) items; results go to `on_result` as they come.

    A backend with its own `run_batched` schedules the rows itself: hf decodes with continuous
    batching (`decode.py`: a row's result arrives the step it ends), openai sends one request
    per row. Any other engine (vllm, which schedules inside `generate`) gets chunks of
    `batch_size` items sorted by prompt length, and results arrive chunk by chunk.
    """
    if hasattr(backend, "run_batched"):
        return backend.run_batched(items, batch_size=batch_size, on_result=on_result, advance=advance, **gen_kwargs)
    items = sorted(items, key=lambda item: backend.count_tokens(item[1]))
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        outs = backend.generate([p for _, p, _ in batch], stops=[s for _, _, s in batch], **gen_kwargs)
        for (key, _, _), out in zip(batch, outs):
            on_result(key, out)
        advance(len(batch))
