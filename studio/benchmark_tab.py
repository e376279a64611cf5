"""Benchmark tab: score models on a dataset split, see the leaderboard, per-family / per-kind bars,
browse base vs fine-tuned per sample (fixed / regressed / both wrong), export CSV / JSON / HTML.

Everything it shows is read from workspace/evals/, written by the same `eval.run.run_eval` that
`python -m eval run` calls; a run from the command line appears here after "Refresh".
"""
from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path

import gradio as gr
import pandas as pd

from charts.io import inside, read_jsonl
from eval import compare
from eval.backends import opener
from eval.endpoints import WIRES
from eval.images import ImageError, load_image
from eval.paired import compare_runs
from eval.display import rounded, short_name
from eval.report import bar_chart, leaderboard_rows, write_reports
from eval.run import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_SUFFIX, DatasetError, RunMismatch, named_eval_dir,
                      new_eval_dir, read_runs, run_eval)
from studio.context import Studio

SPLITS = ["test", "val", "train", "human", "augmented", "all"]
OUTCOMES = {"regressed": "regressed", "fixed": "fixed", "both wrong": "both_wrong", "both right": "both_right",
            "all": None}
# scores first and the full model ref last, so a narrow table still shows who scored what
BOARD_COLUMNS = ["model", "relaxed_ref", "relaxed_norm", "exact", "anls", "n", "n_errors", "eval", "dataset", "split",
                 "date", "model ref"]


# ---------------------------------------------------------------- what the workspace offers
def dataset_choices(studio: Studio) -> list[tuple[str, str]]:
    root = studio.path("datasets")
    return [(p.name, str(p)) for p in sorted(root.glob("*")) if p.is_dir()] if root.is_dir() else []


def model_choices(studio: Studio) -> list[str]:
    """The same list the Compare tab offers: base, base + each adapter, recorded endpoints."""
    return [(short_name(r), r) for r in compare.model_choices(studio.workspace, studio.base, studio.adapter)]


def eval_choices(studio: Studio) -> list[str]:
    root = studio.path("evals")
    found = {p.parent.parent for p in root.glob("*/*/summary.json")} if root.is_dir() else set()
    return [(p.name, str(p)) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def leaderboard(studio: Studio) -> pd.DataFrame:
    rows = [{**{k: rounded(v) for k, v in r.items()}, "model": short_name(r["model"]), "model ref": r["model"]}
            for r in leaderboard_rows(studio.path("evals"))]
    return pd.DataFrame(rows, columns=BOARD_COLUMNS)


# ---------------------------------------------------------------- per-sample browser
def browse(eval_dir: str, slug_b: str | None, outcome: str) -> tuple[list[tuple[dict, dict | None]], str]:
    """(baseline row, other row) pairs of one outcome, and a paired-statistics line."""
    runs = read_runs(eval_dir)
    if not runs:
        return [], "no finished runs in this eval"
    base_dir = runs[0][0]
    rows_a = list(read_jsonl(base_dir / "samples.jsonl"))
    other = next((d for d, s in runs[1:] if s["slug"] == slug_b), None)
    if other is None:
        keep = [r for r in rows_a if outcome == "all" or (outcome == "both wrong" and r["relaxed_ref"] < 0.5)
                or (outcome == "both right" and r["relaxed_ref"] >= 0.5)]
        return [(r, None) for r in keep], f"one model only ({runs[0][1]['slug']}): no paired diff"
    pair = compare_runs(base_dir, other, n_boot=1000)
    rows_b = {r["id"]: r for r in read_jsonl(other / "samples.jsonl")}
    ids = set(pair["ids"][OUTCOMES[outcome]]) if OUTCOMES[outcome] else None
    pairs = [(r, rows_b[r["id"]]) for r in rows_a if ids is None or r["id"] in ids]
    line = (f"**{pair['metric']}**: {runs[0][1]['slug']} {pair['a']:.1f} → {slug_b} {pair['b']:.1f} "
            f"(**{pair['delta']:+.1f}**, 95% CI {pair['ci95'][0]:+.1f}..{pair['ci95'][1]:+.1f}, McNemar p "
            f"{pair['mcnemar_p']:.3g}) · fixed {pair['fixed']} · regressed {pair['regressed']} · "
            f"both right {pair['both_right']} · both wrong {pair['both_wrong']}")
    return pairs, line


def opening_outcome(eval_dir: str | None, slug_b: str | None) -> str:
    """"fixed" when the compared model fixed any sample (what a fine-tune demo is about), else "regressed"."""
    runs = read_runs(eval_dir) if eval_dir else []
    other = next((d for d, s in runs[1:] if s["slug"] == slug_b), None)
    if other is None:
        return "regressed"
    wrong_a = {r["id"] for r in read_jsonl(runs[0][0] / "samples.jsonl") if r["relaxed_ref"] < 0.5}
    fixed = any(r["id"] in wrong_a and r["relaxed_ref"] >= 0.5 for r in read_jsonl(other / "samples.jsonl"))
    return "fixed" if fixed else "regressed"


def _show(pairs: list, index: int):
    if not pairs:
        return None, "*no samples with this outcome*", "", ""
    index = max(0, min(int(index or 0), len(pairs) - 1))
    a, b = pairs[index]
    try:
        image = load_image(a["image"])
    except ImageError:
        image = None
    text = (f"**{a['question']}**  \ngold: `{' | '.join(a['golds'])}` · {a.get('chart_type')} · {a.get('family')} "
            f"· `{a['id']}` ({index + 1}/{len(pairs)})")
    mark = lambda r: ("✓ " if r["relaxed_ref"] >= 0.5 else "✗ ") + r["prediction"] + (f"  [{r['error']}]" if r.get("error") else "")  # noqa: E731
    return image, text, mark(a), mark(b) if b else ""


# ---------------------------------------------------------------- callbacks
def _run(studio, dataset, split, limit, name, models, suffix, max_new_tokens, progress=gr.Progress(), wire="recorded"):
    try:     # a typed dataset path must lie in the workspace, like every path from the browser
        dataset = str(inside(studio.workspace, dataset)) if dataset else dataset
    except ValueError as e:
        raise gr.Error(str(e))

    if not dataset or not models:
        raise gr.Error("pick a dataset and at least one model")
    try:   # a typed name is one folder under workspace/evals (reused to resume); an automatic one is new
        out = named_eval_dir(studio.path("evals"), name) if (name or "").strip() else \
            new_eval_dir(studio.path("evals"), f"{Path(dataset).stem}-{split}-{datetime.now():%Y%m%d-%H%M%S}")
    except ValueError as e:
        raise gr.Error(str(e))
    name = out.name
    report = lambda done, total, info: progress(done / max(1, total), desc=f"{info['model']} {done}/{total}")  # noqa: E731
    try:
        summaries = run_eval(dataset, list(models), out, split=None if split == "all" else split,
                             limit=int(limit) or None, prompt_suffix=suffix, max_new_tokens=int(max_new_tokens),
                             on_progress=report, open_backend=opener(studio.workspace, None if wire == "recorded" else wire,
                                                                     studio.pool, studio.local_options()))
    except (DatasetError, RunMismatch, ValueError, FileNotFoundError) as e:
        if out.is_dir() and not any(out.iterdir()):   # refused before it wrote anything: leave no empty folder
            out.rmdir()
        raise gr.Error(str(e))
    lines = [f"- `{s['slug']}`: **{s['failed']}**" if s.get("failed") else
             f"- `{s['slug']}`: relaxed {s['overall']['relaxed_ref']:.1f} (normalized "
             f"{s['overall']['relaxed_norm']:.1f}), n {s['n']}"
             + (f", **{s['n_errors']} failed samples scored wrong**" if s["n_errors"] else "") for s in summaries]
    return f"Finished **{name}**\n" + "\n".join(lines), gr.Dropdown(choices=eval_choices(studio), value=str(out))


def _select_eval(eval_dir):
    runs = read_runs(eval_dir) if eval_dir else []
    summaries = [s for _, s in runs]
    others = [s["slug"] for s in summaries[1:]]
    if not summaries:
        return None, None, gr.Dropdown(choices=[], value=None), gr.update()
    slug_b = others[-1] if others else None
    return (bar_chart(summaries, "by_family"), bar_chart(summaries, "by_chart_type"),
            gr.Dropdown(choices=others, value=slug_b), opening_outcome(eval_dir, slug_b))


def _browse(eval_dir, slug_b, outcome):
    pairs, line = browse(eval_dir, slug_b, outcome) if eval_dir else ([], "")
    return pairs, line, gr.Slider(minimum=0, maximum=max(1, len(pairs) - 1), value=0, step=1), *_show(pairs, 0)


def _export(eval_dir):
    if not eval_dir:
        raise gr.Error("pick an eval run first")
    # A temp copy: gradio serves files from the temp dir wherever the workspace lives.
    paths = write_reports(eval_dir, tempfile.mkdtemp(prefix="report-"))
    return str(paths["csv"]), str(paths["json"]), str(paths["html"])


def build(studio: Studio) -> dict:
    models_now = model_choices(studio)
    datasets_now = dataset_choices(studio)
    evals_now = eval_choices(studio)
    newest = [s for _, s in read_runs(evals_now[0][1])] if evals_now else []   # shown right away
    with gr.Row():
        dataset = gr.Dropdown(datasets_now, value=datasets_now[0][1] if datasets_now else None, allow_custom_value=True,
                              label="Dataset (workspace/datasets, or a path to a ChartQA-style / LLaVA file)", scale=3)
        split = gr.Dropdown(SPLITS, value="test", label="Split", scale=1)
        limit = gr.Number(value=100, precision=0, minimum=0, label="Limit (0 = all)", scale=1)
        name = gr.Textbox(label="Eval name", placeholder="automatic: dataset-split-time", scale=2)
    with gr.Row():
        models = gr.Dropdown(models_now, value=[v for _, v in models_now[:2]], multiselect=True, allow_custom_value=True,
                             scale=5,
                             label="Models (the first is the baseline; type sagemaker:NAME or openai:URL#MODEL too)")
        refresh = gr.Button("Refresh lists", size="sm", scale=1)
    with gr.Accordion("Prompt and generation (recorded with the results)", open=False):
        with gr.Row():
            suffix = gr.Textbox(DEFAULT_SUFFIX, label="Prompt suffix (appended to each question)", scale=4)
            max_new_tokens = gr.Number(DEFAULT_MAX_NEW_TOKENS, precision=0, minimum=1, label="max_new_tokens", scale=1)
            wire = gr.Dropdown(["recorded", *WIRES], value="recorded", label="Endpoint wire", scale=1,
                               info="sagemaker models: as recorded at deploy, or the format of one deployed elsewhere")
    run = gr.Button("Run benchmark", variant="primary")
    status = gr.Markdown()
    board = gr.Dataframe(leaderboard(studio), label="Leaderboard (workspace/evals)", interactive=False)
    with gr.Row():
        eval_dir = gr.Dropdown(evals_now, value=evals_now[0][1] if evals_now else None, allow_custom_value=False,
                               label="Eval run", scale=4)     # only workspace/evals: a typed folder could be anywhere
        others = [s["slug"] for s in newest[1:]]
        model_b = gr.Dropdown(others, value=others[-1] if others else None, label="Compare against the baseline",
                              scale=2)
    with gr.Row():
        family_plot = gr.Plot(bar_chart(newest, "by_family") if newest else None, label="relaxed accuracy per family")
        kind_plot = gr.Plot(bar_chart(newest, "by_chart_type") if newest else None,
                            label="relaxed accuracy per chart kind")
    paired = gr.Markdown()
    with gr.Row():
        outcome = gr.Radio(list(OUTCOMES), value=opening_outcome(evals_now[0][1] if evals_now else None,
                                                                 others[-1] if others else None), label="Samples")
        index = gr.Slider(0, 1, value=0, step=1, label="Sample")
    with gr.Row():
        image = gr.Image(type="pil", label="Chart", height=320, interactive=False)
        with gr.Column():
            question = gr.Markdown()
            answer_a = gr.Textbox(label="Baseline answer", interactive=False)
            answer_b = gr.Textbox(label="Other model's answer", interactive=False)
    with gr.Row():
        export = gr.Button("Build reports")
        csv_file = gr.DownloadButton("CSV", value=None)
        json_file = gr.DownloadButton("JSON", value=None)
        html_file = gr.DownloadButton("HTML", value=None)
    pairs = gr.State([])

    def on_run(dataset_, split_, limit_, name_, models_, suffix_, max_new_tokens_, wire_, progress=gr.Progress()):
        return _run(studio, dataset_, split_, limit_, name_, models_, suffix_, max_new_tokens_, progress, wire_)

    def lists(newest_eval: bool = False):
        evals = eval_choices(studio)
        picked = {"value": evals[0][1] if evals else None} if newest_eval else {}
        return (gr.Dropdown(choices=dataset_choices(studio)), gr.Dropdown(choices=model_choices(studio)),
                leaderboard(studio), gr.Dropdown(choices=evals, **picked))

    # ---- wiring
    refresh.click(lists, outputs=[dataset, models, board, eval_dir])
    run.click(on_run, inputs=[dataset, split, limit, name, models, suffix, max_new_tokens, wire],
              outputs=[status, eval_dir],
              api_name="benchmark_run").then(lambda: leaderboard(studio), outputs=board)
    browse_outputs = [pairs, paired, index, image, question, answer_a, answer_b]
    eval_dir.change(_select_eval, inputs=eval_dir, outputs=[family_plot, kind_plot, model_b, outcome]
                    ).then(_browse, inputs=[eval_dir, model_b, outcome], outputs=browse_outputs)
    model_b.input(_browse, inputs=[eval_dir, model_b, outcome], outputs=browse_outputs)
    outcome.input(_browse, inputs=[eval_dir, model_b, outcome], outputs=browse_outputs)  # set by code: .then above
    index.change(_show, inputs=[pairs, index], outputs=[image, question, answer_a, answer_b])
    export.click(_export, inputs=eval_dir, outputs=[csv_file, json_file, html_file], api_name="benchmark_export")
    # on page load (studio/app.py): the workspace as it is now, the newest eval with its plots and samples
    on_load = [(lambda: lists(newest_eval=True), None, [dataset, models, board, eval_dir]),
               (_select_eval, eval_dir, [family_plot, kind_plot, model_b, outcome]),
               (_browse, [eval_dir, model_b, outcome], browse_outputs)]
    return {"on_load": on_load, "dataset": dataset, "split": split, "limit": limit, "name": name, "models": models,
            "run": run,
            "status": status, "leaderboard": board, "eval_dir": eval_dir, "model_b": model_b, "outcome": outcome,
            "index": index, "image": image, "question": question, "answer_a": answer_a, "answer_b": answer_b,
            "paired": paired, "family_plot": family_plot, "kind_plot": kind_plot, "export": export,
            "csv": csv_file, "json": json_file, "html": html_file}
