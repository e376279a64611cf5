"""Jobs from the shell (the same launchers the studio uses): fine-tunes, benchmark runs, chart generation.

    python -m training launch --config run.yaml [--name r1] [--gpus 2]             # local subprocess
    python -m training launch --task bench --config eval.yaml     # python -m eval run in the background
    python -m training launch --task charts --config gen.yaml     # python -m charts generate in the background
    python -m training launch --config run.yaml --sagemaker --role ARN --bucket B \\
        [--instance-type ml.g5.2xlarge --count 1 --no-spot --hours 24 --region us-east-1]
    python -m training estimate --instance-type ml.g5.12xlarge --count 1 --hours 10
    python -m training jobs                       # every recorded job: short name, status, progress
    python -m training logs JOB [--tail 50]       # JOB: its id or short name (train-1, bench-3, charts-2)
    python -m training stop JOB
    python -m training resume JOB                 # a stopped or killed local job continues from its checkpoint
Training itself: python -m training.train --help
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training.config import TrainConfig
from charts.config import GenerateConfig
from eval.config import EvalConfig
from training.launchers import LocalLauncher, all_jobs, find_job, launchers

CONFIGS = {"train": TrainConfig, "bench": EvalConfig, "charts": GenerateConfig}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training", description="Launch and watch jobs: fine-tunes, "
                                 "benchmark runs, chart generation.")
    ap.add_argument("--workspace", default="workspace")
    sub = ap.add_subparsers(dest="command", required=True)
    launch = sub.add_parser("launch", help="start a job from a config YAML")
    launch.add_argument("--config", required=True, help="a TrainConfig, EvalConfig or GenerateConfig YAML (--task)")
    launch.add_argument("--task", choices=list(CONFIGS), default="train",
                        help="train (TrainConfig), bench (EvalConfig), charts (GenerateConfig)")
    launch.add_argument("--name")
    launch.add_argument("--gpus", type=int, default=1)
    launch.add_argument("--sagemaker", action="store_true")
    for p in (launch, sub.add_parser("estimate", help="SageMaker cost before launch")):
        p.add_argument("--role", default="")
        p.add_argument("--bucket", default="")
        p.add_argument("--region", default="us-east-1")
        p.add_argument("--instance-type", default="ml.g5.2xlarge")
        p.add_argument("--count", type=int, default=1)
        p.add_argument("--no-spot", action="store_true")
        p.add_argument("--hours", type=float, default=24)
    sub.add_parser("jobs", help="list jobs")
    for name in ("logs", "stop", "resume"):
        p = sub.add_parser(name)
        p.add_argument("job")
        p.add_argument("--tail", type=int, default=50)
    args = ap.parse_args(argv)

    sm = {}
    if args.command in ("launch", "estimate"):
        sm = dict(role=args.role, bucket=args.bucket, region=args.region, instance_type=args.instance_type,
                  instance_count=args.count, spot=not args.no_spot, max_runtime_s=int(args.hours * 3600),
                  max_wait_s=int(args.hours * 3600 * 1.5))
    table = launchers(args.workspace, **sm)
    if args.command == "estimate":
        print(table["sagemaker"].estimate()["text"])
    elif args.command == "launch":
        try:
            cfg = CONFIGS[args.task].from_yaml(Path(args.config))
            if args.sagemaker and args.task != "train":
                raise ValueError("only fine-tunes run on SageMaker")
            if args.sagemaker:
                print(table["sagemaker"].estimate()["text"])
                job = table["sagemaker"].start(cfg, args.name)
            else:
                job = table["local"].start(cfg, args.name, gpus=args.gpus)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({k: job[k] for k in ("id", "short", "task", "kind", "status") if k in job}))
    elif args.command == "jobs":
        for j in all_jobs(args.workspace):
            metrics = {k: j[k] for k in ("step", "loss", "eval_loss", "eval_relaxed_accuracy", "desc") if k in j}
            done = f"{j['progress']:5.1f}%" if j.get("progress") is not None else "     -"
            print(f"{j['short']:10s} {j['status']:11s} {done} {j['kind']:9s} {j['id']:40s} {json.dumps(metrics)}")
    else:
        job = find_job(args.workspace, args.job)
        if job is None:
            print(f"error: no job {args.job!r} in {args.workspace}/jobs.jsonl", file=sys.stderr)
            return 2
        launcher = table[job["kind"]]
        try:
            if args.command == "resume":
                job = LocalLauncher(args.workspace).resume(job["id"])
                print(json.dumps({k: job[k] for k in ("id", "kind", "status")}))
                return 0
            result = launcher.logs(job, args.tail) if args.command == "logs" else launcher.stop(job)
        except ValueError as e:           # e.g. SageMaker refused, or the job cannot resume: one line
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(result if isinstance(result, str) else result.get("message") or result["status"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
