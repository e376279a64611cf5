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
"""
from __future__ import annotations

import types


def _fused_forward(self, x, *args, **kwargs):
    names = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(names) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    name = names[0]
    if name not in self.lora_A or name in getattr(self, "lora_variant", {}) or self.lora_B[name].bias is not None:
        return type(self).forward(self, x, *args, **kwargs)
    import torch
    result = self.base_layer(x)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    low = lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]).to(result.dtype),
                       lora_b.weight.t().to(result.dtype), alpha=self.scaling[name])
    return flat.view(result.shape)


def fuse_lora(model) -> int:
    """Fuse the forward of every LoRA linear (dense or bitsandbytes 4-bit base) of a PEFT model."""
    from peft.tuners.lora import LoraLayer
    fused = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(module, LoraLayer) and hasattr(base, "in_features") and not getattr(module, "fan_in_fan_out", False):
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
