"""lidr's C++ kernels (lidr/kernels.py, lidr/csrc/): built on this machine, the fused Gemma 3
operators give the eager operators' bits on every shape and kind of value tried, and the int8
screen's bounds agree with PyTorch's three passes up to fp32 rounding."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F

from lidr import kernels
from lidr.backends.gemma3_body import _ActivationTable, _rotate

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: lidr runs PyTorch's operators")


@pytest.fixture(scope="module")
def ops():
    """The built kernels: on a machine with a compiler they must build (a failed build would
    otherwise pass unnoticed as the eager fallback)."""
    built = kernels.load()
    assert built is not None, "lidr's C++ kernels did not build (see the log)"
    return built


def eager_norm(x, scale, eps):
    """lidr's _Norm: Gemma3RMSNorm with (1 + weight) as `scale`."""
    y = x.float()
    return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * scale).type_as(x)


def bf16_values(shape, gen, kind):
    """Values of a kind that stresses the roundings: normal, wide-ranging magnitudes, values on
    bf16's rounding half-way points once squared or scaled, rows of zeros and of one value."""
    if kind == "normal":
        return torch.randn(shape, generator=gen).bfloat16()
    if kind == "wide":
        return (torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-40, 40, shape, generator=gen))).bfloat16()
    if kind == "grid":  # few distinct mantissas: many ties and exact sums
        return (torch.randint(-8, 9, shape, generator=gen).float() / 4).bfloat16()
    if kind == "constant":
        return torch.full(shape, 3.0).bfloat16()
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.bfloat16)
    if kind == "special":  # inf, -inf, NaN, subnormals, squares past float32's range, among normal values
        x = torch.randn(shape, generator=gen)
        picks = torch.randint(0, 8, shape, generator=gen)
        for i, v in enumerate([float("inf"), float("-inf"), float("nan"), 1e-39, -3e-40, 3e19, -1e20]):
            x[picks == i] = v
        return x.bfloat16()
    raise ValueError(kind)


KINDS = ["normal", "wide", "grid", "constant", "zeros", "special"]


def same(a, b) -> bool:
    """Equal values, NaN where the other has NaN (torch.equal is False for any NaN)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def test_lanes_found_and_sums_equal_torchs(ops):
    """The vector width the norms sum with gives torch.sum's bits on rows of many lengths (the
    cascade's levels start past 64 vectors: 4096 and 20000 go through them)."""
    assert ops.lanes in (8, 16)
    gen = torch.Generator().manual_seed(0)
    for n in (1, 5, 7, 8, 15, 16, 17, 64, 100, 256, 640, 1000, 1152, 2048, 4096, 20000):
        x = torch.randn(16, n, generator=gen).pow(2)
        assert torch.equal(ops.module.row_sum(x, ops.lanes), x.sum(-1)), n
    other = 24 - ops.lanes  # the other width: different sums somewhere (the check can fail)
    x = torch.randn(64, 640, generator=gen).pow(2)
    assert not torch.equal(ops.module.row_sum(x, other), x.sum(-1))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_norms_same_bits_as_eager(ops, kind, threads):
    m, lanes = ops.module, ops.lanes
    gen = torch.Generator().manual_seed(1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows, n in [(1, 640), (3, 640), (32, 640), (300, 640), (7, 256), (5, 64), (2, 1152), (600, 100),
                        (50, 7), (9, 1)]:  # rows shorter than a vector: ATen's scalar sum
            x = bf16_values((rows, n), gen, kind)
            h = bf16_values((rows, n), gen, "normal")
            scale, scale2 = 1 + torch.randn(n, generator=gen) * 0.5, 1 + torch.randn(n, generator=gen) * 0.5
            eps, eps2 = 1e-6, 1e-5
            assert same(m.rms_norm(x, scale, eps, lanes), eager_norm(x, scale, eps))
            want_h = h + eager_norm(x, scale, eps)
            got_h, got_x = m.add_norm(h, x, scale, eps, scale2, eps2, lanes)
            assert same(got_h, want_h) and same(got_x, eager_norm(want_h, scale2, eps2))
            (alone,) = m.add_norm(h, x, scale, eps, None, 0.0, lanes)
            assert same(alone, want_h)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", KINDS)
def test_norm_and_rotary_same_bits_and_layout_as_eager(ops, kind):
    """q/k norm then rotary embedding, as `_Layer` runs them on a projection's output viewed as
    [rows, heads, positions, dim]: the same values and the same layout."""
    gen = torch.Generator().manual_seed(2)
    for rows, q, heads, dim in [(3, 1, 4, 256), (32, 1, 1, 256), (13, 16, 4, 256), (2, 5, 8, 64), (1, 7, 2, 16)]:
        lin = bf16_values((rows * q, heads * dim), gen, kind)
        cos = torch.randn(rows, q, dim, generator=gen).bfloat16()
        sin = torch.randn(rows, q, dim, generator=gen).bfloat16()
        scale = 1 + torch.randn(dim, generator=gen) * 0.5
        want = _rotate(eager_norm(lin.view(rows, q, heads, dim).transpose(1, 2), scale, 1e-6),
                       cos.unsqueeze(1), sin.unsqueeze(1))
        got = ops.module.norm_rope(lin, heads, scale, 1e-6, cos.view(-1, dim), sin.view(-1, dim), ops.lanes)
        got = got.view(rows, q, heads, dim).transpose(1, 2)
        assert got.shape == want.shape  # and the same strides (but on dimensions of size 1)
        assert all(a == b or n == 1 for a, b, n in zip(got.stride(), want.stride(), got.shape))
        assert same(got, want)


def test_activation_times_up_same_bits_as_eager(ops):
    """The activation read from a table of all 65,536 bf16 values, times `up`: gelu (tanh) as
    Gemma 3 has it, and another activation, on all bit patterns including inf and NaN."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    for act in (lambda x: F.gelu(x, approximate="tanh"), F.silu):
        table = _ActivationTable(act)
        up = torch.randn(every.shape, generator=gen).bfloat16()
        got, ambiguous = ops.module.act_mul(every.view(32, -1).contiguous(), up.view(32, -1).contiguous(),
                                            table.values, table.ambiguous)
        assert same(got.view(-1), act(every) * up)  # 65,536 values: one thread's vectorized loop
        assert ambiguous == bool(table.ambiguous.any())
        for rows in (1, 3, 32):
            g, u = (torch.randn(rows, 2048, generator=gen) * 3).bfloat16(), torch.randn(rows, 2048, generator=gen).bfloat16()
            got, ambiguous = ops.module.act_mul(g, u, table.values, table.ambiguous)
            assert torch.equal(got, act(g) * u) or ambiguous and table.scalar_tail(g.numel())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_activation_values_eager_computes_two_ways_are_flagged(ops, threads):
    """ATen's gelu (tanh) gives -5.0625 ... -5.15625 one value in its vectorized loop and another
    in its scalar loop, which runs at the end of each thread's chunk: with 3 threads the chunks
    of a large tensor end off the vectorized loop's step, and eager's bits at those inputs depend
    on their position. The table marks them, `act_mul` says when a gate holds one, and where a
    tensor of that size has a scalar tail at this thread count (asked of ATen), `_Layer._fused`
    runs the eager operators: the layer's bits are eager's at any thread count."""
    from transformers.activations import ACT2FN

    act = ACT2FN["gelu_pytorch_tanh"]
    table = _ActivationTable(act)
    flagged = torch.arange(65536)[table.ambiguous.bool()].to(torch.int32).to(torch.int16).view(torch.bfloat16)
    assert set(flagged.tolist()) >= {-5.0625, -5.09375, -5.125, -5.15625}
    gen = torch.Generator().manual_seed(5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tails = []
        for tokens in (1, 7, 40):
            gate = (torch.randn(tokens, 2048, generator=gen) * 0.5).bfloat16()  # none near -5
            up = torch.randn(tokens, 2048, generator=gen).bfloat16()
            got, hit = ops.module.act_mul(gate, up, table.values, table.ambiguous)
            assert not hit and torch.equal(got, act(gate) * up)
            gate.view(-1)[::50] = -5.0625
            got, hit = ops.module.act_mul(gate, up, table.values, table.ambiguous)
            tails.append(table.scalar_tail(gate.numel()))
            assert hit and (torch.equal(got, act(gate) * up) or tails[-1])
        # 40 x 2048 values split 3 ways: 27,306.67 each, not a multiple of 64
        assert tails == [False, False, threads == 3]
    finally:
        torch.set_num_threads(before)


def test_bad_arguments_are_refused_with_a_message(ops):
    m, lanes = ops.module, ops.lanes
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16"):
        m.rms_norm(x.float(), torch.ones(64), 1e-6, lanes)
    with pytest.raises(RuntimeError, match="contiguous"):
        m.rms_norm(x.T, torch.ones(2), 1e-6, lanes)
    with pytest.raises(RuntimeError, match="scale"):
        m.rms_norm(x, torch.ones(63), 1e-6, lanes)
    with pytest.raises(RuntimeError, match="lanes must be 8 or 16"):
        m.rms_norm(x, torch.ones(64), 1e-6, 4)
    with pytest.raises(RuntimeError, match="multiple of heads"):
        m.norm_rope(torch.zeros(3, 64, dtype=torch.bfloat16), 5, torch.ones(16), 1e-6,
                    torch.zeros(3, 16, dtype=torch.bfloat16), torch.zeros(3, 16, dtype=torch.bfloat16), lanes)
    with pytest.raises(RuntimeError, match="cos and sin"):
        m.norm_rope(torch.zeros(3, 64, dtype=torch.bfloat16), 4, torch.ones(16), 1e-6,
                    torch.zeros(2, 16, dtype=torch.bfloat16), torch.zeros(2, 16, dtype=torch.bfloat16), lanes)


def _bounds_in_torch(approx, t, left, extra, out, chunk_max, offset, chunk):
    """Int8Head.upper's PyTorch passes for one block."""
    a = approx * t if t is not None else approx.clone()
    torch.addmm(a, left, extra[:, offset:offset + a.shape[1]], out=out[:, offset:offset + a.shape[1]])
    block = out[:, offset:offset + -(-a.shape[1] // chunk) * chunk]
    chunk_max[:, offset // chunk:offset // chunk + block.shape[1] // chunk] = block.unflatten(1, (-1, chunk)).amax(2)


@pytest.mark.parametrize("threads", [1, 2])
def test_int8_bounds_agree_with_pytorchs_passes(ops, threads):
    """The bound block by block, the last one ending inside a chunk (the columns past the
    vocabulary hold -inf and stay so): values within fp32 rounding of addmm's, each chunk's
    maximum the largest of its values exactly, other columns untouched."""
    gen = torch.Generator().manual_seed(4)
    vocab, chunk, block, k = 5000, 256, 1024, 18
    width = -(-vocab // chunk) * chunk
    extra = torch.randn(k, vocab, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 2, 3, 4, 5, 6, 7, 8, 33):  # 4 rows at a time, and each remainder
            left = torch.randn(rows, k, generator=gen)
            t = torch.rand(rows, generator=gen) + 0.1
            outs = [torch.full((rows, width), float("-inf")) for _ in range(2)]
            maxes = [torch.full((rows, width // chunk), float("nan")) for _ in range(2)]
            for scaled in (True, False):
                for i in range(0, vocab, block):
                    approx = torch.randn(rows, min(block, vocab - i), generator=gen) * 50
                    ops.module.int8_bounds(approx, t if scaled else None, left, extra, outs[0], maxes[0], i, chunk)
                    _bounds_in_torch(approx, t[:, None] if scaled else None, left, extra, outs[1], maxes[1], i, chunk)
                got, want = outs
                assert torch.isinf(got[:, vocab:]).all() and (got[:, vocab:] < 0).all()
                assert torch.allclose(got[:, :vocab], want[:, :vocab], rtol=1e-5, atol=1e-4)
                assert torch.equal(maxes[0], got.unflatten(1, (-1, chunk)).amax(2))
    finally:
        torch.set_num_threads(before)


def test_off_switch_and_a_failed_build_fall_back(monkeypatch, caplog):
    """LIDR_KERNELS=0 turns them off; without a compiler, or with a build that fails, lidr logs
    why (the compiler's error line, not torch's command line) and goes on with PyTorch's
    operators."""
    uncached = kernels.load.__wrapped__  # the cached build stays for the other tests
    monkeypatch.setenv("LIDR_KERNELS", "0")
    assert uncached() is None
    monkeypatch.setenv("LIDR_KERNELS", "1")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with caplog.at_level(logging.WARNING, logger="lidr.kernels"):
        assert uncached() is None
    assert "no C++ compiler ('/nonexistent/c++' is not on PATH" in caplog.text
    monkeypatch.delenv("CXX")
    caplog.clear()

    def failed():
        raise RuntimeError("Error building extension 'x': [1/2] c++ -MMD -MF a.o.d -DTORCH_EXTENSION_NAME=x\n"
                           "a.cpp:3:10: fatal error: Python.h: No such file or directory\ncompilation terminated.")

    monkeypatch.setattr(kernels, "_build", failed)
    with caplog.at_level(logging.WARNING, logger="lidr.kernels"):
        assert uncached() is None
    assert "not built (RuntimeError: a.cpp:3:10: fatal error: Python.h: No such file" in caplog.text


def test_a_lock_left_by_a_killed_build_is_removed(ops, caplog):
    """torch's build lock, left behind by a build that was killed, would make every later load
    wait forever; lidr removes it (under a lock of its own, which the OS releases with the process)."""
    stale = kernels.build_directory() / "lock"
    stale.write_text("")
    with caplog.at_level(logging.WARNING, logger="lidr.kernels"):
        assert kernels.load.__wrapped__() is not None
    assert not stale.exists() and "left by a build that did not finish" in caplog.text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_prepare_is_pytorchs_preparation(ops, dtype):
    """The rows Int8Head.upper hands oneDNN's int8 product (quantized with each row's scale,
    outlier channels at the zero point) equal PyTorch's; the fp32 side product's columns and
    the slack agree up to the order of their sums."""
    gen = torch.Generator().manual_seed(6)
    d, outliers = 640, torch.tensor([3, 100, 101, 639])
    for rows in (1, 3, 33):
        h = (torch.randn(rows, d, generator=gen) * 4).to(dtype)
        h[:, 100] = 150  # an outlier channel far above the rest
        if rows > 1:
            h[1] = 0  # a row of zeros: the smallest scale
        margin, d_rest, slack_norm, slack_t = 1 + 2 ** -10, d - len(outliers), 0.25, 3.0
        qx, t, left, slack = ops.module.int8_prepare(h, outliers, margin, d_rest, slack_norm, slack_t)
        x = h.float()
        rest = x.clone()
        rest[:, outliers] = 0
        want_t = rest.abs().amax(1, keepdim=True).div_(127).clamp_(min=torch.finfo(torch.float32).tiny)
        assert torch.equal(t, want_t)
        assert torch.equal(qx, torch.div(rest, want_t).round_().add_(128).to(torch.uint8))
        a = want_t / 2 * margin
        c = (rest.abs().sum(1, keepdim=True) + d_rest * want_t / 2) / 2 * margin
        assert torch.equal(left[:, :len(outliers)], x[:, outliers]) and torch.equal(left[:, -2:-1], a)
        assert torch.allclose(left[:, -1:], c, rtol=1e-6, atol=0)
        assert torch.allclose(slack, slack_norm * x.norm(dim=1) + slack_t * want_t[:, 0], rtol=1e-6, atol=0)


def test_one_activation_table_for_modules_that_compute_the_same_function():
    """Each MLP has its own activation module: modules of one class and attributes share one table
    (transformers' GELUTanh keeps a new functools.partial in each); other attributes or classes,
    or a module with parameters, get their own."""
    from transformers.activations import ACT2FN

    from lidr.backends.gemma3_body import _activation_table

    a, b = ACT2FN["gelu_pytorch_tanh"], ACT2FN["gelu_pytorch_tanh"]
    assert a is not b and _activation_table(a) is _activation_table(b)
    tanh, exact = torch.nn.GELU(approximate="tanh"), torch.nn.GELU()
    assert _activation_table(tanh) is not _activation_table(exact)
    assert not torch.equal(_activation_table(tanh).values, _activation_table(exact).values)
    assert _activation_table(tanh) is not _activation_table(a)  # another class: its own table
    prelu = torch.nn.PReLU().bfloat16()  # a parameter: never shared
    assert _activation_table(prelu) is not _activation_table(torch.nn.PReLU().bfloat16())
