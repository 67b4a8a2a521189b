"""The output layer (hidden -> vocabulary logits) on a CPU, where it costs the most.

For a 262k-token vocabulary the output layer is most of a small model's arithmetic: 168 M of
gemma-3-270m's 268 M parameters. MKL runs `h @ W.T` for a few dozen rows far below its
matrix-multiply peak on the CPUs measured here (bench/profile_generate.py); `W @ h.T`, taken
in blocks of 1024 vocabulary rows that stay in cache, is 1.3-4x faster for 4-256 rows
(about the same for 1). Used
by generation (`decode.py`) and, with a hand-written backward, by training (`train.py`).
Generation's greedy choice needs only the winning token, so lower-precision copies screen the
vocabulary and fp32 decides among the few tokens that can still win: `HalfHead` (fp16, one
row) and `Int8Head` (int8, several rows).
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

BLOCK = 1024  # vocabulary rows per product: 1024 x hidden fp32 weights stay in the cache
CHUNK = 1024  # vocabulary ids per chunk whose largest int8 bound `Int8Head.upper` keeps


def logits_t(weight: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """`weight @ h.T`: logits as [vocab, rows] (the transpose of `F.linear(h, weight)`), blockwise."""
    ht = h.T.contiguous()
    if len(h) < 32:  # a few rows: one call is as fast (the weights are read once either way)
        return weight @ ht
    out = ht.new_empty(weight.shape[0], len(h))
    for i in range(0, weight.shape[0], BLOCK):
        torch.mm(weight[i:i + BLOCK], ht, out=out[i:i + BLOCK])
    return out


def penalized(logits: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty on the logits of tokens a row has seen: divided by the
    row's factor, or multiplied where negative (RepetitionPenaltyLogitsProcessor)."""
    return torch.where(logits < 0, logits * penalty, logits / penalty)


def greedy_t(weight: torch.Tensor, h: torch.Tensor, seen: torch.Tensor | None = None,
             penalty: torch.Tensor | None = None) -> torch.Tensor | None:
    """Each row's greedy next token from `logits_t(weight, h)`: the argmax over the vocabulary of
    the logits in fp32, after transformers' repetition penalty where given (`penalty`, a column
    of per-row factors, on the ids in `seen` [rows, n]; `seen` is ignored without it), the
    lowest id among equal logits. The best of each block of vocabulary rows is taken while the
    block's logits are in cache: no fp32 copy of the [vocab, rows] array and no strided
    reduction over it, 1.2-3.6x faster for 16-64 rows of gemma-3-270m's bf16 output layer (the
    same for 1-8). The blocks' products are those of `logits_t` bit for bit, and `penalized`
    applies the penalty in fp32 to the same values as decode.py's `_penalize`, so the choice is
    the same. None where a logit is NaN (the caller takes the plain path, which has its own rule
    for that)."""
    rows, vocab = len(h), weight.shape[0]
    if penalty is None:
        seen = None
    ht = h.T.contiguous()
    block = max(8192, min(65536, (1 << 19) // rows))  # a block's logits: at most ~1 MB (bf16)
    starts = range(0, vocab, block)
    logits = ht.new_empty(vocab, rows) if seen is not None else None  # kept only for the penalty
    best = []  # each block's (largest logit, its id in the block) per row
    for i in starts:
        out = logits[i:i + block] if logits is not None else None
        best.append(torch.mm(weight[i:i + block], ht, out=out).max(0))  # the first of equal maxima
    values = torch.stack([v for v, _ in best])  # [blocks, rows]
    ids = torch.stack([k for _, k in best]) + torch.tensor(list(starts), device=h.device)[:, None]
    if seen is not None:
        at = torch.arange(rows, device=h.device)[:, None].expand_as(seen)
        raw = logits[seen, at].float()
        after = penalized(raw, penalty)
        logits[seen, at] = float("-inf")  # the unseen tokens' best from here
        redo = (ids[:, :, None] == seen[None]).any(-1).any(1)  # blocks whose best is a seen token
        for b in redo.nonzero()[:, 0].tolist():
            v, k = logits[starts[b]:starts[b] + block].max(0)
            values[b], ids[b] = v, k + starts[b]
    value, which = values.max(0)  # the first block of equal maxima: the lowest id
    token = ids.gather(0, which[None])[0]
    if bool(value.isnan().any()):
        return None
    if seen is None:
        return token
    top = after.max(1).values
    if bool(top.isnan().any()):
        return None
    top_id = torch.where(after == top[:, None], seen, vocab).min(1).values
    value = value.float()
    take_seen = (top > value) | ((top == value) & (top_id < token))
    return torch.where(take_seen, top_id, token)


def _block_logits(weight: torch.Tensor, ht: torch.Tensor, i: int, out: torch.Tensor) -> torch.Tensor:
    """Vocabulary rows i..i+BLOCK of `weight @ ht` into `out` (fp32)."""
    if weight.dtype == torch.float32:
        return torch.mm(weight[i:i + BLOCK], ht, out=out)
    return out.copy_(weight[i:i + BLOCK] @ ht)


def _add_to_lse(block: torch.Tensor, m: torch.Tensor, s: torch.Tensor, softcap: float | None):
    """Fold one block of logits into the running max `m` and sum of exp `s` of each column (the
    streaming logsumexp). With `softcap` the block is turned into tanh(block / softcap) in place.
    Returns the capped block (a new array with softcap; `block` itself without), m and s."""
    capped = block
    if softcap:
        capped = block.div_(softcap).tanh_() * softcap
    new_m = torch.maximum(m, capped.amax(0))
    return capped, new_m, s * (m - new_m).exp() + (capped - new_m).exp().sum(0)


def logits_t_lse(weight: torch.Tensor, h: torch.Tensor, softcap: float | None):
    """`logits_t` in fp32 with each column's logsumexp, computed block by block while the block
    is in cache (a reduction over the vocabulary axis of the whole [vocab, rows] array is
    strided and several times slower). With `softcap` the array holds tanh(logits / softcap)
    (the capped logits are softcap x that) for the backward pass."""
    ht = h.T.contiguous()
    out = ht.new_empty(weight.shape[0], len(h), dtype=torch.float32)
    m = out.new_full((len(h),), float("-inf"))
    s = out.new_zeros(len(h))
    for i in range(0, weight.shape[0], BLOCK):
        _, m, s = _add_to_lse(_block_logits(weight, ht, i, out[i:i + BLOCK]), m, s, softcap)
    return out, m + s.log()


def token_logps(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """`TokenLogProbs` without the backward (scoring): the same block products and logsumexp, but
    one block buffer instead of the whole [vocab, rows] array, so memory does not grow with the
    rows and a scoring pass can run the head on all its rows at once (MKL runs these products
    faster for more rows: about 95 GFLOP/s for 128 rows against 120 for 256 here). A target's
    logit is read from its block while the block is in cache. Returns [rows, k] fp32."""
    ht = h.T.contiguous()
    rows, k = targets.shape
    buf = ht.new_empty(BLOCK, rows, dtype=torch.float32)
    m = buf.new_full((rows,), float("-inf"))
    s = buf.new_zeros(rows)
    picked = buf.new_empty(rows * k)
    flat = targets.reshape(-1)
    order = flat.argsort()
    # the targets (by their index into `flat`) that fall in each vocabulary block
    bounds = torch.searchsorted(flat[order], torch.arange(0, weight.shape[0] + BLOCK, BLOCK,
                                                          device=flat.device)).tolist()
    for b, i in enumerate(range(0, weight.shape[0], BLOCK)):
        block = _block_logits(weight, ht, i, buf[:min(BLOCK, weight.shape[0] - i)])
        capped, m, s = _add_to_lse(block, m, s, softcap)
        if bounds[b + 1] > bounds[b]:
            which = order[bounds[b]:bounds[b + 1]]
            picked[which] = capped[flat[which] - i, which // k]
    return picked.view(rows, k) - (m + s.log())[:, None]


class TokenLogProbs(torch.autograd.Function):
    """log p(targets | h) through a bias-free output layer, optional Gemma-style soft-capping.

    h: [rows, hidden]; targets: [rows, k] (k tokens scored from each row's logits).
    Returns [rows, k] fp32. The backward is written out so the [vocab, rows] logits block is
    turned into its gradient in place (softmax, scatter of the targets), instead of autograd's
    several temporaries of that size."""

    @staticmethod
    def forward(ctx, h, weight, targets, softcap):
        logits, lse = logits_t_lse(weight, h, softcap)  # with softcap: tanh(logits / softcap)
        picked = logits.gather(0, targets.T)
        if softcap:
            picked = picked * softcap
        ctx.softcap = softcap
        ctx.save_for_backward(h, weight, targets, logits, lse)
        return (picked - lse).T  # [rows, k]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        h, weight, targets, logits, lse = ctx.saved_tensors
        grad = grad.float()
        c = ctx.softcap
        # d logp_j / d logits = onehot(target_j) - softmax, for each of the k targets of a row
        if c:
            d = (logits * c).sub_(lse).exp_().mul_(-grad.sum(1))
        else:
            d = logits.sub_(lse).exp_().mul_(-grad.sum(1))  # in place: the logits are not needed again
        d.scatter_add_(0, targets.T, grad.T)
        if c:  # d(c * tanh(x / c)) / dx = 1 - tanh^2
            d.mul_(1 - logits * logits)
        d = d.to(weight.dtype)
        grad_h = None
        if ctx.needs_input_grad[0]:
            # MKL runs `weight.T @ d` for a few rows at ~1 GFLOP/s here (1.9 s for 7 rows of a 262k
            # vocabulary), `d.T @ weight` 6x faster; from ~32 rows on the first is as fast or faster.
            grad_h = (d.T @ weight if d.shape[1] < 32 else (weight.T @ d).T).to(h.dtype)
        grad_w = (d @ h) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


class FrozenHeadLogProbs(torch.autograd.Function):
    """log p(targets | h) through a frozen bias-free output layer (LoRA leaves it as loaded), for
    GPUs: the rows in chunks of `chunk`, each chunk's [chunk, vocab] logits built in one product
    and dropped before the next. The forward also works out what the backward needs of them, as
    Liger's fused linear cross-entropy does: with the weight frozen, the gradient of logp_j for h
    is (J (onehot(t_j) - p)) @ W (J: the soft-cap's derivative, 1 without one), a [hidden] vector
    per row and target, and the backward is their sum weighted by the upstream gradient. No
    logits array outlives its chunk, where autograd keeps two fp32 [rows, vocab] arrays until the
    backward (480 MB for 240 rows of a 262k vocabulary) and `TokenLogProbs` one. onehot - p is
    formed in fp32 before the product, as autograd forms it: a confident row (p_t near 1) keeps
    its small gradient (W_t - sum_v p_v W_v in bf16 would cancel it away). The same products as
    autograd: one forward, one for the gradient, and one more for each row whose other targets
    differ from its first (the first response token of a pair: one row per pair). The weight
    gets no gradient.

    h: [rows, hidden]; targets: [rows, k]. Returns [rows, k] fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, chunk):
        out, grads = _frozen_head_chunks(h, weight, targets, softcap, chunk, want_grad=True)
        ctx.save_for_backward(grads)
        ctx.h_dtype = h.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (grads,) = ctx.saved_tensors
        return torch.einsum("rk,rkd->rd", grad.float(), grads).to(ctx.h_dtype), None, None, None, None


def _frozen_head_chunks(h, weight, targets, softcap, chunk, want_grad):
    """The forward of `FrozenHeadLogProbs`: log-probs [rows, k], and with `want_grad` the
    gradient of each for h, [rows, k, hidden] fp32 (rounded as the product in the weight's dtype
    rounds it)."""
    rows, k = targets.shape
    out = h.new_empty(rows, k, dtype=torch.float32)
    grads = h.new_empty(rows, k, h.shape[1], dtype=torch.float32) if want_grad else None
    for s in range(0, rows, chunk):
        t = targets[s:s + chunk]
        logits = (h[s:s + chunk] @ weight.T).float()
        if softcap:
            tanh = logits.div_(softcap).tanh_()
            logits = tanh * softcap
        lse = logits.logsumexp(-1, keepdim=True)
        out[s:s + chunk] = logits.gather(1, t) - lse
        if not want_grad:
            continue
        p = logits.sub_(lse).exp_()  # the softmax, in place
        j = 1 - tanh * tanh if softcap else None
        g = grads[s:s + chunk]
        for col in range(1, k):  # the rows whose target col differs from their first (few)
            other = (t[:, col] != t[:, 0]).nonzero()[:, 0]
            if len(other):
                d = -p[other]
                d[torch.arange(len(other), device=d.device), t[other, col]] += 1
                g[other, col] = ((d if j is None else d.mul_(j[other])).to(weight.dtype) @ weight).float()
        d = p.neg_()  # onehot(t_0) - p for every row, in place of p
        d[torch.arange(len(t), device=d.device), t[:, 0]] += 1
        g[:, 0] = (d if j is None else d.mul_(j)).to(weight.dtype) @ weight
        for col in range(1, k):
            same = t[:, col] == t[:, 0]
            g[same, col] = g[same, 0]
    return out, grads


def frozen_head_logps(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                      max_logits: int = 2**24) -> torch.Tensor:
    """`FrozenHeadLogProbs` in chunks of at most `max_logits` logits (64 MB in fp32: 64 rows of a 262k
    vocabulary; a chunk's products and softmax take about four such arrays while it runs); without a
    gradient to compute (scoring), the forward alone."""
    chunk = max(1, max_logits // weight.shape[0])
    if torch.is_grad_enabled() and h.requires_grad:
        return FrozenHeadLogProbs.apply(h, weight.detach(), targets, softcap, chunk)
    return _frozen_head_chunks(h, weight.detach(), targets, softcap, chunk, want_grad=False)[0]


class HalfHead:
    """An fp16 copy of a bias-free fp32 output layer, for screening one row's greedy choice.

    A one-row decoding step reads the whole output layer (671 MB in fp32 for gemma-3-270m) to
    make one token, and on the CPUs measured here MKL's fp16 product for one row ran 2.8x
    faster than fp32 (half the bytes; more rows run slower than fp32, so it is for one row).
    `approx(h)` gives logits within `±eps` of the exact fp32 ones for every token, so the
    decoder computes exact fp32 logits only for the few tokens that can still win.

    The bound: fp16 rounding of a weight and of h is at most 2^-11 of each (2^-10 for their
    product), fp32 accumulation of `d` products adds at most d 2^-24 of their absolute sum,
    and a weight in fp16's subnormal range is off by at most 2^-25 absolutely. With
    |w_v . h| sums bounded by ||w_v|| ||h|| (Cauchy-Schwarz):
        eps = (2^-10 + d 2^-23) max_v ||w_v|| ||h|| + d 2^-24 ||h||_inf.
    `measured_error` checks this against a real product when the decoder starts.
    """

    def __init__(self, weight: torch.Tensor):
        self.half = weight.detach().half()
        self.d = weight.shape[1]
        self.max_row_norm = float(weight.detach().norm(dim=1).max())
        # Weights past fp16's range (or not finite) make it unusable. A row's norm bounds each of
        # its weights, so the norm already computed decides it (NaN and inf fail the test), where
        # torch.isfinite on the fp16 copy took 0.8 s for gemma-3-270m (the row norms: 0.04 s).
        self.finite = self.max_row_norm <= torch.finfo(torch.float16).max

    def approx(self, h: torch.Tensor) -> tuple[torch.Tensor, float]:
        """[1, vocab] fp32 logits of one row `h` [1, hidden], and the bound on their error."""
        h = h.float()
        out = (self.half @ h.half().T).T.float()
        eps = ((2 ** -10 + self.d * 2 ** -23) * self.max_row_norm * float(h.norm())
               + self.d * 2 ** -24 * float(h.abs().max()))
        return out, eps

    _faster: dict[tuple, bool] = {}  # measured once per process and shape

    @staticmethod
    def faster(weight: torch.Tensor, half: torch.Tensor, repeats: int = 3) -> bool:
        """Is the fp16 product for one row clearly (20 %) faster than the fp32 logits
        (`logits_t`; a one-row product reads the whole fp32 weight, packed or not) on this machine?"""
        key = (tuple(weight.shape), torch.get_num_threads())
        if key not in HalfHead._faster:
            HalfHead._faster[key] = HalfHead._measure(weight, half, lambda h: logits_t(weight, h), repeats)
        return HalfHead._faster[key]

    @staticmethod
    def _measure(weight: torch.Tensor, half: torch.Tensor, fp32_head, repeats: int) -> bool:
        import time

        h = torch.randn(1, weight.shape[1])

        def best(fn):
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        return best(lambda: half @ h.half().T) < 0.8 * best(lambda: fp32_head(h))


def _on_two_threads(work) -> None:
    """work(0) and work(1) at once, each on its own thread (for work that lets go of the GIL)."""
    import threading

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@functools.lru_cache(maxsize=1)
def _onednn_int8_exact() -> bool:
    """Does oneDNN's int8 product give the exact integer sums the bound assumes? With VNNI or
    AMX it does; limited to older instructions (e.g. ONEDNN_MAX_CPU_ISA=AVX512_CORE), pairs of
    u8 x s8 products are added in saturating int16 (255 * 127 * 2 > 32767) and the bound broke
    (review of round 23). Checked once per process on the extreme values (11 ms here, the first
    oneDNN int8 call included)."""
    onednn = getattr(torch.ops, "onednn", None)
    if not (torch.backends.mkldnn.is_available()
            and all(hasattr(onednn, op) for op in ("qlinear_prepack", "qlinear_pointwise"))):
        return False
    d = 256
    qw = torch.full((32, d), 127, dtype=torch.int8)
    qw[1::2] = -127
    qw[2::4, 1::2] = -127
    qx = torch.full((4, d), 255, dtype=torch.uint8)  # with zero point 128: +127
    qx[1] = 1  # -127
    qx[2, ::2] = 1
    qx[3, ::3] = 128
    try:
        packed = torch.ops.onednn.qlinear_prepack(qw, [4, d])
        got = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, packed, torch.ones(32), torch.zeros(32, dtype=torch.long),
                                                 None, 1.0, 0, torch.float32, "none", [], "")
    except RuntimeError:
        return False
    return torch.equal(got.double(), (qx.double() - 128) @ qw.double().T)  # sums below 2^24: exact in fp32


def _pack_fbgemm(q: torch.Tensor, scale: torch.Tensor, block: int) -> list:
    """fbgemm's packed blocks of `block` rows of int8 weights `q` [vocab, d] with per-row scales `scale`."""
    import warnings

    blocks = range(0, len(q), block)
    zero, scale64 = torch.zeros(len(q), dtype=torch.long), scale.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice for quantized tensors
        quantized = [torch._make_per_channel_quantized_tensor(q[i:i + block], scale64[i:i + block],
                                                             zero[i:i + block], 0) for i in blocks]
    engine = torch.backends.quantized.engine
    packed: list = [None] * len(blocks)

    def pack(first):  # fbgemm's packing of one block runs on one core; two threads halve it
        for j in range(first, len(blocks), 2):
            packed[j] = torch.ops.quantized.linear_prepack(quantized[j], None)

    try:
        torch.backends.quantized.engine = "fbgemm"
        _on_two_threads(pack)
    finally:
        torch.backends.quantized.engine = engine
    if any(p is None for p in packed):
        raise RuntimeError("fbgemm could not pack the output layer")
    return packed


def _pack_onednn(q: torch.Tensor, scale: torch.Tensor, block: int) -> list:
    """oneDNN's packed blocks of `block` rows of int8 weights `q` [vocab, d]: per block (weights,
    scales, zero points), the arguments `onednn::qlinear_pointwise` takes after the activations'."""
    out = []
    for i in range(0, len(q), block):
        n = min(block, len(q) - i)
        packed = torch.ops.onednn.qlinear_prepack(q[i:i + n], [16, q.shape[1]])
        out.append((packed, scale[i:i + n].contiguous(), torch.zeros(n, dtype=torch.long)))
    return out


def fingerprint(t: torch.Tensor) -> bytes:
    """XXH3-128 of a CPU tensor's shape, dtype and bytes: 0.03 s for gemma-3-270m's 671 MB output
    layer, where SHA-256 took 0.2-0.3 s on two threads (bench/fixed_costs.py). It tells a kept
    copy's weight from another, not from a forgery: a non-cryptographic 128-bit hash suffices."""
    import xxhash

    data = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
    h = xxhash.xxh3_128(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(data)
    return h.digest()


def _kernels():
    from lidr import kernels

    return kernels.load()


class Int8Head:
    """An int8 copy of a bias-free fp32 or bf16 output layer, for screening the greedy choice of
    decoding steps exactly (several rows for fp32, where one row has the fp16 screen; any for bf16).

    Two engines run the int8 product (`engine`). On CPUs with int8 matrix instructions (AMX or
    AVX512-VNNI) it is oneDNN's (`onednn::qlinear_pointwise`, as PyTorch's own x86 int8
    inference uses): gemma-3-270m's 168 MB of int8 weights for 1-16 rows in 7.8-8.8 ms, near the
    memory's limit, where its bf16 output layer took 15-18 ms (bench/README.md, round 23). Each row
    then gets its own activation scale (quantized here, not by the kernel): in a float model of
    the bound on 120 real decoding rows, a median of 10 candidate tokens a row with the outlier
    channels below, against 53 with one scale for all rows; the screen itself, on the 59 steps of
    bench/generate.py, read exact logits for a median of 22 distinct tokens per row of a step
    (at most 106). Elsewhere (AVX2) it is fbgemm's, as described next.

    fbgemm's int8 product (`quantized::linear_dynamic`) ran gemma-3-270m's output layer 2.3x
    faster than the packed fp32 one on the decoding steps of bench/generate.py. Its result is not
    fp32's, so it only screens: `upper(h)` is, for every row and token, at least the exact logit
    (a bound, not an estimate), and the decoder computes exact fp32 logits only for the tokens
    whose bound reaches the best exact logit of the few with the highest bounds
    (`ContinuousDecoder._int8_choice`).

    The bound. The weights (outside a few outlier channels) are rounded per vocabulary row v to
    s_v q_v with q_v in [-127, 127] (|error| <= s_v / 2 each); fbgemm rounds the activations h of
    all rows with one scale t (7 bits with `reduce_range`, which also keeps its int16 pair sums
    from saturating; |error| <= t / 2 each). So, for the rest channels R,
        |h_R . w_Rv - approx| <= (t / 2) |w_Rv|_1 + (s_v / 2) (|h_R|_1 + |R| t / 2),
    one bound per row and token, made of two products of a row's number and a token's. Gemma 3's
    final hidden states have a few channels 5-10x larger than the rest (up to 154 against a median
    channel maximum of 15 on the demo); with them in t the bound grew tenfold, so the `OUTLIERS`
    largest channels of the rows that first reach the screen are zeros in the int8 product and
    run in fp32 instead, in the same product as the bound's two terms:
    [h_O, t/2, c_b] @ [w_O, |w_R|_1, s]^T added to the int8 result. A channel that turns out
    large later only loosens the bound (more candidates), never breaks it. On
    bench/generate.py's workload (penalty 1.1) a row kept 30 candidate tokens of 262,144 (median;
    mean 71, at most 762), 616 for a whole step on average.
    """

    OUTLIERS = {"fbgemm": 32, "onednn": 16}  # channels kept in fp32 (per-row scales need fewer)
    BLOCK = 32768  # vocabulary rows per packed block (packed on two threads; see `__init__`)
    MIN_PARAMS = 1 << 24  # smaller output layers are cheap enough in fp32

    # The last one built in this process, under its weight's fingerprint (`of`).
    _last: tuple[bytes, "Int8Head"] | None = None

    @classmethod
    def of(cls, weight: torch.Tensor, h: torch.Tensor) -> "Int8Head":
        """The int8 copy of `weight`: the last one built in this process if `weight` holds the
        same bytes, else a new one (which replaces it). LoRA training leaves the output layer as
        it was, so every iteration's model and every evaluation reuses the first build: the
        fingerprint takes 0.03 s for gemma-3-270m, the build 1.0-2.5 s. The copy kept
        (about 0.2 GB, and 4 bytes per token per row of the largest step for its bounds: 1 MB a
        row for gemma-3-270m) stays in memory between backends; `forget` frees it."""
        key = fingerprint(weight)
        if cls._last is not None and cls._last[0] == key:
            return cls._last[1]
        cls._last = None  # free the old copy before building the new one
        head = cls(weight, h)
        cls._last = (key, head)
        return head

    @classmethod
    def forget(cls) -> None:
        cls._last = None

    @staticmethod
    def engines() -> list[str]:
        """The int8 products this machine can run, the one used first (see the class): "onednn"
        on an x86-64 CPU with AMX or AVX512-VNNI int8 instructions, "fbgemm" on x86-64 (AVX2)."""
        from lidr.models import cpu_flags
        from lidr.packed_linear import on_x86

        if not on_x86():
            return []
        found = []
        if cpu_flags() & {"amx_int8", "avx512_vnni"} and _onednn_int8_exact():
            found.append("onednn")
        if "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic"):
            found.append("fbgemm")
        return found

    @classmethod
    def default_engine(cls) -> str | None:
        """The int8 product a new copy uses on this machine, None where there is none."""
        return next(iter(cls.engines()), None)

    @classmethod
    def available(cls) -> bool:
        return cls.default_engine() is not None

    def __init__(self, weight: torch.Tensor, h: torch.Tensor, engine: str | None = None):
        """Quantize and pack `weight` [vocab, hidden] (fp32 or bf16) for `engine` (default:
        `Int8Head.default_engine()`); `h` [rows, hidden]: hidden states whose largest channels
        are taken as the outliers."""
        w = weight.detach()
        vocab, d = w.shape
        self.engine = engine or Int8Head.default_engine()
        if self.engine not in self.engines():
            raise RuntimeError(f"int8 engine {self.engine!r} is not available on this machine (Int8Head.engines)")
        k = min(self.OUTLIERS[self.engine], d // 4)
        self.outliers = h.detach().float().abs().amax(0).topk(k).indices.sort().values
        # The outlier channels stay in the int8 product as zeros (in the weights here, in h in
        # `upper`), so that the blocks below are plain row slices: no column gather.
        l1, scale, norm = torch.empty(vocab), torch.empty(vocab), torch.empty(vocab)
        q = torch.empty(vocab, d, dtype=torch.int8)
        w_out = torch.empty(vocab, k)  # the outlier channels' weights (a column gather, block by block)
        # Rows quantized at a time, into the same two fp32 buffers (new ones fault in every page):
        # 1024 rows (2.6 MB a buffer) stay in cache across the passes; 0.26 s against 0.41 s for
        # 4096 (gemma-3-270m, the same bytes; bench/README.md, round 16).
        rows = 1024
        x, a = torch.empty(rows, d), torch.empty(rows, d)
        for i in range(0, vocab, rows):
            n = min(rows, vocab - i)
            xb, ab = x[:n], a[:n]
            xb.copy_(w[i:i + n])  # bf16 to fp32 exactly
            torch.linalg.vector_norm(xb, dim=1, out=norm[i:i + n])
            torch.index_select(xb, 1, self.outliers, out=w_out[i:i + n])
            xb.index_fill_(1, self.outliers, 0)
            torch.abs(xb, out=ab)
            torch.sum(ab, 1, out=l1[i:i + n])
            s = scale[i:i + n]
            torch.amax(ab, 1, out=s)
            s.div_(127).clamp_(min=torch.finfo(torch.float32).tiny)  # an all-zero row: any scale
            q[i:i + n] = xb.div_(s[:, None]).round_()
        self.vocab, self.d_rest = vocab, d - k
        # [w_O | |w_R|_1 | s]^T: the fp32 product adds the outlier channels' logits and the bound
        self.extra = torch.cat([w_out, l1[:, None], scale[:, None]], 1).T.contiguous()
        self.l1_max, self.s_max = float(l1.max()), float(scale.max())
        self.max_row_norm = float(norm.max())
        self.blocks = list(range(0, vocab, self.BLOCK))
        self.packed = (_pack_onednn if self.engine == "onednn" else _pack_fbgemm)(q, scale, self.BLOCK)
        self._out: torch.Tensor | None = None  # the bounds' buffer (`upper`)

    def upper(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Upper bounds of the exact logits of rows `h` [rows, hidden], [rows, chunks * CHUNK]:
        column v holds token v's bound, and the columns past the vocabulary (the last chunk's
        missing ids) hold -inf, so that every chunk is a row of `upper.view(rows, -1, CHUNK)`.
        Per row the slack [rows] for rounding in fp32 (fbgemm's output, the added product, and
        the exact logits the decoder compares with): a token can win only if its bound is at
        least (exact logit of some token) - slack. And each chunk's largest bound [rows, chunks],
        taken while each block is in cache, so that the decoder reads only the few chunks that
        can hold a winner.

        The bounds are written into a buffer kept between calls (valid until the next call): a
        new [32, 262144] one (33.5 MB) was mapped afresh at every step, 8,193 page faults each
        (bench/README.md, round 11)."""
        margin = 1 + 2 ** -10  # t and s_v as the kernels and the quantizers round them
        # fp32 rounding, each term a few times over: the exact logits (d products of |h||w|),
        # fbgemm's dequantized output (terms up to 254 t (|w_R|_1 + |R| s_max)) and the sums
        slack_norm, slack_t = 2 ** -12 * self.max_row_norm, 2 ** -16 * 254 * (self.l1_max + self.d_rest * self.s_max)
        # lidr's C++ kernels (lidr/kernels.py) prepare the rows in one pass a row, and add the
        # bounds up in one pass over each block, where PyTorch's operators take ~20 calls and three
        kernels = _kernels() if h.device.type == "cpu" else None
        if kernels is not None and self.engine == "onednn":
            qx, t, left, slack = kernels.module.int8_prepare(h.contiguous(), self.outliers, margin, self.d_rest,
                                                             slack_norm, slack_t)
        else:
            h = h.float()
            h_rest = h.clone()
            h_rest[:, self.outliers] = 0  # exact in int8 (0 is on the grid): these run in fp32
            if self.engine == "onednn":  # each row its own scale t, its activations quantized here
                t = h_rest.abs().amax(1, keepdim=True).div_(127).clamp_(min=torch.finfo(torch.float32).tiny)
                qx = torch.div(h_rest, t).round_().add_(128).to(torch.uint8)  # |h / t| <= 127
            else:  # fbgemm quantizes all rows with one scale
                t = h.new_full((len(h), 1), (max(float(h_rest.max()), 0.0) - min(float(h_rest.min()), 0.0)) / 127)
            a = t / 2 * margin
            c = (h_rest.abs().sum(1, keepdim=True) + self.d_rest * t / 2) / 2 * margin
            left = torch.cat([h.index_select(1, self.outliers), a, c], 1)
            slack = slack_norm * h.norm(dim=1) + slack_t * t[:, 0]
        out = self._rows(len(h))
        chunk_max = out.new_empty(len(h), out.shape[1] // CHUNK)
        for j, i in enumerate(self.blocks):
            if self.engine == "onednn":  # sum_i (q_h q_w) s_v, then times each row's t
                approx = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, *self.packed[j], None, 1.0, 0,
                                                            torch.float32, "none", [], "")
                scale = t
            else:
                approx, scale = torch.ops.quantized.linear_dynamic(h_rest, self.packed[j], True), None
            if kernels is not None:
                kernels.module.int8_bounds(approx, None if scale is None else scale.view(-1), left, self.extra,
                                           out, chunk_max, i, CHUNK)
                continue
            if scale is not None:
                approx.mul_(scale)
            torch.addmm(approx, left, self.extra[:, i:i + self.BLOCK], out=out[:, i:i + approx.shape[1]])
            block = out[:, i:i + self.BLOCK]  # BLOCK is a multiple of CHUNK; the last one ends in the -inf
            chunk_max[:, i // CHUNK:(i + block.shape[1]) // CHUNK] = block.unflatten(1, (-1, CHUNK)).amax(2)
        return out, slack, chunk_max

    def _rows(self, rows: int) -> torch.Tensor:
        """The first `rows` rows of the kept buffer [rows, chunks * CHUNK] (grown as needed),
        whose columns past the vocabulary hold -inf."""
        if self._out is None or len(self._out) < rows:
            self._out = None  # free the smaller one first
            width = -(-self.vocab // CHUNK) * CHUNK
            # a normal tensor even when made under inference mode (the decoder's), so that a
            # later call outside it may write into it
            with torch.inference_mode(False):
                self._out = torch.empty(rows, width)
                self._out[:, self.vocab:] = float("-inf")
        return self._out[:rows]
