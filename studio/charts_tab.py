"""Charts tab: generate a chart-QA dataset, browse it, validate any LLaVA dataset, export it.

"Generate" starts a job (`python -m charts generate` in the background, from a GenerateConfig; it survives a
reload and a studio restart, and "Stop generation" ends it); the dataset opens when the job ends. Every other
callback calls one function of the `charts` package and formats its result.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gradio as gr

import charts
from charts.config import GenerateConfig
from charts.io import inside
from studio.context import Studio
from training.launchers import LocalLauncher, describe, newest, stop_newest

GALLERY_LIMIT = 60


def _dataset_dir(studio: Studio, name: str):
    try:
        return inside(studio.path("datasets"), name)
    except ValueError as e:
        raise gr.Error(str(e))


def _qa_markdown(items: list[dict]) -> str:
    lines = []
    for it in items:
        tol = f" (±{it['tolerance']:.0%})" if it.get("tolerance") else ""
        lines.append(f"- **Q** ({it.get('family')}, {it.get('answer_type')}): {it['question']}  \n"
                     f"  **A**: `{it['answers'][0]}`{tol}")
    return "\n".join(lines) or "_no questions_"


def _gallery(studio: Studio, name: str | None):
    if not name:
        return [], []
    groups = charts.dataset_gallery(_dataset_dir(studio, name), GALLERY_LIMIT)
    shown = [(image, f"{items[0].get('chart_type')} · {items[0].get('split')}") for image, items in groups]
    return shown, [items for _, items in groups]


def build(studio: Studio) -> dict:
    datasets = charts.list_datasets(studio.workspace)
    first_shown, first_items = _gallery(studio, datasets[-1] if datasets else None)
    with gr.Row():
        with gr.Column(scale=1):
            name = gr.Textbox("charts-demo", label="Dataset name", info="saved to WORKSPACE/datasets/NAME")
            d, h = GenerateConfig(out="-", n=200), GenerateConfig.help   # the form's defaults and help: the config's
            kinds = gr.CheckboxGroup(list(charts.KINDS), value=d.kinds, label="Chart kinds")
            families = gr.CheckboxGroup(list(charts.FAMILIES), value=d.families, label="Question families")
            with gr.Row():
                count = gr.Number(d.n, label="Charts", precision=0, minimum=1, maximum=200_000, info=h("n"))
                seed = gr.Number(d.seed, label="Seed", precision=0, info=h("seed"))
                qa_per_chart = gr.Number(d.qa_per_chart, label="Questions per chart", precision=0, minimum=1,
                                         maximum=13, info=h("qa_per_chart"))
            split = gr.Textbox(d.split, label="Split train,val,test (by image)", info=h("split"))
            multi_turn = gr.Checkbox(d.multi_turn, label="Multi-turn: all questions of an image in one conversation")
            instruct_share = gr.Slider(0, 1, value=d.instruct_share, step=0.05,
                                       label="Share of train/val questions with the short-answer instruction",
                                       info=h("instruct_share"))
            with gr.Row():
                generate_btn = gr.Button("Generate", variant="primary", scale=3)
                stop_btn = gr.Button("Stop generation", variant="stop", scale=1)
            status = gr.Markdown()
            seen = gr.State(None)      # (job id, status) last shown: the dataset opens when its job ends
            timer = gr.Timer(2.0)
        with gr.Column(scale=2):
            with gr.Row():
                dataset = gr.Dropdown(datasets, value=datasets[-1] if datasets else None, label="Dataset",
                                      scale=3)
                refresh_btn = gr.Button("Refresh", scale=1)
            gallery = gr.Gallery(first_shown, label="Charts (select one to see its questions)", columns=4, height=420,
                                 allow_preview=False, format="png")
            qa_view = gr.Markdown()
            with gr.Row():
                random_btn = gr.Button("Random example")
            with gr.Row():
                example_image = gr.Image(type="filepath", label="Random example", height=300, interactive=False)
                example_text = gr.Markdown()
    with gr.Row():
        with gr.Column():
            validate_path = gr.Textbox(label="Validate a path in the workspace (dataset folder, .jsonl or .json)",
                                       placeholder="empty = the selected dataset; e.g. datasets/NAME/train.jsonl")
            validate_btn = gr.Button("Validate")
            report = gr.Textbox(label="Validation report", lines=12, max_lines=30, interactive=False)
        with gr.Column():
            export_format = gr.Radio(list(charts.EXPORTERS), value="llava-json", label="Export format")
            export_btn = gr.Button("Export selected dataset")
            export_file = gr.File(label="Export (zip)", interactive=False)
    groups = gr.State(first_items)

    def on_generate(name, kinds, families, count, seed, qa_per_chart, split, multi_turn, instruct_share):
        """Start the generation as a job (`python -m charts generate` in the background)."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name or ""):
            raise gr.Error("Dataset name: letters, digits, '-', '_' and '.' only.")
        n = int(count)
        try:
            cfg = GenerateConfig(out=str(_dataset_dir(studio, name)), n=n, kinds=list(kinds), families=list(families),
                                 seed=int(seed), split=split, qa_per_chart=int(qa_per_chart), multi_turn=multi_turn,
                                 instruct_share=float(instruct_share),
                                 workers=1 if n < 64 else min(4, os.cpu_count() or 1))
            return job_status(LocalLauncher(studio.workspace).start(cfg))
        except ValueError as e:     # an empty choice, a bad split ...: the config says which field
            raise gr.Error(str(e))

    def on_stop():
        return job_status(stop_newest(studio.workspace, "charts"))

    def watch(last):
        """Every tick: the newest generation job's line; when it has just finished, its dataset opened."""
        job = newest(studio.workspace, "charts")
        key = (job["id"], job["status"]) if job else None
        if key == last or not job or job["status"] != "completed":
            return job_status(job), gr.update(), gr.update(), gr.update(), gr.update(), key
        name = Path(job["output_dir"]).name
        shown, items = _gallery(studio, name)
        return (job_status(job), gr.Dropdown(choices=charts.list_datasets(studio.workspace), value=name), shown,
                items, charts.validate(job["output_dir"]).to_text(), key)

    def seen_now():
        job = newest(studio.workspace, "charts")
        return (job["id"], job["status"]) if job else None

    def on_dataset(name):
        shown, items = _gallery(studio, name)
        return shown, items, ""

    def on_select(items, evt: gr.SelectData):
        return _qa_markdown(items[evt.index]) if evt.index is not None and evt.index < len(items) else ""

    def on_random(name):
        if not name:
            raise gr.Error("Pick or generate a dataset first.")
        try:
            item = charts.random_example(_dataset_dir(studio, name))
        except ValueError as e:
            raise gr.Error(str(e))
        return item["image"], f"{item['chart_type']} · id `{item['id']}`\n\n" + _qa_markdown([item])

    def on_validate(path, name):
        if not path.strip() and not name:
            raise gr.Error("Enter a path or pick a dataset.")
        try:        # anything inside the workspace; relative paths are taken from it
            target = inside(studio.workspace, path) if path.strip() else _dataset_dir(studio, name)
        except ValueError as e:
            raise gr.Error(str(e))
        return charts.validate(target).to_text()

    def on_export(name, fmt):
        if not name:
            raise gr.Error("Pick or generate a dataset first.")
        folder = charts.export(_dataset_dir(studio, name), fmt, studio.path("exports", f"{name}-{fmt}"))
        return str(charts.zip_folder(folder))

    generate_btn.click(on_generate, [name, kinds, families, count, seed, qa_per_chart, split, multi_turn,
                                     instruct_share],
                       status)
    stop_btn.click(on_stop, None, status)
    timer.tick(watch, seen, [status, dataset, gallery, groups, report, seen])
    dataset.change(on_dataset, dataset, [gallery, groups, qa_view])
    refresh_btn.click(lambda: gr.Dropdown(choices=charts.list_datasets(studio.workspace)), None, dataset)
    gallery.select(on_select, groups, qa_view)
    random_btn.click(on_random, dataset, [example_image, example_text])
    validate_btn.click(on_validate, [validate_path, dataset], report)
    export_btn.click(on_export, [dataset, export_format], export_file)
    return {"dataset": dataset, "gallery": gallery, "generate": generate_btn, "stop": stop_btn, "report": report,
            "on_load": [(seen_now, None, seen)]}


def job_status(job: dict | None) -> str:
    """The generation job's line: progress while it runs; the dataset's counts once it is written."""
    if not job:
        return ""
    if job.get("status") != "completed":
        return f"Generation job {describe(job)}"
    manifest = json.loads((Path(job["output_dir"]) / "dataset.json").read_text(encoding="utf-8"))
    c = manifest["counts"]
    return (f"**{Path(job['output_dir']).name}**: {c['charts']} charts in {manifest['seconds']:.1f}s · records "
            f"{c['records']} · questions {c['questions']} ({job['short']})"
            + "".join(f"\n\n⚠ {note}" for note in manifest["notes"]))
