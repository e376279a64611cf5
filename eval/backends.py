"""Which class serves which kind of model, and one call that opens any of them.

    open_backend("local:workspace/models/demo-llava+workspace/runs/r1/adapter")
    open_backend("sagemaker:chartqa-llava", wire="openai", region="us-east-1")
    open_backend("openai:http://127.0.0.1:8000/v1#llava-hf/llava-1.5-7b-hf")
    open_backend("sagemaker:chartqa-r1", workspace="workspace")   # wire and streaming as recorded at deploy

Long-lived callers (the studio, a benchmark run) open backends through one eval.pool.ModelPool, so a base
loads once for all its adapters; `open_backend` is the one-off form. Importing this module loads no torch,
transformers or boto3: each backend imports them when used.
"""
from __future__ import annotations

from eval.endpoints import WIRES, OpenAIBackend, SageMakerBackend, endpoint_options
from eval.local import LocalBackend
from eval.protocol import Backend, ModelRef

BACKENDS = {
    "local": LocalBackend,
    "sagemaker": SageMakerBackend,
    "openai": OpenAIBackend,
}


def open_remote(ref: ModelRef, workspace=None, **options) -> Backend:
    """An endpoint or server backend. What WORKSPACE/endpoints.json recorded for a deployed
    `sagemaker:NAME` (wire, streams, region) is the default; options given here override it."""
    if ref.kind == "sagemaker":
        options = {**endpoint_options(workspace, ref), **options}
    if ref.kind == "openai":
        url, sep, model = ref.target.partition("#")
        if not sep or not model:
            raise ValueError(f"{str(ref)!r}: an OpenAI-compatible server is written openai:URL#MODEL, "
                             "e.g. openai:http://127.0.0.1:8000/v1#llava-hf/llava-1.5-7b-hf")
        return OpenAIBackend(url, model, **options)
    return BACKENDS[ref.kind](ref.target, **options)


def open_backend(ref: ModelRef | str, pool=None, **options) -> Backend:
    """Open the backend `ref` names, through `pool` (a new one if none). Options given here override the
    ones carried by the ref (e.g. quantize="none" for local, wire="openai" or workspace=... for sagemaker)."""
    from eval.pool import ModelPool
    return (pool or ModelPool()).backend(ref, **options)


def opener(workspace=None, wire: str | None = None, pool=None, local: dict | None = None):
    """`open_backend` for a run, through one pool (so a base loads once for all its adapters): endpoints
    as recorded in `workspace`, `wire` (for endpoints deployed elsewhere) applied to `sagemaker:` refs,
    `local` options (e.g. quantize) to local ones."""
    from eval.pool import ModelPool
    if wire is not None and wire not in WIRES:
        raise ValueError(f"wire={wire!r}: expected one of {', '.join(WIRES)}")
    pool = pool or ModelPool()

    def open_ref(ref, **options):
        kind = ref.kind if isinstance(ref, ModelRef) else str(ref).split(":", 1)[0]
        extra = {"workspace": workspace, **({"wire": wire} if wire else {})} if kind == "sagemaker" else \
            dict(local or {}) if kind == "local" else {}
        return pool.backend(ref, **{**extra, **options})
    return open_ref
