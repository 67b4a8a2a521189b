"""Frozen linear layers on a CPU through oneDNN with prepacked weights (LoRA training).

With LoRA the base model's linear layers never change, and each one runs twice a step: `x W^T`
forward and `g W` backward. PyTorch sends fp32 `F.linear` to MKL, which on the AMD CPUs measured
here reached 58-88 GFLOP/s for a layer's forward + backward at the training batches' shapes; oneDNN,
given its weights reordered once into its blocked layout, reached 87-103 (the same fp32
arithmetic, summed in another order). This is what PyTorch's own compiler does for frozen CPU
weights (`torch._inductor` freezing calls the same two operators). Used only where the operators
exist, on plain fp32 CPU weights that do not train; `unpack` restores the layers.
"""

from __future__ import annotations

import torch
from torch import nn

_OPS = ("_linear_pointwise", "_reorder_linear_weight")


def available() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return torch.backends.mkldnn.is_available() and all(hasattr(mkldnn, op) for op in _OPS)


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


def _packed_forward(layer: nn.Linear, forward_w, backward_w):
    def forward(x):
        shape = x.shape
        y = _PackedLinear.apply(x.reshape(-1, shape[-1]).contiguous(), forward_w, backward_w, layer.bias)
        return y.view(*shape[:-1], y.shape[-1])
    return forward


def eligible(layer: nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return (type(layer) is nn.Linear and type(w) is nn.Parameter and not w.requires_grad
            and w.device.type == "cpu" and w.dtype == torch.float32
            and (layer.bias is None or not layer.bias.requires_grad))


def pack(model: nn.Module, rows_hint: int = 128, skip: tuple[nn.Module, ...] = ()) -> int:
    """Run every frozen fp32 CPU `nn.Linear` of model (but those in `skip`, e.g. an output layer
    computed elsewhere) through oneDNN with prepacked weights. Returns how many were packed.
    Each keeps two packed copies (the forward's and the backward's layout). For gemma-3-270m's
    126 layers (100 M parameters, 765 MB as two fp32 copies) RSS rose by 1289 MB."""
    if not available():
        return 0
    n = 0
    for layer in model.modules():
        if layer in skip or not eligible(layer) or "forward" in vars(layer):
            continue
        w = layer.weight.detach()
        forward_w = torch.ops.mkldnn._reorder_linear_weight(w, rows_hint)
        backward_w = torch.ops.mkldnn._reorder_linear_weight(w.T.contiguous(), rows_hint)
        layer.forward = _packed_forward(layer, forward_w, backward_w)
        layer._lidr_packed = True
        n += 1
    return n


def unpack(model: nn.Module) -> None:
    """Give the packed layers back their own forward (and free the packed copies)."""
    for layer in model.modules():
        if vars(layer).pop("_lidr_packed", False):
            del layer.forward


__all__ = ["available", "pack", "unpack"]
