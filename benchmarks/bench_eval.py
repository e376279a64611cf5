"""Benchmark runner throughput: eval.run (batched) against a one-request-at-a-time loop, same model,
same questions, same process.

    python benchmarks/bench_eval.py --n 200 [--batch-sizes 4 8 16] [--threads 1] [--rounds 3]

Model: the tiny LLaVA from eval/demo.py on CPU. Questions: a generated test split (charts.generate).
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
    args = parser.parse_args()

    import torch

    from charts.io import read_jsonl
    from eval.backends import open_backend
    from eval.demo import build_demo_model
    from eval.run import DEFAULT_SUFFIX, load_questions, run_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_eval-"))
    model = build_demo_model(workdir / "demo-llava")
    data = make_questions(workdir, args.n)
    questions = load_questions(data, split="test")[: args.n]
    ref = f"local:{model}"
    backend = open_backend(ref)                      # loads once; run_eval below reuses it
    one_at_a_time(backend, questions[:8], DEFAULT_SUFFIX, args.max_new_tokens)   # warm-up
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(questions)} questions, "
          f"max_new_tokens {args.max_new_tokens}, backend max_batch {backend.max_batch}")

    best: dict[int, float] = {}       # batch size (1 = the plain loop) -> best seconds
    answers: dict[int, list[str]] = {}
    for _ in range(args.rounds):
        seconds, answers[1] = one_at_a_time(backend, questions, DEFAULT_SUFFIX, args.max_new_tokens)
        best[1] = min(best.get(1, seconds), seconds)
        for batch in args.batch_sizes:
            out = workdir / f"evals-b{batch}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            run_eval(data, [ref], out, split="test", limit=args.n, batch_size=batch,
                     max_new_tokens=args.max_new_tokens, open_backend=lambda r, **o: backend)
            seconds = time.perf_counter() - start
            best[batch] = min(best.get(batch, seconds), seconds)
            answers[batch] = [r["prediction"] for r in read_jsonl(out / "demo-llava" / "samples.jsonl")]

    base_rate = len(questions) / best[1]
    print("\n| mode | batch | seconds (best of %d) | samples/s | ratio | same answers as one-at-a-time |" % args.rounds)
    print("|---|---:|---:|---:|---:|---:|")
    for batch, seconds in best.items():
        mode = "one at a time: backend.generate([req])" if batch == 1 else "eval.run, batched"
        same = sum(a == b for a, b in zip(answers[batch], answers[1])) / len(answers[1])
        rate = len(questions) / seconds
        print(f"| {mode} | {batch} | {seconds:.2f} | {rate:.1f} | {rate / base_rate:.2f}x | {same:.0%} |")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
