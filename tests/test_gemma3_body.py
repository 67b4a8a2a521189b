"""lidr/backends/gemma3_body.py gives transformers' Gemma 3 hidden states bit for bit, on every
kind of forward the decoder makes: prompts with and without padding, decoding steps with and
without padding, a lone row's guesses after its cache, the rest of a prompt after a shared
prefix; with plain and oneDNN-packed linear layers, one or several query heads per KV head."""

from __future__ import annotations

import pytest
import torch

from lidr import kernels, packed_linear
from lidr.backends.decode import _growing, _positions
from lidr.backends.gemma3_body import Gemma3Body

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(kv_heads: int, packed: bool, attn: str = "sdpa", dtype: torch.dtype = torch.float32,
           intermediate: int = 128):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from lidr.models import cpu_has_fast_bf16

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                              max_position_embeddings=256, sliding_window=64,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval().requires_grad_(False)
    with torch.no_grad():  # the norms' weights start at zero: give them something to scale by
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    model.to(dtype)
    if packed and packed_linear.available():
        dtypes = (torch.float32, torch.bfloat16) if cpu_has_fast_bf16() else (torch.float32,)
        packed_linear.pack(model, rows_hint=16, skip=(model.lm_head,), backward=False, dtypes=dtypes)
    return model


def _new_cache(model):
    from transformers import DynamicCache

    return _growing(DynamicCache(config=model.config))


def _both(model, fast, ids, mask, pos, caches):
    """transformers' hidden states and the fast body's, each appending to its own cache."""
    with torch.inference_mode():
        want = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=caches[0],
                           use_cache=True).last_hidden_state
        got = fast(ids, mask, pos, caches[1])
    return want, got


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bfloat16-eager"])
def test_same_bits_as_transformers_on_every_kind_of_forward(kv_heads, packed, dtype):
    """fp32, and bf16 with lidr's C++ kernels for the small operators (where they build: a
    compiler, lidr/kernels.py) and without them."""
    model = _model(kv_heads, packed, dtype=getattr(torch, dtype.split("-")[0]))
    fast = Gemma3Body.of(model.model, fused=not dtype.endswith("eager"))
    assert fast is not None
    assert fast.fused == (dtype == "bfloat16" and kernels.load() is not None)
    gen = torch.Generator().manual_seed(1)
    ids = lambda rows, n: torch.randint(3, 97, (rows, n), generator=gen)  # noqa: E731

    def check(ids_, mask, pos, caches):
        want, got = _both(model, fast, ids_, mask, pos, caches)
        assert torch.equal(want, got)
        for a, b in zip(caches[0].layers, caches[1].layers):  # the same keys and values cached
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

    # prompts without padding (transformers skips the mask: sdpa's own causal mask)
    caches = _new_cache(model), _new_cache(model)
    mask = torch.ones(3, 9, dtype=torch.long)
    check(ids(3, 9), mask, _positions(mask), caches)
    # decoding steps without padding, then a lone row's guesses (several tokens after a cache)
    for _ in range(2):
        mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
        check(ids(3, 1), mask, _positions(mask)[:, -1:], caches)
    one = [caches[0], caches[1]]
    for c in one:
        c.batch_select_indices(torch.tensor([1]))
    mask = torch.cat([mask[1:2], mask.new_ones(1, 4)], 1)
    check(ids(1, 4), mask, _positions(mask)[:, -4:], one)

    # left-padded prompts, then decoding steps with padding
    caches = _new_cache(model), _new_cache(model)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])
    check(ids(3, 7), mask, _positions(mask), caches)
    for _ in range(3):
        mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
        check(ids(3, 1), mask, _positions(mask)[:, -1:], caches)

    # a shared prefix, then each row's rest: [pads, prefix | pads, rest] (lidr's _prefill)
    caches = _new_cache(model), _new_cache(model)
    p_mask = torch.tensor([[1, 1, 1, 1, 1]])
    check(ids(1, 5), p_mask, _positions(p_mask), caches)
    for c in caches:
        c.batch_select_indices(torch.tensor([0, 0]))
    r_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    mask = torch.cat([p_mask.expand(2, -1), r_mask], 1)
    check(ids(2, 3), mask, _positions(mask)[:, -3:], caches)


@pytest.mark.skipif(kernels.load() is None, reason="lidr's C++ kernels are not built here")
@pytest.mark.parametrize("threads", [2, 3])
def test_fused_body_matches_at_activations_eager_computes_two_ways(threads):
    """Gate values whose activation ATen computes one way in its vectorized loop and another in
    its scalar loop (gelu tanh at -5.0625), in a prompt of 40 tokens whose [40, 2048] activation
    three threads split off the vectorized loop's step: the fused body still gives transformers'
    bits (it runs the eager activation for such a step)."""
    model = _model(1, True, dtype=torch.bfloat16, intermediate=2048)
    fast = Gemma3Body.of(model.model)
    assert fast.fused
    # the same planted gates for transformers and the fast body, and large `up` values there, so
    # that the two activations' difference (-0.0 against -1.5e-7) shows in the hidden states
    for layer in model.model.layers:
        for linear, value in ((layer.mlp.gate_proj, -5.0625), (layer.mlp.up_proj, 1e6)):
            plain = linear.forward

            def planted(x, plain=plain, value=value):
                out = plain(x).clone()
                out.view(-1)[::50] = value
                return out

            linear.forward = planted
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(2))
        mask = torch.ones_like(ids)
        want, got = _both(model, fast, ids, mask, _positions(mask), (_new_cache(model), _new_cache(model)))
        assert torch.equal(want, got)
    finally:
        torch.set_num_threads(before)


def test_only_plain_gemma3_text_bodies_with_sdpa_get_one():
    from transformers import AutoModelForCausalLM, LlamaConfig

    assert Gemma3Body.of(_model(1, False).model) is not None
    assert Gemma3Body.of(_model(1, False, attn="eager").model) is None  # another attention arithmetic
    llama = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=2, num_attention_heads=4))
    assert Gemma3Body.of(llama.model) is None


def test_decoder_uses_it_only_where_the_probe_matches(tmp_path, monkeypatch):
    """The decoder checks the fast body on its probe; one that differs is not used."""
    from lidr.backends import gemma3_body
    from lidr.backends.decode import ContinuousDecoder

    from tiny import word_tokenizer

    tok = word_tokenizer("the a cat dog sat ran on mat".split())
    model = _model(1, True)
    model.config.bos_token_id = tok.bos_token_id
    dec = ContinuousDecoder(model, tok, {tok.eos_token_id}, packed_weights=False)
    assert dec.own_head and dec.fast_body is not None

    # every forward of a run (shared prefix, prompts, steps, a lone row's guesses) goes through
    # it, and the answers are those of transformers' forward
    fast, calls = dec.fast_body, []
    dec.fast_body = lambda *a: calls.append(a[0].shape) or fast(*a)
    items = [(i, p, []) for i, p in enumerate(["<s> the cat sat on the mat the cat", "<s> the cat sat on a dog",
                                                "<s> a dog ran"])]
    answers = {}
    for name in ("fast", "transformers"):
        got = {}
        dec.run(items, max_rows=3, max_new_tokens=12, repetition_penalty=1.0, on_result=got.__setitem__)
        answers[name] = {k: g.text for k, g in got.items()}
        dec.fast_body = None
    assert {len(s) for s in calls} == {2} and any(s[1] > 1 for s in calls) and any(s[1] == 1 for s in calls)
    assert len(calls) >= 12 and answers["fast"] == answers["transformers"]

    norm = gemma3_body._Norm.__call__
    monkeypatch.setattr(gemma3_body._Norm, "__call__", lambda self, x: norm(self, x) * (1 + 2 ** -20))
    from lidr.backends import decode

    monkeypatch.setattr(decode, "_CHECKED", {})  # as in a new process: its answers are per process
    assert ContinuousDecoder(model, tok, {tok.eos_token_id}, packed_weights=False).fast_body is None


@pytest.mark.skipif(kernels.load() is None, reason="lidr's C++ kernels are not built here")
def test_decoder_falls_back_from_the_kernels_to_pytorchs_operators(monkeypatch):
    """A bf16 body whose fused kernels miss the probe's bits is used without them (and a second
    decoder of that kind takes the answer without checking again); a "fused" answer does not
    stand for the body without the kernels; a body whose PyTorch operators miss them too is not
    used at all."""
    from lidr.backends import decode, gemma3_body
    from lidr.backends.decode import ContinuousDecoder

    from tiny import word_tokenizer

    tok = word_tokenizer("the a cat dog sat ran on mat".split())
    model = _model(1, True, dtype=torch.bfloat16)
    model.config.bos_token_id = tok.bos_token_id
    monkeypatch.setattr(decode, "_CHECKED", {})
    new = lambda: ContinuousDecoder(model, tok, {tok.eos_token_id}, packed_weights=False)  # noqa: E731
    assert new().fast_body.fused

    fused = gemma3_body._Layer._fused
    monkeypatch.setattr(gemma3_body._Layer, "_fused", lambda self, h, *a: fused(self, h, *a) * (1 + 2 ** -6))
    monkeypatch.setattr(decode, "_CHECKED", {})
    dec = new()
    assert dec.fast_body is not None and not dec.fast_body.fused
    checks = []
    real = ContinuousDecoder._fast_body_matches
    monkeypatch.setattr(ContinuousDecoder, "_fast_body_matches", lambda self: checks.append(1) or real(self))
    again = new()
    assert not checks and again.fast_body is not None and not again.fast_body.fused

    # a "fused" answer, then a decoder without the kernels (not built in that process): its
    # body without them is checked, not taken on that answer
    monkeypatch.setattr(gemma3_body._Layer, "_fused", fused)
    monkeypatch.setattr(decode, "_CHECKED", {})
    assert new().fast_body.fused and list(decode._CHECKED.values())[0][1] == "fused"
    checks.clear()
    monkeypatch.setattr(kernels, "load", lambda: None)
    without = new()
    assert checks and without.fast_body is not None and not without.fast_body.fused

    norm = gemma3_body._Norm.__call__
    monkeypatch.setattr(gemma3_body._Norm, "__call__", lambda self, x: norm(self, x) * (1 + 2 ** -6))
    monkeypatch.setattr(decode, "_CHECKED", {})
    assert new().fast_body is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_model_same_bits_and_used_by_the_decoder(dtype):
    """The embedded gemma-3-270m, as the decoder runs it (packed layers): two demo prompts of
    different lengths (left padding), then decoding steps, bit for bit; in bf16 (lidr run's
    dtype on a CPU with fast bf16) through lidr's C++ kernels where they build."""
    from lidr.backends.hf import HFBackend
    from lidr.models import resolve_model

    b = HFBackend(resolve_model("gemma-3-270m"), dtype=dtype, device="cpu", packed_weights=True)
    try:
        assert b.decoder.fast_body is not None
        assert b.decoder.fast_body.fused == (dtype == "bfloat16" and kernels.load() is not None)
        tok, model = b.tokenizer, b.model
        prompts = ["Question: How do I keep bread fresh?\nAnswer:", "Pregunta: ¿Qué verduras son verdes?\nRespuesta:"]
        enc = tok(prompts, add_special_tokens=True, padding=True, return_tensors="pt")
        mask = enc.attention_mask
        assert not bool(mask.all())  # left padding in one row
        caches = b.decoder.new_cache(), b.decoder.new_cache()
        want, got = _both(model, b.decoder.fast_body, enc.input_ids, mask, _positions(mask), caches)
        assert torch.equal(want, got)
        for _ in range(3):
            nxt = model.lm_head(want[:, -1:]).argmax(-1)
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
            want, got = _both(model, b.decoder.fast_body, nxt, mask, _positions(mask)[:, -1:], caches)
            assert torch.equal(want, got)
    finally:
        b.close()
