"""Batched generation on one copy of a LLaVA model: the base and any adapters in one forward.

A batch is a list of rows (prompt ids, image, adapter slot, settings). Prefill runs once for the whole
batch: each distinct image goes through the vision tower once, then through the projector of every adapter
that asks about it, and the language model reads all rows left-padded into a static KV cache (rows that
share a chart and adapter prefill their common head, template + image tokens, once). The decode
step that follows is one fixed-shape function (token, position, mask -> logits); on CUDA it is compiled by
torch.compile (inductor fuses the norms, rotary, residual adds, SiLU * up and the LoRA adds into a few
Triton kernels) and then captured as a CUDA graph per batch bucket, so each new token costs one graph
replay of fused kernels instead of hundreds of small launches. If compiling fails the uncompiled step is
captured; if capture fails decoding runs eager; each reason is kept (`compile_error`, `graph_error`).
The masks are built here (4D, additive), so transformers' mask and cache logic is not on the hot path,
and a padded row never produces NaNs that leak into real rows.

    gen = Generator(model, rows_table, projectors, eos_ids, pad_id, max_len, use_graphs=True, use_compile=True)
    tokens = gen.run(batch)              # [[token ids] per row]; row.emit(token) streams them as they come
"""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from eval.features import FeatureCache

BUCKETS = (1, 2, 4)          # batch sizes served by captured graphs (Compare's sides); larger batches run eager
COMPILE_MODE = "default"     # inductor without its own CUDA graphs: the step is captured here, once per bucket
# Compiled variants: per bucket, one per adapter mix (base only, one adapter, base + adapter, ...) and per
# engine in the process (they share the step's code object). Past the limit dynamo silently runs eager.
RECOMPILE_LIMIT = 64


@dataclass
class Row:
    ids: list[int]                       # prompt token ids, image tokens already expanded
    image: int | None = None             # index into Batch.pixel_values
    slot: int = 0                        # 0 = the base, k = the k-th attached adapter
    max_new: int = 64
    min_new: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    emit: Callable[[int | None], None] | None = None     # each new token, then None when the row ends
    cancel: threading.Event | None = None


@dataclass
class Batch:
    rows: list[Row]
    pixel_values: torch.Tensor | None = None     # (distinct images, 3, H, W), CPU


class KVCache:
    """A static key/value cache written at a position the caller sets. Duck-types transformers' Cache
    for the one method attention layers call, `update(key, value, layer_idx)`, in 5.17 and later."""

    def __init__(self, length: int, device):
        self.length = length
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.position = torch.zeros((), dtype=torch.long, device=device)   # where the next tokens go
        self.fill_at = 0                # where a prefill's tokens go (a Python int: prefill is never captured)

    @classmethod
    def gathered(cls, prefix: "KVCache", index: torch.Tensor, length: int) -> "KVCache":
        """A cache of `length` positions whose row i starts with row index[i] of `prefix` (its
        prefill): rows that share a prompt prefix copy its keys and values instead of recomputing them."""
        cache = cls(length, index.device)
        for layer, k in prefix.keys.items():
            v = prefix.values[layer]
            cache.keys[layer] = k.new_zeros(len(index), k.shape[1], length, k.shape[3])
            cache.values[layer] = v.new_zeros(len(index), v.shape[1], length, v.shape[3])
            cache.keys[layer][:, :, :prefix.length] = k[index]
            cache.values[layer][:, :, :prefix.length] = v[index]
        return cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in self.keys:             # allocated at the first prefill, never again
            b, h, _, d = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros(b, h, self.length, d)
            self.values[layer_idx] = value_states.new_zeros(b, h, self.length, value_states.shape[-1])
        n = key_states.shape[-2]
        if n > 1:       # prefill, from fill_at: a slice copy (index_copy_ took 97 ms a 128-row batch)
            at = self.fill_at
            self.keys[layer_idx][:, :, at:at + n].copy_(key_states)
            self.values[layer_idx][:, :, at:at + n].copy_(value_states)
        else:           # decode: the position is a tensor (captured graphs replay it)
            index = self.position + torch.arange(n, device=key_states.device)
            self.keys[layer_idx].index_copy_(2, index, key_states)
            self.values[layer_idx].index_copy_(2, index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class _Graph:
    """One captured decode step with its static inputs and output. `step` is the compiled decode or the
    plain one; its first calls (the warm-up, outside the capture) are where inductor compiles it."""

    def __init__(self, gen: "Generator", cache: KVCache, b: int, step: Callable):
        dev = gen.device
        self.tokens = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(b, 1, 1, cache.length, dtype=gen.dtype, device=dev)
        self.cache = cache
        # Warm-up steps really run: let them write the cache's last slot, which any real step overwrites
        # before reading it, and put the position back for the batch being served.
        position = cache.position.clone()
        cache.position.fill_(cache.length - 1)
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):                # warm-up: compiling and lazy allocations happen outside the capture
                    step(cache, self.tokens, self.positions, self.mask)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=gen.graph_pool):
                self.logits = step(cache, self.tokens, self.positions, self.mask)
        finally:
            cache.position.copy_(position)

    def __call__(self, tokens, positions, mask):
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.mask.copy_(mask)
        self.graph.replay()
        return self.logits


class Generator:
    def __init__(self, model, rows_table, projectors: dict, eos_ids: set[int], pad_id: int, max_len: int,
                 use_graphs: bool = False, use_compile: bool = False):
        self.model, self.rows_table, self.projectors = model, rows_table, projectors
        self.lm = model.model.language_model
        self.vision = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.config = model.config
        self.eos_ids, self.pad_id, self.max_len = eos_ids, pad_id, max_len
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.use_compile = use_compile
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.graphs: dict[tuple, _Graph] = {}
        self.caches: dict[int, KVCache] = {}
        self.graph_error: str | None = None
        self.compile_error: str | None = None
        self.compiled_keys: set[tuple] = set()     # (bucket, adapter mix) the compiled step has run at
        # Compiling a new (bucket, mix) takes tens of seconds on a 7B model: Engine.warm_up allows it and
        # turns it off after, so a later, unwarmed mix (3-4 sides) runs the plain step instead of stalling.
        self.compile_new_shapes = True
        self._compiled: Callable | None = None
        self.features = FeatureCache(self._vision)    # the tower is frozen: base and adapters share them
        self.share_prefixes = True                    # prefill a head shared by rows once (see _prefill)
        self._lm_kwargs = {"use_cache": True}
        if "cache_position" in inspect.signature(self.lm.forward).parameters:
            self._lm_kwargs["cache_position"] = None        # filled per call on versions that take it

    # ---- the two model calls ----
    def _lm(self, cache, positions, mask, **inputs):
        kwargs = dict(self._lm_kwargs)
        if "cache_position" in kwargs:
            kwargs["cache_position"] = cache.position + torch.arange(positions.shape[1], device=self.device)
        out = self.lm(attention_mask=mask, position_ids=positions, past_key_values=cache, **inputs, **kwargs)
        # looked up each call: an adapter may have put a per-row switch in place of lm_head / embed_tokens
        return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def decode(self, cache: KVCache, tokens, positions, mask):
        """One new token for every row: the step that CUDA graphs capture. Every input is a tensor of a
        fixed shape per bucket (the write position too, in cache.position), so a compiled step is traced
        once per bucket and adapter mix, never per token."""
        return self._lm(cache, positions, mask, input_ids=tokens)

    @property
    def compiling(self) -> bool:
        """Whether bucketed decode steps go through torch.compile (on, and it has not failed)."""
        return self.use_compile and self.compile_error is None

    def _use_compiled(self, key: tuple) -> bool:
        return self.compiling and (key in self.compiled_keys or self.compile_new_shapes)

    def _compiled_step(self) -> Callable:
        if self._compiled is None:
            import torch._dynamo
            for name in ("recompile_limit", "cache_size_limit"):      # the name changed across versions
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT))
            self._compiled = torch.compile(self.decode, mode=COMPILE_MODE, fullgraph=True, dynamic=False)
        return self._compiled

    def _compile_failed(self, e: BaseException) -> None:
        self.compile_error = f"{type(e).__name__}: {e}"[:300]

    def _eager_step(self, cache: KVCache, tokens, positions, mask):
        """A bucketed step without CUDA graphs (CPU, or capture failed): compiled when compiling."""
        key = (tokens.shape[0], self.rows_table.key)
        if self._use_compiled(key):
            try:
                logits = self._compiled_step()(cache, tokens, positions, mask)
                self.compiled_keys.add(key)
                return logits
            except Exception as e:  # noqa: BLE001 - the step reruns uncompiled (it rewrites the same cache slot)
                self._compile_failed(e)
        return self.decode(cache, tokens, positions, mask)

    # ---- prefill pieces ----
    def _image_features(self, batch: Batch) -> list[torch.Tensor | None]:
        """Per row, its image's projected features: the vision tower runs once per distinct image,
        the projector once per (adapter, image)."""
        rows = batch.rows
        if batch.pixel_values is None or all(r.image is None for r in rows):
            return [None] * len(rows)
        features = self.features(batch.pixel_values)      # eval.features: each image's tower output once
        projected: dict[tuple[int, int], torch.Tensor] = {}
        for slot in sorted({r.slot for r in rows if r.image is not None}):
            images = sorted({r.image for r in rows if r.image is not None and r.slot == slot})
            projector = self.projectors.get(slot, self.projector)
            result = projector(features[images])
            for k, image in enumerate(images):
                projected[(slot, image)] = result[k]
        return [projected[(r.slot, r.image)] if r.image is not None else None for r in rows]

    def _vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's selected layer(s) for these images (CPU pixels in), before any projector."""
        pixels = pixel_values.to(self.device, self.vision_dtype)
        layer = self.config.vision_feature_layer
        out = self.vision(pixels, output_hidden_states=True, return_dict=True)
        layers = [layer] if isinstance(layer, int) else list(layer)
        hidden = [out.hidden_states[i] for i in layers]
        if self.config.vision_feature_select_strategy == "default":
            hidden = [h[:, 1:] for h in hidden]
        return torch.cat(hidden, dim=-1)

    @property
    def vision_dtype(self):
        return next(self.vision.parameters()).dtype

    def _embeddings(self, ids: torch.Tensor, features: list) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(ids)
        image_token = self.config.image_token_id
        for i, feats in enumerate(features):
            if feats is None:
                continue
            where = (ids[i] == image_token).nonzero(as_tuple=True)[0]
            if where.numel() != feats.shape[0]:
                raise ValueError(f"prompt {i} has {where.numel()} image tokens for {feats.shape[0]} image features")
            embeds[i, where] = feats.to(embeds.dtype)
        return embeds

    def _cache(self, b: int, length: int, reuse: bool) -> KVCache:
        if not reuse:
            return KVCache(length, self.device)
        if b not in self.caches:                  # one per graph bucket: captured graphs read its memory
            self.caches[b] = KVCache(length, self.device)
        self.caches[b].position.zero_()
        return self.caches[b]

    # ---- the whole batch ----
    def _left_padded(self, seqs: list[list[int]], length: int):
        """(ids (rows, longest), real (rows, length)): each sequence right-aligned at the longest one's end,
        `real` marking where its tokens are."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        real = torch.zeros(len(seqs), length, dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            real[i, width - len(s):width] = True
        return ids.to(self.device), real.to(self.device)

    def _fill(self, cache: KVCache, ids, real, at: int, features: list):
        """The language model over `ids` (rows, n), their keys and values written to the cache from
        position `at`; `real` (rows, cache length) marks every position that holds a token (the prompt,
        and each one decode will write). Returns each row's next-token logits and its last position id."""
        b, n = ids.shape
        positions = (real[:, :at].sum(1, keepdim=True) + real[:, at:at + n].long().cumsum(1) - 1).clamp(min=0)
        # A key is visible when it is real and not in the future; a padding query sees itself only.
        keys = torch.arange(cache.length, device=self.device)
        queries = at + torch.arange(n, device=self.device)
        allowed = (keys[None, :] <= queries[:, None]) & real[:, None, :]
        allowed |= keys[None, None, :] == queries[None, :, None]
        mask = torch.zeros(b, 1, n, cache.length, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)
        del allowed
        cache.fill_at = at
        try:
            logits = self._lm(cache, positions, mask, inputs_embeds=self._embeddings(ids, features))
        finally:
            cache.fill_at = 0
        return logits, positions[:, -1:]

    def _shared_heads(self, rows: list[Row]) -> tuple[list[int], list[int], list[int]] | None:
        """Rows about the same image through the same slot share their prompt up to the image's last
        token (the chat template's head and the 576 image tokens of a LLaVA-1.5: ~90% of a benchmark
        prompt). Returns (per row its group, per row where its head ends, each group's first row), or
        None when no two rows share a head."""
        if len(rows) < 2 or not self.share_prefixes or any(r.image is None for r in rows):
            return None
        image_token = self.config.image_token_id
        groups: dict[tuple, int] = {}
        group_of, cuts, firsts = [], [], []
        for i, r in enumerate(rows):
            if image_token not in r.ids:
                return None
            cut = len(r.ids) - r.ids[::-1].index(image_token)
            if cut == len(r.ids):          # nothing after the image to prefill on its own
                return None
            key = (r.slot, r.image, tuple(r.ids[:cut]))
            if key not in groups:
                groups[key] = len(groups)
                firsts.append(i)
            group_of.append(groups[key])
            cuts.append(cut)
        return (group_of, cuts, firsts) if len(groups) < len(rows) else None

    def _prefill(self, batch: Batch):
        """Fill the cache for every row; returns (state for decoding, logits of each row's next token).
        Rows that share a head (several questions about one chart, as a benchmark asks) prefill it once:
        the head's keys and values are copied into each row's cache and only the rest of each prompt runs."""
        rows = batch.rows
        n, prompt = len(rows), max(len(r.ids) for r in rows)
        longest = max(r.max_new for r in rows)
        bucket = None
        if (self.use_graphs or self.use_compile) and prompt + longest <= self.max_len and n <= BUCKETS[-1]:
            bucket = next(k for k in BUCKETS if k >= n)
        b = bucket or n
        padded = rows + [rows[0]] * (b - n)          # filler rows (copies of the first), discarded
        shared = None if bucket else self._shared_heads(rows)
        if shared is None:
            length = self.max_len if bucket else prompt + longest
            cache = self._cache(b, length, reuse=bucket is not None)
            ids, real = self._left_padded([r.ids for r in padded], length)
            real[:, prompt:] = True
            self.rows_table.set([r.slot for r in padded])
            logits, last = self._fill(cache, ids, real, 0, self._image_features(Batch(padded, batch.pixel_values)))
        else:
            group_of, cuts, firsts = shared
            heads = [rows[i] for i in firsts]
            width = max(cuts[i] for i in firsts)
            head_ids, head_real = self._left_padded([r.ids[:cuts[i]] for i, r in zip(firsts, heads)], width)
            self.rows_table.set([r.slot for r in heads])
            head_cache = KVCache(width, self.device)
            self._fill(head_cache, head_ids, head_real, 0, self._image_features(Batch(heads, batch.pixel_values)))
            tails = [r.ids[cut:] for r, cut in zip(rows, cuts)]
            prompt = width + max(len(t) for t in tails)
            length = prompt + longest
            index = torch.tensor(group_of, device=self.device)
            cache = KVCache.gathered(head_cache, index, length)
            del head_cache
            ids, tail_real = self._left_padded(tails, prompt - width)
            real = torch.cat([head_real[index], tail_real, torch.ones(n, longest, dtype=torch.bool, device=self.device)],
                             dim=1)
            self.rows_table.set([r.slot for r in rows])
            logits, last = self._fill(cache, ids, real, width, [None] * n)
        keys = torch.arange(length, device=self.device)
        step_mask = torch.zeros(b, 1, 1, length, dtype=self.dtype, device=self.device)
        step_mask.masked_fill_(~(real & (keys < prompt))[:, None, None, :], torch.finfo(self.dtype).min)
        state = {"b": b, "n": n, "prompt": prompt, "longest": longest, "cache": cache, "mask": step_mask,
                 "positions": last + 1, "bucket": bucket is not None,
                 "graph": self._graph(cache, b) if bucket and self.use_graphs else None}
        return state, logits

    @torch.inference_mode()
    def first_logits(self, batch: Batch) -> torch.Tensor:
        """Scores of each row's first answer token (float32, CPU): a tie-proof check that two ways of
        running a model compute the same thing, where greedy text can flip on near-equal bf16 logits."""
        return self._prefill(batch)[1][: len(batch.rows)].float().cpu()

    @torch.inference_mode()
    def run(self, batch: Batch) -> list[list[int]]:
        rows = batch.rows
        state, logits = self._prefill(batch)
        b, n, prompt, cache, step_mask = state["b"], state["n"], state["prompt"], state["cache"], state["mask"]
        positions, graph = state["positions"], state["graph"]
        step_fn = self._eager_step if state["bucket"] else self.decode
        out: list[list[int]] = [[] for _ in rows]
        live = [True] * n
        greedy = all(r.temperature <= 0 for r in rows)
        for step in range(state["longest"]):
            token = self._pick(logits, rows, out, greedy)
            chosen = token.tolist()
            for i, r in enumerate(rows):
                if not live[i]:
                    continue
                t = chosen[i]
                stop = (r.cancel is not None and r.cancel.is_set()) or t in self.eos_ids
                if not stop:
                    out[i].append(t)
                    if r.emit is not None:
                        r.emit(t)
                live[i] = not stop and len(out[i]) < r.max_new
                if not live[i] and r.emit is not None:
                    r.emit(None)          # this row is finished: its stream ends now, not with the batch
            if not any(live):
                break
            cache.position.fill_(prompt + step)
            step_mask[:, :, :, prompt + step] = 0
            tokens = torch.cat([token, token[:1].expand(b - n)]) if b > n else token
            if graph is not None:
                logits = graph(tokens[:, None], positions, step_mask)
            else:
                logits = step_fn(cache, tokens[:, None], positions, step_mask)
            positions = positions + 1
        return out

    def _pick(self, logits, rows, out, greedy: bool):
        logits = logits[: len(rows)]
        early = [i for i, r in enumerate(rows) if len(out[i]) < r.min_new]
        if early and self.eos_ids:
            logits = logits.clone()
            eos = torch.tensor(sorted(self.eos_ids), device=logits.device)
            logits[torch.tensor(early, device=logits.device)[:, None], eos[None, :]] = float("-inf")
        if greedy:
            return logits.argmax(-1)
        picked = logits.argmax(-1)
        for i, r in enumerate(rows):
            if r.temperature > 0:
                picked[i] = _sample(logits[i], r.temperature, r.top_p)
        return picked

    def _graph(self, cache: KVCache, b: int):
        """The captured step for this bucket and adapter mix: compiled if possible, else plain, else None
        (eager), each failure recorded once."""
        key = (b, self.rows_table.key)
        if key not in self.graphs and self.graph_error is None:
            if self._use_compiled(key):
                try:
                    self.graphs[key] = _Graph(self, cache, b, self._compiled_step())
                    self.compiled_keys.add(key)
                except Exception as e:  # noqa: BLE001 - capture the uncompiled step instead, and say why
                    self._compile_failed(e)
            if key not in self.graphs:
                try:
                    self.graphs[key] = _Graph(self, cache, b, self.decode)
                except Exception as e:  # noqa: BLE001 - fall back to eager decode, and say why once
                    self.graph_error = f"{type(e).__name__}: {e}"[:300]
                    return None
        return self.graphs.get(key)

    def forget_graphs(self, adapters_only: bool = True) -> None:
        """Drop captured steps that read adapter weights (they changed), or all of them."""
        self.graphs = {k: g for k, g in self.graphs.items() if adapters_only and not k[1][0]}
        self.compiled_keys = {k for k in self.compiled_keys if adapters_only and not k[1][0]}   # they recompile


def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return torch.multinomial(probs, 1)[0]


class Detokenizer:
    """Token ids in, new text out, cut only where the text is final: a character whose bytes are split
    across tokens (shown as U+FFFD until complete) is held back, as is text a later token would rewrite."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.sent = decode, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def flush(self) -> str:
        text = self.decode(self.ids)
        piece = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += piece
        return piece
