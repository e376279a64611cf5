"""The training loss from the answer positions only, without full-vocabulary logits for the whole batch.

The stock causal-LM loss projects every position of the batch onto the vocabulary (8 x 835 x 32064 logits
for LLaVA-1.5 at batch 8: 0.4 GB in bf16, 0.9 GB again as fp32 for the loss, and as much for its gradient)
although only the answer tokens (labels != -100, a few percent of a chart-QA sample) have a target.
Here the model is asked for the answer positions alone (`logits_to_keep` as a boolean mask); a pre-hook on
the output head takes the hidden states it is handed and lets it project none of them, and the loss is
computed from those hidden states:

- `chunked`: plain torch; the head and the cross-entropy run on `CHUNK` tokens at a time, each chunk under
  `torch.utils.checkpoint`, so at most one chunk's logits exist at once (forward and backward).
- `liger`: Liger's fused linear cross-entropy kernel (GPU; the head must be a plain Linear), else `chunked`.

Both return what the model's own loss returns: the summed token losses over `num_items_in_batch` (the
Trainer's count over the accumulated batch) or, without it, their mean. A model whose forward cannot take
the mask (LLaVA in transformers 5.17) raises MaskUnsupported, and the trainer goes on with the stock loss.
"""
from __future__ import annotations

import contextlib
import warnings

IGNORE = -100
CHUNK = 1024        # tokens per chunk: 1024 x 32064 fp32 logits = 131 MB, the most that exists at once
LOSS_IMPLS = ("chunked", "liger", "hf")


class MaskUnsupported(RuntimeError):
    """The model (or the installed transformers) cannot be asked for the answer positions alone; the
    trainer then falls back to the stock loss (loss_impl hf)."""


def answer_positions(labels):
    """(keep, targets): keep[b, t] is True where position t predicts a labelled token labels[b, t+1];
    targets are those tokens in the row-major order of hidden_states[keep]."""
    import torch

    shifted = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE)
    keep = shifted != IGNORE
    return keep, shifted[keep]


@contextlib.contextmanager
def head_input(head):
    """Within the block, the first call of `head` hands its input to `seen["hidden"]` and projects nothing
    (an empty slice of it) so that no logits are made; later calls run as usual."""
    seen: dict = {}

    def hook(module, args):
        if "hidden" in seen:
            return None
        seen["hidden"] = args[0]
        return (args[0][:0],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _chunk_loss(head, hidden, targets):
    import torch

    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_sum(head, hidden, targets, chunk: int | None = None):
    """Sum of the token cross-entropies of head(hidden) against targets, `chunk` tokens at a time. Each
    chunk's logits are freed after its forward and recomputed in backward (checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    chunk, total = chunk or CHUNK, None
    for start in range(0, hidden.shape[0], chunk):
        part = checkpoint(_chunk_loss, head, hidden[start:start + chunk], targets[start:start + chunk],
                          use_reentrant=False)
        total = part if total is None else total + part
    return total


def liger_sum(head, hidden, targets):
    """The same sum through Liger's fused kernel; None when it cannot run here (falls back to chunked)."""
    import torch

    if not hidden.is_cuda or type(head) is not torch.nn.Linear:
        return None
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    weight = head.weight
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")(
        weight, hidden.to(weight.dtype), targets, head.bias)


def output_head(model):
    """The module that projects hidden states onto the vocabulary (PEFT's wrapper when it is trained)."""
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module        # DDP / DeepSpeed engines
    return model.get_output_embeddings()


def answer_loss(model, inputs: dict, impl: str, num_items_in_batch=None):
    """(loss, outputs) of one forward pass whose loss covers the answer tokens only."""
    keep, targets = answer_positions(inputs["labels"])
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    head = output_head(model)
    with head_input(head) as seen:
        try:
            outputs = model(**rest, logits_to_keep=keep)
        except (IndexError, TypeError) as e:    # transformers < 5.23 LLaVA slices hidden_states[:, logits_to_keep]
            raise MaskUnsupported(f"the model's forward does not take a boolean logits_to_keep mask ({e})") from e
    hidden = seen.get("hidden")
    if hidden is None or hidden.ndim != 2 or hidden.shape[0] != targets.numel():
        got = "no call of its head" if hidden is None else f"its head got {tuple(hidden.shape)}"
        raise MaskUnsupported(f"the model ignored the boolean logits_to_keep mask ({got})")
    if targets.numel() == 0:
        total = hidden.sum() * 0.0      # no answer token: a zero that still reaches backward
    else:
        total = liger_sum(head, hidden, targets) if impl == "liger" else None
        if total is None:
            total = chunked_sum(head, hidden, targets)
    if num_items_in_batch is None:
        return total / max(targets.numel(), 1), outputs
    if hasattr(num_items_in_batch, "to"):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch, outputs


def apply_liger(model) -> bool:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on a loaded LLaVA (or Llama) model, before LoRA wraps it.
    False, with a warning, when liger_kernel does not import or the model has no Liger patch."""
    try:
        from liger_kernel.transformers import monkey_patch
    except Exception as e:  # noqa: BLE001 - a wheel built against other torch/transformers fails in many ways
        warnings.warn(f"liger: liger_kernel does not import ({type(e).__name__}: {e}); training without its kernels")
        return False
    kinds = {"llava": "apply_liger_kernel_to_llava", "llama": "apply_liger_kernel_to_llama"}
    name = kinds.get(getattr(model.config, "model_type", ""))
    if name is None or not hasattr(monkey_patch, name):
        warnings.warn(f"liger: no Liger patch for model type {model.config.model_type!r}; training without it")
        return False
    # The loss stays ours (answer positions only): Liger's fused loss would replace the model's forward.
    getattr(monkey_patch, name)(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    return True
