"""The model card of the shipped demo model (assets/demo-llava/README.md), written from a run's numbers.

    python -m training.pretrain_card --eval OUT/eval.json --ckpt OUT/ckpt --out assets/demo-llava

training/pretrain.py writes it itself when given --hf-dir after an evaluation. Every claim in the card
comes from eval.json (scores) or the checkpoint's state.json (how it was trained, device time): what
the model reads is decided by the per-family scores, not written by hand.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

READS, FAILS = 50.0, 20.0       # relaxed accuracy (%) above which a family is "read", below which it is not


def _families(result: dict) -> tuple[list[str], list[str], list[str]]:
    reads, partly, fails = [], [], []
    for fam, v in sorted(result.get("seen", {}).get("by_family", {}).items()):
        (reads if v["relaxed"] >= READS else fails if v["relaxed"] < FAILS else partly).append(f"{fam} ({v['relaxed']:.0f}%)")
    return reads, partly, fails


def _cell(result: dict, split: str, fam: str | None = None) -> str:
    part = result.get(split)
    if not part:
        return "-"
    v = part["by_family"].get(fam) if fam else part
    return f"{v['relaxed']:.1f}" if v else "-"


def card(result: dict, state: dict) -> str:
    """README.md text for the model with eval `result` and checkpoint `state`."""
    cfg = state.get("model_config", {})
    vision, text = cfg.get("vision_config", {}), cfg.get("text_config", {})
    runs = state.get("runs", [])
    device_min = sum(r.get("wall_s", 0) for r in runs) / 60
    held = state.get("held_out", result.get("held_out_kind", "?"))
    reads, partly, fails = _families(result)
    params = result.get("params")
    lines = [
        "# demo-llava: a small chart-reading LLaVA trained from scratch",
        "",
        "A standard Hugging Face `LlavaForConditionalGeneration` (CLIP-style vision tower -> MLP projector -> Llama)"
        + (f" of {params / 1e6:.1f}M parameters" if params else "") + ", pretrained from random weights by "
        "`training/pretrain.py` on charts drawn by the project's own generator (`charts/`). It loads like a hub "
        "checkpoint:",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "# the weights are stored in fp16; on a CPU load them in float32 (fp16 matmuls there decode garbage)",
        'model = AutoModelForImageTextToText.from_pretrained("assets/demo-llava", dtype=torch.float32)',
        'processor = AutoProcessor.from_pretrained("assets/demo-llava")',
        "```",
        "",
        f"- Images: {vision.get('image_size', '?')} px squares in {vision.get('patch_size', '?')} px patches "
        f"({cfg.get('image_seq_length', '?')} image tokens). Vision tower {vision.get('num_hidden_layers', '?')} x "
        f"{vision.get('hidden_size', '?')}, language model {text.get('num_hidden_layers', '?')} x "
        f"{text.get('hidden_size', '?')}, vocabulary {text.get('vocab_size', '?')} (byte-level BPE, digits one "
        "token each), prompt `USER: <image>\\n{question} ASSISTANT:`.",
        f"- Charts it was made for: the `demo` look (`charts.spec.LOOKS`): square {vision.get('image_size', '?')} px "
        "charts with 12-14 pt type and at most 6 categories. Charts in other styles, especially large ones with "
        "small type, are read worse"
        + (f" (the same kinds in the default style range: {_cell(result, 'seen_default')}%)."
           if result.get("seen_default") else "."),
        "",
        "## What it reads",
        "",
        f"Relaxed accuracy (%) on fresh test charts (seed {result.get('test_seed', '?')}) of the pretraining kinds, "
        "each question ending with the benchmark's short-answer instruction:",
        "",
        f"- reads (>= {READS:.0f}%): " + (", ".join(reads) or "none yet"),
        f"- partly: " + (", ".join(partly) or "none"),
        f"- cannot (< {FAILS:.0f}%): " + (", ".join(fails) or "none"),
        f"- `{held}` charts were held out of pretraining on purpose: the demo fine-tune (the `demo-cpu` preset) "
        f"is there to teach them. Base model on them: {_cell(result, 'held_out')}%.",
        "",
        "| family | seen kinds | same, wrong image | most common answer | held-out kind |",
        "|---|---|---|---|---|",
    ]
    for fam in sorted(result.get("seen", {}).get("by_family", {})):
        lines.append(f"| {fam} | {_cell(result, 'seen', fam)} | {_cell(result, 'seen_swapped', fam)} | "
                     f"{_cell(result, 'seen_prior', fam)} | {_cell(result, 'held_out', fam)} |")
    lines.append(f"| **all** | **{_cell(result, 'seen')}** | {_cell(result, 'seen_swapped')} | "
                 f"{_cell(result, 'seen_prior')} | {_cell(result, 'held_out')} |")
    tab = result.get("seen", {}).get("table")
    if tab:
        lines += ["", f"Asked for a chart's data table (its pretraining target), it writes the title exactly on "
                      f"{tab['title']:.0f}% of charts, finds {tab['labels']:.0f}% of the row labels and "
                      f"{tab['values']:.0f}% of the values exactly ({tab['n']} test charts)."]
    if result.get("seen"):
        drop = result["seen"].get("looks_drop", 0.0)
        verdict = ("It reads the image" if drop >= 30 else "It relies on the image in part" if drop >= 10
                   else "It does not yet rely on the image")
        lines += ["", f"{verdict}: the same questions asked with another chart's image score {drop:.1f} points "
                      "lower (the target for a model that looks: 30 or more)."]
    lines += [
        "",
        "## How it was trained",
        "",
        f"- `python -m training.pretrain --preset {state.get('preset', 'demo')}` (seed {state.get('seed', 0)}), "
        f"{sum(r.get('runs', 1) for r in runs)} run(s), each resumed from the last one's checkpoint, "
        f"{state.get('step', 0):,} steps, "
        f"{state.get('charts_trained', 0):,} chart passes over {state.get('charts_generated', 0):,} generated charts.",
        "- Each chart is one sequence: its questions (one per family, shuffled) and, for most charts, its data "
        "table as the last answer (the chart-to-table target of Pix2Struct / MatCha / DePlot); loss on answers only.",
        "- Curriculum by chart index: large type and four simple kinds first, then every kind but "
        f"`{held}` in the demo look, then a share of the full default style range, then reading cards (lines of "
        "chart text, later random text, in large type, to be read back), then a glyph loss: the vision tower also "
        "learns which character lies in each half-patch cell, since the answers alone never taught it to tell "
        "digits apart.",
        f"- Device time: {device_min:.1f} minutes in all ({state.get('train_seconds', 0) / 60:.1f} of them training), "
        + ", ".join(sorted({r.get('device', '?') for r in runs})) + ".",
        "",
        "## Limits",
        "",
        "- Trained on synthetic charts only; real-world charts, photos and documents are outside what it saw.",
        "- Values it must compute (sums, averages, ratios, differences) are harder for a model this small than values "
        "it can read off a label.",
        "- Answers are short; it was never trained to explain or to chat.",
    ]
    return "\n".join(lines) + "\n"


def write_card(result: dict, state: dict, out_dir: Path) -> Path:
    from charts.io import atomic_write_text
    path = Path(out_dir) / "README.md"
    atomic_write_text(path, card(result, state))
    return path


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m training.pretrain_card", description=__doc__.split("\n")[0])
    ap.add_argument("--eval", required=True, help="eval.json of the run")
    ap.add_argument("--ckpt", required=True, help="the checkpoint folder (its state.json)")
    ap.add_argument("--out", required=True, help="the exported model folder")
    a = ap.parse_args(argv)
    result = json.loads(Path(a.eval).read_text(encoding="utf-8"))
    state = json.loads((Path(a.ckpt) / "state.json").read_text(encoding="utf-8"))
    return write_card(result, state, Path(a.out))


if __name__ == "__main__":
    print(main())
