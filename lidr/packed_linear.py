"""Frozen linear layers on a CPU through oneDNN with prepacked weights (LoRA training, generation).

With LoRA the base model's linear layers never change, and each one runs twice a step: `x W^T`
forward and `g W` backward; in generation no weight changes at all. PyTorch sends fp32
`F.linear` to MKL, which on the AMD CPUs measured here reached 58-88 GFLOP/s for a layer's
forward + backward at the training batches' shapes; oneDNN, given its weights reordered once
into its blocked layout, reached 87-103 (the same fp32 arithmetic, summed in another order). In
generation's decoding steps (4-32 rows) the gap is wider: gemma-3-270m's 262k-token output
layer took 58-119 ms through oneDNN against 121-183 ms through MKL (bench/README.md, round 4).
This is what PyTorch's own compiler does for frozen CPU weights (`torch._inductor` freezing
calls the same two operators). Used only where the operators exist, on plain fp32 CPU weights
that do not train; `unpack` restores the layers.
"""

from __future__ import annotations

import platform

import torch
from torch import nn

_OPS = ("_linear_pointwise", "_reorder_linear_weight")


def on_x86() -> bool:
    """The CPU is x86-64: where lidr's CPU kernels (oneDNN here, fbgemm in lidr/head.py) were
    measured (AVX2, AMD EPYC: bench/README.md)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def available() -> bool:
    """The operators exist and the CPU is x86-64, where they were measured faster. Elsewhere
    (ARM: oneDNN's kernels there were not measured) the layers stay plain."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (on_x86() and torch.backends.mkldnn.is_available()
            and all(hasattr(mkldnn, op) for op in _OPS))


class _PackedLinear(torch.autograd.Function):
    """y = x W^T (+ b) with W packed for the forward (`forward_w`) and W^T for the backward."""

    @staticmethod
    def forward(ctx, x, forward_w, backward_w, bias):
        ctx.backward_w = backward_w
        return linear(x, forward_w, bias)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return linear(grad, ctx.backward_w), None, None, None


def pack_weight(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """`weight` [out, in] reordered once into oneDNN's blocked layout for `linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, W, bias)` for 2D `x`, with W given as `pack_weight(W)` (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def _packed_forward(layer: nn.Linear, forward_w, backward_w):
    def forward(x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if backward_w is not None:
            y = _PackedLinear.apply(x2, forward_w, backward_w, layer.bias)
        elif torch.is_grad_enabled() and x.requires_grad:  # packed for inference only
            return nn.functional.linear(x, layer.weight, layer.bias)
        else:
            y = linear(x2, forward_w, layer.bias)
        return y.view(*shape[:-1], y.shape[-1])
    forward.packed = forward_w  # Gemma3Body's fused layers call the product straight (`_linear` there)
    return forward


def eligible(layer: nn.Module, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    w = getattr(layer, "weight", None)
    return (type(layer) is nn.Linear and type(w) is nn.Parameter and not w.requires_grad
            and w.device.type == "cpu" and w.dtype in dtypes
            and (layer.bias is None or not layer.bias.requires_grad))


def pack(model: nn.Module, rows_hint: int = 128, skip: tuple[nn.Module, ...] = (), backward: bool = True,
         dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> int:
    """Run every frozen fp32 CPU `nn.Linear` of model (but those in `skip`, e.g. an output layer
    computed elsewhere) through oneDNN with prepacked weights. Returns how many were packed.
    `dtypes`: the weight dtypes packed (bf16 too for generation on a CPU with AMX / AVX512-BF16,
    where a bf16 product of a packed weight was measured 1.4-1.9x faster at 1-256 rows, with the
    plain product's bits; at 512-1000 rows with 1024-2048 inputs (a prefill) some outputs
    differ in the last bf16 bit, as two bf16 kernels may: bench/README.md, round 17; training
    packs fp32 only).
    Each keeps two packed copies (the forward's and the backward's layout); with
    `backward=False` only the forward's, and a call that needs a gradient runs the plain layer.
    For gemma-3-270m's 126 layers (100 M parameters, 765 MB as two fp32 copies) RSS rose by
    1289 MB.

    A layer packed already for the forward only (by a decoder: the model training takes over
    from generation) keeps that copy and gets the backward's: the layout chosen for another
    `rows_hint` computes the same products bit for bit (tests/test_packed_linear.py), and
    reordering gemma-3-270m's forward copies again took 0.12-0.27 s."""
    if not available():
        return 0
    n = 0
    for layer in model.modules():
        if layer in skip or not eligible(layer, dtypes):
            continue
        forward_w, backward_w = vars(layer).get("_lidr_packed") or (None, None)
        if forward_w is None and "forward" in vars(layer):
            continue  # a forward someone else set: left alone
        if forward_w is None or (backward and backward_w is None):
            w = layer.weight.detach()
            forward_w = forward_w if forward_w is not None else pack_weight(w, rows_hint)
            backward_w = pack_weight(w.T.contiguous(), rows_hint) if backward else None
            layer.forward = _packed_forward(layer, forward_w, backward_w)
            layer._lidr_packed = (forward_w, backward_w)
        n += 1
    return n


class _PackedLoraLinear(torch.autograd.Function):
    """y = x W^T (+ b) + s (x A^T) B^T: a LoRA layer over a packed frozen base in one autograd
    node. PEFT's layer makes four (base, A, B, the scaling) and adds the two results as a fifth,
    each a Python call and a pass over [rows, out]; here the LoRA product is added into the base
    result by one `addmm_`, and the backward adds x's two gradient terms the same way."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, forward_w, backward_w, bias, scaling):
        xa = x @ lora_a.T  # [rows, r]
        y = linear(x, forward_w, bias)
        y.addmm_(xa, lora_b.T, alpha=scaling)
        ctx.save_for_backward(x, lora_a, lora_b, xa)
        ctx.backward_w, ctx.scaling = backward_w, scaling
        return y

    @staticmethod
    def backward(ctx, grad):
        x, lora_a, lora_b, xa = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        grad_x = grad_a = grad_b = None
        if need_x or need_a:
            grad_xa = (grad @ lora_b).mul_(ctx.scaling)  # [rows, r]
            if need_a:
                grad_a = grad_xa.T @ x
            if need_x:
                grad_x = linear(grad, ctx.backward_w)
                grad_x.addmm_(grad_xa, lora_a)
        if need_b:
            grad_b = (grad.T @ xa).mul_(ctx.scaling)
        return grad_x, grad_a, grad_b, None, None, None, None


def _fused_lora_forward(layer: nn.Module, forward_w, backward_w):
    """The forward of PEFT LoRA layer `layer` whose base is packed: `_PackedLoraLinear` when one
    plain LoRA adapter (no dropout, bias or variant such as DoRA) is active on fp32 input, else
    PEFT's own forward (adapters disabled for the reference pass, merged weights, anything else)."""
    peft_forward = type(layer).forward

    def forward(x, *args, **kwargs):
        names = layer.active_adapters
        name = names[0] if len(names) == 1 else None
        if (args or kwargs or layer.disable_adapters or layer.merged or name not in layer.lora_A
                or name in getattr(layer, "lora_variant", {}) or x.dtype != torch.float32
                or type(layer.lora_dropout[name]) is not nn.Identity):
            return peft_forward(layer, x, *args, **kwargs)
        a, b = layer.lora_A[name], layer.lora_B[name]
        if (a.bias is not None or b.bias is not None or a.weight.dtype != torch.float32
                or b.weight.dtype != torch.float32):
            return peft_forward(layer, x, *args, **kwargs)
        shape = x.shape
        y = _PackedLoraLinear.apply(x.reshape(-1, shape[-1]).contiguous(), a.weight, b.weight, forward_w, backward_w,
                                    layer.base_layer.bias, float(layer.scaling[name]))
        return y.view(*shape[:-1], y.shape[-1])
    return forward


def fuse_lora(model: nn.Module) -> int:
    """Give every PEFT LoRA linear layer whose base `pack` packed (with its backward copy) the
    one-node forward of `_PackedLoraLinear`: the same arithmetic as PEFT's (gradients equal in
    tests/test_packed_linear.py) with fewer calls and passes over the layer's output. On
    gemma-3-270m's 13 steps over the demo's 25 pairs: 4 % less by the median of 6 epochs each
    way, alternating in one process, 10 % by the sum of each step's fastest run (bench/README.md,
    round 15). Returns how many; `unpack` restores them."""
    n = 0
    for layer in model.modules():
        base = getattr(layer, "base_layer", None)
        packed = vars(base).get("_lidr_packed") if isinstance(base, nn.Module) else None
        if (packed is None or packed[1] is None or "forward" in vars(layer)
                or not all(hasattr(layer, a) for a in ("lora_A", "lora_B", "scaling", "lora_dropout"))):
            continue
        layer.forward = _fused_lora_forward(layer, *packed)
        layer._lidr_packed = None  # no copies of its own: `unpack` only restores its forward
        n += 1
    return n


def unpack(model: nn.Module) -> None:
    """Give the packed (and LoRA-fused) layers back their own forward (and free the packed copies)."""
    for layer in model.modules():
        if "_lidr_packed" in vars(layer):
            del layer._lidr_packed
            del layer.forward


def memory_available() -> int | None:
    """Bytes the OS says can still be allocated without swapping (Linux MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fits(nbytes: int) -> bool:
    """Is there room for a packed copy of `nbytes` of weights? Twice that must be free (packing
    gemma-3-270m's 1072 MB of linear weights raised RSS by 1062 MB; keep room for the rest)."""
    free = memory_available()
    return free is None or 2 * nbytes <= free


__all__ = ["available", "eligible", "fits", "linear", "memory_available", "on_x86", "pack", "pack_weight", "unpack"]
