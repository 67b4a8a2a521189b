"""The openai generation backend against a real OpenAI-compatible server (llama-cpp-python
on the embedded Gemma 3 270M GGUF, the `llama_url` fixture), with faults injected by a
real proxy in front of it (429, 500, hangs past the timeout), the translator setting, and
a demo-sized `lidr run` whose generation goes through the server."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch

from lidr.backends import make_backend, run_batched
from lidr.backends.openai import GenerationFailed, OpenAIBackend
from lidr.config import ConfigError, EndpointConfig, GenerationConfig, load_config
from lidr.models import load_tokenizer, resolve_model
from lidr.openai_client import client_from
from lidr.pipeline.respond import respond
from lidr.records import JsonlAppender, load_records
from lidr.templates import OUT_CLOSE, PromptFormat, choose_format, parse_translation

from servers import FaultyProxy

MODEL = "gemma-3-270m"  # the llama server's --model_alias


@pytest.fixture(scope="module")
def tok_path() -> Path:
    return resolve_model(MODEL)  # converted once, cached in ~/.cache/lidr


@pytest.fixture(scope="module")
def tokenizer(tok_path):
    return load_tokenizer(tok_path)  # loaded once for the tests that make their own backends


def endpoint(url: str, **kw) -> EndpointConfig:
    return EndpointConfig(url=url, model=MODEL, api_key_env=kw.pop("api_key_env", None), **kw)


def backend_at(url: str, tokenizer, **kw) -> OpenAIBackend:
    server = endpoint(url, **kw)
    client = client_from(server)
    client.backoff = 0.05  # keep the retry waits short in tests
    return OpenAIBackend(server, None, client=client, tokenizer=tokenizer)


def test_greedy_text_stop_strings_and_finish_reason(llama_url, tok_path):
    b = make_backend("openai", tok_path, server=endpoint(llama_url))
    try:
        fmt = choose_format(b.tokenizer, "completion")
        counting = b.tokenizer.bos_token + "1, 2, 3, 4, 5, 6,"
        prompts = [counting, counting, fmt.translation_prompt("The cat is sleeping on the sofa.", "en", "es")]
        stops = [[" 9,"], [], fmt.translation_stops]
        outs = b.generate(prompts, max_new_tokens=24, stops=stops, repetition_penalty=1.0)
        # the stop string ends the row and is kept in the text, as with the hf backend
        assert outs[0].finish_reason == "stop" and outs[0].text.endswith(" 9,"), outs[0]
        assert "7" in outs[0].text and "10" not in outs[0].text
        # no stop string: runs to the token limit
        assert outs[1].finish_reason == "length" and outs[1].text.startswith(outs[0].text[:-1].rstrip(","))
        assert b.count_tokens(outs[1].text) >= 20
        # the translation closes its delimiter, which the parser needs to see
        assert outs[2].finish_reason == "stop" and outs[2].text.endswith(OUT_CLOSE), outs[2]
        translation, ok = parse_translation(outs[2].text)
        assert ok and translation
        # greedy: the same request gives the same text
        again = b.generate(prompts[:1], max_new_tokens=24, stops=stops[:1], repetition_penalty=1.0)
        assert again[0].text == outs[0].text
    finally:
        b.close()


def test_rows_keep_their_own_token_limit(llama_url, tok_path):
    from lidr.backends import Request

    b = make_backend("openai", tok_path, server=endpoint(llama_url))
    try:
        counting = b.tokenizer.bos_token + "1, 2, 3, 4, 5, 6,"
        results = {}
        run_batched(b, [Request("short", counting, [], 4), Request("default", counting, [])], batch_size=2,
                    on_result=results.__setitem__, max_new_tokens=12)
        assert results["short"].finish_reason == results["default"].finish_reason == "length"
        assert b.count_tokens(results["short"].text) <= 5 < b.count_tokens(results["default"].text)
        assert results["default"].text.startswith(results["short"].text)
    finally:
        b.close()


def test_eos_is_not_taken_for_a_stop_string(llama_url, tokenizer):
    """A row that ends on EOS comes back without its stop string: it must stay without."""
    b = backend_at(llama_url, tokenizer)
    try:
        r = b._parse({"choices": [{"text": "Hola", "finish_reason": "stop"}],
                      "usage": {"completion_tokens": 2}}, [OUT_CLOSE])
        assert r.text == "Hola" and r.finish_reason == "stop"
        r = b._parse({"choices": [{"text": "Hola", "finish_reason": "stop"}],
                      "usage": {"completion_tokens": 8}}, [OUT_CLOSE])
        assert r.text == "Hola" + OUT_CLOSE
        r = b._parse({"choices": [{"text": "Hola", "finish_reason": "stop", "stop_reason": None}]}, [OUT_CLOSE])
        assert r.text == "Hola"
        r = b._parse({"choices": [{"text": "Hola", "finish_reason": "stop", "stop_reason": OUT_CLOSE}]}, [OUT_CLOSE])
        assert r.text == "Hola" + OUT_CLOSE
    finally:
        b.close()


def test_retries_through_429_and_500(llama_url, tokenizer):
    with FaultyProxy(llama_url, {1: 429, 2: 500}) as proxy:
        b = backend_at(proxy.url, tokenizer, concurrency=1, max_retries=3)
        try:
            outs = b.generate(["<bos>Hello", "<bos>The sky is"], max_new_tokens=4, stops=[[], []])
        finally:
            b.close()
    assert all(o.finish_reason in ("stop", "length") and o.text for o in outs)
    assert b.client.stats["retries"] == 2 and b.client.stats["failures"] == 0
    assert proxy.seen == 4


class BarePrompt(PromptFormat):
    """The instruction alone as the prompt: short requests, so the timeout below is far
    above a real request's time even on a busy machine."""

    def response_prompt(self, instruction: str, lang: str) -> str:
        return self._bos() + instruction


def _respond_rows(backend, out_dir: Path, gen: GenerationConfig):
    fmt = BarePrompt(kind="completion", tokenizer=backend.tokenizer)
    prompts = {"en": {"a": "1, 2, 3,", "b": "Monday, Tuesday,", "c": "red, green,"}}
    respond(backend, fmt, prompts, out_dir, gen)


def test_hung_requests_fail_are_counted_and_a_rerun_asks_only_for_the_missing(llama_url, tokenizer, tmp_path):
    gen = GenerationConfig(max_new_tokens=3, batch_size=8)
    out = tmp_path / "responses"
    # requests 1 and 2 (the first row and its one retry) hang past the timeout
    with FaultyProxy(llama_url, {1: "hang", 2: "hang"}, hang_seconds=8) as proxy:
        b = backend_at(proxy.url, tokenizer, concurrency=1, max_retries=1, timeout=4)
        try:
            with pytest.raises(GenerationFailed) as err:
                _respond_rows(b, out, gen)
            msg = str(err.value)
            assert "1 of 3" in msg and proxy.url in msg and "again" in msg
            assert b.client.stats["failures"] == 1
            written = {r["id"] for r in load_records(out / "en.jsonl")}
            assert len(written) == 2  # the rows that succeeded are on disk
            seen = proxy.seen
            _respond_rows(b, out, gen)  # resume
            assert proxy.seen == seen + 1  # only the missing row was asked for
        finally:
            b.close()
    recs = load_records(out / "en.jsonl")
    assert sorted(r["id"] for r in recs) == ["a", "b", "c"]


def test_a_server_that_refuses_everything_stops_early(llama_url, tokenizer):
    with FaultyProxy(llama_url, always=503) as proxy:
        b = backend_at(proxy.url, tokenizer, concurrency=2, max_retries=0)
        got = []
        try:
            with pytest.raises(GenerationFailed, match="2 of 6 .* 4 were not sent"):
                run_batched(b, [(i, "<bos>Hi", []) for i in range(6)], batch_size=2,
                            on_result=lambda k, g: got.append(k), max_new_tokens=2)
        finally:
            b.close()
    assert proxy.seen == 2 and got == []


def test_backend_openai_needs_a_server():
    with pytest.raises(ConfigError, match="generation.server"):
        load_config(None, ["generation.backend=openai"])
    with pytest.raises(ConfigError, match="translator.tokenizer"):
        load_config(None, ["translator={backend: openai, server: {url: 'http://x/v1', model: m}}"])


def _cfg(llama_url: str, extra: list[str] | None = None):
    return load_config(None, [
        f"model={MODEL}", "languages.others=[es]", "prompts.per_iteration=3", "iterations=1",
        "generation.backend=openai",
        f"generation.server={{url: '{llama_url}', model: {MODEL}, api_key_env: LIDR_TEST_SERVER_KEY}}",
        "generation.max_new_tokens=24", "generation.translation_max_new_tokens=40",
        "training.batch_size=1", "training.gradient_accumulation=1", "training.max_length=160",
        "eval.enabled=false", *(extra or []),
    ])


def test_demo_run_with_the_openai_backend(llama_url, tmp_path, monkeypatch, capfd):
    from lidr.config import dump_config
    from lidr.pipeline.loop import Loop

    secret = "sk-lidr-test-0123456789"
    monkeypatch.setenv("LIDR_TEST_SERVER_KEY", secret)
    torch.set_num_threads(1)
    cfg = _cfg(llama_url)
    root = tmp_path / "run"
    (root).mkdir()
    (root / "config.yaml").write_text(dump_config(cfg))
    loop = Loop(cfg, root)
    frozen = []  # gc's frozen objects as each stage starts: the libraries' (lidr/models.py, libraries_frozen)
    execute = Loop._execute

    def recording(self, *args, **kwargs):
        frozen.append(gc.get_freeze_count())
        return execute(self, *args, **kwargs)

    monkeypatch.setattr(Loop, "_execute", recording)
    loop.run_all()
    assert len(frozen) == 4 and min(frozen) > 100_000 and gc.get_freeze_count() == 0  # given back after the run

    it = root / "iter-1"
    for lang in ("en", "es"):
        recs = load_records(it / "responses" / f"{lang}.jsonl")
        assert len(recs) == 3 and all(set(r) == {"id", "lang", "prompt", "response", "finish_reason"} for r in recs)
        assert all(r["finish_reason"] in ("stop", "length") for r in recs)
    for direction in ("en-es", "es-en"):
        for r in load_records(it / "translations" / f"{direction}.jsonl"):
            assert set(r) == {"id", "src", "tgt", "text", "translation", "ok", "raw"}
    assert (it / "pairs.jsonl").exists() and (it / "pairs.summary.json").exists()
    assert (it / "model" / "config.json").exists() and list((it / "model").glob("*.safetensors"))
    state = json.loads((root / "state.json").read_text())
    stages = state.get("stages", state)
    assert all(stages[f"iter-1/{s}"]["status"] == "done" for s in ("respond", "translate", "pairs", "train"))
    # the key itself is never written: only the variable's name
    out, err = capfd.readouterr()
    for text in ((root / "config.yaml").read_text(), (root / "state.json").read_text(), out, err):
        assert secret not in text
    assert "LIDR_TEST_SERVER_KEY" in (root / "config.yaml").read_text()


def test_translator_setting_translates_through_its_own_server(llama_url, tmp_path):
    from lidr.pipeline.loop import Loop

    with FaultyProxy(llama_url) as proxy:
        translator = f"translator={{backend: openai, server: {{url: '{proxy.url}', model: {MODEL}}}, model: {MODEL}}}"
        cfg = _cfg(llama_url, [translator, "prompts.per_iteration=2"])
        loop = Loop(cfg, tmp_path / "run")
        # this iteration's answers, written by hand (the respond stage is tested above)
        ids = loop.ids(1)
        for lang in ("en", "es"):
            w = JsonlAppender(loop.run.responses(1) / f"{lang}.jsonl")
            for i in ids:
                w.write({"id": i, "lang": lang, "prompt": loop.prompts.text[lang][i],
                         "response": "Yes." if lang == "en" else "Sí.", "finish_reason": "stop"})
            w.close()
        fp = loop.inputs(1, "translate")
        summary = loop._translate(1)
        loop.release_backend()
        n = sum(v["n"] for v in summary["translations"].values())
        assert n == proxy.seen > 0  # every translation went to the translator's server
        assert loop._backend is None  # the model being trained was never loaded for it
    # the translator is part of the translate stage's inputs: a change is detected
    assert "translator" in fp
    other = Loop(_cfg(llama_url, [translator.replace(f"model: {MODEL}}}", "model: other}"),
                                  "prompts.per_iteration=2"]), tmp_path / "run")
    assert other.inputs(1, "translate")["translator"] != fp["translator"]
    slower = Loop(_cfg(llama_url, [translator.replace("}, model", ", timeout: 5}, model"),
                                   "prompts.per_iteration=2"]), tmp_path / "run")
    assert slower.inputs(1, "translate") == fp  # engine knobs are not inputs
    # and so is nothing about the server of the model being trained
    moved = Loop(_cfg("http://127.0.0.1:1/v1", [translator, "prompts.per_iteration=2"]), tmp_path / "run")
    assert moved.inputs(1, "translate") == fp


def test_iteration_two_needs_the_server_to_serve_the_trained_model(llama_url, tok_path, tmp_path):
    from lidr.pipeline.loop import Loop, StageNotReady

    loop = Loop(_cfg(llama_url, ["iterations=2"]), tmp_path / "run")
    m1 = loop.run.model(1)
    m1.mkdir(parents=True)
    for f in tok_path.iterdir():  # a stand-in M1: only its tokenizer is read here
        if "token" in f.name or f.name.endswith(".model"):
            shutil.copy(f, m1 / f.name)
    with pytest.raises(StageNotReady, match="M1"):
        loop.backend(2)  # the llama server serves M0 under its alias
    orig = OpenAIBackend.served_models
    try:  # a server that lists M1's folder as the root of the served name (as vLLM does)
        OpenAIBackend.served_models = lambda self: [{"id": MODEL, "root": str(m1)}]
        assert loop.backend(2) is not None
    finally:
        OpenAIBackend.served_models = orig
        loop.release_backend()
