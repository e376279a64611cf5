"""Benchmark tab: score models on a dataset split, see the leaderboard, per-family / per-kind bars,
browse base vs fine-tuned per sample (fixed / regressed / both wrong), export CSV / JSON / HTML.

"Run benchmark" starts a job (`python -m eval run` in the background, from an EvalConfig; it survives a
reload and a studio restart, and "Stop benchmark" ends it). Everything the tab shows is read from
workspace/evals/, so a run from the command line appears here too; a timer reloads the lists when a job ends.
"""
from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path

import gradio as gr
import pandas as pd

from charts import list_datasets
from charts.io import inside
from eval import compare
from eval.endpoints import WIRES
from eval.images import ImageError, load_image
from eval.paired import OUTCOMES, opening_outcome, sample_pairs
from eval.display import rounded, short_name
from eval.report import bar_chart, leaderboard_rows, list_evals, write_reports
from eval.config import SPLITS, EvalConfig
from eval.run import named_eval_dir, new_eval_dir, read_runs
from studio.context import Studio
from training.launchers import LocalLauncher, describe, newest, stop_newest

# scores first and the full model ref last, so a narrow table still shows who scored what
BOARD_COLUMNS = ["model", "relaxed_ref", "relaxed_norm", "exact", "anls", "n", "n_errors", "eval", "dataset", "split",
                 "date", "model ref"]


# ---------------------------------------------------------------- what the workspace offers
def dataset_choices(studio: Studio) -> list[tuple[str, str]]:
    return [(name, str(studio.path("datasets", name))) for name in list_datasets(studio.workspace)]


def model_choices(studio: Studio) -> list[str]:
    """The same list the Compare tab offers: base, base + each adapter, recorded endpoints."""
    return [(short_name(r), r) for r in compare.model_choices(studio.workspace, studio.base, studio.adapter)]


def eval_choices(studio: Studio) -> list[str]:
    return [(p.name, str(p)) for p in list_evals(studio.path("evals"))]


def leaderboard(studio: Studio) -> pd.DataFrame:
    rows = [{**{k: rounded(v) for k, v in r.items()}, "model": short_name(r["model"]), "model ref": r["model"]}
            for r in leaderboard_rows(studio.path("evals"))]
    return pd.DataFrame(rows, columns=BOARD_COLUMNS)


# ---------------------------------------------------------------- per-sample browser
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
def _start(studio, dataset, split, limit, name, models, suffix, max_new_tokens, wire="recorded"):
    """Start the benchmark as a job (`python -m eval run` in the background); returns its status line."""
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
    try:
        cfg = EvalConfig(data=dataset, model=list(models), out=str(out), split=split, limit=int(limit or 0),
                         prompt_suffix=suffix, max_new_tokens=int(max_new_tokens), workspace=str(studio.workspace),
                         wire="" if wire == "recorded" else wire)
        job = LocalLauncher(studio.workspace).start(cfg)
    except ValueError as e:
        if out.is_dir() and not any(out.iterdir()):   # refused before it wrote anything: leave no empty folder
            out.rmdir()
        raise gr.Error(str(e))
    return job_status(job)


def job_status(job: dict | None) -> str:
    """The benchmark job's line: progress while it runs; when it finished, each model's score."""
    if not job:
        return ""
    line = f"Benchmark job {describe(job)}"
    if job.get("status") != "completed":
        return line
    runs = read_runs(job["output_dir"])
    return (f"Finished **{Path(job['output_dir']).name}** ({job['short']})\n" +
            "\n".join(f"- `{s['slug']}`: **{s['failed']}**" if s.get("failed") else
                      f"- `{s['slug']}`: relaxed {s['overall']['relaxed_ref']:.1f} (normalized "
                      f"{s['overall']['relaxed_norm']:.1f}), n {s['n']}"
                      + (f", **{s['n_errors']} failed samples scored wrong**" if s["n_errors"] else "")
                      for _, s in runs))


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
    pairs, line = sample_pairs(eval_dir, slug_b, outcome) if eval_dir else ([], "")
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
    newest_runs = [s for _, s in read_runs(evals_now[0][1])] if evals_now else []   # shown right away
    with gr.Row():
        dataset = gr.Dropdown(datasets_now, value=datasets_now[0][1] if datasets_now else None, allow_custom_value=True,
                              label="Dataset (workspace/datasets, or a path to a ChartQA-style / LLaVA file)", scale=3)
        split = gr.Dropdown(list(SPLITS), value="test", label="Split", scale=1)
        limit = gr.Number(value=100, precision=0, minimum=0, label="Limit (0 = all)", scale=1)
        name = gr.Textbox(label="Eval name", placeholder="automatic: dataset-split-time", scale=2)
    with gr.Row():
        models = gr.Dropdown(models_now, value=[v for _, v in models_now[:2]], multiselect=True, allow_custom_value=True,
                             scale=5,
                             label="Models (the first is the baseline; type sagemaker:NAME or openai:URL#MODEL too)")
        refresh = gr.Button("Refresh lists", size="sm", scale=1)
    with gr.Accordion("Prompt and generation (recorded with the results)", open=False):
        with gr.Row():
            suffix = gr.Textbox(EvalConfig().prompt_suffix, label="Prompt suffix (appended to each question)", scale=4,
                                info=EvalConfig.help("prompt_suffix"))
            max_new_tokens = gr.Number(EvalConfig().max_new_tokens, precision=0, minimum=1, label="max_new_tokens",
                                       scale=1, info=EvalConfig.help("max_new_tokens"))
            wire = gr.Dropdown(["recorded", *WIRES], value="recorded", label="Endpoint wire", scale=1,
                               info="sagemaker models: as recorded at deploy, or the format of one deployed elsewhere")
    with gr.Row():
        run = gr.Button("Run benchmark", variant="primary", scale=3)
        stop = gr.Button("Stop benchmark", variant="stop", scale=1)
    status = gr.Markdown()
    seen = gr.State(None)            # (job id, status) last shown: the leaderboard reloads when a job ends
    timer = gr.Timer(2.0)
    board = gr.Dataframe(leaderboard(studio), label="Leaderboard (workspace/evals)", interactive=False)
    with gr.Row():
        eval_dir = gr.Dropdown(evals_now, value=evals_now[0][1] if evals_now else None, allow_custom_value=False,
                               label="Eval run", scale=4)     # only workspace/evals: a typed folder could be anywhere
        others = [s["slug"] for s in newest_runs[1:]]
        model_b = gr.Dropdown(others, value=others[-1] if others else None, label="Compare against the baseline",
                              scale=2)
    with gr.Row():
        family_plot = gr.Plot(bar_chart(newest_runs, "by_family") if newest_runs else None,
                              label="relaxed accuracy per family")
        kind_plot = gr.Plot(bar_chart(newest_runs, "by_chart_type") if newest_runs else None,
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

    def on_run(dataset_, split_, limit_, name_, models_, suffix_, max_new_tokens_, wire_):
        return _start(studio, dataset_, split_, limit_, name_, models_, suffix_, max_new_tokens_, wire_)

    def on_stop():
        return job_status(stop_newest(studio.workspace, "bench"))

    def watch(last):
        """Every tick: the newest benchmark job's line; when it has just ended, the lists it changed."""
        job = newest(studio.workspace, "bench")
        key = (job["id"], job["status"]) if job else None
        if key == last or not job or job["status"] == "running":
            return job_status(job), gr.update(), gr.update(), key
        evals = eval_choices(studio)
        mine = [v for _, v in evals if Path(v).resolve() == Path(job["output_dir"]).resolve()]
        return (job_status(job), leaderboard(studio),
                gr.Dropdown(choices=evals, **({"value": mine[0]} if mine else {})), key)

    def seen_now():
        job = newest(studio.workspace, "bench")
        return (job["id"], job["status"]) if job else None

    def lists(newest_eval: bool = False):
        evals = eval_choices(studio)
        picked = {"value": evals[0][1] if evals else None} if newest_eval else {}
        return (gr.Dropdown(choices=dataset_choices(studio)), gr.Dropdown(choices=model_choices(studio)),
                leaderboard(studio), gr.Dropdown(choices=evals, **picked))

    # ---- wiring
    refresh.click(lists, outputs=[dataset, models, board, eval_dir])
    run.click(on_run, inputs=[dataset, split, limit, name, models, suffix, max_new_tokens, wire],
              outputs=status, api_name="benchmark_run")
    stop.click(on_stop, outputs=status)
    timer.tick(watch, inputs=seen, outputs=[status, board, eval_dir, seen])
    browse_outputs = [pairs, paired, index, image, question, answer_a, answer_b]
    eval_dir.change(_select_eval, inputs=eval_dir, outputs=[family_plot, kind_plot, model_b, outcome]
                    ).then(_browse, inputs=[eval_dir, model_b, outcome], outputs=browse_outputs)
    model_b.input(_browse, inputs=[eval_dir, model_b, outcome], outputs=browse_outputs)
    outcome.input(_browse, inputs=[eval_dir, model_b, outcome], outputs=browse_outputs)  # set by code: .then above
    index.change(_show, inputs=[pairs, index], outputs=[image, question, answer_a, answer_b])
    export.click(_export, inputs=eval_dir, outputs=[csv_file, json_file, html_file], api_name="benchmark_export")
    # on page load (studio/app.py): the workspace as it is now, the newest eval with its plots and samples
    on_load = [(lambda: lists(newest_eval=True), None, [dataset, models, board, eval_dir]),
               (seen_now, None, seen),
               (_select_eval, eval_dir, [family_plot, kind_plot, model_b, outcome]),
               (_browse, [eval_dir, model_b, outcome], browse_outputs)]
    return {"on_load": on_load, "dataset": dataset, "split": split, "limit": limit, "name": name, "models": models,
            "run": run, "stop": stop, "timer": timer,
            "status": status, "leaderboard": board, "eval_dir": eval_dir, "model_b": model_b, "outcome": outcome,
            "index": index, "image": image, "question": question, "answer_a": answer_a, "answer_b": answer_b,
            "paired": paired, "family_plot": family_plot, "kind_plot": kind_plot, "export": export,
            "csv": csv_file, "json": json_file, "html": html_file}
