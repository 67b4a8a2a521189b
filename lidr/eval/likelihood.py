"""Reference likelihood: a judge-free signal of answer quality per language.

For each X-AlpacaEval instruction with a reference answer (gpt-4-turbo), the mean
per-token log-probability the model gives the reference, prompted exactly as in
generation. Higher means the model finds good answers in that language more likely;
a change between iterations is a change in the model, since the texts are fixed.
The summary averages the per-item means and gives a 95 % normal-approximation interval.

The reference is cut at `max_tokens` (long answers cost a forward pass each on a CPU);
the cut is recorded, and since it is the same for every model, comparisons stay fair.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lidr.backends.decode import MIN_SHARED, common_length  # as generation: tokens worth sharing a forward for
from lidr.eval.stats import mean_ci
from lidr.records import JsonlAppender, atomic_write_json, load_records


def _shared_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt begins with, leaving each prompt at least one token of its own (the
    first reference token is predicted from a prompt position after the prefix)."""
    n = min(map(len, prompts)) - 1
    for p in prompts[1:]:
        n = common_length(prompts[0], p, n)
    return max(n, 0)


@torch.inference_mode()
def reference_loglik(model, tokenizer, fmt, data: dict[str, list[dict]], out_dir: Path, *,
                     max_tokens: int = 256, batch_size: int = 8, progress=None) -> dict:
    """Score every item with a reference (resumable per language); write and return the summary."""
    from lidr.console import tracker
    from lidr.pipeline.train import ResponseLogProbs

    scorer = ResponseLogProbs(model).eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    writers = {lang: JsonlAppender(out_dir / f"{lang}.jsonl") for lang in data}
    jobs = [(lang, it) for lang, items in data.items() for it in items
            if it["reference"] and it["id"] not in writers[lang].done]
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    advance = tracker(progress, "reference likelihood", len(jobs))
    try:
        encoded: dict[str, list] = {lang: [] for lang in data}  # lang -> (id, prompt, reference, cut)
        for lang, it in jobs:
            prompt = enc([fmt.response_prompt(it["instruction"], lang)])[0]
            ref = enc([fmt.response_text(it["reference"])])[0]
            encoded[lang].append((it["id"], prompt, ref[:max_tokens], len(ref) > max_tokens))
        # One language's prompts begin with the same few-shot examples: that prefix runs once per
        # batch (ResponseLogProbs' prefix layout) instead of once per item.
        for lang, group in encoded.items():
            if not group:
                continue
            shared = _shared_prefix([p for _, p, _, _ in group])
            shared = shared if shared >= MIN_SHARED else 0
            prefix = torch.tensor(group[0][1][:shared], device=device) if shared else None
            group.sort(key=lambda e: len(e[1]) + len(e[2]))  # similar lengths together: less padding
            for start in range(0, len(group), batch_size):
                batch = group[start:start + batch_size]
                rows = [(p[shared:], r) for _, p, r, _ in batch]  # each row: the prompt's own tokens, reference
                width = max(len(q) + len(r) for q, r in rows)
                ids = torch.tensor([q + r + [pad_id] * (width - len(q) - len(r)) for q, r in rows], device=device)
                attn = torch.tensor([[1] * (len(q) + len(r)) + [0] * (width - len(q) - len(r)) for q, r in rows],
                                    device=device)
                resp = torch.tensor([[0] * len(q) + [1] * len(r) + [0] * (width - len(q) - len(r)) for q, r in rows],
                                    device=device)
                sums, counts = scorer(ids, attn, resp, prefix_ids=prefix)
                for (pid, _, _, cut), s, n in zip(batch, sums.tolist(), counts.tolist()):
                    writers[lang].write({"id": pid, "lang": lang, "tokens": n, "sum_logprob": round(s, 4),
                                         "mean_logprob": round(s / n, 6), "truncated": cut})
                advance(len(batch))
    finally:
        for w in writers.values():
            w.close()
    return summarize(out_dir, data, max_tokens)


def summarize(out_dir: Path, data: dict[str, list[dict]], max_tokens: int) -> dict:
    per_lang = {}
    for lang, items in data.items():
        wanted = {it["id"] for it in items if it["reference"]}
        recs = [r for r in load_records(out_dir / f"{lang}.jsonl") if r["id"] in wanted]
        if not recs:
            continue
        mean, ci = mean_ci([r["mean_logprob"] for r in recs])
        per_lang[lang] = {
            "n": len(recs), "tokens": sum(r["tokens"] for r in recs),
            "mean_logprob": round(mean, 4), "ci95": [round(x, 4) for x in ci] if ci else None,
            "truncated": sum(r["truncated"] for r in recs),
        }
    means = [v["mean_logprob"] for v in per_lang.values()]
    summary = {"benchmark": "reference-likelihood", "max_tokens": max_tokens, "languages": per_lang,
               "average_mean_logprob": round(sum(means) / len(means), 4) if means else None}
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
