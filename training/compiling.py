"""Regional compilation: `torch.compile` on each decoder layer of the language model, not the whole model.

All decoder layers share one code object, so the first compiles it and the others reuse it (seconds, where
a whole-model compile of a 7B takes minutes and breaks on the vision tower, the image scatter and the loss).
The compiled call sits inside the layer's `__call__`, under gradient checkpointing's recompute, and around
PEFT's LoRA linears. A layer that fails to compile (an op inductor cannot trace, such as a 4-bit kernel on
some bitsandbytes builds, or no C++ compiler on a CPU) makes every layer run eagerly from then on, with the
reason logged once: the run goes on at eager speed instead of stopping.
"""
from __future__ import annotations

import logging
import warnings

log = logging.getLogger(__name__)


def decoder_layers(model) -> list:
    """The language model's decoder layers (through PEFT and LLaVA wrappers)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"compile: no decoder layers found in {type(model).__name__}")
    return list(layers)


def compile_layers(model, **compile_kwargs) -> dict:
    """Compile each decoder layer in place. Returns the shared state: {"layers": n, "failed": None | reason};
    "failed" is set (and warned about) by the first call that fails to compile."""
    import torch

    state = {"layers": 0, "failed": None}
    for layer in decoder_layers(model):
        eager = layer._call_impl
        compiled = torch.compile(eager, **compile_kwargs)

        def call(*args, _compiled=compiled, _eager=eager, **kwargs):
            if state["failed"] is None:
                try:
                    return _compiled(*args, **kwargs)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as e:  # noqa: BLE001 - dynamo/inductor raise many types; eager re-raises real bugs
                    state["failed"] = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
                    warnings.warn(f"compile: the decoder layers run eagerly ({state['failed']})")
                    log.warning("compile: the decoder layers run eagerly (%s)", state["failed"])
            return _eager(*args, **kwargs)

        # nn.Module.__call__ runs `_compiled_call_impl` when set: what Module.compile() sets, here guarded
        layer._compiled_call_impl = call
        state["layers"] += 1
    return state
