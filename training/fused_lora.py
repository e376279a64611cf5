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

With `siblings=True` (TrainConfig.fused_lora_siblings) the linears of one layer that read the same input
(q/k/v_proj, gate/up_proj) also share their first half: one dropout mask on the input and one matmul
with their A matrices stacked, `dropout(x) @ [A_q; A_k; A_v]^T`, each sibling then taking its r columns.
That is LoRA on a fused qkv_proj / gate_up_proj (as Phi-3 has) with a block-diagonal B: the same
parameters and saved adapter, one dropout mask where PEFT draws three (equal when dropout is 0), and per
layer 4 dropouts instead of 7, 2 A-matmuls instead of 5, and as many fewer in backward.
"""
from __future__ import annotations

import types


def _fusable(module, name) -> bool:
    return (name in module.lora_A and name not in getattr(module, "lora_variant", {})
            and module.lora_B[name].bias is None)


def _fused_forward(self, x, *args, **kwargs):
    names, group = self.active_adapters, getattr(self, "_siblings", None)
    if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1
            or not all(_fusable(m, names[0]) for m in (group.members if group else [self]))):
        return type(self).forward(self, x, *args, **kwargs)
    import torch
    name = names[0]
    result = self.base_layer(x)
    if group:
        low = group.low(self, x, name)
    else:
        low = self.lora_A[name](self.lora_dropout[name](x.to(self.lora_A[name].weight.dtype)))
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]).to(result.dtype),
                       self.lora_B[name].weight.t().to(result.dtype), alpha=self.scaling[name])
    return flat.view(result.shape)


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))     # called in this order on one input


class _Siblings:
    """Linears of one layer that read the same input: the first one called with a new input computes the
    low-rank activations of all of them, the others take theirs (forward and checkpoint recompute alike)."""

    def __init__(self, members):
        self.members, self.x, self.ready = members, None, {}

    def low(self, module, x, name):
        import torch
        if self.x is not x or module not in self.ready:
            weights = [m.lora_A[name].weight for m in self.members]
            low = torch.nn.functional.linear(module.lora_dropout[name](x.to(weights[0].dtype)), torch.cat(weights))
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


def fuse_lora(model, siblings: bool = False) -> int:
    """Fuse the forward of every LoRA linear (dense or bitsandbytes 4-bit base) of a PEFT model; with
    `siblings`, linears that read one input also share its dropout mask and one A matmul."""
    for members in _sibling_groups(model) if siblings else []:
        group = _Siblings(members)
        for m in members:
            m._siblings = group
    fused = 0
    for module in model.modules():
        if _plain(module):
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
