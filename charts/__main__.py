"""Command line for the charts package.

    python -m charts generate --out workspace/datasets/charts --n 2000 --seed 0 --workers 2 --instruct-share 0.5
    python -m charts generate --config gen.yaml [--n 50]          # a GenerateConfig YAML; flags override it
    python -m charts validate workspace/datasets/charts
    python -m charts export workspace/datasets/charts --format hf --out workspace/exports/charts-hf
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    from .config import GenerateConfig, add_flags
    p = argparse.ArgumentParser(prog="python -m charts", description="Synthetic chart-QA datasets.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="render charts and their questions into a dataset folder")
    add_flags(g, GenerateConfig)        # one flag per GenerateConfig field, plus --config
    g.add_argument("--job-file", help="keep this JSON file up to date with progress and outcome (background jobs)")

    v = sub.add_parser("validate", help="check a LLaVA-format dataset folder, .jsonl or .json")
    v.add_argument("path")
    v.add_argument("--examples", type=int, default=5, help="examples shown per issue")
    v.add_argument("--json", action="store_true", help="print the report as JSON")

    e = sub.add_parser("export", help="export to the LLaVA JSON array or the Hugging Face imagefolder form")
    e.add_argument("path")
    e.add_argument("--format", choices=["llava-json", "hf"], required=True)
    e.add_argument("--out", required=True)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "generate":
        from .config import GenerateConfig, from_flags
        from .dataset import progress_bar
        from .jobfile import run_job

        bar = progress_bar()

        def body(job) -> int:
            t0 = time.time()
            cfg = from_flags(GenerateConfig, args)

            def progress(done, total):
                bar(done, total)
                job.progress(done, total, f"charts {done}/{total}")
            manifest = cfg.generate(progress)
            cfg.to_yaml(Path(cfg.out) / "generate_config.yaml")   # the copy saved with the dataset: rerun with --config
            for note in manifest["notes"]:
                print(f"note: {note}", file=sys.stderr)
            c = manifest["counts"]
            print(f"{cfg.out}: {c['charts']} charts, records {c['records']}, questions {c['questions']} "
                  f"in {time.time() - t0:.1f}s")
            return 0
        return run_job(args.job_file, body)
    if args.command == "validate":
        from .validate import validate
        report = validate(args.path)
        if args.json:
            from dataclasses import asdict
            print(json.dumps({"ok": report.ok, **asdict(report)}, indent=1))
        else:
            print(report.to_text(args.examples))
        return 0 if report.ok else 1
    if args.command == "export":
        from .export import export
        print(export(args.path, args.format, args.out))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
