"""Padding-free batches: a batch's samples concatenated into one row, positions restarting per sample.

Chart-QA samples differ in length (576 image tokens + one to several short turns), so a padded batch spends
compute on pad tokens. `PackingCollator` lays the samples end to end in one row of exactly their total length,
with `position_ids` that restart at 0 for each sample and no `attention_mask`. From those position ids
transformers (masking_utils: `find_packed_sequence_indices`) builds a block-diagonal causal mask, so a token
never attends to another sample: with `sdpa` that is a boolean 4D mask (CPU, and CUDA without the varlen
kernel). On CUDA `use_varlen` swaps the language model's attention for torch's variable-length flash kernel
(`torch.nn.attention.varlen.varlen_attn`, torch >= 2.9), fed the `cu_seq_lens_*` boundaries the collator
adds (the same kwargs FlashAttention-2's varlen path reads): no mask and no attention across samples is
computed at all. Labels stay answer-only per token; the first token of each sample is never a label, so the
last token of one sample never learns to predict the next sample.
"""
from __future__ import annotations

import logging

IGNORE = -100
VARLEN = "packed_varlen"        # the attention implementation name registered by use_varlen

log = logging.getLogger(__name__)


class PackingCollator:
    """Samples (as ChatDataset gives them) -> one packed row: input_ids, labels, position_ids (1, total),
    cu_seq_lens_q/k (int32 sample boundaries), max_length_q/k, use_cache False, and the image tensors concatenated in
    sample order (LLaVA scatters image features onto the image tokens in order).

    A batch whose samples all have one length has no padding to remove: it stays a plain batch (training.data's
    Collator), because there the dense causal kernel (cuDNN's SDPA) is faster than the varlen one: 12% a step on
    835-token LLaVA batches on an H200 (docs/BENCHMARKS.md)."""

    def __init__(self, pad_token_id: int):
        from training.data import Collator
        self.plain = Collator(pad_token_id)

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        if len({len(b["input_ids"]) for b in batch}) == 1:
            return self.plain(batch)
        ids = [b["input_ids"] for b in batch]
        labels = [b["labels"].clone() for b in batch]
        for lab in labels:
            lab[0] = IGNORE
        lengths = [len(x) for x in ids]
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out = {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
               "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
               "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(lengths), "max_length_k": max(lengths),
               # a cache (the config's use_cache default) turns transformers' packed-sequence detection off
               "use_cache": False}
        for key in batch[0]:
            if key not in out and key != "attention_mask" and torch.is_tensor(batch[0][key]):
                out[key] = torch.cat([b[key] for b in batch if key in b])
        return out


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                     **kwargs):
    """Attention over a packed row with torch's varlen flash kernel; any other call (padded evaluation
    batches, generation with a cache) goes to SDPA unchanged."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1 or attention_mask is not None or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    import torch

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # (1, heads, tokens, dim) -> (tokens, heads, dim), the layout of the varlen kernel
    # The flash kernel takes half precision only (an fp32 model on CUDA: computed in bf16, returned in fp32)
    half = query.dtype if query.dtype in (torch.float16, torch.bfloat16) or not query.is_cuda else torch.bfloat16
    q, k, v = (t[0].transpose(0, 1).to(half) for t in (query, key, value))
    cu_q, cu_k = cu_seq_lens_q.to(q.device, torch.int32), cu_seq_lens_k.to(q.device, torch.int32)
    out = call_varlen(q, k, v, cu_q, cu_k, int(max_length_q), int(max_length_k), scaling)
    return out[None].to(query.dtype), None          # (1, tokens, heads, dim), as sdpa_attention_forward returns


_KERNEL: dict = {}      # filled once, outside any compiled region (inspect does not trace under dynamo)


def call_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale=None):
    """Causal varlen attention across torch versions: 2.9 takes `is_causal`, later ones a `window_size`
    ((-1, 0) is causal) and `scale`."""
    if not _KERNEL:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        _KERNEL.update(fn=varlen_attn, causal=causal, scale="scale" in params)
    kw = dict(_KERNEL["causal"])
    if scale is not None and _KERNEL["scale"]:
        kw["scale"] = scale
    elif scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6:
        raise RuntimeError(f"this torch's varlen_attn takes no scale and the model's is {scale}")
    return _KERNEL["fn"](q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def _mask_or_none(*args, attention_mask=None, **kwargs):
    # A packed row has no 2D mask: the varlen kernel takes its boundaries from cu_seq_lens, so no 4D mask is
    # built; a padded batch (evaluation) gets SDPA's mask as before.
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def varlen_available(device) -> str | None:
    """None when the varlen kernel runs here, else why not (checked on a tiny packed input)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return "not on CUDA"
    try:
        q = torch.randn(6, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        cu = torch.tensor([0, 2, 6], device=device, dtype=torch.int32)
        call_varlen(q, q, q, cu, cu, 4, 4).sum().backward()      # forward and backward
    except Exception as e:  # noqa: BLE001 - an old torch, a GPU without the kernel: SDPA's mask instead
        return f"{type(e).__name__}: {e}"
    return None


def use_varlen(model) -> str:
    """On CUDA, the language model's attention becomes the varlen kernel (the vision tower keeps its own).
    Returns the attention path packed rows take: "varlen" or "sdpa block mask" (with the reason logged)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    device = next(model.parameters()).device
    why = varlen_available(device)
    if why is not None:
        log.info("packing: SDPA with a block-diagonal mask (varlen kernel unavailable: %s)", why)
        return "sdpa block mask"
    AttentionInterface.register(VARLEN, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, _mask_or_none)
    text = model.get_decoder() if hasattr(model, "get_decoder") else model
    text.set_attn_implementation(VARLEN)
    return "varlen"


def packed_attention(model, attn_implementation: str, on_cuda: bool) -> str:
    """Make packed rows attend within each sample; returns the path they take (printed in the run log)."""
    if attn_implementation == "flash_attention_2":
        return "flash_attention_2 varlen (cu_seq_lens)"
    if attn_implementation == "sdpa" and on_cuda:
        return use_varlen(model)
    return f"{attn_implementation} block mask"
