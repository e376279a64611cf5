"""Chart generation speed (render + questions + PNG written to disk), in charts per second.

    .venv/bin/python benchmarks/bench_charts.py --n 600 [--workers 1,2,4,8]

Compares, on the same charts (all kinds in turn, same seeds):
  naive pyplot loop : plt.subplots + draw + plt.savefig (default PNG) + plt.close, one process
  charts.generate   : the package (reused figure, marks as collections, text by Pillow, fast PNG), with each
                      worker count in --workers (default 1 and 2)
"""
from __future__ import annotations

import argparse
import io
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import charts  # noqa: E402
from charts.io import atomic_write_bytes  # noqa: E402


def naive_pyplot(n: int, seed: int, out: Path) -> None:
    """What a first version usually looks like: pyplot, one new figure per chart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        spec = charts.sample_spec(charts.KINDS[i % len(charts.KINDS)], rng)
        fig, ax = plt.subplots(figsize=(spec.style["width"] / 100, spec.style["height"] / 100), dpi=100)
        names = list(spec.series)
        if spec.kind in ("pie", "donut"):
            ax.pie(spec.series[names[0]], labels=spec.categories, autopct="%d%%")
        elif spec.kind == "scatter":
            ax.scatter(spec.series[names[0]], spec.series[names[1]])
            for c, x, y in zip(spec.categories, spec.series[names[0]], spec.series[names[1]]):
                ax.annotate(c, (x, y))
        elif spec.kind in ("line", "multi_line", "area"):
            for s in names:
                ax.plot(spec.categories, spec.series[s], marker="o", label=s)
                if spec.kind == "area":
                    ax.fill_between(spec.categories, spec.series[s], alpha=0.3)
        elif spec.kind == "infographic":
            ax.axis("off")
            for k, (c, v) in enumerate(zip(spec.categories, spec.series[names[0]])):
                ax.text(k / len(spec.categories), 0.5, f"{charts.format_value(v, spec.fmt)}\n{c}", fontsize=14)
        else:
            draw = ax.barh if spec.kind in ("hbar", "funnel") else ax.bar
            for k, s in enumerate(names):
                bars = draw([p + 0.8 * k / len(names) for p in range(len(spec.categories))], spec.series[s],
                            0.8 / len(names), label=s)
                ax.bar_label(bars, labels=[charts.format_value(v, spec.fmt) for v in spec.series[s]])
            ticks = ax.set_yticks if draw == ax.barh else ax.set_xticks
            ticks(range(len(spec.categories)), spec.categories)
        ax.set_title(spec.title)
        ax.set_xlabel(spec.x_label)
        ax.set_ylabel(spec.y_label)
        if len(names) > 1 and spec.kind != "scatter":
            ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        charts.make_questions(spec, rng)
        atomic_write_bytes(out / f"{i:06d}.png", buf.getvalue())


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). The CPU figure does not depend on what else
    runs on the machine; it misses worker processes, so it is only shown for in-process rows."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=600, help="charts per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", default="1,2", help="comma list of worker counts to measure, e.g. 1,2,4,8")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, cpu = timed(lambda: naive_pyplot(args.n, args.seed, tmp / "naive"))
        rows.append(("naive pyplot loop", 1, base, cpu))
        for workers in (int(w) for w in args.workers.split(",")):
            out = tmp / f"generate-{workers}"
            wall, cpu = timed(lambda: charts.generate(args.n, seed=args.seed, out_dir=out, workers=workers))
            rows.append(("charts.generate", workers, wall, cpu if workers <= 1 else None))
    load = os.getloadavg()[0]
    import matplotlib
    import PIL
    print(f"Python {sys.version.split()[0]}, matplotlib {matplotlib.__version__}, Pillow {PIL.__version__}")
    print(f"{args.n} charts per row, all {len(charts.KINDS)} kinds in turn; {os.cpu_count()} CPUs; "
          f"1-min load average at the end {load:.2f}")
    print("| method | workers | wall s | charts/s | vs naive pyplot | charts per CPU-second |")
    print("|---|---|---|---|---|---|")
    for name, workers, wall, cpu in rows:
        per_cpu = f"{args.n / cpu:.1f}" if cpu else "n/a (in workers)"
        print(f"| {name} | {workers} | {wall:.1f} | {args.n / wall:.1f} | {base / wall:.2f}x | {per_cpu} |")


if __name__ == "__main__":
    main()
