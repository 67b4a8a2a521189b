"""lidr/packed_linear.py: frozen CPU linear layers through oneDNN with prepacked weights give the
values and input gradients of `F.linear`, in a LoRA model's DPO step and packed for inference
only, and come undone."""

import copy

import pytest
import torch
from torch import nn

from lidr import packed_linear

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="packed layers run only on x86-64 with oneDNN linear operators")


def test_frozen_layers_are_packed_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96, bias=False), nn.GELU(), nn.Linear(96, 32), nn.Linear(32, 8))
    for p in model[:3].parameters():
        p.requires_grad_(False)  # the last layer trains: not packed
    x = torch.randn(3, 5, 64, requires_grad=True)
    want = model(x)
    want_grads = torch.autograd.grad(want.square().sum(), [x, model[3].weight])

    assert packed_linear.pack(model, skip=(model[2],)) == 1  # model[2] skipped, model[3] trains
    assert "forward" in vars(model[0]) and "forward" not in vars(model[2]) and "forward" not in vars(model[3])
    with torch.profiler.profile() as prof:
        got = model(x)
    assert any(e.name == "mkldnn::_linear_pointwise" for e in prof.events())  # oneDNN ran, not F.linear
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got.square().sum(), [x, model[3].weight]), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():  # other row counts than the packing hint, and no autograd
        torch.testing.assert_close(model(x[0, :1]), want[0, :1], rtol=1e-5, atol=1e-5)

    packed_linear.unpack(model)
    assert not any("forward" in vars(m) for m in model)
    assert packed_linear.pack(nn.Sequential(nn.Linear(4, 4))) == 0  # trainable: nothing to pack


def test_packed_for_inference_only_keeps_one_copy_and_falls_back_for_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32, bias=False)).requires_grad_(False)
    x = torch.randn(7, 64)
    want = model(x)
    plain = copy.deepcopy(model)
    assert packed_linear.pack(model, rows_hint=16, backward=False) == 2
    with torch.inference_mode(), torch.profiler.profile() as prof:
        got = model(x)
    assert sum(e.name == "mkldnn::_linear_pointwise" for e in prof.events()) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a caller that wants an input gradient gets the plain layer (no backward copy was packed)
    xg = x.clone().requires_grad_(True)
    with torch.profiler.profile() as prof:
        model(xg).sum().backward()
    assert not any(e.name == "mkldnn::_linear_pointwise" for e in prof.events())
    xp = x.clone().requires_grad_(True)
    plain(xp).sum().backward()
    torch.testing.assert_close(xg.grad, xp.grad)
    # the output layer's way: a weight packed by itself
    w = torch.randn(300, 64)
    torch.testing.assert_close(packed_linear.linear(x, packed_linear.pack_weight(w, 16)), x @ w.T, rtol=1e-5, atol=1e-5)


def test_a_forward_copy_is_kept_and_the_backward_copy_added():
    """A model a decoder packed for the forward (rows hint 16) and training then packs (hint 128):
    each layer keeps its forward copy, gets the backward's, and gives `F.linear`'s values and input
    gradients through oneDNN; a copy packed for 16 rows computes what one for 128 does, bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32, bias=False)).requires_grad_(False)
    x = torch.randn(300, 64, requires_grad=True)
    want = model(x)
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    assert packed_linear.pack(model, rows_hint=16, backward=False) == 2
    first = [m._lidr_packed[0] for m in (model[0], model[2])]
    assert packed_linear.pack(model) == 2
    assert [m._lidr_packed[0] for m in (model[0], model[2])] == first  # the same objects, not packed again
    assert all(m._lidr_packed[1] is not None for m in (model[0], model[2]))
    assert packed_linear.pack(model) == 2 and [m._lidr_packed[0] for m in (model[0], model[2])] == first
    with torch.profiler.profile() as prof:
        got = model(x)
        (grad,) = torch.autograd.grad(got.square().sum(), x)
    assert sum(e.name == "mkldnn::_linear_pointwise" for e in prof.events()) == 4  # 2 forward, 2 backward
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5)
    w = model[0].weight
    for rows in (1, 7, 16, 100, 300):
        assert torch.equal(packed_linear.linear(x[:rows].detach(), packed_linear.pack_weight(w, 16)),
                           packed_linear.linear(x[:rows].detach(), packed_linear.pack_weight(w, 128)))


def _lora_model(dropout: float = 0.0):
    """A tiny Llama with LoRA on every linear layer, B not zero (so the adapters do something),
    a batch of two pairs, and its DPO+NLL step: (log-probs, adapter gradients)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lidr.pipeline.train import Pair, ResponseLogProbs, collate, dpo_nll_loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    lm = get_peft_model(AutoModelForCausalLM.from_config(config).float(),
                        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():  # B starts at 0: make the adapters do something
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lora = [p for p in lm.parameters() if p.requires_grad]
    pairs = [Pair([1, 5, 6, 7], [8, 9, 2], [10, 2]), Pair([1, 11, 12], [13, 2], [14, 15, 16, 2])]
    batch = collate(pairs, [0, 1], 0)

    def step():
        logps, ntok = ResponseLogProbs(lm)(**batch)
        loss, _ = dpo_nll_loss(logps, logps.detach() - 0.1, ntok, 0.5, 1.0)
        return logps, torch.autograd.grad(loss, lora)

    def base_logps():
        with torch.no_grad(), lm.disable_adapter():
            return ResponseLogProbs(lm)(**batch)[0]
    return lm, step, base_logps


def test_lora_step_is_the_same_packed():
    """A LoRA model's DPO+NLL log-probs and adapter gradients, with the base layers packed or not."""
    lm, step, _ = _lora_model()
    want, want_grads = step()
    n_base = sum(1 for m in lm.modules() if packed_linear.eligible(m))
    assert packed_linear.pack(lm, skip=(lm.get_output_embeddings(),)) == n_base - 1 > 0
    with torch.profiler.profile() as prof:
        got, grads = step()
    assert any(e.name == "mkldnn::_linear_pointwise" for e in prof.events())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _fused_calls(prof) -> int:
    return sum(e.name == "_PackedLoraLinear" for e in prof.events())


def test_lora_layers_over_packed_bases_run_as_one_node_with_the_same_step():
    """`fuse_lora`: each LoRA layer over a packed base runs as `_PackedLoraLinear`, with PEFT's
    log-probs and adapter gradients (A and B both: B is not zero); with the adapters disabled (the
    reference pass) it runs the base alone; `unpack` gives PEFT its forward back."""
    lm, step, base_logps = _lora_model()
    want, want_grads = step()
    want_base = base_logps()
    n_lora = sum(1 for m in lm.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    packed_linear.pack(lm, skip=(lm.get_output_embeddings(),))
    assert packed_linear.fuse_lora(lm) == n_lora == 2 * 7
    assert packed_linear.fuse_lora(lm) == 0  # already fused
    with torch.profiler.profile() as prof:
        got, grads = step()
    assert _fused_calls(prof) == n_lora  # one body forward: the batch packed in one row
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.profiler.profile() as prof:
        torch.testing.assert_close(base_logps(), want_base, rtol=1e-5, atol=1e-5)
    assert _fused_calls(prof) == 0  # adapters off: PEFT's forward, the packed base alone

    packed_linear.unpack(lm)
    assert not any("forward" in vars(m) or "_lidr_packed" in vars(m) for m in lm.modules())
    with torch.profiler.profile() as prof:
        again, _ = step()
    assert _fused_calls(prof) == 0
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


def test_lora_with_dropout_keeps_peft_forward():
    """A LoRA layer `_PackedLoraLinear` does not cover (dropout here) runs PEFT's forward over the
    packed base: the same values in eval mode, no fused calls."""
    lm, step, _ = _lora_model(dropout=0.1)
    lm.eval()
    want, want_grads = step()
    packed_linear.pack(lm, skip=(lm.get_output_embeddings(),))
    assert packed_linear.fuse_lora(lm) > 0  # fused where the adapter allows it, checked at each call
    with torch.profiler.profile() as prof:
        got, grads = step()
    assert _fused_calls(prof) == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_layers_pack_only_when_asked_and_give_the_same_bits():
    """Generation packs bf16 layers too on a CPU with fast bf16 (AMX / AVX512-BF16), where oneDNN's
    bf16 product of a packed weight equals the plain one bit for bit at decoding steps' rows."""
    from lidr.models import cpu_has_fast_bf16

    if not cpu_has_fast_bf16():
        pytest.skip("bf16 layers are packed only on a CPU with fast bf16")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(640, 2048), nn.Linear(2048, 640, bias=False)).bfloat16().requires_grad_(False)
    assert packed_linear.pack(model) == 0  # fp32 only by default (training)
    plain = copy.deepcopy(model)
    assert packed_linear.pack(model, rows_hint=16, backward=False, dtypes=(torch.float32, torch.bfloat16)) == 2
    for rows in (1, 2, 7, 16, 31, 64, 200):
        x = torch.randn(rows, 640).bfloat16()
        assert torch.equal(model(x), plain(x)), rows
    packed_linear.unpack(model)
    assert not any("_lidr_packed" in vars(m) for m in model.modules())
