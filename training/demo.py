"""The demo adapter the studio opens with: the tiny LLaVA fine-tuned on a small generated chart set.

    python -c "from training.demo import ensure_demo_adapter; print(ensure_demo_adapter('workspace', 'workspace/models/demo-llava'))"

Real training (training.train with the "demo-cpu" preset, fewer steps), not a canned file, so "base" and
"base + adapter" answer differently in the Compare tab. About 25-30 s on 2 CPU cores the first time
(chart generation included), instant afterwards.

The demo model's weights are random and it sees a chart as 16 patches of 64 px: it cannot read values.
What it can learn in seconds is which answers go with which questions (yes/no for comparisons and
trends, common counts, likely labels and ratios). So the demo dataset asks those question families
only, and half of its train/val questions end with the benchmark's short-answer instruction
(`charts.SHORT_ANSWER_INSTRUCTION`, LLaVA-1.5's own prompt for short answers; charts.generate's
instruct_share), so the adapter answers both the bare question (Compare tab) and the benchmark prompt.
Test questions stay bare: the benchmark runner appends the instruction itself.
"""
from __future__ import annotations

from pathlib import Path

from training.config import preset

DEMO_DATASET = "demo"
DEMO_RUN = "demo-adapter"
DEMO_CHARTS = 120
# Question families with answer priors a 64 px random-init model can learn (see the module docstring).
DEMO_FAMILIES = ("compare", "trend", "count", "argmax", "rank", "ratio")
DEMO_QA_PER_CHART = 6
# 20% test: ~110 test questions from 120 charts (those families give ~4.5 questions per chart).
DEMO_SPLIT = (0.7, 0.1, 0.2)
# The adapter built at first start trains 120 of the preset's 300 steps: it must be ready in ~30 s.
DEMO_STEPS = 120
# Share of train/val questions that end with the benchmark's short-answer instruction.
DEMO_INSTRUCT_SHARE = 0.5


def ensure_demo_dataset(workspace: str | Path, n: int = DEMO_CHARTS, seed: int = 0) -> Path:
    import charts

    out = Path(workspace) / "datasets" / DEMO_DATASET
    if not (out / "dataset.json").exists():
        settings = dict(seed=seed, out_dir=str(out), workers=2, families=list(DEMO_FAMILIES),
                        qa_per_chart=DEMO_QA_PER_CHART, split=DEMO_SPLIT, instruct_share=DEMO_INSTRUCT_SHARE)
        try:
            charts.generate(n, **settings)          # resumes a killed run of the same settings
        except ValueError:                          # an unfinished set made with other settings
            charts.generate(n, **settings, overwrite=True)
    return out


def ensure_demo_adapter(workspace: str | Path, base: str | Path, on_progress=None, **overrides) -> Path:
    """WORKSPACE/runs/demo-adapter/adapter, trained now if missing."""
    import torch

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
    cfg = preset("demo-cpu", model=str(base), data=str(data), output_dir=str(run), overwrite=True,
                 **{"max_steps": DEMO_STEPS, **overrides})
    # One intra-op thread: as fast for a model this small, and several times faster than two threads
    # when other processes share the cores (docs/BENCHMARKS.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    if on_progress:
        on_progress(2, 2)
    return Path(result["adapter"])

