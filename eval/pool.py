"""The one owner of loaded models in a process: the studio holds a ModelPool, the CLI builds its own.

    pool = ModelPool(max_engines=2)
    a = pool.backend("local:llava-hf/llava-1.5-7b-hf")
    b = pool.backend("local:llava-hf/llava-1.5-7b-hf+workspace/runs/r1/adapter")   # same engine, one copy
    c = pool.backend("sagemaker:chartqa-r1", wire="openai")                           # kept, with its client
    pool.unload()                                                                     # frees the GPU

Each base loads once per (base, options). Loading holds only that key's lock, so a second model (or a
remote endpoint) is never blocked by another one loading. Past `max_engines`, the least recently used
engine that is not generating is evicted. An adapter, once attached, keeps its slot for the engine's life.
"""
from __future__ import annotations

import gc
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from eval.protocol import ModelRef

LOCAL_OPTIONS = {"quantize": "auto", "device": "auto", "trust_remote_code": False, "graphs": True,
                 "compile": "auto"}   # and their defaults
# One model load at a time in the process, across pools: two side by side (two pools, or two bases) failed
# with "cannot import name 'AutoConfig'" (transformers resolves its names lazily on first use), or loaded
# a model that then decoded garbage (from_pretrained sets process-wide torch defaults while it loads).
_LOADING = threading.Lock()


def captures(engine) -> bool:
    """Whether an engine compiles or captures decode steps per adapter mix, which a warm-up does ahead
    of the first request. Without (CPU), warming a new adapter only ran two throwaway generations:
    ~1 s of the demo studio's start on 2 cores, and its first real request is no slower for it."""
    g = getattr(engine, "generator", None)
    return g is not None and bool(g.use_graphs or g.use_compile)


class ModelPool:
    def __init__(self, max_engines: int = 2):
        self.max_engines = max_engines
        self._lock = threading.Lock()                  # guards the dicts; never held while loading
        self._engines: OrderedDict[tuple, object] = OrderedDict()
        self._loading: dict[tuple, threading.Lock] = {}
        self._remote: dict[tuple, object] = {}

    @staticmethod
    def _engine_key(base: str, options: dict) -> tuple:
        local = Path(base).expanduser()
        base_key = str(local.resolve()) if local.exists() else base
        return (base_key,) + tuple(str(options.get(k, default)) for k, default in LOCAL_OPTIONS.items())

    def engine(self, base: str, on_progress: Callable[[str], None] | None = None, **options):
        """The Engine for `base` with these options, loaded on first use."""
        from eval.local import Engine

        key = self._engine_key(base, options)
        with self._lock:
            if key in self._engines:
                self._engines.move_to_end(key)
                return self._engines[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:                                   # one loader per key; others wait for its result
            with self._lock:
                if key in self._engines:
                    return self._engines[key]
            with _LOADING:
                engine = Engine(key[0], on_progress=on_progress,
                                **{k: v for k, v in options.items() if k in LOCAL_OPTIONS})
            with self._lock:
                self._engines[key] = engine
                self._loading.pop(key, None)
                self._evict()
        return engine

    def _evict(self) -> None:
        while len(self._engines) > self.max_engines:
            idle = [k for k, e in list(self._engines.items())[:-1] if not e.busy]
            if not idle:
                return
            self._engines.pop(idle[0]).close()
            gc.collect()

    def backend(self, ref: ModelRef | str, on_progress: Callable[[str], None] | None = None, **options):
        """A backend for `ref`. Local refs share their base's engine; remote ones are opened once per
        (ref, options) and kept, with their clients."""
        from eval.backends import BACKENDS, open_remote
        from eval.local import LocalBackend

        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        if ref.kind not in BACKENDS:
            raise ValueError(f"unknown backend {ref.kind!r} in {str(ref)!r}: expected one of {', '.join(BACKENDS)}")
        options = {**ref.options, **options}
        if ref.kind == "local":
            options.pop("workspace", None)
            engine_options = {k: v for k, v in options.items() if k in LOCAL_OPTIONS}
            extra = {k: v for k, v in options.items() if k not in LOCAL_OPTIONS}
            engine = self.engine(ref.target, on_progress=on_progress, **engine_options)
            fresh = ref.adapter is not None and str(Path(ref.adapter).expanduser().resolve()) not in engine.slots
            backend = LocalBackend(engine, ref.adapter, **extra)
            if fresh and captures(engine):
                engine.warm_up(on_progress or (lambda _msg: None))   # capture the adapter graphs now
            return backend
        key = (str(ref), tuple(sorted((k, repr(v)) for k, v in options.items())))
        with self._lock:
            if key not in self._remote:
                self._remote[key] = open_remote(ref, **options)
            return self._remote[key]

    def loaded(self) -> list[dict]:
        """What is in memory, for the UI: base, precision and decode mode, adapters."""
        with self._lock:
            engines = list(self._engines.values())
        return [{"base": e.base, "mode": e.describe(), "adapters": list(e.slots), "busy": e.busy,
                 "load_s": round(e.load_seconds, 1), "warm_s": round(e.warm_seconds, 1),
                 "answer_room": e.max_positions - getattr(e, "image_tokens", 0) - 96} for e in engines]

    def unload(self, wait: float = 0.0) -> int:
        """Forget every idle engine (its memory is freed once no backend refers to it); returns how many.
        `wait`: seconds to let engines finish the batch they are on, and each worker end (before a process
        exits: a worker still inside torch when the interpreter finalizes aborts it)."""
        deadline = time.monotonic() + wait
        while wait and any(e.busy for e in list(self._engines.values())) and time.monotonic() < deadline:
            time.sleep(0.01)       # a stream's last token reaches its reader before the batch ends
        with self._lock:
            idle = [k for k, e in self._engines.items() if not e.busy]
            for k in idle:
                self._engines.pop(k).close(wait)
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
        return len(idle)
