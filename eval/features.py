"""Vision-tower features by image content, kept for the next question about the same chart.

The vision tower is frozen: every adapter the engine serves leaves it alone (LoRA on it is refused, and
only the projector, embed_tokens and lm_head may be replaced in full), so one image's features serve the
base and every adapter; each adapter's projector is applied after. On the demo model on 2 CPU cores the
tower is ~0.2 s of a Compare (576 patches through 6 layers); a second question about a chart, a re-run
with other settings, or Compare's two sides sending the same image each skip it.

    cache = FeatureCache(vision_fn, max_images=32)
    features = cache(pixel_values)      # (images, patches, dim); rows seen before are not recomputed

Keys are a hash of each image's processed pixels (the exact tensor the tower would read), so two
different files with the same pixels share an entry and a changed pixel does not. Images missing from
the cache go through the tower together, in one call, in their batch order. Batches of more than
MAX_BATCH images (benchmark runs) bypass it.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Callable

MAX_IMAGES = 32         # demo model: 0.9 MB each (fp32); LLaVA-1.5-7B: 1.2 MB each (bf16)
# Larger batches (benchmark runs: each image asked about once, or once per turn) skip the cache: hashing
# hundreds of images would cost more than the few repeats save.
MAX_BATCH = 8


def pixel_key(pixels) -> bytes:
    """A digest of one image's pixel tensor (CPU), its shape and dtype."""
    array = pixels.detach().cpu().contiguous().numpy()
    h = hashlib.sha256()        # the fastest in hashlib where the CPU has SHA instructions: ~1.5 ms per image
    h.update(f"{array.dtype}{array.shape}".encode())
    h.update(array.tobytes())
    return h.digest()


class FeatureCache:
    """LRU of `compute(pixels) -> features`, per image row. `max_images=0` turns caching off (every call
    computes), which the tests use to check that cached answers are the same."""

    def __init__(self, compute: Callable, max_images: int = MAX_IMAGES):
        self.compute, self.max_images = compute, max_images
        self._entries: OrderedDict[bytes, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __call__(self, pixels):
        import torch

        if self.max_images <= 0 or pixels.shape[0] > MAX_BATCH:
            self.misses += pixels.shape[0]
            return self.compute(pixels)
        keys = [pixel_key(row) for row in pixels]
        with self._lock:
            found = {k: self._entries[k] for k in keys if k in self._entries}
            for k in found:
                self._entries.move_to_end(k)
        todo = list(dict.fromkeys(k for k in keys if k not in found))    # each new image once
        if todo:
            first = {k: keys.index(k) for k in todo}
            computed = self.compute(pixels[[first[k] for k in todo]])
            fresh = {k: computed[i] for i, k in enumerate(todo)}
            with self._lock:
                for k, value in fresh.items():
                    self._entries[k] = value
                    self._entries.move_to_end(k)
                while len(self._entries) > self.max_images:
                    self._entries.popitem(last=False)
            found.update(fresh)
        self.hits += len(keys) - len(todo)         # rows served without running the tower for them
        self.misses += len(todo)
        return torch.stack([found[k] for k in keys])
