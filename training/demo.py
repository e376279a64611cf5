"""The demo adapter the studio opens with: the tiny LLaVA fine-tuned on a small generated chart set.

    python -c "from training.demo import ensure_demo_adapter; print(ensure_demo_adapter('workspace', 'workspace/models/demo-llava'))"

Real training (training.train with the "demo-cpu" preset), not a canned file, so "base" and "base + adapter"
answer differently in the Compare tab. ~20 s on 2 CPU cores the first time, instant afterwards.
"""
from __future__ import annotations

from pathlib import Path

from training.config import preset

DEMO_DATASET = "demo"
DEMO_RUN = "demo-adapter"
DEMO_CHARTS = 80


def ensure_demo_dataset(workspace: str | Path, n: int = DEMO_CHARTS, seed: int = 0) -> Path:
    import charts

    out = Path(workspace) / "datasets" / DEMO_DATASET
    if not (out / "dataset.json").exists():
        charts.generate(n, seed=seed, out_dir=str(out), workers=2)
    return out


def ensure_demo_adapter(workspace: str | Path, base: str | Path, on_progress=None, **overrides) -> Path:
    """WORKSPACE/runs/demo-adapter/adapter, trained now if missing."""
    from training.train import train

    workspace = Path(workspace)
    run = workspace / "runs" / DEMO_RUN
    adapter = run / "adapter"
    if (adapter / "adapter_config.json").exists():
        return adapter
    if on_progress:
        on_progress(0, 2)
    data = ensure_demo_dataset(workspace)
    if on_progress:
        on_progress(1, 2)
    cfg = preset("demo-cpu", model=str(base), data=str(data), output_dir=str(run), overwrite=True, **overrides)
    result = train(cfg)
    if on_progress:
        on_progress(2, 2)
    return Path(result["adapter"])
