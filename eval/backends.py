"""Which class serves which kind of model, and one call that opens any of them.

    open_backend("local:workspace/models/demo-llava+workspace/runs/r1/adapter")
    open_backend("sagemaker:chartqa-llava", wire="openai", region="us-east-1")
    open_backend("openai:http://127.0.0.1:8000/v1#llava-hf/llava-1.5-7b-hf")
    open_backend("sagemaker:chartqa-r1", workspace="workspace")   # wire and streaming as recorded at deploy

Importing this module loads no torch, transformers or boto3: each backend imports them when used.
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


def open_backend(ref: ModelRef | str, workspace=None, **options) -> Backend:
    """Open the backend `ref` names. Options given here override the ones carried by the ref, which
    override what WORKSPACE/endpoints.json recorded for a deployed `sagemaker:NAME` (wire, streams,
    region); all are passed to the backend class (e.g. quantize="none" for local, wire="openai")."""
    if isinstance(ref, str):
        ref = ModelRef.parse(ref)
    if ref.kind not in BACKENDS:
        raise ValueError(f"unknown backend {ref.kind!r} in {str(ref)!r}: expected one of {', '.join(BACKENDS)}")
    options = {**(endpoint_options(workspace, ref) if ref.kind == "sagemaker" else {}), **ref.options, **options}
    if ref.kind == "local":
        return LocalBackend(ref.target, ref.adapter, **options)
    if ref.kind == "openai":
        url, sep, model = ref.target.partition("#")
        if not sep or not model:
            raise ValueError(f"{str(ref)!r}: an OpenAI-compatible server is written openai:URL#MODEL, "
                             "e.g. openai:http://127.0.0.1:8000/v1#llava-hf/llava-1.5-7b-hf")
        return OpenAIBackend(url, model, **options)
    return BACKENDS[ref.kind](ref.target, **options)


def opener(workspace=None, wire: str | None = None):
    """`open_backend` for a run: endpoints as recorded in `workspace`, and `wire` (for endpoints deployed
    elsewhere) applied to every `sagemaker:` ref."""
    if wire is not None and wire not in WIRES:
        raise ValueError(f"wire={wire!r}: expected one of {', '.join(WIRES)}")

    def open_ref(ref, **options):
        kind = (ref.kind if isinstance(ref, ModelRef) else str(ref).split(":", 1)[0])
        extra = {"wire": wire} if wire and kind == "sagemaker" else {}
        return open_backend(ref, workspace=workspace, **{**extra, **options})
    return open_ref
