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
        return torch.ops.mkldnn._linear_pointwise(x, forward_w, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return torch.ops.mkldnn._linear_pointwise(grad.contiguous(), ctx.backward_w, None, "none", [], ""), None, None, None


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
    return forward


def eligible(layer: nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return (type(layer) is nn.Linear and type(w) is nn.Parameter and not w.requires_grad
            and w.device.type == "cpu" and w.dtype == torch.float32
            and (layer.bias is None or not layer.bias.requires_grad))


def pack(model: nn.Module, rows_hint: int = 128, skip: tuple[nn.Module, ...] = (), backward: bool = True) -> int:
    """Run every frozen fp32 CPU `nn.Linear` of model (but those in `skip`, e.g. an output layer
    computed elsewhere) through oneDNN with prepacked weights. Returns how many were packed.
    Each keeps two packed copies (the forward's and the backward's layout); with
    `backward=False` only the forward's, and a call that needs a gradient runs the plain layer.
    For gemma-3-270m's 126 layers (100 M parameters, 765 MB as two fp32 copies) RSS rose by
    1289 MB."""
    if not available():
        return 0
    n = 0
    for layer in model.modules():
        if layer in skip or not eligible(layer) or "forward" in vars(layer):
            continue
        w = layer.weight.detach()
        forward_w = pack_weight(w, rows_hint)
        backward_w = pack_weight(w.T.contiguous(), rows_hint) if backward else None
        layer.forward = _packed_forward(layer, forward_w, backward_w)
        layer._lidr_packed = True
        n += 1
    return n


def unpack(model: nn.Module) -> None:
    """Give the packed layers back their own forward (and free the packed copies)."""
    for layer in model.modules():
        if vars(layer).pop("_lidr_packed", False):
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
