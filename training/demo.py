"""The demo's fine-tune: the shipped model (assets/demo-llava) taught the chart kind held out of its pretraining.

    python -m training.demo --workspace /tmp/demo-ws --out assets/demo-adapter      # remake the shipped adapter

The shipped model was pretrained on every chart kind but `hbar` (training/pretrain.py's `held_out`):
horizontal bars share every question family with vertical ones, but their labels sit on the other
axis and their values run left to right, so the base reads them worse than the kinds it knows. The
`demo-cpu` preset trains a LoRA on hbar charts in the demo look on 2 CPU cores in about 3 minutes, and
the studio's Compare and Benchmark tabs show what it fixed. That run's adapter ships as
assets/demo-adapter; the first start copies it into WORKSPACE/runs/demo-adapter/adapter (nothing is
trained at start) and draws the same hbar dataset into WORKSPACE/datasets/demo, so Fine-tune can
repeat the run and Benchmark can score it on the test split.

The dataset: DEMO_CHARTS hbar charts in the demo look (`charts.spec.LOOKS`: 384 px, 12-14 pt type, the
model's input size), every question family the kind has, each chart ONE multi-turn record holding
all its questions (multi_turn=True): the 576 image tokens are encoded once per chart instead of once
per question, which is what makes ~1,500 answers fit in 3 CPU minutes. Half of the train/val records
end their first question with the benchmark's short-answer instruction (charts.generate's
instruct_share), as pretraining did, so the adapter answers both the bare question (Compare) and the
benchmark prompt. Test questions stay bare: the benchmark runner appends the instruction itself, and
scores each turn of a test chart as its own question.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from training.config import preset

DEMO_KIND = "hbar"            # = training.pretrain.PRESETS["demo"].held_out (tests/test_demo_finetune.py checks)
DEMO_LOOK = "demo"
DEMO_DATASET = "demo"
DEMO_RUN = "demo-adapter"
DEMO_CHARTS = 200
DEMO_QA_PER_CHART = 8
# 180 train charts (~1,400 answers: one epoch is the preset's 45 steps of 4), 10 val (the end-of-run
# accuracy), 10 test (~80 questions: a quick Benchmark-tab run; docs/BENCHMARKS.md scores fresh charts).
DEMO_SPLIT = (0.9, 0.05, 0.05)
DEMO_INSTRUCT_SHARE = 0.5


def demo_dataset_settings(out: str | Path, n: int = DEMO_CHARTS, seed: int = 0) -> dict:
    return dict(n=n, kinds=[DEMO_KIND], seed=seed, out_dir=str(out), workers=2, look=DEMO_LOOK, multi_turn=True,
                qa_per_chart=DEMO_QA_PER_CHART, split=DEMO_SPLIT, instruct_share=DEMO_INSTRUCT_SHARE)


def ensure_demo_dataset(workspace: str | Path, n: int = DEMO_CHARTS, seed: int = 0) -> Path:
    """WORKSPACE/datasets/demo, drawn now if missing (~3 s on 2 cores)."""
    import charts

    out = Path(workspace) / "datasets" / DEMO_DATASET
    if not (out / "dataset.json").exists():
        settings = demo_dataset_settings(out, n, seed)
        try:
            charts.generate(**settings)          # resumes a killed run of the same settings
        except ValueError:                       # an unfinished set made with other settings
            charts.generate(**settings, overwrite=True)
    return out


def install_demo(workspace: str | Path, dataset: bool = True) -> tuple[Path, Path]:
    """(model, adapter) for a studio on the demo: WORKSPACE/models/demo-llava links to the shipped model
    (a copy where links are not allowed), WORKSPACE/runs/demo-adapter/adapter is a copy of the shipped
    adapter (runs are the workspace's own, so the tabs list, compare and benchmark it like any run),
    and the demo dataset is drawn (`dataset=False`: left to the caller; app.py draws it in the background).
    Builds and trains nothing."""
    from eval.demo import SHIPPED_ADAPTER, SHIPPED_MODEL, shipped_demo_adapter, shipped_demo_model

    model, adapter = shipped_demo_model(), shipped_demo_adapter()
    if model is None or adapter is None:
        missing = SHIPPED_MODEL if model is None else SHIPPED_ADAPTER
        raise FileNotFoundError(f"the shipped demo model is incomplete: {missing} is missing files "
                                "(a checkout without its assets?)")
    workspace = Path(workspace)
    link = workspace / "models" / "demo-llava"
    if not (link / "config.json").exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():                   # dangling: the checkout moved
            link.unlink()
        try:
            link.symlink_to(model.resolve(), target_is_directory=True)
        except OSError:
            _copy_atomic(model, link)
    run_adapter = workspace / "runs" / DEMO_RUN / "adapter"
    if not (run_adapter / "adapter_config.json").exists():
        _copy_atomic(adapter, run_adapter)
    if dataset:
        ensure_demo_dataset(workspace)
    return link, run_adapter


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def train_demo_adapter(workspace: str | Path, base: str | Path, on_progress=None, **overrides) -> Path:
    """Run the demo-cpu preset on WORKSPACE/datasets/demo into WORKSPACE/runs/demo-adapter; its adapter.
    This is how assets/demo-adapter was made (see main)."""
    import torch

    from training.train import train

    workspace = Path(workspace)
    data = ensure_demo_dataset(workspace)
    cfg = preset("demo-cpu", model=str(base), data=str(data), output_dir=str(workspace / "runs" / DEMO_RUN),
                 overwrite=True, **overrides)
    # Two intra-op threads: the 576-token sequences keep both cores busy (one thread is ~1.7x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    if on_progress:
        on_progress(1, 1)
    return Path(result["adapter"])


def _relative_base(config_path: Path) -> None:
    """A base inside the checkout is named relative to its root ("assets/demo-llava"), so the shipped
    adapter's config names no path of the machine that trained it."""
    import json

    from charts.io import atomic_write_json
    root = Path(__file__).resolve().parent.parent
    config = json.loads(config_path.read_text(encoding="utf-8"))
    base = Path(config.get("base_model_name_or_path") or "")
    if base.is_absolute() and base.resolve().is_relative_to(root):
        config["base_model_name_or_path"] = base.resolve().relative_to(root).as_posix()
        atomic_write_json(config_path, config)


def main(argv=None) -> None:
    from eval.demo import SHIPPED_MODEL

    p = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workspace", required=True, help="where the dataset and the run go")
    p.add_argument("--base", default=str(SHIPPED_MODEL))
    p.add_argument("--out", help="copy the adapter's weights and config here (e.g. assets/demo-adapter)")
    args = p.parse_args(argv)
    adapter = train_demo_adapter(args.workspace, args.base)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(adapter / name, tmp / name)
        _relative_base(tmp / "adapter_config.json")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        adapter = out
    print(adapter)


if __name__ == "__main__":
    main()
