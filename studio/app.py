"""The studio's shell: a header saying which model is loaded, the four tabs, and the few events that
cross tabs. Each tab lives in its own `<name>_tab.py` with one `build(studio)`."""
from __future__ import annotations

import gradio as gr

from studio import benchmark_tab, charts_tab, compare_tab, finetune_tab
from studio.context import Studio

CSS = """
.answer textarea { font-size: 1.05rem; }
footer { display: none !important; }
"""


def header(studio: Studio) -> str:
    import torch

    device = f"CUDA ({torch.cuda.get_device_name(0)}), 4-bit" if torch.cuda.is_available() else "CPU, full precision"
    adapter = f" · adapter `{studio.adapter}`" if studio.adapter else ""
    return (f"## LLaVA Chart Studio\nBase model `{studio.base}`{adapter} · {device} · "
            f"workspace `{studio.workspace}`")


def build_app(studio: Studio) -> gr.Blocks:
    with gr.Blocks(title="LLaVA Chart Studio") as app:
        gr.Markdown(header(studio))
        with gr.Tabs() as tabs:
            with gr.Tab("Compare", id="compare"):
                compare = compare_tab.build(studio)
            with gr.Tab("Charts", id="charts"):
                charts_tab.build(studio)
            with gr.Tab("Benchmark", id="benchmark"):
                benchmark_tab.build(studio)
            with gr.Tab("Fine-tune", id="finetune"):
                finetune = finetune_tab.build(studio)

        # "Compare this checkpoint": base on side A, the job's adapter on side B, and switch tabs.
        finetune["compare_button"].click(
            lambda adapter: (gr.Tabs(selected="compare"), f"local:{studio.base}", f"local:{studio.base}+{adapter}"),
            inputs=finetune["compare_adapter"], outputs=[tabs, compare["side_a"], compare["side_b"]],
        )
    return app
