"""Gemma 3's text body for the decoder's forwards, in fewer operator calls: the same arithmetic.

transformers' `Gemma3TextModel` makes about 110 operator calls per layer and forward, most
of them on tensors of a few rows (a norm is 10 calls; rotary embeddings 16), and dispatches
through ~15 modules and their decorators per layer. A 2-row decoding step of gemma-3-270m's
body took 36 ms through it, of which the 126 linear layers 19-24 ms; the rest is that
bookkeeping. `Gemma3Body` runs the same operators in the same order on the same modules'
weights, with the per-layer constants computed once (a norm's 1 + weight; the attention
mask once per forward instead of per layer): 31 ms for that step, and 6 % less time on
bench/generate.py's workload (bench/README.md, round 13). Its hidden states equal
transformers' bit for bit (tests/test_gemma3_body.py compares them on every path the decoder
takes); the decoder checks that once more on its probe before using it, on a CPU
(`ContinuousDecoder.__init__`).

For bf16 weights, where lidr's C++ kernels are built (lidr/kernels.py), the norms, rotary
embeddings, activation and residual sums run fused (`_Layer._fused`): the same roundings in the
same order, so the same bits again, and 19-21 % less time per layer (bench/README.md, round 25).
`Gemma3Body.eager()` is the same body without them, which the decoder falls back to where the
fused one misses its probe.

It serves only what the decoder does: inference, sdpa attention, a 2D padding mask and a
KV cache that holds the whole sequence (every sliding-window layer still within its window;
the decoder falls back to transformers' forward otherwise). Forward hooks on the body's
submodules are not called.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lidr import packed_linear


class Gemma3Body:
    """`Gemma3Body.of(body)(ids, mask, positions, cache)` == `body(...).last_hidden_state`."""

    @classmethod
    def of(cls, body: nn.Module, fused: bool = True) -> "Gemma3Body | None":
        """The fast forward of `body` if it is a plain Gemma 3 text model this module knows
        (sdpa attention, causal, no attention soft-capping), else None. `fused`: its small
        operators through lidr's C++ kernels where they are built and the weights are bf16
        (`lidr/kernels.py`; `eager()` gives the same body without them)."""
        try:
            from transformers.models.gemma3 import modeling_gemma3 as g
        except ImportError:
            return None
        cfg = getattr(body, "config", None)
        if type(body) is not g.Gemma3TextModel or cfg is None:
            return None
        layers = list(body.layers[: cfg.num_hidden_layers])
        kinds = getattr(cfg, "layer_types", None)
        plain = (getattr(cfg, "_attn_implementation", None) == "sdpa"
                 and not getattr(cfg, "use_bidirectional_attention", False)
                 and getattr(cfg, "attn_logit_softcapping", None) is None
                 and kinds is not None and len(kinds) >= len(layers)
                 and set(kinds) <= {"full_attention", "sliding_attention"}
                 and all(type(layer) is g.Gemma3DecoderLayer and type(layer.self_attn) is g.Gemma3Attention
                         and type(layer.mlp) is g.Gemma3MLP for layer in layers))
        return cls(body, layers, fused) if plain else None

    def __init__(self, body: nn.Module, layers: list, fused: bool = True):
        cfg = body.config
        self.body = body
        self.layer_types = list(cfg.layer_types[: len(layers)])
        groups = cfg.num_attention_heads // cfg.num_key_value_heads  # query heads per KV head
        self.layers = [_Layer(layer, cfg.head_dim, groups) for layer in layers]
        self.norm = _Norm(body.norm)
        self.ops = None  # lidr's C++ kernels (lidr/kernels.py), where they are used
        if fused and body.embed_tokens.weight.dtype == torch.bfloat16 and body.embed_tokens.weight.device.type == "cpu":
            from lidr import kernels

            self.ops = kernels.load()
        if self.ops is not None:
            for layer, fast in zip(layers, self.layers):
                fast.fuse(self.ops, _activation_table(layer.mlp.act_fn))

    @property
    def fused(self) -> bool:
        return self.ops is not None

    def eager(self) -> "Gemma3Body":
        """The same body with PyTorch's own operators throughout."""
        return self if self.ops is None else Gemma3Body(self.body, [layer.layer for layer in self.layers], fused=False)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Final hidden states [rows, new tokens, hidden] of `ids` [rows, new], appended to
        `cache`; `mask` [rows, cached + new] marks real tokens, `positions` [rows, new]."""
        rows, q = ids.shape
        h = self.body.embed_tokens(ids)
        rotary = {}
        for kind in dict.fromkeys(self.layer_types):
            cos, sin = self.body.rotary_emb(h, positions, kind)
            rotary[kind] = cos.unsqueeze(1), sin.unsqueeze(1)
        keep = _keep(mask, q)
        if self.ops is not None:  # the fused kernels take cos and sin as [tokens, head_dim]
            rotary = {kind: tuple(t.reshape(rows * q, -1).contiguous() for t in cs) for kind, cs in rotary.items()}
        for i, (layer, kind) in enumerate(zip(self.layers, self.layer_types)):
            h = layer(h, rotary[kind], keep, cache, i)
        return self.norm(h)


class _Norm:
    """Gemma3RMSNorm with (1 + weight) computed once: x * rsqrt(mean(x^2) + eps) * (1 + w), in fp32."""

    def __init__(self, norm: nn.Module):
        self.eps = norm.eps
        self.scale = (1.0 + norm.weight.detach().float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale).type_as(x)


class _Layer:
    """One Gemma3DecoderLayer: attention and MLP, each between its two norms, with residuals."""

    def __init__(self, layer: nn.Module, head_dim: int, groups: int):
        self.layer = layer
        self.ops = None  # lidr.kernels.Kernels, after `fuse`
        attn, mlp = layer.self_attn, layer.mlp
        self.head_dim, self.groups = head_dim, groups
        self.q, self.k, self.v, self.o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.gate, self.up, self.down, self.act = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.q_norm, self.k_norm = _Norm(attn.q_norm), _Norm(attn.k_norm)
        self.norms = [_Norm(n) for n in (layer.input_layernorm, layer.post_attention_layernorm,
                                         layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm)]
        self.scaling = attn.scaling

    def fuse(self, ops, table: "_ActivationTable") -> None:
        """Run the small operators through `ops` (lidr.kernels.Kernels); `table`: the activation of every
        bf16 value."""
        self.ops, self.table = ops, table

    def __call__(self, h, rotary, keep, cache, index: int) -> torch.Tensor:
        if self.ops is not None:
            return self._fused(h, rotary, keep, cache, index)
        rows, q, _ = h.shape
        x = self.norms[0](h)
        # the linear layers' own forward: oneDNN's where the decoder packed them (lidr/packed_linear.py)
        query = self.q.forward(x).view(rows, q, -1, self.head_dim).transpose(1, 2)
        key = self.k.forward(x).view(rows, q, -1, self.head_dim).transpose(1, 2)
        value = self.v.forward(x).view(rows, q, -1, self.head_dim).transpose(1, 2)
        query, key = _rotate(self.q_norm(query), *rotary), _rotate(self.k_norm(key), *rotary)
        key, value = cache.update(key, value, index)
        out = _attention(query, key, value, keep, self.scaling, self.groups)
        h = h + self.norms[1](self.o.forward(out.reshape(rows, q, -1)))
        x = self.norms[2](h)
        x = self.down.forward(self.act(self.gate.forward(x)) * self.up.forward(x))
        return h + self.norms[3](x)

    def _fused(self, h, rotary, keep, cache, index: int) -> torch.Tensor:
        """`__call__` with the norms, rotary embeddings, activation and residual sums through
        the fused kernels (lidr/csrc/gemma3_ops.cpp: the same roundings, so the same bits);
        the linear layers, the cache and attention as there. `rotary`: cos and sin [tokens, dim]."""
        ops, lanes, norms = self.ops.module, self.ops.lanes, self.norms
        rows, q, width = h.shape
        h = h.reshape(rows * q, width)
        x = ops.rms_norm(h, norms[0].scale, norms[0].eps, lanes)
        query, key = _linear(self.q, x), _linear(self.k, x)
        query = ops.norm_rope(query, query.shape[1] // self.head_dim, self.q_norm.scale, self.q_norm.eps, *rotary, lanes)
        key = ops.norm_rope(key, key.shape[1] // self.head_dim, self.k_norm.scale, self.k_norm.eps, *rotary, lanes)
        query, key, value = (t.view(rows, q, -1, self.head_dim).transpose(1, 2) for t in (query, key, _linear(self.v, x)))
        key, value = cache.update(key, value, index)
        out = _attention(query, key, value, keep, self.scaling, self.groups)
        # h + norm1(o), and norm2 of that: the MLP's input
        h, x = ops.add_norm(h, _linear(self.o, out.reshape(rows * q, -1)), norms[1].scale, norms[1].eps,
                            norms[2].scale, norms[2].eps, lanes)
        gate, up = _linear(self.gate, x), _linear(self.up, x)
        x, ambiguous = ops.act_mul(gate, up, self.table.values, self.table.ambiguous)
        if ambiguous and self.table.scalar_tail(gate.numel()):  # eager's answer depends on the position
            x = self.act(gate) * up
        (h,) = ops.add_norm(h, _linear(self.down, x), norms[3].scale, norms[3].eps, None, 0.0, lanes)
        return h.view(rows, q, width)


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer.forward(x)` for 2D contiguous `x`, calling oneDNN's product straight where the layer's
    forward is lidr's packed one (lidr/packed_linear.py): its reshapes and checks cost about 4.5 us
    a call, 126 calls a step."""
    packed = getattr(vars(layer).get("forward"), "packed", None)  # a forward set since is called
    if packed is None:
        return layer.forward(x)
    return packed_linear.linear(x, packed, layer.bias)


# Tables made so far, by what decides an activation module's function (`_activation_key`): each
# layer has its own module (transformers makes one per MLP), and a table takes about 2 ms.
_TABLES: dict[tuple, "_ActivationTable"] = {}
_MODULE_STATE = frozenset(vars(nn.Module()))  # what every module has: hooks, flags, registries


def _activation_table(act) -> "_ActivationTable":
    """The table of `act`: one made for an activation of the same class and attributes, else a new one."""
    key = _activation_key(act)
    if key is None:
        return _ActivationTable(act)
    if key not in _TABLES:
        _TABLES[key] = _ActivationTable(act)
    return _TABLES[key]


def _activation_key(act) -> tuple | None:
    """An activation module's class and its own attributes (as text: transformers' GELUTanh keeps a
    `functools.partial`, a new object in every module), where it has no parameters, buffers or
    submodules; None (no sharing) otherwise."""
    if (not isinstance(act, nn.Module) or next(act.parameters(), None) is not None
            or next(act.buffers(), None) is not None or next(act.children(), None) is not None):
        return None
    return type(act), tuple(sorted((k, repr(v)) for k, v in vars(act).items() if k not in _MODULE_STATE))


class _ActivationTable:
    """The model's activation of each of the 65,536 bf16 bit patterns, for the fused kernel to look
    up (`values`, float32, exact, in bit order): the eager operator's bits by construction, but
    for a few inputs eager has two answers.

    ATen runs the last elements of each thread's chunk of a tensor (numel / threads of them, a
    multiple of its vectorized loop's 64 or not) through a scalar loop, and gelu's tanh there
    differs from the vectorized one at -5.0625 ... -5.15625 (-0.0 against -1.5e-7; found in
    review, bench/README.md round 25). `ambiguous` marks such inputs (uint8). A layer's gates that
    hold one are exact from the table only where no element of a tensor of their size goes
    through the scalar loop at this thread count (`scalar_tail`): on 2 threads and gemma-3-270m's
    widths never; 27 % of the generate workload's layer calls held one."""

    def __init__(self, act):
        every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        with torch.inference_mode():
            # 4,096 contiguous values at a time: one thread's chunk (ATen splits a tensor between
            # threads only past 16,384 values), a multiple of the vectorized loop's 64: no scalar tail
            vectorized = torch.cat([act(every[i:i + 4096]) for i in range(0, len(every), 4096)])
            scalar = act(torch.stack([every, every], 1)[:, 0])  # a strided view: all in the scalar loop
        differs = (vectorized.view(torch.int16) != scalar.view(torch.int16)) & ~(vectorized.isnan() & scalar.isnan())
        order = lambda t: torch.cat([t[32768:], t[:32768]]).contiguous()  # noqa: E731  (unsigned bit order)
        self.values, self.ambiguous = order(vectorized.float()), order(differs.to(torch.uint8))
        self.act = act
        self.probe = every[differs][:1]  # an input with two answers, if there is one
        self.probe_vectorized = vectorized[differs][:1]
        self._tails: dict[tuple[int, int], bool] = {}

    def scalar_tail(self, numel: int) -> bool:
        """Does ATen's activation of a contiguous tensor of `numel` values, on this many threads,
        run any of them through its scalar loop? Asked of ATen itself, once per size: the
        activation of `numel` copies of an input with two answers shows where each came from."""
        key = (numel, torch.get_num_threads())
        if not len(self.probe):
            return False  # no input has two answers
        if key not in self._tails:
            with torch.inference_mode():
                out = self.act(self.probe.expand(numel).contiguous())
            self._tails[key] = not bool((out.view(torch.int16) == self.probe_vectorized.view(torch.int16)).all())
        return self._tails[key]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as transformers' apply_rotary_pos_emb (rotate_half)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _keep(mask: torch.Tensor, q: int) -> torch.Tensor | None:
    """The boolean attention mask [rows, 1, q, kv] of the last `q` positions, as transformers'
    sdpa_mask makes it: None where it is skipped (no padding and one new token, or no cache),
    which also changes how sdpa is called (`_attention`)."""
    kv = mask.shape[1]
    if (q == 1 or kv == q) and bool(mask.all()):
        return None
    keep = mask.bool()[:, None, None, :]
    if q > 1:
        causal = torch.arange(kv - q, kv, device=mask.device)[:, None] >= torch.arange(kv, device=mask.device)[None]
        keep = keep & causal
    return keep


def _attention(query, key, value, keep, scaling: float, groups: int) -> torch.Tensor:
    """transformers' sdpa_attention_forward for these inputs -> [rows, q, heads, head_dim]."""
    rows, heads, q, dim = query.shape
    if groups > 1 and keep is None:  # its `use_gqa_in_sdpa` holds without a mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, scale=scaling,
                                             is_causal=q > 1, enable_gqa=True)
    else:
        if groups > 1 and q == 1:  # pack_gqa: the query heads of one kv head as its "positions"
            query = query.reshape(rows, heads // groups, groups, dim)
        elif groups > 1:  # repeat_kv
            key = key[:, :, None].expand(*key.shape[:2], groups, *key.shape[2:]).reshape(rows, -1, *key.shape[2:])
            value = value[:, :, None].expand(*value.shape[:2], groups,
                                             *value.shape[2:]).reshape(rows, -1, *value.shape[2:])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, dropout_p=0.0, scale=scaling,
                                             is_causal=keep is None and q > 1)
    return out.reshape(out.shape[0], -1, q, dim).transpose(1, 2).contiguous()
