"""The demo fine-tune's recipe sweep: each variant of the `demo-cpu` preset trained on the demo dataset for
several seeds, and scored (base + LoRA, relaxed accuracy) on fresh charts of the held-out kind, against the base.

    python benchmarks/demo_recipes.py --out /tmp/recipes --workers 8             # all but long*, seeds 0 1 2
    python benchmarks/demo_recipes.py --out /tmp/recipes --variants shipped warmup0 --seeds 0 --workers 1

One job = `training.train` with the preset and the variant's overrides, then `eval.run` of the adapter; jobs
run as separate processes, `--workers` at a time (on a GPU many fit beside each other; on 2 CPU cores use 1).
The test sets are `charts generate --seed S --kinds hbar --look demo --split 0,0,1 --qa-per-chart 8` for each
`--test-seeds` S (1000 is the set docs/BENCHMARKS.md reports). Prints the table (mean and spread over seeds of
the lift on each test set, the seen-kind score when --seen) and writes OUT/results.json; finished jobs are kept,
so a rerun into the same OUT only runs what is missing or was made with other settings.

Models are scored as eval.run opens them: float32 on a CPU, bfloat16 on a GPU (where the base scores 21.25 on
hbar-1000, as on the 2-core CPU of docs/BENCHMARKS.md, whose fp32 figures differ by a few answers between CPUs).
Training follows the preset on either (float32, no TF32), without packing, so both see the same batches.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SEEN_KINDS = ["pie", "donut", "bar", "grouped_bar", "stacked_bar", "line", "multi_line", "area", "scatter", "funnel",
              "infographic"]
LM = r".*language_model.*\.({})"
# name -> (train.py overrides, demo dataset overrides)
VARIANTS = {
    "shipped": ({}, {}),
    "warmup0": ({"warmup_ratio": 0.0}, {}),
    "lr2.5e-3": ({"learning_rate": 2.5e-3, "mm_projector_lr": 1.25e-3}, {}),
    "proj2e-3": ({"mm_projector_lr": 2e-3}, {}),
    "proj5e-4": ({"mm_projector_lr": 5e-4}, {}),
    "r8": ({"lora_r": 8, "lora_alpha": 16}, {}),
    "r32": ({"lora_r": 32, "lora_alpha": 64}, {}),
    "alpha64": ({"lora_alpha": 64}, {}),
    "attention": ({"lora_target": LM.format("q_proj|k_proj|v_proj|o_proj")}, {}),
    "mlp": ({"lora_target": LM.format("gate_proj|up_proj|down_proj")}, {}),
    "batch8": ({"per_device_batch_size": 8, "max_steps": 23, "learning_rate": 3e-3, "mm_projector_lr": 1.5e-3}, {}),
    "batch2": ({"per_device_batch_size": 2, "max_steps": 90, "learning_rate": 1.5e-3, "mm_projector_lr": 7.5e-4}, {}),
    "instruct1": ({}, {"instruct_share": 1.0}),
    "instruct0": ({}, {"instruct_share": 0.0}),
    "data-seed1": ({}, {"seed": 1}),
    "qa12": ({}, {"qa_per_chart": 12}),
    "dropout0.05": ({"lora_dropout": 0.05}, {}),
    "charts270-steps60": ({"max_steps": 60}, {"n": 270}),
    # far past the 3-minute budget: how much a LoRA on this base can lift hbar at all
    "long300": ({"max_steps": 300}, {"n": 1350}),
    "long300-lr1e-3": ({"max_steps": 300, "learning_rate": 1e-3, "mm_projector_lr": 5e-4}, {"n": 1350}),
    "long300-r64": ({"max_steps": 300, "lora_r": 64, "lora_alpha": 128}, {"n": 1350}),
    "long600": ({"max_steps": 600}, {"n": 2700}),
}


def draw(out: Path, **settings) -> None:
    import charts
    if not (out / "dataset.json").exists():
        charts.generate(**settings)


def datasets(out: Path, variants: list[str], test_seeds: list[int], seen: bool) -> dict:
    """{"train": {data overrides as JSON: folder}, "tests": {name: folder}}, each drawn if missing."""
    from training.demo import DEMO_KIND, DEMO_LOOK, demo_dataset_settings

    def test_set(kinds, n, seed):
        return dict(n=n, kinds=kinds, seed=seed, look=DEMO_LOOK, split=(0, 0, 1), qa_per_chart=8)

    train, tests, todo = {}, {}, []
    for name in variants:
        data = VARIANTS[name][1]
        key = json.dumps(data, sort_keys=True)
        if key not in train:
            train[key] = out / "data" / ("train-" + ("-".join(f"{k}{v}" for k, v in sorted(data.items())) or "demo"))
            todo.append((train[key], {**demo_dataset_settings(train[key]), **data}))
    for seed in test_seeds:
        tests[f"hbar-{seed}"] = out / "data" / f"hbar-{seed}"
        todo.append((tests[f"hbar-{seed}"], test_set([DEMO_KIND], 30, seed)))
    if seen:
        tests["seen-1000"] = out / "data" / "seen-1000"
        todo.append((tests["seen-1000"], test_set(SEEN_KINDS, 33, 1000)))
    for path, settings in todo:
        draw(path, **{**settings, "out_dir": str(path), "workers": os.cpu_count()})
    return {"train": train, "tests": tests}


def score(model: str, test: Path, out: Path, options: dict) -> dict:
    from eval.run import run_eval
    summary = run_eval(test, [model], out, split="test", backend_options=options)[0]
    return {"acc": summary["overall"]["relaxed_ref"],
            "by_family": {k: v["relaxed_ref"] for k, v in summary["by_family"].items()}}


def job(args) -> None:
    """One (variant, seed): train, then score on every test set; OUT/runs/NAME-sSEED/result.json."""
    from charts.io import atomic_write_json
    from training.config import preset
    from training.train import train
    spec = json.loads(args.job)
    run = Path(spec["run"])
    overrides, _ = VARIANTS[spec["variant"]]
    cfg = preset("demo-cpu", model=spec["base"], data=spec["data"], output_dir=str(run / "train"), overwrite=True,
                 seed=spec["seed"], packing="false", eval_limit=0, save_steps=10_000,
                 **{**overrides, **spec["extra"]})
    started = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - started
    model = f"local:{spec['base']}+{result['adapter']}"
    scores = {name: score(model, Path(test), run / "eval" / name, spec["options"]) for name, test in spec["tests"].items()}
    atomic_write_json(run / "result.json", {**spec, "train_s": train_s, "scores": scores})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--base", default=str(ROOT / "assets" / "demo-llava"))
    p.add_argument("--variants", nargs="*", default=[v for v in VARIANTS if not v.startswith("long")],
                   choices=list(VARIANTS), help="default: all but the long* runs")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--test-seeds", nargs="*", type=int, default=[1000, 2000])
    p.add_argument("--seen", action="store_true", help="score the seen kinds too (seed 1000, 264 questions)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--deadline-s", type=float, default=0, help="start no job after this many seconds")
    p.add_argument("--max-steps", type=int, help="override every variant's steps (a quick check of the sweep)")
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        return job(args)
    out = Path(args.out)
    started = time.perf_counter()
    sets = datasets(out, args.variants, args.test_seeds, args.seen)
    options = {"quantize": "none", "compile": False, "graphs": False}
    tests = {k: str(v) for k, v in sets["tests"].items()}
    base_scores = {}
    for name, test in tests.items():
        base_scores[name] = score(f"local:{args.base}", Path(test), out / "base" / name, options)
    env = {"OMP_NUM_THREADS": "2", **os.environ}         # 2 threads a job: on 2 cores, or 8 jobs on 16

    extra = {"max_steps": args.max_steps} if args.max_steps else {}

    def launch(variant_seed):
        variant, seed = variant_seed
        run = out / "runs" / f"{variant}-s{seed}"
        if done(run, args.base, tests, extra):
            return
        if args.deadline_s and time.perf_counter() - started > args.deadline_s:
            return
        run.mkdir(parents=True, exist_ok=True)
        data = sets["train"][json.dumps(VARIANTS[variant][1], sort_keys=True)]
        spec = {"variant": variant, "seed": seed, "run": str(run), "base": args.base, "data": str(data),
                "tests": tests, "options": options, "extra": extra}
        with open(run / "log.txt", "w") as log:
            subprocess.run([sys.executable, __file__, "--out", str(out), "--job", json.dumps(spec)], env=env,
                           stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, check=False)

    jobs = [(v, s) for s in args.seeds for v in args.variants]
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(launch, jobs))
    results: dict[str, list[dict]] = {}
    for variant, seed in jobs:
        run = out / "runs" / f"{variant}-s{seed}"
        if done(run, args.base, tests, extra):
            results.setdefault(variant, []).append(json.loads((run / "result.json").read_text()))
        elif (run / "log.txt").exists():
            print(f"{run.name} failed, see {run / 'log.txt'}")
    report(out, base_scores, results)


def done(run: Path, base: str, tests: dict, extra: dict) -> bool:
    """Whether RUN holds the result of a job with these settings (one made with others is run again)."""
    path = run / "result.json"
    if not path.exists():
        return False
    r = json.loads(path.read_text())
    return (r["base"], r["tests"], r["extra"]) == (base, tests, extra)


def report(out: Path, base_scores: dict, results: dict[str, list[dict]]) -> None:
    from charts.io import atomic_write_json
    tests = list(base_scores)
    lifts = {v: {t: [r["scores"][t]["acc"] - base_scores[t]["acc"] for r in rows] for t in tests}
             for v, rows in results.items()}
    print("base: " + ", ".join(f"{t} {base_scores[t]['acc']:.2f}" for t in tests))
    print("| variant | seeds | train s | " + " | ".join(f"{t} lift (mean, min..max)" for t in tests)
          + f" | {tests[0]} vs shipped |")
    print("|" + "---|" * (4 + len(tests)))
    for variant, rows in results.items():
        cells = [f"{statistics.mean(x):+.1f} ({min(x):+.1f}..{max(x):+.1f})" for x in lifts[variant].values()]
        versus = (f"{statistics.mean(lifts[variant][tests[0]]) - statistics.mean(lifts['shipped'][tests[0]]):+.1f}"
                  if "shipped" in lifts else "-")
        train_s = statistics.mean(r["train_s"] for r in rows)
        print(f"| {variant} | {len(rows)} | {train_s:.0f} | " + " | ".join(cells) + f" | {versus} |")
    atomic_write_json(out / "results.json", {"base": base_scores, "runs": results})


if __name__ == "__main__":
    main()
