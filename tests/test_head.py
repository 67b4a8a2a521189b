"""The CPU output layer (lidr/head.py) gives what `F.linear` + autograd give."""

import pytest
import torch
import torch.nn.functional as F

from lidr.head import BLOCK, HalfHead, TokenLogProbs, frozen_head_logps, greedy_t, logits_t, token_logps


@pytest.mark.parametrize("rows", [3, 40])  # one product / blockwise products
def test_logits_t_is_the_transposed_linear(rows):
    torch.manual_seed(0)
    w, h = torch.randn(3000, 16), torch.randn(rows, 16)
    torch.testing.assert_close(logits_t(w, h), F.linear(h, w).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_t_is_the_argmax_of_the_logits(dtype):
    """The blockwise choice is `logits_t(...).argmax` over the vocabulary for any number of rows
    (the block size follows it): the lowest id among equal logits, even across blocks, and a NaN
    logit first."""
    torch.manual_seed(0)
    w = (torch.randn(70000, 32) * 0.1).to(dtype)  # more than one block for every row count
    for rows in (1, 3, 8, 16, 33, 64, 100):
        h = (torch.randn(rows, 32) * 2).to(dtype)
        want = logits_t(w, h).float().argmax(0)
        assert torch.equal(greedy_t(w, h), want), rows
    # equal logits in two blocks: the lower id wins, wherever the blocks split
    w = torch.zeros(140000, 4, dtype=dtype)
    h = torch.ones(2, 4, dtype=dtype)
    w[[5, 70000, 139999]] = 1.0
    assert greedy_t(w, h).tolist() == [5, 5]
    w[5] = 0.5
    assert greedy_t(w, h).tolist() == [70000, 70000]
    w[100000] = float("nan")  # a NaN logit: the plain path's rule (the caller's)
    assert greedy_t(w, h) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_t_applies_the_repetition_penalty_as_the_decoder_does(dtype):
    """With a penalty, the blockwise choice is the plain one: fp32 logits, transformers' penalty
    on the ids each row has seen (repeated ids, a factor per row, above and below 1), argmax."""
    from lidr.backends.decode import _choose

    torch.manual_seed(0)
    w = (torch.randn(70000, 32) * 0.1).to(dtype)
    for rows in (1, 5, 16, 40):
        h = (torch.randn(rows, 32) * 2).to(dtype)
        logits = logits_t(w, h).T.float()
        # each row has seen its own top tokens (the case the penalty is for) and some others
        seen = torch.cat([logits.topk(3, dim=1).indices, torch.randint(0, 70000, (rows, 20)),
                          logits.topk(1, dim=1).indices], 1)
        for factors in ([1.1] * rows, [1.5 if r % 2 else 0.8 for r in range(rows)], [1.0] * rows):
            penalty = torch.tensor(factors)[:, None]
            want = _choose(logits.clone(), seen, penalty)
            assert torch.equal(greedy_t(w, h, seen, penalty), want), (rows, factors[:2])
    # a seen token and an unseen one with the same penalized logit: the lower id wins
    w = torch.zeros(140000, 2, dtype=dtype)
    h = torch.ones(1, 2, dtype=dtype)
    w[80000] = 2.0  # seen: 4 / 2 = 2
    w[90000] = 1.0  # unseen: 2
    w[100] = 0.5  # unseen: 1
    seen, penalty = torch.tensor([[80000, 80000]]), torch.tensor([[2.0]])
    assert greedy_t(w, h, seen, penalty).tolist() == [80000]
    w[1000] = 1.0  # unseen, lower id, the same 2
    assert greedy_t(w, h, seen, penalty).tolist() == [1000] == _choose(logits_t(w, h).T.float(), seen, penalty).tolist()


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("rows", [5, 37])  # the two ways of the backward's product
def test_token_logprobs_values_and_gradients_match_autograd(softcap, k, rows):
    torch.manual_seed(0)
    w = torch.randn(2500, 16, dtype=torch.float64, requires_grad=True)
    h = torch.randn(rows, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 2500, (rows, k))
    weights = torch.randn(rows, k, dtype=torch.float64)  # an arbitrary upstream gradient

    logits = F.linear(h, w)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = logits.gather(1, targets) - logits.logsumexp(1, keepdim=True)
    gh, gw = torch.autograd.grad((want * weights).sum(), (h, w))

    got = TokenLogProbs.apply(h, w, targets, softcap)
    fh, fw = torch.autograd.grad((got * weights).sum(), (h, w))
    # the log-probs are computed in fp32 (as in training), so fp32 tolerances
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fh, gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fw, gw, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("k", [1, 2])
def test_scoring_head_matches_the_training_head(softcap, k):
    """The no-grad scoring head (one block buffer) gives the training head's log-probs, for
    targets in every block, the last partial block and the same target in several rows."""
    torch.manual_seed(0)
    vocab = 2 * BLOCK + 300
    w, h = torch.randn(vocab, 16), torch.randn(45, 16)
    targets = torch.randint(0, vocab, (45, k))
    targets[0, 0], targets[1, 0], targets[2, 0], targets[3, 0] = 0, vocab - 1, BLOCK, vocab - 1
    logits = F.linear(h, w)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = logits.gather(1, targets) - logits.logsumexp(1, keepdim=True)
    got = token_logps(h, w, targets, softcap)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, TokenLogProbs.apply(h, w, targets, softcap), rtol=0, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("max_logits", [2500 * 64, 2500 * 7])  # one chunk of rows / several, the last partial
def test_frozen_head_values_and_input_gradient_match_autograd(softcap, k, max_logits):
    """The GPU's LoRA head (the gradient worked out in the forward, no logits kept): autograd's
    log-probs and gradient for h, in chunks of rows or not; no gradient for the frozen weight."""
    torch.manual_seed(0)
    w = torch.randn(2500, 16, dtype=torch.float64, requires_grad=True)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 2500, (37, k))
    targets[1] = targets[0]  # the same targets in two rows
    weights = torch.randn(37, k, dtype=torch.float64)

    logits = F.linear(h, w)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    want = logits.gather(1, targets) - logits.logsumexp(1, keepdim=True)
    (gh,) = torch.autograd.grad((want * weights).sum(), (h,))

    got = frozen_head_logps(h, w, targets, softcap, max_logits=max_logits)
    # what the backward keeps: each row's gradient per target, no [rows, vocab] logits
    assert [tuple(t.shape) for t in got.grad_fn.saved_tensors] == [(37, k, 16)]
    (fh,) = torch.autograd.grad((got * weights).sum(), (h,))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fh, gh, rtol=1e-4, atol=1e-5)
    assert w.grad is None
    with torch.no_grad():  # scoring: the forward alone, the same values
        torch.testing.assert_close(frozen_head_logps(h, w, targets, softcap, max_logits=max_logits), got.detach())


def test_frozen_head_in_bf16_is_autograds_bf16_head():
    """In bf16 (LoRA on a GPU) the values are those of the plain head's bf16 logits, and the
    gradient for h agrees with autograd's to bf16 rounding."""
    torch.manual_seed(0)
    w = torch.randn(3000, 64, dtype=torch.bfloat16) * 0.1
    h = torch.randn(20, 64, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 3000, (20, 2))
    weights = torch.randn(20, 2)
    logits = F.linear(h, w).float()
    want = logits.gather(1, targets) - logits.logsumexp(1, keepdim=True)
    (gh,) = torch.autograd.grad((want * weights).sum(), (h,))
    got = frozen_head_logps(h, w, targets, None)
    (fh,) = torch.autograd.grad((got * weights).sum(), (h,))
    assert fh.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(fh.float(), gh.float(), rtol=0.02, atol=0.02 * gh.float().abs().max().item())


@pytest.mark.parametrize("layout", ["same target twice", "second target confident"])
def test_frozen_head_keeps_a_confident_rows_gradient_in_bf16(layout):
    """Rows whose target has p near 1 (what NLL trains on) have a small gradient, W_t - sum p W:
    formed as (onehot - p) in fp32 before the bf16 product, as autograd forms it, each row's
    gradient stays autograd's to bf16 rounding (formed as W_t minus a bf16 sum, it was lost: a
    row off by a factor of 2e5). Both of `_pair_sums`' layouts: a response position's target
    twice; a pair's first tokens (chosen, rejected), here the second the likely one."""
    torch.manual_seed(0)
    w = (torch.randn(32768, 64) * 0.05).bfloat16()
    h0 = (torch.randn(64, 64) * 100).bfloat16()
    top = (h0.float() @ w.float().T).topk(2, 1).indices
    targets = top[:, :1].expand(-1, 2).contiguous() if layout == "same target twice" else top[:, [1, 0]].contiguous()
    upstream = torch.randn(64, 2)

    def grad(logps):
        h = h0.clone().requires_grad_()
        (logps(h) * upstream).sum().backward()
        return h.grad.float()

    def plain(h):
        logits = F.linear(h, w).float()
        return logits.gather(1, targets) - logits.logsumexp(1, keepdim=True)

    assert plain(h0).exp().max(1).values.median() > 0.99  # confident rows
    want, got = grad(plain), grad(lambda h: frozen_head_logps(h, w, targets, None))
    assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 0.05


@pytest.mark.parametrize("bad, usable", [(None, True), (6e4, True), (7e4, False), (float("inf"), False),
                                         (float("nan"), False)])
def test_half_screen_refuses_weights_fp16_cannot_hold(bad, usable):
    w = torch.randn(300, 16)
    if bad is not None:
        w[123, 5] = bad
    half = HalfHead(w)
    assert half.finite is usable
    if usable:  # and then its bound holds (logits within fp16's range: the product is fp16)
        h = torch.randn(1, 16) * 1e-3
        approx, eps = half.approx(h)
        assert float((approx - h @ w.T).abs().max()) <= eps


def test_int8_copy_is_kept_for_the_same_weight_only():
    """`Int8Head.of` hands back the kept copy for a weight of the same bytes, shape and dtype
    (another tensor, e.g. the next iteration's model), and builds anew when one bit differs."""
    from lidr.head import Int8Head, fingerprint

    if not Int8Head.available():
        pytest.skip("fbgemm's int8 kernels are for x86")
    torch.manual_seed(0)
    w, h = torch.randn(4096, 64), torch.randn(3, 64)
    Int8Head.forget()
    try:
        kept = Int8Head.of(w, h)
        assert Int8Head.of(w.clone(), h) is kept
        changed = w.clone()
        changed.view(torch.int32)[1234, 5] ^= 1  # the lowest bit of one weight
        assert Int8Head.of(changed, h) is not kept
        # the same bytes as another shape or dtype are another tensor
        assert len({fingerprint(w), fingerprint(w.view(64, 4096)), fingerprint(w.view(torch.int32))}) == 3
    finally:
        Int8Head.forget()
