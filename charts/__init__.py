"""Synthetic chart-QA datasets whose answers are computed from the chart's own data.

    spec = sample_spec("bar", random.Random(0))     # ChartSpec(kind, title, series, style, ...)
    png = render(spec)                               # PNG bytes
    qas = make_questions(spec, random.Random(0))     # [QA(question, answer, family, answer_type, tolerance)]
    generate(2000, seed=0, out_dir="workspace/datasets/charts", workers=2)
    validate("workspace/datasets/charts").ok

Light on purpose: importing charts pulls in neither matplotlib, torch, gradio nor boto3.
"""
from .dataset import (SHORT_ANSWER_INSTRUCTION, SPLITS, assign_splits, dataset_gallery, generate, list_datasets,
                      load_qa, random_example)
from .export import EXPORTERS, export, export_hf, export_llava_json, zip_folder
from .questions import ANSWER_TYPES, FAMILIES, QA, is_close, make_questions, parse_number
from .render import RENDERERS, render
from .spec import KINDS, ChartSpec, format_value, sample_spec
from .validate import Report, validate

__all__ = [
    "ChartSpec", "KINDS", "sample_spec", "format_value", "render", "RENDERERS",
    "QA", "FAMILIES", "ANSWER_TYPES", "make_questions", "parse_number", "is_close",
    "generate", "assign_splits", "load_qa", "random_example", "list_datasets", "dataset_gallery", "SPLITS",
    "SHORT_ANSWER_INSTRUCTION",
    "validate", "Report", "export", "export_llava_json", "export_hf", "zip_folder", "EXPORTERS",
]
