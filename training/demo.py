"""The demo adapter the studio opens with: the tiny LLaVA fine-tuned on a small generated chart set.

    python -c "from training.demo import ensure_demo_adapter; print(ensure_demo_adapter('workspace', 'workspace/models/demo-llava'))"

Real training (training.train with the "demo-cpu" preset, fewer steps), not a canned file, so "base" and
"base + adapter" answer differently in the Compare tab. About 25-30 s on 2 CPU cores the first time
(chart generation included), instant afterwards.

The demo model's weights are random and it sees a chart as 16 patches of 64 px: it cannot read values.
What it can learn in seconds is which answers go with which questions (yes/no for comparisons and
trends, common counts, likely labels and ratios). So the demo dataset asks those question families
only, and half of its training questions end with the benchmark's short-answer instruction
(`eval.run.DEFAULT_SUFFIX`, LLaVA-1.5's own prompt for short answers), so the adapter answers both the
bare question (Compare tab) and the benchmark prompt. Test questions are left as generated.
"""
from __future__ import annotations

import zlib
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
SUFFIX_MARKER = ".demo-prompts.json"


def ensure_demo_dataset(workspace: str | Path, n: int = DEMO_CHARTS, seed: int = 0) -> Path:
    import charts

    out = Path(workspace) / "datasets" / DEMO_DATASET
    if not (out / "dataset.json").exists():
        settings = dict(seed=seed, out_dir=str(out), workers=2, families=list(DEMO_FAMILIES),
                        qa_per_chart=DEMO_QA_PER_CHART, split=DEMO_SPLIT)
        (out / SUFFIX_MARKER).unlink(missing_ok=True)   # train.jsonl is about to be written afresh
        try:
            charts.generate(n, **settings)          # resumes a killed run of the same settings
        except ValueError:                          # an unfinished set made with other settings
            charts.generate(n, **settings, overwrite=True)
    if not (out / SUFFIX_MARKER).exists():
        add_prompt_suffix(out / "train.jsonl")
    return out


def add_prompt_suffix(path: Path, every: int = 2) -> int:
    """Append eval.run.DEFAULT_SUFFIX to the first question of one record in `every` (chosen by id, so
    the choice does not depend on order); records that already end with it are left alone. Returns how
    many records carry it. Records a marker beside the file."""
    from charts.io import atomic_write_json, read_jsonl, write_jsonl
    from eval.run import DEFAULT_SUFFIX

    rows = list(read_jsonl(path))
    for row in rows:
        turn = row["conversations"][0]
        if zlib.crc32(str(row.get("id")).encode()) % every == 0 and not turn["value"].endswith(DEFAULT_SUFFIX):
            turn["value"] += DEFAULT_SUFFIX
    write_jsonl(path, rows)
    count = sum(r["conversations"][0]["value"].endswith(DEFAULT_SUFFIX) for r in rows)
    atomic_write_json(path.parent / SUFFIX_MARKER, {"file": path.name, "prompt_suffix": DEFAULT_SUFFIX,
                                                    "records": len(rows), "with_suffix": count})
    return count


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

