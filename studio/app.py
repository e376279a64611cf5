"""The studio's shell: a header saying which model is loaded, the four tabs, and the few events that
cross tabs. Each tab lives in its own `<name>_tab.py` with one `build(studio)`."""
from __future__ import annotations

import html

import gradio as gr

from charts import list_datasets
from eval.display import short_name
from studio import benchmark_tab, charts_tab, compare_tab, finetune_tab
from studio.context import Studio
from training.launchers import compare_refs

CSS = """
.answer textarea { font-size: 1.05rem; }
footer { display: none !important; }
#example-charts img { object-fit: contain; }   /* gradio crops example thumbnails to a square: show the whole chart */
"""


def header(studio: Studio) -> str:
    import torch

    device = f"CUDA ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU"
    named = lambda path: f'<code title="{html.escape(str(path))}">{html.escape(short_name(path))}</code>'  # noqa: E731
    adapter = f" · adapter {named(studio.adapter)}" if studio.adapter else ""
    loaded = studio.pool.loaded()
    modes = " · ".join(f"{named(e['base'])}: {e['mode']}" for e in loaded) or "no model loaded yet"
    return (f"## LLaVA Chart Studio\nBase model {named(studio.base)}{adapter} · {device} · "
            f"workspace {named(studio.workspace)}\n\nLoaded: {modes}")


def build_app(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="LLaVA Chart Studio") as app:
        gr.Markdown(header(studio))
        with gr.Tabs() as tabs:
            with gr.Tab("Compare", id="compare"):
                compare = compare_tab.build(studio)
            with gr.Tab("Charts", id="charts"):
                charts_parts = charts_tab.build(studio)
            with gr.Tab("Benchmark", id="benchmark"):
                benchmark = benchmark_tab.build(studio)
            with gr.Tab("Fine-tune", id="finetune"):
                finetune = finetune_tab.build(studio)

        # "Compare this checkpoint": the job's base on side A, base + its adapter on side B, and switch tabs.
        def open_in_compare(job_id):
            try:
                side_a, side_b = compare_refs(studio.workspace, job_id)
            except ValueError as e:
                raise gr.Error(str(e))
            fresh = compare_tab.side_choices(studio, "local")    # this run may be newer than the page
            return (gr.Tabs(selected="compare"), gr.Dropdown(choices=fresh, value=side_a),
                    gr.Dropdown(choices=fresh, value=side_b))

        # every tab reads the workspace on page load, so a reload shows what other tabs and the CLI made
        charts_load = [(lambda: gr.Dropdown(choices=list_datasets(studio.workspace)), None, charts_parts["dataset"]),
                       *charts_parts["on_load"]]
        for steps in (compare["on_load"], charts_load, benchmark["on_load"], finetune["on_load"]):
            event = None
            for fn, inputs, outputs in steps:
                event = (app.load if event is None else event.then)(fn, inputs=inputs, outputs=outputs)

        finetune["compare_button"].click(
            open_in_compare, inputs=finetune["job"],
            outputs=[tabs, compare["side_a"], compare["side_b"]])
    return app
