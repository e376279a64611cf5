"""Command line for benchmark runs, comparisons, reports and the tiny demo model.

    python -m eval run --data workspace/datasets/demo --split test --model local:workspace/models/demo-llava \
        --out workspace/evals/demo [--limit 100]
    python -m eval run --config eval.yaml [--limit 10]           # an EvalConfig YAML; flags override it
    python -m eval run --data "ChartQA Dataset/test" --model openai:http://localhost:8000/v1#llava --out evals/chartqa
    python -m eval compare workspace/evals/demo/demo-llava workspace/evals/demo/demo-llava+r1-adapter --out paired.json
    python -m eval side-by-side --image assets/examples/pie.png --question "Which mode of transport has the highest share?" \
        --model local:workspace/models/demo-llava \
        --model local:workspace/models/demo-llava+workspace/runs/demo-adapter/adapter
    python -m eval votes --workspace workspace
    python -m eval report workspace/evals/demo
    python -m eval demo-model --out /tmp/tiny-llava      # the random tiny LLaVA (GPU benchmarks)
"""
from __future__ import annotations

import argparse
import sys
import time


def _progress_bar(done: int, total: int, info: dict) -> None:
    width = 30
    filled = int(width * done / total) if total else width
    eta = info.get("eta_s")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None else "--:--:--"
    rate = info.get("samples_per_s")
    rate_text = f"{rate:.2f}/s" if rate else "-/s"
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {info.get('model', '')} "
                     f"{rate_text} ETA {eta_text} ")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def cmd_run(args) -> int:
    """Exit 0 when every sample of every model was scored; 1 when a model could not be opened, or when
    samples failed (missing image, backend error ...) unless --allow-errors; 2 for bad arguments or data."""
    from pathlib import Path

    from charts.config import from_flags
    from charts.jobfile import run_job
    from eval.backends import opener
    from eval.config import EvalConfig

    def body(job) -> int:
        cfg = from_flags(EvalConfig, args)

        def progress(done, total, info):
            if not args.quiet:
                _progress_bar(done, total, info)
            job.progress(done, total, f"{info.get('model', '')} {done}/{total}")
        summaries = cfg.run(progress, opener(cfg.workspace, wire=cfg.wire or None))
        cfg.to_yaml(Path(cfg.out) / "eval_config.yaml")       # the copy saved with the results: rerun with --config
        return _report_run(cfg, summaries)
    return run_job(args.job_file, body)


def _report_run(cfg, summaries: list[dict]) -> int:
    print(format_table(summaries, list(cfg.metrics)))
    print(f"written to {cfg.out}")
    failed = False
    for s in summaries:
        if s.get("failed"):
            print(f"error: model {s['slug']} ({s['model']}) {s['failed']}", file=sys.stderr)
            failed = True
        elif s["n_errors"]:
            first = next(r for r in _error_rows(cfg.out, s["slug"]))
            level = "warning" if cfg.allow_errors else "error"
            print(f"{level}: {s['slug']}: {s['n_errors']} of {s['n']} samples failed and are scored wrong "
                  f"(first: {first['id']}: {first['error']}); see {s['slug']}/samples.jsonl"
                  + ("" if cfg.allow_errors else "; --allow-errors accepts them"), file=sys.stderr)
            failed = failed or not cfg.allow_errors
    return 1 if failed else 0


def format_table(summaries: list[dict], metrics: list[str]) -> str:
    """One line per model: n, n_errors (samples scored wrong because they failed), scores, speed."""
    lines = [f"{'model':40s} {'n':>6s} {'n_errors':>8s} " + " ".join(f"{m:>12s}" for m in metrics)
             + f" {'samples/s':>10s}"]
    for s in summaries:
        if s.get("failed"):
            lines.append(f"{s['slug'][:40]:40s} {s['n']:6d} {s['n_errors']:8d} {'failed':>12s}")
            continue
        rate = s["timing"]["samples_per_s"]
        lines.append(f"{s['slug'][:40]:40s} {s['n']:6d} {s['n_errors']:8d} "
                     + " ".join(f"{s['overall'][m]:12.2f}" for m in metrics)
                     + f" {rate if rate is not None else '-':>10}")
    return "\n".join(lines)


def _error_rows(out: str, slug: str):
    from pathlib import Path

    from charts.io import read_jsonl
    return (r for r in read_jsonl(Path(out) / slug / "samples.jsonl") if r.get("error"))


def cmd_compare(args) -> int:
    from pathlib import Path

    from charts.io import atomic_write_json
    from eval.paired import compare_runs, format_paired
    result = compare_runs(args.run_a, args.run_b, metric=args.metric, n_boot=args.resamples, seed=args.seed)
    print(format_paired(result))
    if args.out:
        out = Path(args.out)
        out = out / "paired.json" if out.suffix != ".json" else out
        atomic_write_json(out, result)
        print(f"written to {out}")
    return 0


def side_by_side_lines(sides, labels: str = "AB", width: int = 100) -> list[str]:
    """One line per side for the live view: label, short model name, the answer so far on one line."""
    from eval.display import short_name

    name_w = max([len(short_name(s.ref)) for s in sides] + [5])
    out = []
    for label, side in zip(labels, sides):
        text = side.error or " ".join(side.text.split()) or ("…" if not side.done else "")
        head = f"{label}  {short_name(side.ref):{name_w}s} │ "
        room = max(10, width - len(head))
        out.append(head + (text if len(text) <= room else text[:room - 1] + "…"))
    return out


def cmd_side_by_side(args) -> int:
    """Both models answer one chart question at once, streamed as labelled lines updated in place (a plain
    log of the final answers when stdout is not a terminal). Exit 0 when every side answered, 1 if not."""
    import shutil

    from eval.compare import check_question, compare_stream, to_ref
    from eval.display import short_name
    from eval.images import load_image
    from eval.pool import ModelPool
    from eval.protocol import Request

    refs = [to_ref(m) for m in args.model]
    request = Request(load_image(args.image), check_question(args.question), max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature)
    live = sys.stdout.isatty() and not args.plain
    width = shutil.get_terminal_size((100, 20)).columns - 1
    labels = "ABCDEFGH"[:len(refs)]
    sides, shown = [], 0
    pool = ModelPool()
    stream = compare_stream(refs, request, pool, {"local": {"quantize": args.quantize}}, args.gold or [])
    try:
        for sides in stream:
            if live:
                lines = side_by_side_lines(sides, labels, width)
                sys.stdout.write(("\x1b[%dF" % shown if shown else "") + "".join(f"\x1b[2K{ln}\n" for ln in lines))
                sys.stdout.flush()
                shown = len(lines)
    finally:
        stream.close()
        pool.unload(wait=10.0)     # the engines' workers end before the process does
    print()
    for label, side in zip(labels, sides):   # the whole answers, wrapped as the terminal wraps them
        print(f"{label}  {short_name(side.ref)}  ({side.ref})")
        print(f"   {side.error or side.text}")
        if side.verdict:
            print(f"   {side.verdict}")
        print(f"   {side.stats().replace('**', '')}")
    return 1 if any(s.error for s in sides) else 0


def cmd_votes(args) -> int:
    from eval.votes import format_board, leaderboard, read_votes
    print(format_board(leaderboard(read_votes(args.workspace))))
    return 0


def cmd_report(args) -> int:
    from eval.report import write_reports
    for path in write_reports(args.eval_dir, args.out, metric=args.metric).values():
        print(path)
    return 0


def cmd_demo_model(args) -> int:
    from eval.demo import build_demo_model
    print(build_demo_model(args.out, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from charts.config import add_flags
    from eval.config import EvalConfig

    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="score models on a question set")
    add_flags(run, EvalConfig)              # one flag per EvalConfig field, plus --config
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--job-file", help="keep this JSON file up to date with progress and outcome (background jobs)")
    run.set_defaults(func=cmd_run)

    compare = sub.add_parser("compare", help="paired statistics of two finished benchmark runs on the same questions "
                                             "(delta, bootstrap CI, McNemar); to watch two models answer one chart "
                                             "live, use side-by-side",
                             description="Paired statistics of two finished model runs of `python -m eval run` on "
                                         "the same questions: accuracy delta, bootstrap 95% CI, McNemar test, "
                                         "fixed / regressed counts. Nothing is generated. To see two models answer "
                                         "one chart as they stream, use `python -m eval side-by-side`.")
    compare.add_argument("run_a", help="baseline: a model folder (with samples.jsonl) or a samples.jsonl")
    compare.add_argument("run_b")
    compare.add_argument("--metric", default="relaxed_ref")
    compare.add_argument("--resamples", type=int, default=2000)
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--out", help="paired.json path or folder")
    compare.set_defaults(func=cmd_compare)

    sbs = sub.add_parser("side-by-side", help="one chart and question to two (or more) models at once, both "
                                              "answers streamed in the terminal (the Compare tab's CLI)")
    sbs.add_argument("--image", required=True, help="chart image (PNG / JPEG)")
    sbs.add_argument("--question", required=True)
    sbs.add_argument("--model", action="append", required=True,
                     help="local:BASE, local:BASE+ADAPTER, sagemaker:ENDPOINT, openai:URL#MODEL (repeat: one per side)")
    sbs.add_argument("--gold", action="append", help="gold answer (repeatable): each side gets a verdict")
    sbs.add_argument("--max-new-tokens", type=int, default=64)
    sbs.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sbs.add_argument("--quantize", choices=["auto", "4bit", "none"], default="auto",
                     help="local models: auto = bf16 when the base fits the GPU, else 4-bit")
    sbs.add_argument("--plain", action="store_true", help="no in-place updates: only the final answers")
    sbs.set_defaults(func=cmd_side_by_side)

    votes = sub.add_parser("votes", help="the votes leaderboard of the Compare tab: win rate (95%% Wilson CI) and "
                                         "Bradley-Terry strength per model, from WORKSPACE/votes.jsonl")
    votes.add_argument("--workspace", default="workspace")
    votes.set_defaults(func=cmd_votes)

    report = sub.add_parser("report", help="CSV + JSON + one self-contained HTML file for an eval folder")
    report.add_argument("eval_dir")
    report.add_argument("--out", help="folder for the reports (default: the eval folder)")
    report.add_argument("--metric", default="relaxed_ref", help="metric of the paired comparison")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo-model", help="build the random tiny LLaVA (for the GPU benchmarks; the studio "
                                             "ships assets/demo-llava)")
    demo.add_argument("--out", required=True)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from eval.run import DatasetError, RunMismatch
    from eval.images import ImageError
    try:
        return args.func(args)
    except (DatasetError, RunMismatch, ImageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
