"""The GPU paths, on a CUDA device (skipped where there is none, as on CI): generation with
the continuous-batching decoder, and LoRA training that takes the engine's model and hands
M_{t+1} over to the next engine, both in fp32 and bf16 on the GPU.

On a CPU these paths are the tests in test_decode.py and test_train.py; on a GPU the decoder
runs the model's own forward (no oneDNN packing, no fp16/int8 screens of the output layer, no
fused Gemma 3 body) and training runs on Accelerate's CUDA device, with bf16 autocast."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from lidr.backends.decode import Request
from lidr.backends.hf import HFBackend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = ["<s> the cat", "<s> a big red dog ran under the tree and then", "<s> one", "<s> two three four",
           "<s> it was very happy and sad", "<s> the small blue mat", "<s> seven eight nine ten one two three",
           "<s> a big red dog ran under the tree and the cat sat on the mat"]


@pytest.fixture(scope="module", params=["gemma3", "gemma3-wide", "llama"])
def tiny_model(request, tmp_path_factory):
    from test_decode import _save_tiny  # the CPU tests' models: sliding windows, soft-capping, untied heads

    path = _save_tiny(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, path


def _generate_reference(model, tokenizer, prompt: str, max_new_tokens: int, penalty: float, eos: int | None):
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=penalty,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None,
                         top_k=None)
    return out[0, enc.input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("max_rows", [1, 3, 16])
def test_fp32_generation_on_cuda_is_transformers_generate(tiny_model, max_rows):
    """fp32 on the GPU: the same tokens as transformers' `generate` on the prompt alone, with a
    repetition penalty, an EOS that ends some rows early and rows joining a running batch."""
    from transformers import AutoModelForCausalLM

    kind, path = tiny_model
    backend = HFBackend(path, dtype="float32", device="cuda")
    decoder = backend.decoder
    assert backend.model.device.type == "cuda" and decoder.packed_layers == 0 and decoder.fast_body is None
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda").eval()
    tok = backend.tokenizer
    eos = _generate_reference(plain, tok, PROMPTS[0], 12, 1.3, None)[3]
    decoder.eos_ids = {eos}
    results = {}
    backend.run_batched([(i, p, []) for i, p in enumerate(PROMPTS)], batch_size=max_rows,
                        on_result=results.__setitem__, max_new_tokens=12, repetition_penalty=1.3)
    lengths = set()
    for i, p in enumerate(PROMPTS):
        ids = _generate_reference(plain, tok, p, 12, 1.3, eos)
        want = tok.decode([t for t in ids if t != eos], skip_special_tokens=True)
        assert (results[i].text, results[i].finish_reason) == (want, "stop" if eos in ids else "length"), p
        lengths.add(len(ids))
    assert len(lengths) > 1  # rows ended at different steps
    backend.close()


def test_bf16_generation_on_cuda_takes_the_greedy_token(tiny_model, monkeypatch):
    """bf16 on the GPU: batched and single-row products round differently, so the check is the
    greedy rule itself: every generated token is the top logit of the model's forward over the
    prompt and the tokens before it (batch 1), up to bf16's rounding, and nearly always exactly.
    Rows have their own limits, so they leave the batch at different steps."""
    kind, path = tiny_model
    backend = HFBackend(path, dtype="bfloat16", device="cuda")
    model, tok = backend.model, backend.tokenizer
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    backend.decoder.eos_ids = set()  # every row runs to its own limit
    limits = [6 + 3 * i for i in range(len(PROMPTS))]
    tokens = {}  # key -> (prompt ids, generated ids), as each row ends
    finish = backend.decoder._finish

    def record(row, reason):
        tokens[row.key] = (row.prompt_ids, list(row.new))
        return finish(row, reason)

    monkeypatch.setattr(backend.decoder, "_finish", record)
    results = {}
    backend.run_batched([Request(i, p, [], max_new_tokens=n) for i, (p, n) in enumerate(zip(PROMPTS, limits))],
                        batch_size=4, on_result=results.__setitem__, max_new_tokens=12)
    exact = total = 0
    for i, p in enumerate(PROMPTS):
        prompt_ids, new = tokens[i]
        assert prompt_ids == tok(p, add_special_tokens=False).input_ids
        assert len(new) == limits[i] and results[i].finish_reason == "length"
        assert results[i].text == tok.decode(new, skip_special_tokens=True)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt_ids + new], device="cuda")).logits[0, len(prompt_ids) - 1:-1].float()
        chosen = logits.gather(1, torch.tensor(new, device="cuda")[:, None])[:, 0]
        top = logits.max(1).values
        assert bool((chosen >= top - 0.25).all()), (p, (top - chosen).max().item())
        exact += int((chosen == top).sum())
        total += len(new)
    assert exact >= 0.9 * total
    backend.close()


WORDS = """Question : What is the capital of France ? Answer Paris is the capital . La capital de Francia es
París Die Hauptstadt von Frankreich ist the cat sat on mat and dog ran in park one two three four five six seven
eight nine ten hola mundo gracias por favor bonjour merci danke schön""".split()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_on_cuda_takes_the_engines_model_and_hands_over_the_saved_one(tmp_path, dtype):
    """The loop's GPU path for LoRA: the engine's model (on the GPU) is trained where it is, the
    loss falls, and M_{t+1} is handed to the next engine as loading the saved folder onto the
    GPU gives it (the same weights bit for bit), generating what the loaded folder generates."""
    from test_train import EXAMPLES, _cfg
    from tiny import save_tiny_gemma3

    from lidr.checkpoint import save_model
    from lidr.config import LoraConfig
    from lidr.models import copy_tokenizer, load_model
    from lidr.pipeline.train import train_dpo_nll

    # Accelerate's state is shared by the process: a TRL trainer made with use_cpu=True earlier
    # (test_train.py) would keep every later Accelerator on the CPU
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    tiny = save_tiny_gemma3(tmp_path / "tiny", WORDS, vocab_size=128, hidden_size=64, intermediate_size=128,
                            num_attention_heads=4, sliding_window=64, max_position_embeddings=256)
    save_model(load_model(tiny, dtype="float32", device="cpu"), tmp_path / "m0")  # lidr's layout, as M_t is
    copy_tokenizer(tiny, tmp_path / "m0")
    m0 = tmp_path / "m0"
    prompts = [e["prompt"] for e in EXAMPLES[:3]]
    cfg = _cfg(learning_rate=1e-2, epochs=3, batch_size=2, lora=LoraConfig(r=8, alpha=16), dtype=dtype,
               final_metrics=True)
    backend = HFBackend(m0, dtype=dtype, device="cuda")
    backend.generate(prompts, max_new_tokens=6)
    held, handed = [backend.take_model()], []
    summary = train_dpo_nll(m0, EXAMPLES, tmp_path / "m1", cfg, seed=0, log_dir=tmp_path / "log",
                            take_model=held.pop, hand_over=handed.append)
    assert summary["model_from"] == "memory" and summary["steps"] == 12
    assert summary["final"]["loss"] < summary["initial"]["loss"]
    first = json.loads((tmp_path / "log/metrics.jsonl").read_text().splitlines()[0])
    assert first["dpo_loss"] == pytest.approx(0.6931, abs=1e-2)  # π = π_ref at the first step: log 2

    assert len(handed) == 1
    model, fresh = handed[0], load_model(tmp_path / "m1", dtype=dtype, device="cuda")
    assert model.device.type == "cuda" and model.dtype == fresh.dtype == getattr(torch, dtype)
    mine, theirs = model.state_dict(), fresh.state_dict()
    assert mine.keys() == theirs.keys() and not any("lora" in k for k in mine)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    m0_weights = load_model(m0, dtype=dtype, device="cuda").state_dict()
    assert sum(not torch.equal(mine[k], m0_weights[k]) for k in mine) >= 4  # trained
    given = HFBackend(tmp_path / "m1", dtype=dtype, device="cuda", model=model)
    assert given.model is model
    loaded = HFBackend(tmp_path / "m1", dtype=dtype, device="cuda")
    assert [g.text for g in given.generate(prompts, max_new_tokens=6)] == \
           [g.text for g in loaded.generate(prompts, max_new_tokens=6)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_head_on_cuda_takes_the_frozen_head_and_matches_autograd(dtype, monkeypatch):
    """LoRA training on one GPU takes the frozen output layer's path (`frozen_head_logps`, which
    keeps no logits: tests/test_head.py): the same log-probs and LoRA gradients as autograd's
    head, up to the dtype's rounding."""
    from test_train import EXAMPLES, _logps_and_grads, _random_lora
    from tiny import save_tiny_gemma3

    import lidr.pipeline.train as train_mod
    from lidr.models import causal_lm, load_tokenizer
    from lidr.pipeline.train import ResponseLogProbs, collate, tokenize_pairs

    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_gemma3(Path(tmp) / "tiny", WORDS, vocab_size=128, hidden_size=64, intermediate_size=128,
                                num_attention_heads=4, sliding_window=64, max_position_embeddings=256)
        tok = load_tokenizer(path)
        lm, trained = _random_lora(causal_lm(path, dtype=dtype).to("cuda"))
    pairs, _ = tokenize_pairs(tok, EXAMPLES[:4], max_length=512)
    batch = {k: v.to("cuda") for k, v in collate(pairs, [0, 1, 2, 3], tok.pad_token_id).items()}
    policy = ResponseLogProbs(lm)
    used = []
    frozen = train_mod._frozen_gpu_head
    monkeypatch.setattr(train_mod, "_frozen_gpu_head", lambda h, head: used.append(frozen(h, head)) or used[-1])
    got = _logps_and_grads(policy, batch, trained)
    assert used and all(used)  # the GPU's LoRA head was taken
    monkeypatch.setattr(train_mod, "_frozen_gpu_head", lambda h, head: False)
    want = _logps_and_grads(policy, batch, trained)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(got[0], want[0], **tol)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol["rtol"],
                                   atol=tol["atol"] * w.float().abs().max().item() + 1e-6)
