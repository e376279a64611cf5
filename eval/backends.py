"""Which class serves which kind of model, and one call that opens any of them.

    open_backend("local:workspace/models/demo-llava+workspace/runs/r1/adapter")
    open_backend("sagemaker:chartqa-llava", wire="openai", region="us-east-1")
    open_backend("openai:http://127.0.0.1:8000/v1#llava-hf/llava-1.5-7b-hf")

Long-lived callers (the studio, a benchmark run) open backends through one eval.pool.ModelPool, so a base
loads once for all its adapters; `open_backend` is the one-off form. Importing this module loads no torch,
transformers or boto3: each backend imports them when used.
"""
from __future__ import annotations

from eval.endpoints import OpenAIBackend, SageMakerBackend
from eval.local import LocalBackend
from eval.protocol import Backend, ModelRef

BACKENDS = {
    "local": LocalBackend,
    "sagemaker": SageMakerBackend,
    "openai": OpenAIBackend,
}


def open_remote(ref: ModelRef, **options) -> Backend:
    if ref.kind == "openai":
        url, sep, model = ref.target.partition("#")
        if not sep or not model:
            raise ValueError(f"{str(ref)!r}: an OpenAI-compatible server is written openai:URL#MODEL, "
                             "e.g. openai:http://127.0.0.1:8000/v1#llava-hf/llava-1.5-7b-hf")
        return OpenAIBackend(url, model, **options)
    return BACKENDS[ref.kind](ref.target, **options)


def open_backend(ref: ModelRef | str, pool=None, **options) -> Backend:
    """Open the backend `ref` names, through `pool` (a new one if none). Options given here override the
    ones carried by the ref (e.g. quantize="none" for local, wire="openai" for sagemaker)."""
    from eval.pool import ModelPool
    return (pool or ModelPool()).backend(ref, **options)
