"""How models, paths and scores are shown to people: short names, one accuracy unit, rounded numbers.

Every tab and report formats through these few functions, so the studio's tables, its plots and the
HTML report read alike: accuracy is always a percentage (0-100) with one decimal, a model is its
folder name (base + adapter run), never an absolute path, and a status line is words, not a dict.
"""
from __future__ import annotations

from pathlib import PurePath

# folder names that say nothing on their own: the run folder above them names the model
_GENERIC = {"adapter", "final", "model", "merged", "output", "outputs"}
_KINDS = ("local", "sagemaker", "openai")


def _path_name(path: str) -> str:
    """Last meaningful part of a path or hub id: runs/r1/adapter -> r1, runs/r1/checkpoint-40 -> r1/checkpoint-40."""
    parts = [p for p in PurePath(path.rstrip("/\\")).parts if p not in ("/", "\\")]
    if not parts:
        return path
    last = parts[-1]
    if len(parts) > 1 and last.lower() in _GENERIC:
        return parts[-2]
    if len(parts) > 1 and last.startswith("checkpoint-"):
        return f"{parts[-2]}/{last}"
    return last


def short_name(ref_or_path) -> str:
    """A model ref or a path as a person reads it: 'local:/w/models/demo-llava+/w/runs/r1/adapter' ->
    'demo-llava + r1'; 'local:llava-hf/llava-1.5-7b-hf' -> 'llava-1.5-7b-hf'; 'sagemaker:ep' ->
    'ep (SageMaker)'; 'openai:http://host/v1#model' -> 'model (OpenAI API)'; a plain path -> its name."""
    text = str(ref_or_path or "").strip()
    if not text:
        return ""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in _KINDS or not rest:
        return _path_name(text)
    if kind == "sagemaker":
        return f"{rest} (SageMaker)"
    if kind == "openai":
        model = rest.split("#", 1)[1] if "#" in rest else rest
        return f"{_path_name(model)} (OpenAI API)"
    base, _, adapter = rest.partition("+")
    return _path_name(base) + (f" + {_path_name(adapter)}" if adapter else "")


def pct(fraction, digits: int = 1) -> float | None:
    """A fraction (0-1) as a rounded percentage (0-100); None stays None."""
    return None if fraction is None else round(100 * float(fraction), digits)


def rounded(x, digits: int = 1):
    """A float rounded for display; ints, None and text pass through."""
    return round(x, digits) if isinstance(x, float) else x


def status_line(values: dict, sep: str = " · ") -> str:
    """A dict as one readable line: {'step': 40, 'loss': 0.41234} -> 'step 40 · loss 0.412'."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1 else f"{v:,.1f}"
        return str(v)
    return sep.join(f"{k} {fmt(v)}" for k, v in values.items() if v is not None)
