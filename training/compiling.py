"""Regional compilation: `torch.compile` on each decoder layer of the language model, not the whole model.

The decoder layers run the same code, so dynamo compiles it once and every layer reuses the graph (a
whole-model compile would also trace the vision tower, the image scatter and the loss, and compile again
for each of them). The compiled call sits inside the layer's `__call__`: around gradient checkpointing's
recompute and PEFT's LoRA linears. Only training forwards are compiled; evaluation and generation (a KV
cache, one-token steps) run the layers eagerly. A layer that fails to compile (an op inductor cannot trace,
such as a 4-bit kernel of some bitsandbytes build, or no C++ compiler on a CPU) makes every layer run
eagerly from then on, with the reason logged once: the run goes on at eager speed instead of stopping.
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
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    # Training forwards build no KV cache: a cache object per layer in the layer's inputs makes dynamo compile
    # again for each layer (past its recompile limit of 8); generation asks for its cache explicitly.
    if getattr(decoder, "config", None) is not None:
        decoder.config.use_cache = False
    for layer in decoder_layers(model):
        eager = layer._call_impl
        compiled = torch.compile(eager, **compile_kwargs)

        def call(*args, _compiled=compiled, _eager=eager, _layer=layer, **kwargs):
            # evaluation and generation (a cache, one-token steps) stay eager: training is what is compiled
            if state["failed"] is None and _layer.training:
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
