"""Reports of an eval folder: per-sample CSV, summary + paired JSON, and ONE self-contained HTML file.

    python -m eval report workspace/evals/demo      # -> report.csv, report.json, report.html in that folder

The HTML carries its CSS, charts (PNG, base64) and example thumbnails inline: it opens offline and
can be mailed. The first model of the run (eval.json order) is the baseline of paired comparisons.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from datetime import datetime, timezone
from pathlib import Path

from charts.io import atomic_write_json, atomic_write_text
from eval.paired import QuestionSetMismatch, compare_runs, read_samples
from eval.run import read_runs

CSV_FIELDS = ["model", "id", "split", "chart_type", "family", "question", "golds", "prediction", "relaxed_ref",
              "relaxed_norm", "norm_changes", "exact", "anls", "bleu", "rougeL", "error", "latency_s"]
MAX_EXAMPLES = 40
THUMB_SIDE = 220
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 12px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.pos{color:#1a7f37}.neg{color:#c62828}.muted{color:#777}
.ex{display:flex;gap:12px;border:1px solid #eee;padding:8px;margin:6px 0}.ex img{max-width:220px;height:auto}
code{background:#f4f4f4;padding:0 3px}
"""


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def bar_chart(summaries: list[dict], group: str = "by_family", metric: str = "relaxed_ref"):
    """A matplotlib Figure of horizontal bars, one colour per model, one row per family (or chart kind),
    each bar labelled with its score. Horizontal so that a dozen kind names stay readable at half the
    page width; the figure grows in height, not width. Agg object API: no pyplot, so no global figure
    state and nothing needs a display."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = sorted({k for s in summaries for k in s.get(group, {})}, reverse=True)   # A at the top
    n_models = max(1, len(summaries))
    fig = Figure(figsize=(6.4, 0.9 + len(keys) * (0.22 + 0.16 * n_models)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    height = 0.8 / n_models
    y = np.arange(len(keys))
    for i, s in enumerate(summaries):
        values = [(s.get(group, {}).get(k) or {}).get(metric) or 0.0 for k in keys]
        bars = ax.barh(y + 0.4 - (i + 0.5) * height, values, height, label=s.get("slug", f"model {i}"))
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.set_yticks(y, [k.replace("_", " ") for k in keys], fontsize=9)
    ax.set_xlabel(f"{metric} (%)")
    ax.set_xlim(0, 108)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=min(3, n_models), frameon=False)
    fig.tight_layout()
    return fig


def training_chart(rows: list[dict]):
    """Loss (and eval loss) beside eval accuracy (%) over steps, every logged point marked: evaluations
    are few, and a line alone would hide a single one. `rows` are metrics.jsonl records; training logs
    accuracy as a fraction, shown here in percent like every accuracy of the studio."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from eval.display import pct

    fig = Figure(figsize=(8.0, 3.0), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, style in (("loss", "o-"), ("eval_loss", "s--")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None and r.get("step") is not None]
        if points:
            loss_ax.plot(*zip(*points), style, markersize=4 if key == "loss" else 6, label=key.replace("_", " "))
    acc = [(r["step"], pct(r["eval_relaxed_accuracy"])) for r in rows
           if r.get("eval_relaxed_accuracy") is not None and r.get("step") is not None]
    if acc:
        acc_ax.plot(*zip(*acc), "D-", color="#59a14f", markersize=6)
        for x, y in acc:
            acc_ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    loss_ax.set_title("loss", fontsize=10)
    acc_ax.set_title("eval relaxed accuracy (%)", fontsize=10)
    acc_ax.set_ylim(0, 105)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
    if loss_ax.lines:
        loss_ax.legend(fontsize=8)
    else:
        loss_ax.text(0.5, 0.5, "no steps logged yet", ha="center", va="center", transform=loss_ax.transAxes)
    if not acc:
        acc_ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=acc_ax.transAxes)
    fig.tight_layout()
    return fig


def bar_chart_png(summaries: list[dict], group: str = "by_family", metric: str = "relaxed_ref") -> bytes:
    fig = bar_chart(summaries, group, metric)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def thumbnail_uri(image_path: str, side: int = THUMB_SIDE) -> str | None:
    """A small PNG of a sample's image as a data URI, or None when it cannot be read."""
    from eval.images import ImageError, downsize, load_image
    try:
        img = downsize(load_image(image_path), side)
    except ImageError:
        return None
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return _png_data_uri(buf.getvalue())


def collect(eval_dir: str | Path, metric: str = "relaxed_ref") -> dict:
    """Summaries of every model run in `eval_dir` and the paired comparison of each against the first."""
    runs = read_runs(eval_dir)
    if not runs:
        raise FileNotFoundError(f"{eval_dir}: no finished model runs (no */summary.json)")
    paired = []
    base_dir = runs[0][0]
    for run_dir, _ in runs[1:]:
        try:
            paired.append(compare_runs(base_dir, run_dir, metric=metric))
        except QuestionSetMismatch as e:
            paired.append({"run_a": str(base_dir), "run_b": str(run_dir), "error": str(e)})
    return {"eval_dir": str(Path(eval_dir).resolve()), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "summaries": [s for _, s in runs], "paired": paired, "_dirs": [d for d, _ in runs]}


def write_csv(path: Path, dirs: list[Path], summaries: list[dict]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for run_dir, summary in zip(dirs, summaries):
        for row in read_samples(run_dir):
            writer.writerow({**row, "model": summary.get("slug", run_dir.name), "golds": " | ".join(row["golds"]),
                             "norm_changes": "; ".join(row.get("norm_changes") or [])})
    return atomic_write_text(path, buf.getvalue())


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    def cell(v, i, tag):
        cls = ' class="l"' if i < left else ""
        text = f"{v:.2f}" if isinstance(v, float) else "" if v is None else str(v)
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"
    head = "".join(cell(h, i, "th") for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell(v, i, "td") for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _group_table(summaries: list[dict], group: str, metric: str) -> str:
    """Scores per group, and the failed samples in each ("errors", per model when several) that count as wrong."""
    keys = sorted({k for s in summaries for k in s.get(group, {})})
    cell = lambda s, k, field: (s.get(group, {}).get(k) or {}).get(field)  # noqa: E731
    header = [group[3:].replace("_", " "), "n", "errors"] + [s["slug"] for s in summaries]
    rows = [[k, cell(summaries[0], k, "n"), " / ".join(str(cell(s, k, "n_errors") or 0) for s in summaries)]
            + [cell(s, k, metric) for s in summaries] for k in keys]
    return _table(header, rows)


def _examples(pair: dict, rows_a: dict, rows_b: dict, slug_a: str, slug_b: str, outcome: str = "regressed") -> str:
    """Thumbnails of the samples of one outcome ("fixed" or "regressed"), each with both answers marked
    right or wrong in plain text (no emoji font needed)."""
    ids = pair["ids"][outcome][:MAX_EXAMPLES]
    parts = []
    for i in ids:
        a, b = rows_a[i], rows_b[i]
        uri = thumbnail_uri(a.get("image", ""))
        img = f'<img src="{uri}" alt="chart">' if uri else '<span class="muted">(image unreadable)</span>'
        answers = "".join(
            f'{html.escape(slug)}: <code class="{"pos" if row["relaxed_ref"] >= 0.5 else "neg"}">'
            f'{"&#10003;" if row["relaxed_ref"] >= 0.5 else "&#10007;"} {html.escape(row["prediction"])}</code><br>'
            for slug, row in ((slug_a, a), (slug_b, b)))
        parts.append(
            f'<div class="ex">{img}<div><b>{html.escape(a["question"])}</b><br>'
            f'gold: <code>{html.escape(" | ".join(a["golds"]))}</code><br>{answers}'
            f'<span class="muted">{html.escape(i)} &middot; {html.escape(str(a.get("chart_type")))} &middot; '
            f'{html.escape(str(a.get("family")))}</span></div></div>')
    more = len(pair["ids"][outcome]) - len(ids)
    return "".join(parts) + (f'<p class="muted">and {more} more (see report.csv)</p>' if more > 0 else "")


def render_html(data: dict, metric: str = "relaxed_ref") -> str:
    summaries, dirs = data["summaries"], data["_dirs"]
    metrics = [m for m in ("relaxed_ref", "relaxed_norm", "exact", "anls", "bleu", "rougeL")
               if m in summaries[0]["overall"]]
    first = summaries[0]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>Benchmark report</title><style>{CSS}</style>"
           "</head><body><h1>Benchmark report</h1>",
           f"<p>dataset <code>{html.escape(first['dataset']['path'])}</code> split "
           f"<code>{html.escape(str(first['dataset'].get('split')))}</code>, {first['n']} questions "
           f"(hash <code>{html.escape(first['dataset']['questions_sha256'])}</code>); prompt "
           f"<code>{html.escape(first['prompt']['template'])}</code>; max_new_tokens "
           f"{first['generation']['max_new_tokens']}, greedy. Created {html.escape(data['created'])}.</p>",
           "<h2>Overall</h2>",
           _table(["model", "n", "errors"] + metrics + ["samples/s"],
                  [[s["slug"], s["n"], s["n_errors"]] + [s["overall"][m] for m in metrics]
                   + [s["timing"]["samples_per_s"]] for s in summaries]),
           '<p class="muted">relaxed_ref: ChartQA rule bit-for-bit (compare with published numbers); '
           "relaxed_norm: after strip / trailing period / separators / currency / units / % / exact years.</p>"]
    for group in ("by_family", "by_chart_type", "by_split"):
        out.append(f"<h2>{metric} {group.replace('_', ' ')}</h2>")
        if group != "by_split":
            out.append(f'<img alt="{group}" src="{_png_data_uri(bar_chart_png(summaries, group, metric))}">')
        out.append(_group_table(summaries, group, metric))
    for pair in data["paired"]:
        b_index = next(i for i, d in enumerate(dirs) if str(d) == pair["run_b"])
        slug_a, slug_b = summaries[0]["slug"], summaries[b_index]["slug"]
        out.append(f"<h2>{html.escape(slug_b)} vs {html.escape(slug_a)} (paired)</h2>")
        if "error" in pair:
            out.append(f"<p class='neg'>{html.escape(pair['error'])}</p>")
            continue
        sign = "pos" if pair["delta"] > 0 else "neg" if pair["delta"] < 0 else ""
        out.append(f"<p>{pair['metric']}: {pair['a']:.2f} &rarr; {pair['b']:.2f}, <b class='{sign}'>"
                   f"{pair['delta']:+.2f}</b> points, 95% bootstrap CI [{pair['ci95'][0]:+.2f}, "
                   f"{pair['ci95'][1]:+.2f}] ({pair['bootstrap']['resamples']} resamples), McNemar exact p = "
                   f"{pair['mcnemar_p']:.4g}. Fixed <b class='pos'>{pair['fixed']}</b>, regressed <b class='neg'>"
                   f"{pair['regressed']}</b>, both right {pair['both_right']}, both wrong {pair['both_wrong']}.</p>")
        for group in ("by_family", "by_chart_type"):
            out.append(_table([group[3:].replace("_", " "), "n", slug_a, slug_b, "delta", "fixed", "regressed"],
                              [[k, v["n"], v["a"], v["b"], v["delta"], v["fixed"], v["regressed"]]
                               for k, v in pair[group].items()]))
        rows_a = {r["id"]: r for r in read_samples(dirs[0])}
        rows_b = {r["id"]: r for r in read_samples(dirs[b_index])}
        for outcome in ("fixed", "regressed"):     # what the fine-tune fixed first: the story of the run
            out.append(f"<h2>{outcome.capitalize()} examples ({pair[outcome]})</h2>")
            out.append(_examples(pair, rows_a, rows_b, slug_a, slug_b, outcome))
    out.append("</body></html>")
    return "\n".join(out)


def list_evals(evals_dir: str | Path) -> list[Path]:
    """Eval folders under `evals_dir` (= workspace/evals) with at least one finished model run, newest first."""
    root = Path(evals_dir)
    found = {p.parent.parent for p in root.glob("*/*/summary.json")} if root.is_dir() else set()
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def leaderboard_rows(evals_dir: str | Path) -> list[dict]:
    """One row per finished model run under `evals_dir` (= workspace/evals), newest first."""
    rows = []
    for summary_path in Path(evals_dir).glob("*/*/summary.json"):
        try:
            s = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            continue      # a run being written right now, or a foreign file: skip, never break the board
        overall = s.get("overall", {})
        rows.append({"eval": summary_path.parent.parent.name, "model": s.get("model", ""),
                     "dataset": Path(s.get("dataset", {}).get("path", "")).name,
                     "split": s.get("dataset", {}).get("split") or "all", "n": s.get("n"),
                     "n_errors": s.get("n_errors", 0),
                     **{m: overall.get(m) for m in ("relaxed_ref", "relaxed_norm", "exact", "anls")},
                     "date": (s.get("timing") or {}).get("finished", "")[:16].replace("T", " ")})
    rows.sort(key=lambda r: r["date"], reverse=True)
    return rows


def write_reports(eval_dir: str | Path, out: str | Path | None = None, metric: str = "relaxed_ref") -> dict[str, Path]:
    """report.csv, report.json and report.html for `eval_dir` (written into `out`, default the same folder)."""
    out = Path(out or eval_dir)
    data = collect(eval_dir, metric)
    paths = {"csv": write_csv(out / "report.csv", data["_dirs"], data["summaries"])}
    paths["json"] = atomic_write_json(out / "report.json", {k: v for k, v in data.items() if k != "_dirs"})
    paths["html"] = atomic_write_text(out / "report.html", render_html(data, metric))
    return paths
