"""LoRA's low-rank update added inside its second matmul (TrainConfig.fused_lora).

PEFT's LoRA linear computes `result = base(x).clone(); result = result + B(A(dropout(x))) * scaling`:
besides the two small matmuls, three passes over the (tokens, out_features) output (the clone that 4-bit
layers make, the scale, the add), each again in backward and again under gradient checkpointing's
recompute. Here the update is one `addmm(base(x), A(dropout(x)), B^T, alpha=scaling)`: cuBLAS scales
and adds in the matmul's epilogue, and autograd's addmm backward applies `scaling` to the small
(tokens, r) and (r, out) gradients only. Same arithmetic, same parameters and state dict (the adapter
saves and loads as PEFT's own).

Only the plain case is fused: one active LoRA adapter, no DoRA or other variant, no LoRA bias, not
merged, adapters enabled, no extra forward arguments; anything else calls PEFT's forward unchanged.

    n = fuse_lora(peft_model)      # the number of LoRA linears whose forward is now fused

With `one_node=True` (TrainConfig.fused_lora_one_node) each half of the low-rank path is one autograd
node with a written-out backward: `LowRank` (dropout, then the A matmul) and `AddLowRank` (the addmm
with B), instead of the 5-7 nodes (dropout, views, transposes, matmuls) autograd records per linear. The
kernels and numbers are the same (the same dropout mask, drawn by the same native_dropout call); what it
saves is host time per node, which bounds a 4-bit training step that launches ~10,000 kernels.

With `siblings=True` (TrainConfig.fused_lora_siblings) the linears of one layer that read the same input
(q/k/v_proj, gate/up_proj) also share their first half: one dropout mask on the input and one matmul
with their A matrices stacked, `dropout(x) @ [A_q; A_k; A_v]^T`, each sibling then taking its r columns.
That is LoRA on a fused qkv_proj / gate_up_proj (as Phi-3 has) with a block-diagonal B: the same
parameters and saved adapter, one dropout mask where PEFT draws three (equal when dropout is 0), and per
layer 4 dropouts instead of 7, 2 A-matmuls instead of 5, and as many fewer in backward.
"""
from __future__ import annotations

import functools
import types


def _fusable(module, name) -> bool:
    return (name in module.lora_A and name not in getattr(module, "lora_variant", {})
            and module.lora_B[name].bias is None)


def _fused_forward(self, x, *args, **kwargs):
    names, group = self.active_adapters, getattr(self, "_siblings", None)
    if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1
            or not all(_fusable(m, names[0]) for m in (group.members if group else [self]))):
        return type(self).forward(self, x, *args, **kwargs)
    name = names[0]
    result = base_output(self.base_layer, x) if self._reuse else self.base_layer(x)
    if group:
        low = group.low(self, x, name)
    else:
        low = low_rank(x, [self.lora_A[name].weight], self.lora_dropout[name], self._one_node)
    return add_low_rank(result, low, self.lora_B[name].weight, self.scaling[name], self._one_node)


def base_output(layer, x):
    """A 4-bit linear's output as `F.linear(x, dequantized weight)` when x needs a gradient, so that autograd
    saves the dequantized weight for backward; any other layer or call runs the layer itself."""
    import torch
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    if state is None or not (torch.is_grad_enabled() and x.requires_grad):
        return layer(x)
    from bitsandbytes.functional import dequantize_4bit
    dtype = getattr(layer, "compute_dtype", None) or x.dtype
    weight = dequantize_4bit(layer.weight.data, state).to(dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return torch.nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)


def low_rank(x, weights: list, dropout, one_node: bool):
    """dropout(x) @ [A_1; A_2; ...]^T, (tokens, sum of ranks), as a matrix."""
    import torch
    if one_node and all(w.dtype == x.dtype for w in weights):
        p = float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0
        return _functions()[0].apply(x, p, *weights)
    stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
    return torch.nn.functional.linear(dropout(x.to(stacked.dtype)), stacked).reshape(-1, stacked.shape[0])


def add_low_rank(result, low, b, scale: float, one_node: bool):
    """result + scale * low @ B^T, in addmm's epilogue; result's shape."""
    import torch
    if one_node and low.dtype == b.dtype == result.dtype:
        return _functions()[1].apply(result, low, b, scale)
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), low.to(result.dtype), b.t().to(result.dtype), alpha=scale)
    return flat.view(result.shape)


@functools.cache
def _functions():
    """The two autograd Functions (made on first use: torch is imported lazily)."""
    import torch

    class LowRank(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, p, *weights):
            dropped, mask = torch.native_dropout(x, p, True) if p > 0 else (x, None)
            stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
            flat = dropped.reshape(-1, x.shape[-1])
            ctx.save_for_backward(flat, stacked, mask)
            ctx.p, ctx.ranks, ctx.shape = p, [w.shape[0] for w in weights], x.shape
            return flat @ stacked.t()

        @staticmethod
        def backward(ctx, grad):
            # under autocast the forward's matmul ran in a lower dtype than its inputs: backward in grad's dtype
            flat, stacked, mask = (t if t is None or t.dtype == torch.bool else t.to(grad.dtype)
                                   for t in ctx.saved_tensors)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (grad @ stacked).view(ctx.shape)
                if mask is not None:
                    grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - ctx.p))
            grad_w = (grad.t() @ flat).split(ctx.ranks) if any(ctx.needs_input_grad[2:]) else [None] * len(ctx.ranks)
            return grad_x, None, *grad_w

    class AddLowRank(torch.autograd.Function):
        @staticmethod
        def forward(ctx, result, low, b, scale):
            ctx.save_for_backward(low, b)
            ctx.scale = scale
            return torch.addmm(result.reshape(-1, result.shape[-1]), low, b.t(), alpha=scale).view(result.shape)

        @staticmethod
        def backward(ctx, grad):
            low, b = (t.to(grad.dtype) for t in ctx.saved_tensors)
            flat = grad.reshape(-1, grad.shape[-1])
            grad_low = torch.mm(flat, b).mul_(ctx.scale) if ctx.needs_input_grad[1] else None
            grad_b = torch.mm(flat.t(), low).mul_(ctx.scale) if ctx.needs_input_grad[2] else None
            return grad, grad_low, grad_b, None

    return LowRank, AddLowRank


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))     # called in this order on one input


class _Siblings:
    """Linears of one layer that read the same input: the first one called with a new input computes the
    low-rank activations of all of them, the others take theirs (forward and checkpoint recompute alike)."""

    def __init__(self, members):
        self.members, self.x, self.ready = members, None, {}

    def low(self, module, x, name):
        if self.x is not x or module not in self.ready:
            weights = [m.lora_A[name].weight for m in self.members]
            low = low_rank(x, weights, module.lora_dropout[name], module._one_node)
            self.x, self.ready = x, dict(zip(self.members, low.split([w.shape[0] for w in weights], dim=-1)))
        low = self.ready.pop(module)
        if not self.ready:
            self.x = None       # the last sibling: let the input go
        return low


def _plain(module) -> bool:
    """A LoRA linear the fused forward handles: dense or bitsandbytes 4-bit base, no Conv1D-style weights."""
    from peft.tuners.lora import LoraLayer
    return (isinstance(module, LoraLayer) and hasattr(getattr(module, "base_layer", None), "in_features")
            and not getattr(module, "fan_in_fan_out", False))


def _sibling_groups(model) -> list[list]:
    groups = []
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if (all(_plain(m) for m in members) and len({m.in_features for m in members}) == 1
                    and len({repr(m.lora_dropout) for m in members}) == 1):
                groups.append(members)
    return groups


def fuse_lora(model, siblings: bool = False, one_node: bool = False, reuse: bool = False) -> int:
    """Fuse the forward of every LoRA linear (dense or bitsandbytes 4-bit base) of a PEFT model; with
    `siblings`, linears that read one input also share its dropout mask and one A matmul; with `one_node`,
    each half of the low-rank path is one autograd node; with `reuse`, a 4-bit base's backward reuses the
    weight dequantized in its forward (for gradient-checkpointed models only)."""
    for members in _sibling_groups(model) if siblings else []:
        group = _Siblings(members)
        for m in members:
            m._siblings = group
    fused = 0
    for module in model.modules():
        if _plain(module):
            module._one_node, module._reuse = one_node, reuse
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
