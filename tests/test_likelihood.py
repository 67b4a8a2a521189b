"""The evaluation's reference likelihood (lidr/eval/likelihood.py): the mean log-probability a
model gives each reference answer after its generation prompt."""

from __future__ import annotations

import json

import pytest
import torch

from lidr.eval import likelihood
from lidr.templates import choose_format
from tiny import save_tiny_gemma3

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WORDS = """Question : What is the capital of France ? Answer Paris is the capital . La capital de Francia es
París Die Hauptstadt von Frankreich ist the cat sat on mat and dog ran in park one two three four five six seven
eight nine ten hola mundo gracias por favor bonjour merci danke schön""".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # a sliding window longer than the prompts: the few-shot prefix can be cached and shared
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny"), WORDS, vocab_size=128, hidden_size=64,
                            intermediate_size=128, num_attention_heads=4, sliding_window=256,
                            max_position_embeddings=512)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_reference_loglik_shares_each_languages_prefix_and_scores_as_full_sequences(tiny, tmp_path, device):
    """Each language's few-shot examples run once per batch (two body calls per batch: prefix,
    then the rows), and every item's summed log-prob is the one of its whole prompt + reference
    computed from the model's own logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).to(device).eval()
    fmt = choose_format(tok, "auto")
    data = {
        "en": [{"id": "a", "instruction": "What is the capital of France ?", "reference": "Paris is the capital ."},
               {"id": "b", "instruction": "one two", "reference": "three four five six seven eight"},
               {"id": "c", "instruction": "the cat sat on the mat and the dog ran", "reference": "in the park"}],
        "es": [{"id": "a", "instruction": "hola mundo", "reference": "gracias por favor"},
               {"id": "b", "instruction": "La capital de Francia", "reference": "es París ."}],
    }
    enc = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    prompts = {lang: [enc(fmt.response_prompt(it["instruction"], lang)) for it in items] for lang, items in data.items()}
    assert all(likelihood._shared_prefix(p) >= likelihood.MIN_SHARED for p in prompts.values())

    calls = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                          with_kwargs=True)
    summary = likelihood.reference_loglik(model, tok, fmt, data, tmp_path, max_tokens=5, batch_size=2)
    # en: batches of 2 and 1, es: one batch of 2; each a prefix forward (one row) and a rows forward
    assert [rows for rows, _ in calls] == [1, 2, 1, 1, 1, 2]
    # cut at 5 tokens: "Paris is the capital ." and "three four ... eight" with their EOS
    assert summary["languages"]["en"]["truncated"] == 2

    for lang, items in data.items():
        got = {r["id"]: r for r in map(json.loads, (tmp_path / f"{lang}.jsonl").read_text().splitlines())}
        for it, prompt in zip(items, prompts[lang]):
            ref = enc(fmt.response_text(it["reference"]))[:5]
            ids = torch.tensor([prompt + ref], device=device)
            with torch.no_grad():
                logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            want = logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1, device=device), ids[0, len(prompt):]].sum()
            assert got[it["id"]]["tokens"] == len(ref)
            assert got[it["id"]]["sum_logprob"] == pytest.approx(float(want), abs=2e-4), (lang, it["id"])
