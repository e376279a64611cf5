"""The engine's image-feature cache (eval.features): a second question about a chart, or Compare's two
sides on one chart, skip the vision tower, and every answer is exactly what it is without the cache."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from eval.features import MAX_BATCH, FeatureCache
from eval.pool import ModelPool
from eval.protocol import Request

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def adapter(demo_model, tmp_path_factory):
    from test_local_backend import make_adapter
    return make_adapter(demo_model, tmp_path_factory.mktemp("feature-cache") / "adapter", projector=True)


@pytest.fixture(scope="module")
def charts():
    examples = json.loads((ROOT / "assets" / "examples" / "examples.json").read_text())
    return [(Image.open(ROOT / e["image"]).convert("RGB"), e["question"]) for e in examples]


def counting(cache: FeatureCache) -> list:
    """Record how many images each tower call computes."""
    calls, compute = [], cache.compute

    def counted(pixels):
        calls.append(pixels.shape[0])
        return compute(pixels)
    cache.compute = counted
    return calls


def test_cached_features_give_exactly_the_uncached_answers(demo_model, adapter, charts):
    pool = ModelPool()
    base, tuned = pool.backend(f"local:{demo_model}"), pool.backend(f"local:{demo_model}+{adapter}")
    engine, cache = base.engine, base.engine.generator.features
    requests = [Request(image, question, max_new_tokens=12) for image, question in charts]
    slots = [0] * 3 + [tuned.slot] * 3

    cache.max_images = 0                    # off: the tower runs for every image of every batch
    uncached = [base.generate([r])[0] for r in requests] + [tuned.generate([r])[0] for r in requests]
    uncached_mixed = engine.generate(requests * 2, slots)
    uncached_logits = engine.first_logits(requests * 2, slots)
    cache.max_images, cache.hits, cache.misses = 32, 0, 0
    cache.clear()

    first = [base.generate([r])[0] for r in requests]                  # misses: the tower runs, then keeps them
    assert cache.misses == 3 and cache.hits == 0
    again = first + [tuned.generate([r])[0] for r in requests]         # hits, from the adapter's side too
    assert cache.hits == 3
    assert again == uncached
    assert engine.generate(requests * 2, slots) == uncached_mixed == uncached
    assert torch.equal(engine.first_logits(requests * 2, slots), uncached_logits)


def test_compare_sides_on_one_chart_run_the_vision_tower_once(demo_model, adapter, charts):
    pool = ModelPool()
    base, tuned = pool.backend(f"local:{demo_model}"), pool.backend(f"local:{demo_model}+{adapter}")
    image, question = charts[1]
    image = image.copy()
    image.paste((1, 2, 3), (0, 0, 24, 24))            # a chart this engine has not seen
    calls = counting(base.engine.generator.features)
    streams = [base.stream(Request(image, question, 8)), tuned.stream(Request(image, question, 8))]
    first = ["".join(s) for s in streams]            # both sides in one batch, each its own image row
    assert calls == [1]
    streams = [base.stream(Request(image, "What is the title?", 8)), tuned.stream(Request(image, "What is the title?", 8))]
    assert all("".join(s) is not None for s in streams) and calls == [1]    # the second question: no tower
    assert first == [base.generate([Request(image, question, 8)])[0], tuned.generate([Request(image, question, 8)])[0]]


def test_the_cache_keys_pixels_and_forgets_the_least_recently_used():
    computed = []

    def tower(pixels):
        computed.append(pixels.shape[0])
        return pixels.mean(dim=(2, 3))[:, None, :] * torch.ones(1, 4, 1)     # (images, 4 "patches", 3)

    cache = FeatureCache(tower, max_images=2)
    a, b, c = (torch.full((1, 3, 8, 8), float(v)) for v in (1, 2, 3))
    out = cache(torch.cat([a, a.clone(), b]))          # the same pixels twice: computed once
    assert computed == [2] and out.shape == (3, 4, 3) and torch.equal(out[0], out[1])
    assert torch.equal(cache(a.clone())[0], out[0]) and computed == [2]      # another tensor, same pixels
    cache(c)                                             # a full cache drops b, the least recently used
    assert computed == [2, 1] and len(cache) == 2
    cache(a)
    assert computed == [2, 1]
    cache(b)
    assert computed == [2, 1, 1]
    big = torch.cat([a] * (MAX_BATCH + 1))               # a benchmark-size batch bypasses the cache
    assert cache(big).shape[0] == MAX_BATCH + 1 and computed[-1] == MAX_BATCH + 1
    cache.max_images = 0                                 # off: always computed
    cache(a)
    assert computed[-1] == 1
