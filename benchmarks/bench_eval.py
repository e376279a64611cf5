"""Benchmark runner throughput: eval.run (batched) against a one-request-at-a-time loop, same model,
same questions, same process.

    python benchmarks/bench_eval.py --n 200 [--batch-sizes 4 8 16] [--threads 1] [--rounds 3]

Model: the shipped demo LLaVA (assets/demo-llava, 576 image tokens) on CPU, or --model. Questions: a generated
test split (charts.generate, 3 per chart). Each batch size runs twice: as the runner does, a chart's questions
prefilling their shared head (template + image tokens) once, and with that off (`heads not shared`).
Timings exclude model loading (the backend is opened once, before any timer starts) and count image
loading, generation and scoring, as a benchmark run does. Modes are interleaved over `--rounds`
rounds and the best round of each is kept, so a neighbour's burst of CPU use hits all modes alike.
Prints a table; the ratio column is samples/s relative to the one-at-a-time loop.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from anywhere, like the others


def make_questions(workdir: Path, n: int) -> Path:
    """A dataset folder whose test split holds at least `n` questions (3 questions per chart)."""
    from charts import generate
    out = workdir / "dataset"
    generate(n // 3 + 1, seed=0, out_dir=out, workers=1, split=(0, 0, 1), overwrite=True)
    return out


def one_at_a_time(backend, questions: list[dict], suffix: str, max_new_tokens: int) -> tuple[float, list[str]]:
    from eval.images import load_image
    from eval.metrics import score_sample
    from eval.protocol import Request

    start = time.perf_counter()
    answers = []
    for q in questions:
        request = Request(load_image(q["image"]), q["question"] + suffix, max_new_tokens)
        [answer] = backend.generate([request])
        score_sample(answer, q["answers"])
        answers.append(answer)
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="questions")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="kept after the run when given (default: a temp folder)")
    parser.add_argument("--model", help="a local LLaVA folder (default: the shipped demo model, else a tiny built one)")
    args = parser.parse_args()

    import torch

    from charts.io import read_jsonl
    from eval.backends import open_backend
    from eval.demo import build_demo_model, shipped_demo_model
    from eval.run import DEFAULT_SUFFIX, load_questions, model_slug, run_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_eval-"))
    model = Path(args.model) if args.model else shipped_demo_model() or build_demo_model(workdir / "demo-llava")
    data = make_questions(workdir, args.n)
    questions = load_questions(data, split="test")[: args.n]
    ref = f"local:{model}"
    backend = open_backend(ref)                      # loads once; run_eval below reuses it
    one_at_a_time(backend, questions[:8], DEFAULT_SUFFIX, args.max_new_tokens)   # warm-up
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(questions)} questions, "
          f"max_new_tokens {args.max_new_tokens}, backend max_batch {backend.max_batch}")

    generator = backend.engine.generator
    best: dict[tuple[int, bool], float] = {}       # (batch size (1 = the plain loop), heads shared) -> best seconds
    answers: dict[tuple[int, bool], list[str]] = {}
    for _ in range(args.rounds):
        seconds, answers[1, True] = one_at_a_time(backend, questions, DEFAULT_SUFFIX, args.max_new_tokens)
        best[1, True] = min(best.get((1, True), seconds), seconds)
        for key in [(batch, shared) for batch in args.batch_sizes for shared in (True, False)]:
            out = workdir / f"evals-b{key[0]}-{key[1]}"
            shutil.rmtree(out, ignore_errors=True)
            generator.share_prefixes = key[1]
            start = time.perf_counter()
            run_eval(data, [ref], out, split="test", limit=args.n, batch_size=key[0],
                     max_new_tokens=args.max_new_tokens, open_backend=lambda r, **o: backend)
            seconds = time.perf_counter() - start
            generator.share_prefixes = True
            best[key] = min(best.get(key, seconds), seconds)
            answers[key] = [r["prediction"] for r in read_jsonl(out / model_slug(ref) / "samples.jsonl")]

    base_rate = len(questions) / best[1, True]
    print("\n| mode | batch | seconds (best of %d) | samples/s | ratio | same answers as one-at-a-time |" % args.rounds)
    print("|---|---:|---:|---:|---:|---:|")
    for (batch, shared), seconds in best.items():
        mode = "one at a time: backend.generate([req])" if batch == 1 else \
            "eval.run, batched" + ("" if shared else ", heads not shared")
        same = sum(a == b for a, b in zip(answers[batch, shared], answers[1, True])) / len(answers[1, True])
        rate = len(questions) / seconds
        print(f"| {mode} | {batch} | {seconds:.2f} | {rate:.1f} | {rate / base_rate:.2f}x | {same:.0%} |")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
