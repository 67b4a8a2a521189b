"""Stage 4 (lidr.pipeline.train): the loss equals TRL's DPO+SFT loss, training runs and saves,
log-probs are taken on response tokens only, the shared-prompt forward (prompt once, its KV
cache for both responses) equals whole prompt+response sequences, long pairs are truncated.

Everything runs on tiny random Gemma 3 / Llama models and a word-level tokenizer built here (no Hub)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lidr.pipeline.train as train_mod
from lidr.config import LoraConfig, TrainingConfig
from lidr.pipeline.train import (
    Pair,
    ResponseLogProbs,
    collate,
    dpo_nll_loss,
    resolve_dtype,
    tokenize_pairs,
    train_dpo_nll,
    truncate,
)
from tiny import save_tiny_gemma3

WORDS = """Question : What is the capital of France ? Answer Paris is the capital . La capital de Francia es
París Die Hauptstadt von Frankreich ist the cat sat on mat and dog ran in park one two three four five six seven
eight nine ten hola mundo gracias por favor bonjour merci danke schön""".split()

Q = "<s>Question : {} Answer :"
# Chosen answers of different lengths, so TRL's batch-level NLL differs from the per-pair one.
EXAMPLES = [
    {"prompt": Q.format("What is the capital of France ?"), "chosen": " Paris is the capital .</s>",
     "rejected": " the cat sat on the mat</s>"},
    {"prompt": Q.format("hola mundo"), "chosen": " hola mundo gracias</s>",
     "rejected": " one two three four five six seven</s>"},
    {"prompt": Q.format("La capital de Francia ?"), "chosen": " La capital de Francia es París .</s>",
     "rejected": " dog</s>"},
    {"prompt": Q.format("Die Hauptstadt von Frankreich ?"), "chosen": " Die Hauptstadt ist Paris</s>",
     "rejected": " merci danke schön bonjour</s>"},
    {"prompt": Q.format("one two three ?"), "chosen": " four five six</s>", "rejected": " ten nine</s>"},
    {"prompt": Q.format("bonjour"), "chosen": " bonjour merci</s>", "rejected": " the park and the dog</s>"},
    {"prompt": Q.format("gracias"), "chosen": " por favor</s>", "rejected": " cat cat cat</s>"},
    {"prompt": Q.format("the dog ?"), "chosen": " the dog ran in the park .</s>", "rejected": " eight</s>"},
]
BETA, ALPHA = 0.7, 0.3  # neither is 1, so a misplaced factor shows


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Gemma 3 (with logit soft-capping) and a word-level tokenizer, saved together."""
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny"), WORDS, vocab_size=128, hidden_size=64,
                            intermediate_size=128, num_attention_heads=4, sliding_window=64,
                            max_position_embeddings=256)


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _trl_trainer(model, ref_model, tok, examples, tmp_path, peft_config=None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=["sigmoid", "sft"], loss_weights=[1.0, ALPHA],
        max_length=None, bf16=False, use_cpu=True, gradient_checkpointing=False, report_to="none",
        per_device_train_batch_size=len(examples),
    )
    return DPOTrainer(model=model, ref_model=ref_model, args=args, processing_class=tok,
                      train_dataset=Dataset.from_list(examples), peft_config=peft_config)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_loss_matches_trl(tiny, tmp_path, lora):
    """Same model, same pairs: our DPO+NLL equals TRL's loss_type=["sigmoid","sft"], loss_weights=[1, α].
    π differs from π_ref (non-zero LoRA B / a perturbed reference), so β matters."""
    from peft import LoraConfig as PeftLoraConfig

    tok, lm = _load(tiny)
    examples = EXAMPLES[:3]
    torch.manual_seed(1)
    ref_lm = None
    if not lora:  # full fine-tuning: a separate, perturbed reference model
        ref_lm = _load(tiny)[1]
        with torch.no_grad():
            for p in ref_lm.parameters():
                p.add_(0.05 * torch.randn_like(p))
    # With a peft_config TRL adds a fresh adapter and its reference is the base model (adapters
    # disabled), as ours. (A PeftModel passed in would get a frozen copy of its adapter as reference.)
    peft_config = PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None
    trainer = _trl_trainer(lm, ref_lm, tok, examples, tmp_path, peft_config)
    policy_lm = trainer.model
    if lora:
        with torch.no_grad():  # B starts at 0 (π = π_ref): make the adapter do something
            for name, p in policy_lm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    ref_ctx = policy_lm.disable_adapter if lora else None
    policy_lm.train()

    pairs, _ = tokenize_pairs(tok, examples, max_length=512)
    for i, pair in enumerate(pairs):  # TRL tokenized the text the same way
        row = trainer.train_dataset[i]
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (pair.prompt, pair.chosen, pair.rejected)

    def ours(index):
        batch = collate(pairs, index, tok.pad_token_id)
        with torch.no_grad():
            if ref_ctx is not None:
                with ref_ctx():
                    ref, _ = ResponseLogProbs(policy_lm)(**batch)
            else:
                ref, _ = ResponseLogProbs(ref_lm)(**batch)
        logps, ntok = ResponseLogProbs(policy_lm)(**batch)
        return logps, ntok, dpo_nll_loss(logps, ref, ntok, BETA, ALPHA)

    def theirs(index):
        return trainer.compute_loss(policy_lm, trainer.data_collator([trainer.train_dataset[i] for i in index]))

    # One pair per batch: both NLL definitions coincide, so the whole loss must match.
    for i in range(len(pairs)):
        assert ours([i])[2][0].item() == pytest.approx(theirs([i]).item(), rel=1e-4)

    # Several pairs of unequal length: TRL's "sft" term is the token mean over the whole batch,
    # ours the mean of per-pair token means (the method's formula). Rebuild TRL's from our log-probs.
    logps, ntok, (loss, terms) = ours([0, 1, 2])
    chosen, chosen_ntok = logps.chunk(2)[0], ntok.chunk(2)[0]
    trl_formula = terms["dpo"].mean() + ALPHA * (-chosen.sum() / chosen_ntok.sum())
    assert theirs([0, 1, 2]).item() == pytest.approx(trl_formula.item(), rel=1e-4)
    assert loss.item() == pytest.approx((terms["dpo"] + ALPHA * terms["nll"]).mean().item(), rel=1e-6)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["rewards/chosen"] == pytest.approx(terms["chosen"].mean().item(), rel=1e-4, abs=1e-6)
    assert logged["rewards/margins"] == pytest.approx((terms["chosen"] - terms["rejected"]).mean().item(), rel=1e-4)
    assert abs(logged["rewards/margins"]) > 1e-3  # not the trivial π = π_ref case

    # Gradients agree too (one pair, where the losses are the same function).
    params = [p for p in policy_lm.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours([0])[2][0], params)
    g_trl = torch.autograd.grad(theirs([0]), params)
    for a, b in zip(g_ours, g_trl):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def _full_batch(pairs, index, pad_id):
    """The full-sequence layout (lidr's collate before the shared-prompt path): 2B right-padded
    prompt+response sequences, chosen rows then rejected rows; response_mask marks the response."""
    seqs, masks = [], []
    for side in ("chosen", "rejected"):
        for i in index:
            p, y = pairs[i].prompt, getattr(pairs[i], side)
            seqs.append(p + y)
            masks.append([0] * len(p) + [1] * len(y))
    width = max(map(len, seqs))
    pad = lambda rows, v: torch.tensor([r + [v] * (width - len(r)) for r in rows])  # noqa: E731
    return {"input_ids": pad(seqs, pad_id), "attention_mask": pad([[1] * len(x) for x in seqs], 0),
            "response_mask": pad(masks, 0)}


def test_response_logps_equal_full_logits(tiny, monkeypatch):
    """Head on response positions only == full logits' log_softmax gathered at response tokens,
    for both layouts (pairs with a shared prompt, and full sequences)."""
    tok, lm = _load(tiny)
    pairs, _ = tokenize_pairs(tok, EXAMPLES[:4], max_length=512)
    batch = collate(pairs, [0, 1, 2, 3], tok.pad_token_id)
    sel = batch["prompt_attention_mask"].bool()
    assert batch["prompt_ids"][1][sel[1]].tolist() == pairs[1].prompt and not sel[1, 0]  # left-padded
    sel = batch["response_attention_mask"].bool()
    assert batch["response_ids"][0][sel[0]].tolist() == pairs[0].chosen  # right-padded
    assert batch["response_ids"][4][sel[4]].tolist() == pairs[0].rejected

    full = _full_batch(pairs, [0, 1, 2, 3], tok.pad_token_id)
    logits = lm(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits
    per_token = logits[:, :-1].log_softmax(-1).gather(-1, full["input_ids"][:, 1:, None]).squeeze(-1)
    expected = (per_token * full["response_mask"][:, 1:]).sum(1)
    counts = [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    for b in (batch, full):
        logps, ntok = ResponseLogProbs(lm)(**b)
        torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-5)
        assert ntok.tolist() == counts
    # (lidr.eval.likelihood passes full sequences positionally)
    positional, _ = ResponseLogProbs(lm)(full["input_ids"], full["attention_mask"], full["response_mask"])
    torch.testing.assert_close(positional, expected, rtol=1e-5, atol=1e-5)
    # the full-sequence fallback rebuilds exactly the old layout from the pairs layout
    rebuilt = train_mod._full_sequences(*(batch[k] for k in ("prompt_ids", "prompt_attention_mask", "response_ids",
                                                              "response_attention_mask")))
    for k, v in zip(("input_ids", "attention_mask", "response_mask"), rebuilt):
        assert torch.equal(v * full["attention_mask"], full[k] * full["attention_mask"]), k

    # The chunked, recomputed head (for long batches) gives the same values and gradients.
    logps, _ = ResponseLogProbs(lm)(**batch)
    grads = torch.autograd.grad(logps.sum(), lm.model.layers[0].mlp.up_proj.weight)
    monkeypatch.setattr(train_mod, "LOGITS_BLOCK", 3 * lm.config.vocab_size)
    chunked, _ = ResponseLogProbs(lm)(**batch)
    torch.testing.assert_close(chunked, logps, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(chunked.sum(), lm.model.layers[0].mlp.up_proj.weight), grads)


def _random_lora(lm):
    """PEFT LoRA on every linear layer, with B drawn at random (B = 0, as PEFT starts, would make
    every gradient but B's zero); and the parameters it trains."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    lm = get_peft_model(lm, PeftLora(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    torch.manual_seed(1)
    for n, p in lm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    return lm, [p for p in lm.parameters() if p.requires_grad]


def _logps_and_grads(policy, batch, trained):
    """The policy's summed log-probs and their gradient for `trained` under an arbitrary upstream
    gradient (a different weight per sequence)."""
    logps, _ = policy(**batch)
    weights = torch.linspace(-1, 1, len(logps), device=logps.device)
    return logps, torch.autograd.grad((logps * weights).sum(), trained)


@pytest.mark.parametrize("packed", [True, False])  # the one-row layout / the shared-prompt layout
def test_every_output_layer_path_gives_the_same_values_and_lora_gradients(tiny, monkeypatch, packed):
    """The three ways the response log-probs reach the output layer in LoRA training: the CPU's
    blockwise head (`TokenLogProbs`), autograd's plain head (FSDP, several processes), and the
    frozen head of a GPU in one process (`frozen_head_logps`: no logits kept for the backward).
    The last two run here on the CPU by choice of the switches; Gemma's soft-capping is on."""
    tok, lm = _load(tiny)
    lm, trained = _random_lora(lm)
    pairs, _ = tokenize_pairs(tok, EXAMPLES[:4], max_length=512)
    batch = collate(pairs, [0, 1, 2, 3], tok.pad_token_id)
    policy = ResponseLogProbs(lm)
    policy.pack_batches = packed

    def run(blockwise: bool, frozen: bool):
        monkeypatch.setattr(train_mod, "_blockwise_head", lambda h, head: blockwise)
        monkeypatch.setattr(train_mod, "_frozen_gpu_head", lambda h, head: frozen)
        return _logps_and_grads(policy, batch, trained)

    blockwise, plain, frozen = run(True, False), run(False, False), run(False, True)
    assert lm.get_output_embeddings().weight.grad is None
    for values, grads in (blockwise, frozen):
        torch.testing.assert_close(values, plain[0], rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, plain[1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_lora_training_through_the_gpus_head_path_follows_the_same_steps(tiny, tmp_path, monkeypatch):
    """A whole LoRA training through the output-layer path a GPU takes in one process
    (`frozen_head_logps`, chosen here on the CPU by its switches): the reference pass, every
    step's loss and the final metrics are those of the CPU's blockwise head."""
    cfg = _cfg(learning_rate=1e-2, epochs=2, batch_size=2, lora=LoraConfig(r=4, alpha=8), final_metrics=True)
    runs = {}
    for path in ("cpu", "gpu"):
        if path == "gpu":
            monkeypatch.setattr(train_mod, "_blockwise_head", lambda h, head: False)
            monkeypatch.setattr(train_mod, "_frozen_gpu_head", lambda h, head: not head.weight.requires_grad)
        summary = train_dpo_nll(tiny, EXAMPLES, tmp_path / path, cfg, seed=0, log_dir=tmp_path / f"log-{path}")
        lines = [json.loads(x) for x in (tmp_path / f"log-{path}/metrics.jsonl").read_text().splitlines()]
        runs[path] = summary, [line["loss"] for line in lines]
    (cpu, cpu_losses), (gpu, gpu_losses) = runs["cpu"], runs["gpu"]
    assert len(cpu_losses) == 8 and gpu_losses == pytest.approx(cpu_losses, rel=1e-4)
    assert gpu["initial"]["loss"] == pytest.approx(cpu["initial"]["loss"], rel=1e-5)
    assert gpu["final"]["loss"] == pytest.approx(cpu["final"]["loss"], rel=1e-4)
    assert gpu["final"]["loss"] < gpu["initial"]["loss"]


def test_training_forwards_leave_cudnn_attention_out_on_their_device(tiny, monkeypatch, recorded_attention):
    """Every forward of the trainer's module (training steps and the scoring passes, each batch
    a new shape) runs inside `gpu_attention` for the device of its batch: on a GPU, no cuDNN
    attention, whose per-shape plans made LoRA training 3.5x slower in a new process on an H200
    (bench/README.md, round 22). The flags themselves: test_models.py."""
    tok, lm = _load(tiny)
    pairs, _ = tokenize_pairs(tok, EXAMPLES[:4], max_length=512)
    batch = collate(pairs, [0, 1, 2, 3], tok.pad_token_id)
    full = _full_batch(pairs, [0, 1], tok.pad_token_id)
    bodies = []
    monkeypatch.setattr(train_mod, "gpu_attention", recorded_attention)
    lm.model.register_forward_pre_hook(lambda *_: bodies.append(recorded_attention.inside))
    policy = ResponseLogProbs(lm)
    policy(**batch)
    policy(**full)
    policy(**full, prefix_ids=full["input_ids"][0, :2])
    assert recorded_attention.devices == [torch.device("cpu")] * 3 and len(bodies) >= 3 and all(bodies)


def test_training_backward_runs_inside_the_attention_context_for_checkpointed_layers(tiny, tmp_path, monkeypatch,
                                                                                     recorded_attention):
    """With gradient checkpointing the layers run again during the backward: that runs inside
    `gpu_attention` too, or a GPU would recompute them with another attention kernel than the
    forward's and the checkpoint would refuse them ("Recomputed values ... have different
    metadata"). Every attention call, first or recomputed, is inside it."""
    calls = []
    monkeypatch.setattr(train_mod, "gpu_attention", recorded_attention)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(recorded_attention.inside) or sdpa(*a, **k))
    train_dpo_nll(tiny, EXAMPLES[:4], tmp_path / "m1", _cfg(gradient_checkpointing=True, batch_size=2,
                                                            lora=LoraConfig(r=4, alpha=8)),
                  seed=0, log_dir=tmp_path / "log")
    # reference pass 2 layers, 2 steps x 2 layers, each recomputed once in the backward
    assert len(calls) == 2 + 2 * 2 * 2 and all(calls)


def _tiny_lm(kind: str):
    """A random tiny causal LM from a config, fp32: Gemma 3 (one sliding and one full-attention
    layer, logit soft-capping) with a sliding window of 4, far shorter than the sequences
    ("gemma3"), or of 64, longer than them ("gemma3-w64"); or Llama, with sdpa or eager attention."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    torch.manual_seed(0)
    if kind.startswith("gemma3"):
        config = Gemma3TextConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
            sliding_window=64 if kind == "gemma3-w64" else 4,
            layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=30.0, pad_token_id=0)
    else:
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=0)
    attn = "eager" if kind.endswith("eager") else "sdpa"
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).float()


class _CountCalls:
    """Counts the calls of a module's forward (the body: 2 per batch on the shared-prompt path, 1 on the full one)."""

    def __init__(self, module):
        self.n = 0
        module.register_forward_pre_hook(lambda *_: setattr(self, "n", self.n + 1))


@pytest.mark.parametrize("kind", ["gemma3", "gemma3-w64", "llama", "llama-eager"])
def test_shared_prompt_matches_full_sequences(tiny, kind, monkeypatch):
    """The shared-prompt paths give the full-sequence path's log-probs, token counts, and LoRA
    gradients of a DPO+NLL step, on a batch of pairs with different prompt and response lengths
    (padding on both sides), two of them with the same prompt: `_shared` (prompts once with a KV
    cache, the responses as padded rows on it) and `_packed` (the batch in one row: the prompts
    as a prefix tree, each shared token once, then the responses). Packing is used where one mask
    serves every layer: not with a sliding window shorter than a pair."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    tok = _load(tiny)[0]
    pairs, _ = tokenize_pairs(tok, EXAMPLES, max_length=512)
    pairs.append(train_mod.Pair(pairs[2].prompt, pairs[5].chosen, pairs[6].rejected))  # pair 2's prompt again
    index = [0, 1, 2, 7, 5, 8]
    assert len({len(pairs[i].prompt) for i in index}) > 2 and min(len(pairs[i].prompt) for i in index) > 4
    prompts = [pairs[i].prompt for i in index]
    tree_nodes = len({tuple(q[:k + 1]) for q in prompts for k in range(len(q))})
    assert tree_nodes < sum(map(len, prompts)) - len(prompts[2])  # more shared than the repeated prompt
    batch = collate(pairs, index, tok.pad_token_id)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.1, 0.05])
    lm = get_peft_model(_tiny_lm(kind), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B starts at 0 (π = π_ref): make the adapters do something
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lora = [p for p in lm.parameters() if p.requires_grad]
    calls = _CountCalls(lm.get_base_model().model)
    widths = []  # the packed row's length at each body call
    lm.get_base_model().model.register_forward_pre_hook(
        lambda _, args, kw: widths.append((kw.get("input_ids") if "input_ids" in kw else args[0]).shape), with_kwargs=True)
    packed_calls = []
    packed = ResponseLogProbs._packed
    monkeypatch.setattr(ResponseLogProbs, "_packed", lambda self, *a: packed_calls.append(1) or packed(self, *a))

    def step(shared: bool, pack: bool = False):
        policy = ResponseLogProbs(lm)
        policy.shared_prompt, policy.pack_batches = shared, pack
        with torch.no_grad(), lm.disable_adapter():
            ref, _ = policy(**batch)
        logps, ntok = policy(**batch)
        loss, _ = dpo_nll_loss(logps, ref, ntok, BETA, ALPHA, weights=weights)
        return ref, logps, ntok, torch.autograd.grad(loss, lora)

    n0 = calls.n
    ref_f, logps_f, ntok_f, grads_f = step(False)
    assert calls.n - n0 == 2
    assert ntok_f.tolist() == [len(pairs[i].chosen) for i in index] + [len(pairs[i].rejected) for i in index]
    assert (logps_f - ref_f).abs().max() > 1e-2  # the adapters matter
    for pack in (False, True):  # (the packed results last: checked against each pair alone below)
        n0 = calls.n
        widths.clear()
        ref_s, logps_s, ntok_s, grads_s = step(True, pack)
        used = pack and kind != "gemma3"
        assert len(packed_calls) == (2 if used else 0)
        assert calls.n - n0 == (2 if used else 4)  # reference and policy: one row each, or prompts then responses
        if used:  # the tree's nodes, then every response token
            assert widths == [(1, tree_nodes + int(ntok_f.sum()))] * 2
        packed_calls.clear()
        torch.testing.assert_close(ref_s, ref_f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logps_s, logps_f, rtol=1e-5, atol=1e-5)
        assert ntok_s.tolist() == ntok_f.tolist()
        for a, b in zip(grads_s, grads_f):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert all(g.abs().sum() > 0 for g in grads_s)  # the gradient reaches the prompt's layers too

    # each pair alone, unpadded, through the model's own full forward
    with torch.no_grad():
        for k, i in enumerate(index):
            for side, row in (("chosen", k), ("rejected", len(index) + k)):
                p, y = pairs[i].prompt, getattr(pairs[i], side)
                seq = torch.tensor([p + y])
                logits = lm(input_ids=seq).logits[0, len(p) - 1:-1].float().log_softmax(-1)
                want = logits.gather(-1, seq[0, len(p):, None]).sum()
                assert logps_s[row].item() == pytest.approx(want.item(), abs=1e-4)


def test_shared_prompt_fallbacks(tiny):
    """The full-sequence path where the cache cannot be used: gradient checkpointing on (transformers
    drops the cache there), or a body without a cache argument. Same values either way."""
    tok = _load(tiny)[0]
    pairs, _ = tokenize_pairs(tok, EXAMPLES[:3], max_length=512)
    batch = collate(pairs, [0, 1, 2], tok.pad_token_id)
    lm = _tiny_lm("gemma3")
    calls = _CountCalls(lm.model)
    shared, _ = ResponseLogProbs(lm)(**batch)
    assert calls.n == 2
    (getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable)({"use_reentrant": False})
    lm.train()
    policy = ResponseLogProbs(lm)
    logps, _ = policy(**batch)
    assert calls.n == 3  # one full-sequence pass
    torch.testing.assert_close(logps, shared, rtol=1e-5, atol=1e-5)
    logps.sum().backward()  # and it trains

    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    class OldCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None):
            return input_ids

    assert train_mod._cache_argument(lm.model) == "cache"
    assert train_mod._cache_argument(OldCache()) == "past_key_values"
    assert train_mod._cache_argument(NoCache()) is None


@pytest.mark.parametrize("kind", ["gemma3", "gemma3-w64", "llama", "llama-eager"])
def test_sequences_after_a_shared_prefix_match_full_sequences(kind):
    """Sequences that all continue one prefix (the reference likelihood's few-shot examples):
    the prefix runs once, its cache read by every row, and each row's response log-probs and
    token counts equal those of the full sequences (prefix + row). Where a sliding window is
    shorter than prefix + row (gemma3's 4), or a row would start with a response token, it
    falls back to the full sequences."""
    lm = _tiny_lm(kind)
    calls = _CountCalls(lm.model)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(1, 128, (9,), generator=g)
    # right-padded rows: 2-4 prompt tokens, then 3-6 response tokens
    rows = [(torch.randint(1, 128, (a,), generator=g).tolist(), torch.randint(1, 128, (b,), generator=g).tolist())
            for a, b in ((2, 6), (4, 3), (3, 5))]
    width = max(len(a) + len(b) for a, b in rows)
    pad = lambda seqs: torch.tensor([q + [0] * (width - len(q)) for q in seqs])  # noqa: E731
    ids = pad([a + b for a, b in rows])
    mask = pad([[1] * (len(a) + len(b)) for a, b in rows])
    resp = pad([[0] * len(a) + [1] * len(b) for a, b in rows])
    scorer = ResponseLogProbs(lm)
    with torch.no_grad():
        got, n = scorer(ids, mask, resp, prefix_ids=prefix)
        prefix_calls = calls.n
        ones = torch.ones(3, 9, dtype=torch.long)
        want, n_want = scorer(torch.cat([prefix.expand(3, -1), ids], 1), torch.cat([ones, mask], 1),
                              torch.cat([ones * 0, resp], 1))
        # a response token at a row's start: predicted from the prefix, so the full path
        starts = resp.clone()
        starts[0, 1] = 1
        edge, _ = scorer(ids, mask, starts, prefix_ids=prefix)
        edge_want, _ = scorer(torch.cat([prefix.expand(3, -1), ids], 1), torch.cat([ones, mask], 1),
                              torch.cat([ones * 0, starts], 1))
    assert prefix_calls == (1 if kind == "gemma3" else 2)  # prefix, then the rows (or one full pass)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert n.tolist() == n_want.tolist() == [6, 3, 5]
    torch.testing.assert_close(edge, edge_want, rtol=1e-5, atol=1e-5)


def _cfg(**kw):
    base = dict(beta=BETA, nll_weight=ALPHA, dtype="float32", max_length=128)
    return TrainingConfig(**{**base, **kw})


def test_train_lora_end_to_end(tiny, tmp_path, monkeypatch):
    calls, planned = [], []
    plan = train_mod.plan_batches
    monkeypatch.setattr(train_mod, "plan_batches", lambda keys, *a: planned.append(keys) or plan(keys, *a))
    cfg = _cfg(learning_rate=1e-3, epochs=5, batch_size=2, gradient_accumulation=2, lora=LoraConfig(r=8, alpha=16),
               final_metrics=True)
    summary = train_dpo_nll(tiny, EXAMPLES, tmp_path / "model", cfg, seed=0, log_dir=tmp_path / "log",
                            progress=lambda s, n, m: calls.append((s, n)))

    lines = [json.loads(x) for x in (tmp_path / "log/metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == len(lines) == 10  # 8 pairs / (2 x 2) per step x 5 epochs
    assert calls == [(s, 10) for s in range(1, 11)]
    fields = {"step", "epoch", "lr", "loss", "dpo_loss", "nll_loss", "reward_chosen", "reward_rejected",
              "reward_margin", "reward_accuracy", "seconds"}
    assert all(fields <= set(line) for line in lines)
    assert lines[0]["dpo_loss"] == pytest.approx(math.log(2), rel=1e-5)  # π = π_ref at the first step
    assert json.loads((tmp_path / "log/summary.json").read_text()) == summary
    assert summary["final"]["loss"] < summary["initial"]["loss"]
    assert summary["final_reward_accuracy"] > 0.5 and summary["final_reward_margin"] > 0
    assert summary["final_pass_seconds"] >= 0
    # tokens the body processed: each prompt once, both responses, every epoch
    tok, _ = _load(tiny)
    pairs, _ = tokenize_pairs(tok, EXAMPLES, max_length=128)
    assert summary["tokens"] == 5 * sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    # the model packs its batches (sdpa): pairs are batched by prompt, so that shared prefixes run once
    assert planned == [[p.prompt for p in pairs]] * 5

    # The saved model is a plain causal LM (LoRA merged) and scores the pairs as the trained policy did.
    tok, base = _load(tiny)
    _, trained = _load(tmp_path / "model")
    assert not any("lora" in name for name, _ in trained.named_parameters())
    pairs, _ = tokenize_pairs(tok, EXAMPLES, max_length=128)
    batch = collate(pairs, list(range(len(pairs))), tok.pad_token_id)
    with torch.no_grad():
        ref, _ = ResponseLogProbs(base)(**batch)
        logps, ntok = ResponseLogProbs(trained)(**batch)
    loss, _ = dpo_nll_loss(logps, ref, ntok, BETA, ALPHA)
    assert loss.item() == pytest.approx(summary["final"]["loss"], rel=1e-4)
    # ... with the base model's tokenizer files, copied as they were, which load the same tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "model" / name).read_bytes() == (tiny / name).read_bytes()
    saved, _ = _load(tmp_path / "model")
    text = " ".join(WORDS[:7])
    assert saved(text).input_ids == tok(text).input_ids and saved.pad_token_id == tok.pad_token_id


def test_training_takes_the_generation_engines_model(tiny, tmp_path, monkeypatch):
    """The train stage takes M_t from the generation engine (`HFBackend.take_model`: the layers the
    decoder packed for the forward stay packed) instead of loading its files again: the same steps
    and saved weights as from the files, and the model is freed when training returns."""
    import weakref

    from lidr.backends.hf import HFBackend
    from lidr.pipeline.launch import takes_model

    cfg = _cfg(learning_rate=1e-3, epochs=2, batch_size=2, lora=LoraConfig(r=8, alpha=16))
    loaded = train_dpo_nll(tiny, EXAMPLES, tmp_path / "a", cfg, seed=0, log_dir=tmp_path / "log-a")

    backend = HFBackend(tiny, dtype="float32", device="cpu")
    backend.generate([EXAMPLES[0]["prompt"], EXAMPLES[1]["prompt"]], max_new_tokens=3)
    packed = backend.decoder.packed_layers
    held = [backend.take_model()]
    assert not hasattr(backend, "model") and not hasattr(backend, "decoder")
    assert takes_model(cfg, held[0]) and not takes_model(_cfg(lora=None), held[0])
    assert not takes_model(_cfg(lora=LoraConfig(), dtype="bfloat16"), held[0])
    if packed:  # x86-64 with oneDNN: the decoder packed the body's layers for the forward
        assert sum("_lidr_packed" in vars(m) for m in held[0].modules()) > 0
    alive = weakref.ref(held[0])
    from transformers import AutoModelForCausalLM

    def no_load(*args, **kwargs):
        raise AssertionError("the model was taken: nothing is loaded from the files")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_load)
    taken = train_dpo_nll(tiny, EXAMPLES, tmp_path / "b", cfg, seed=0, log_dir=tmp_path / "log-b",
                          take_model=held.pop)
    assert (loaded["model_from"], taken["model_from"]) == ("files", "memory")
    assert loaded["packed_linears"] == taken["packed_linears"]
    steps = [[{k: v for k, v in json.loads(x).items() if k not in ("seconds", "elapsed")}
              for x in (tmp_path / log / "metrics.jsonl").read_text().splitlines()] for log in ("log-a", "log-b")]
    assert steps[0] == steps[1] and len(steps[0]) == 8
    for file in (tmp_path / "a").glob("*.safetensors"):
        assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes()
    assert alive() is None  # training held the only reference and let it go
    monkeypatch.undo()

    with pytest.raises(ValueError, match="LoRA training in one process"):
        train_dpo_nll(tiny, EXAMPLES, tmp_path / "c", _cfg(lora=None), seed=0, log_dir=tmp_path / "log-c",
                      take_model=lambda: HFBackend(tiny, dtype="float32", device="cpu").take_model())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_hands_over_the_model_it_saved(tiny, tmp_path, dtype):
    """A model taken from the engine and trained with LoRA is handed over (`hand_over`) as
    loading the folder training wrote gives it: the same weights bit for bit (fp32 files; bf16
    rounds them as loading does), config, class, eval mode, no adapters left, the output
    layer's hook, and the same generations. Not handed over when the model came from the files
    or with gradient checkpointing."""
    from lidr.backends.hf import HFBackend
    from lidr.checkpoint import save_model
    from lidr.models import copy_tokenizer, load_model

    # M_t as lidr writes it (the embedding in a file of its own), so that training adds the deltas to it
    save_model(load_model(tiny, dtype="float32", device="cpu"), tmp_path / "m0")
    copy_tokenizer(tiny, tmp_path / "m0")
    tiny = tmp_path / "m0"
    prompts = [EXAMPLES[0]["prompt"], EXAMPLES[1]["prompt"], EXAMPLES[2]["prompt"]]
    cfg = _cfg(learning_rate=1e-2, epochs=2, batch_size=2, lora=LoraConfig(r=8, alpha=16), dtype=dtype)
    backend = HFBackend(tiny, dtype=dtype, device="cpu")
    backend.generate(prompts, max_new_tokens=6)  # (the decoder packs its layers)
    held, handed = [backend.take_model()], []
    train_dpo_nll(tiny, EXAMPLES, tmp_path / "m1", cfg, seed=0, log_dir=tmp_path / "log",
                  take_model=held.pop, hand_over=handed.append)
    assert len(handed) == 1
    model, fresh = handed[0], load_model(tmp_path / "m1", dtype=dtype, device="cpu")
    assert not any("_lidr_packed" in vars(m) for m in model.modules())  # no packed copy of M_t's weights left
    assert type(model) is type(fresh) and model.dtype == fresh.dtype
    mine, theirs = model.state_dict(), fresh.state_dict()
    assert mine.keys() == theirs.keys() and not any("lora" in k for k in mine)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not any(m.training for m in model.modules())
    config = lambda m: {k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert config(model) == config(fresh)
    head_hooks = lambda m: [h.__name__ for h in m.get_output_embeddings()._forward_pre_hooks.values()]  # noqa: E731
    assert head_hooks(model) == head_hooks(fresh) != []
    after = [g.text for g in HFBackend(tmp_path / "m1", dtype=dtype, device="cpu").generate(prompts, max_new_tokens=6)]
    given = HFBackend(tmp_path / "m1", dtype=dtype, device="cpu", model=model)
    assert given.model is model
    assert [g.text for g in given.generate(prompts, max_new_tokens=6)] == after
    ids = torch.tensor([given.tokenizer(prompts[0]).input_ids])
    with torch.inference_mode():  # the forward as the decoder packed it, against the files' model packed alike
        other = HFBackend(tmp_path / "m1", dtype=dtype, device="cpu")
        assert given.decoder.packed_layers == other.decoder.packed_layers
        assert torch.equal(given.model(ids).logits, other.model(ids).logits)
    m0 = load_model(tiny, dtype=dtype, device="cpu").state_dict()
    assert sum(not torch.equal(mine[k], m0[k]) for k in mine) >= 4  # trained: the LoRA layers' weights changed

    handed.clear()  # from the files, and with gradient checkpointing: nothing to hand over
    train_dpo_nll(tiny, EXAMPLES, tmp_path / "m2", cfg, seed=0, log_dir=tmp_path / "log2", hand_over=handed.append)
    held = [HFBackend(tiny, dtype=dtype, device="cpu").take_model()]
    train_dpo_nll(tiny, EXAMPLES, tmp_path / "m3", _cfg(**{**cfg.model_dump(), "gradient_checkpointing": True}),
                  seed=0, log_dir=tmp_path / "log3", take_model=held.pop, hand_over=handed.append)
    assert handed == []


def test_a_tokenizer_without_its_json_is_not_copied(tiny, tmp_path):
    from lidr.models import copy_tokenizer

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "tokenizer_config.json").write_bytes((tiny / "tokenizer_config.json").read_bytes())
    assert not copy_tokenizer(partial, tmp_path / "out") and not (tmp_path / "out").exists()
    assert copy_tokenizer(tiny, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in tiny.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "chat_template")))


def test_train_full_finetuning_one_step_replaces_out_dir(tiny, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    cfg = _cfg(learning_rate=1e-3, batch_size=4, warmup_ratio=0.0, lora=None)
    summary = train_dpo_nll(tiny, EXAMPLES[:4], out, cfg, seed=0, log_dir=tmp_path / "log")
    assert summary["steps"] == 1 and not summary["lora"]
    # no final pass by default (training.final_metrics)
    assert summary["final"] is None and summary["final_pass_seconds"] is None
    assert summary["final_reward_accuracy"] is None and summary["final_reward_margin"] is None
    assert not (out / "stale.txt").exists() and (out / "model.safetensors.index.json").exists()
    # full fine-tuning trains the embedding too: written, not linked from the base model
    assert summary["save_linked"] == [] and summary["save_written"] == ["model.embed_tokens.weight"]
    assert not list(tmp_path.glob(".model.*"))  # no temporary folders left behind
    _, base = _load(tiny)
    _, trained = _load(out)
    assert trained.dtype == torch.float32
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, trained.model.layers[0].mlp.up_proj.weight)


def test_a_one_step_run_trains(tiny, tmp_path):
    """Warm-up never takes a run's only step: transformers' schedule gives its first step lr 0,
    so a one-step run (a small iteration: 2 pairs at batch 2) would save M_t unchanged."""
    cfg = _cfg(learning_rate=1e-3, batch_size=4, warmup_ratio=0.1, lora=None)
    summary = train_dpo_nll(tiny, EXAMPLES[:4], tmp_path / "model", cfg, seed=0, log_dir=tmp_path / "log")
    assert summary["steps"] == 1 and summary["first_step"]["lr"] == pytest.approx(1e-3)
    _, base = _load(tiny)
    _, trained = _load(tmp_path / "model")
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, trained.model.layers[0].mlp.up_proj.weight)
    # with more steps the warm-up is as before: ceil(10 % of 2) = 1 step at lr 0, then the cosine
    cfg = _cfg(learning_rate=1e-3, batch_size=2, warmup_ratio=0.1, lora=None)
    train_dpo_nll(tiny, EXAMPLES[:4], tmp_path / "model2", cfg, seed=0, log_dir=tmp_path / "log2")
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "log2/metrics.jsonl").read_text().splitlines()]
    assert lrs == [0.0, pytest.approx(1e-3)]


@pytest.mark.parametrize("layout", ["lidr", "one file"])
def test_bf16_lora_merges_into_the_stored_fp32_weights(tiny, tmp_path, monkeypatch, layout):
    """LoRA trained over a bf16 copy of fp32 files: M_{t+1} is saved in fp32, each weight the
    file's plus the learned delta B A (alpha / r) added in fp32 (merged into the bf16 copy
    instead, a small delta mostly rounds away). From a folder in lidr's layout the files are
    written again with the deltas (`save_with_deltas`) and the embedding, untouched, is linked;
    from one model.safetensors, the base is loaded again in fp32 (`merge_lora_into_stored`) and
    the embedding written to a file of its own."""
    import os

    from safetensors.torch import load_file

    from lidr.checkpoint import save_model

    if layout == "lidr":
        _, m0 = _load(tiny)
        base = tmp_path / "m0"  # M0 as lidr saves models: the embedding in a file of its own
        save_model(m0, base)
        for f in tiny.glob("tokenizer*"):
            (base / f.name).write_bytes(f.read_bytes())
    else:
        base = tiny
    factors = {}
    deltas_of = train_mod._lora_deltas

    def recorded(model, *a):
        for name, m in train_mod._lora_layers(model):
            factors[name.removeprefix("base_model.model.") + ".weight"] = (
                m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(),
                m.scaling["default"])
        return deltas_of(model, *a)

    monkeypatch.setattr(train_mod, "_lora_deltas", recorded)
    cfg = _cfg(dtype="bfloat16", batch_size=4, learning_rate=1e-3, lora=LoraConfig(r=2, alpha=4), final_metrics=True)
    summary = train_dpo_nll(base, EXAMPLES[:4], tmp_path / "model", cfg, seed=0, log_dir=tmp_path / "log")
    assert summary["dtype"] == "bfloat16" and summary["saved_dtype"] == "float32"
    assert math.isfinite(summary["final"]["loss"])
    embed = "model.embed_tokens.weight"
    if layout == "lidr":
        assert summary["save_linked"] == [embed] and summary["save_written"] == []
        assert os.path.samefile(tmp_path / "model" / "model-embed_tokens.safetensors",
                                base / "model-embed_tokens.safetensors")
        before = load_file(base / "model-body.safetensors")
    else:
        assert summary["save_linked"] == [] and summary["save_written"] == [embed]
        before = load_file(base / "model.safetensors")
        assert torch.equal(load_file(tmp_path / "model" / "model-embed_tokens.safetensors")[embed], before.pop(embed))
    after = load_file(tmp_path / "model" / "model-body.safetensors")
    assert {v.dtype for v in after.values()} == {torch.float32} and after.keys() == before.keys()
    assert factors and set(factors) < set(after)
    for name, w in after.items():
        if name not in factors:
            assert torch.equal(w, before[name]), name  # not trained: the file's bits
            continue
        a, b, scale = factors[name]
        delta = (b @ a) * scale
        assert delta.abs().max() > 0
        assert torch.allclose(w, before[name] + delta, rtol=0, atol=1e-6), name
    # what the bf16 merge would have saved is much further off
    name = next(iter(factors))
    a, b, scale = factors[name]
    bf16 = (before[name].bfloat16() + ((b @ a) * scale).bfloat16()).float()
    assert not torch.allclose(bf16, before[name] + (b @ a) * scale, rtol=0, atol=1e-6)


def test_truncate_rules():
    bos = 1
    long_prompt = [bos] + list(range(10, 40))  # 31 tokens
    # prompt cut from the left (BOS kept) until the longest response fits
    p = truncate(Pair(long_prompt, [5] * 5, [6] * 8), 16, bos)
    assert p[0].prompt == [bos] + long_prompt[-7:] and len(p[0].rejected) == 8 and p[1:] == (True, False)
    # the prompt keeps half the budget; the responses lose their ends
    p = truncate(Pair(long_prompt, list(range(30)), [6] * 3), 16, bos)
    assert len(p[0].prompt) == 8 and p[0].chosen == list(range(8)) and p[0].rejected == [6] * 3
    assert p[1:] == (True, True)
    # a short prompt is kept whole
    p = truncate(Pair([bos, 2, 3], list(range(40)), [6]), 16, bos)
    assert p[0].prompt == [bos, 2, 3] and p[0].chosen == list(range(13)) and p[1:] == (False, True)
    # nothing to do
    pair = Pair([bos, 2], [3], [4])
    assert truncate(pair, 16, bos) == (pair, False, False)


def test_train_truncates_long_pair(tiny, tmp_path):
    long = {"prompt": Q.format(" ".join(WORDS[:30])), "chosen": " " + " ".join(WORDS[30:50]) + "</s>",
            "rejected": " dog</s>"}
    cfg = _cfg(max_length=16, batch_size=2, lora=LoraConfig(r=2, alpha=4))
    summary = train_dpo_nll(tiny, [long, EXAMPLES[4]], tmp_path / "model", cfg, seed=0, log_dir=tmp_path / "log")
    assert summary["truncated_pairs"] == 1 and summary["truncated_prompts"] == 1 and summary["truncated_responses"] == 1
    assert summary["steps"] == 1 and math.isfinite(summary["last_step"]["loss"]) and summary["final"] is None


def test_empty_examples_raise(tiny, tmp_path):
    with pytest.raises(ValueError, match="no preference pairs"):
        train_dpo_nll(tiny, [], tmp_path / "model", _cfg(), seed=0, log_dir=tmp_path / "log")


def test_resolve_dtype(monkeypatch):
    """"auto" trains in bf16 only where the hardware computes it (no CUDA here: the CPU's flags)."""
    import lidr.models

    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for fast, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(lidr.models, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert resolve_dtype("auto") == want


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_lora_deltas_are_peft_deltas_as_low_rank_factors(fan_in_fan_out):
    """The save's LoRA changes are PEFT's own `get_delta_weight`, summed over the active
    adapters: with two adapters at different scales, and for a base layer that stores its
    weight as [in, out] (GPT-2's Conv1D, fan_in_fan_out)."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if fan_in_fan_out:
        base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
        targets = ["c_attn", "c_fc"]
    else:
        base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))
        targets = ["q_proj", "down_proj"]
    model = get_peft_model(base, PeftLora(r=2, lora_alpha=4, target_modules=targets, fan_in_fan_out=fan_in_fan_out),
                           adapter_name="a")
    model.add_adapter("b", PeftLora(r=3, lora_alpha=9, target_modules=targets, fan_in_fan_out=fan_in_fan_out))
    model.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # PEFT starts B at zero: a change to compare
    deltas = train_mod._lora_deltas(model)
    layers = train_mod._lora_layers(model)
    assert len(deltas) == len(layers) > 0
    for name, m in layers:
        d = deltas[name.removeprefix("base_model.model.") + ".weight"]
        want = m.get_delta_weight("a") + m.get_delta_weight("b")
        assert d.shape == tuple(m.get_base_layer().weight.shape) == tuple(want.shape)
        assert want.abs().max() > 0 and torch.allclose(d.up @ d.down, want, rtol=1e-5, atol=1e-6), name
