"""Command line for the charts package.

    python -m charts generate --out workspace/datasets/charts --n 2000 --seed 0 --workers 2 --instruct-share 0.5
    python -m charts validate workspace/datasets/charts
    python -m charts export workspace/datasets/charts --format hf --out workspace/exports/charts-hf
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parser() -> argparse.ArgumentParser:
    from .paraphrase import DEFAULT_MODEL
    from .questions import FAMILIES
    from .spec import KINDS
    p = argparse.ArgumentParser(prog="python -m charts", description="Synthetic chart-QA datasets.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="render charts and their questions into a dataset folder")
    g.add_argument("--out", required=True, help="dataset folder, e.g. workspace/datasets/NAME")
    g.add_argument("--n", type=int, default=2000, help="number of charts (images)")
    g.add_argument("--kinds", type=_csv, default=list(KINDS), help=f"comma list from: {','.join(KINDS)}")
    g.add_argument("--families", type=_csv, default=list(FAMILIES), help=f"comma list from: {','.join(FAMILIES)}")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions (by image)")
    g.add_argument("--workers", type=int, default=2, help="rendering processes")
    g.add_argument("--qa-per-chart", type=int, default=3, help="questions kept per chart")
    g.add_argument("--multi-turn", action="store_true", help="one multi-turn record per image")
    g.add_argument("--instruct-share", type=float, default=0.5,
                   help="share of train/val questions ending with the short-answer instruction the "
                        "benchmark runner appends (0 to 1; test questions stay bare)")
    g.add_argument("--paraphrase", action="store_true", help="reword questions through Amazon Bedrock")
    g.add_argument("--bedrock-model", default=DEFAULT_MODEL, help="Bedrock model or inference profile id")
    g.add_argument("--bedrock-region", default=None)
    g.add_argument("--overwrite", action="store_true", help="replace a dataset made with other settings")
    g.add_argument("--look", default="default", help="how charts are drawn: default, or demo / demo-easy "
                                                     "(square 384 px, large type: the demo model's charts)")

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
        from .dataset import generate, progress_bar
        # a stopped job gets SIGTERM: end like Ctrl-C, so the worker pool is shut down on the way out
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        split = [float(x) for x in args.split.split(",")]
        t0 = time.time()
        manifest = generate(args.n, args.kinds, args.seed, args.out, args.workers, progress_bar(),
                            families=args.families, split=split, multi_turn=args.multi_turn,
                            qa_per_chart=args.qa_per_chart, paraphrase=args.paraphrase,
                            bedrock_model=args.bedrock_model, bedrock_region=args.bedrock_region,
                            instruct_share=args.instruct_share, overwrite=args.overwrite, look=args.look)
        for note in manifest["notes"]:
            print(f"note: {note}", file=sys.stderr)
        c = manifest["counts"]
        print(f"{args.out}: {c['charts']} charts, records {c['records']}, questions {c['questions']} "
              f"in {time.time() - t0:.1f}s")
        return 0
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
