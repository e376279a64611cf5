"""The "demo-cpu" preset teaches the shipped model the chart kind held out of its pretraining (hbar): the whole
preset (45 steps, ~2.3 min on 2 CPU cores) on the demo dataset, then base and base + LoRA answer 240 questions
on 30 fresh hbar charts through `python -m eval run` and `eval compare`, as docs/BENCHMARKS.md "Demo model (CPU)"
measures it (+23.75 points, 95% CI +17.1 .. +30.4), and the gold answers of the demo test charts are more
likely under base + LoRA (the quantity the fine-tune optimises). ~4 min on 2 CPU cores."""
import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch

from charts.dataset import SHORT_ANSWER_INSTRUCTION
from training.config import preset
from training.demo import DEMO_INSTRUCT_SHARE, DEMO_KIND, ensure_demo_dataset
from training.train import train

N_QUESTIONS = 24
# mean answer loss in nats per token: the whole preset drops it 1.89 -> 0.92 on the run-14 model (19 of 24 lower)
MIN_DROP = 0.3
# relaxed accuracy on 240 fresh hbar questions: 21.25 -> 45.0 (+23.75, CI +17.1 .. +30.4) on a 2-core CPU;
# the bound leaves room for other CPUs' float rounding, not for a fine-tune that only learns answer priors (+6)
MIN_LIFT = 12.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def tuned(demo_model, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-finetune")
    cfg = preset("demo-cpu", model=str(demo_model), data=str(demo_data), output_dir=str(out / "run"),
                 eval_limit=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            result = train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert result["status"] == "completed"
    return result["adapter"]


def answer_losses(model, processor, questions) -> list[float]:
    from PIL import Image
    losses = []
    for q in questions:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["question"]}]},
                {"role": "assistant", "content": [{"type": "text", "text": q["answers"][0]}]}]
        x = processor.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                          images=[Image.open(q["image"]).convert("RGB")], return_tensors="pt")
        mask = torch.as_tensor(x.pop("assistant_masks")).bool()
        labels = x["input_ids"].masked_fill(~mask, -100)
        with torch.inference_mode():
            losses.append(float(model(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                                      pixel_values=x["pixel_values"], labels=labels).loss))
    return losses


def test_demo_dataset_is_the_held_out_kind_in_multi_turn_records(demo_data):
    from training.pretrain import PRESETS
    assert DEMO_KIND == PRESETS["demo"].held_out
    rows = [json.loads(line) for line in (demo_data / "train.jsonl").open()]
    assert {r["chart_type"] for r in rows} == {DEMO_KIND} and min(len(r["conversations"]) for r in rows) >= 8
    instructed = sum(r["conversations"][0]["value"].endswith(SHORT_ANSWER_INSTRUCTION) for r in rows)
    assert abs(instructed / len(rows) - DEMO_INSTRUCT_SHARE) < 0.2
    test = [json.loads(line) for line in (demo_data / "test.jsonl").open()]
    assert test and not any(SHORT_ANSWER_INSTRUCTION in t["value"] for r in test for t in r["conversations"])
    files = {s: (demo_data / f"{s}.jsonl").read_bytes() for s in ("train", "val", "test")}
    assert ensure_demo_dataset(demo_data.parent.parent) == demo_data    # a second call changes nothing
    assert {s: (demo_data / f"{s}.jsonl").read_bytes() for s in files} == files


def test_the_demo_run_makes_held_out_answers_more_likely(demo_model, demo_data, tuned):
    import charts
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    questions = [dict(q, question=q["question"] + SHORT_ANSWER_INSTRUCTION)      # as the benchmark asks them
                 for q in charts.load_qa(demo_data, split="test")[:N_QUESTIONS]]
    assert len(questions) == N_QUESTIONS and {q["chart_type"] for q in questions} == {DEMO_KIND}
    processor = AutoProcessor.from_pretrained(demo_model)
    model = AutoModelForImageTextToText.from_pretrained(demo_model, dtype=torch.float32).eval()
    base = answer_losses(model, processor, questions)
    after = answer_losses(PeftModel.from_pretrained(model, str(tuned)).eval(), processor, questions)
    drop = sum(base) / len(base) - sum(after) / len(after)
    print(f"answer loss {sum(base) / len(base):.3f} -> {sum(after) / len(after):.3f}, "
          f"{sum(a < b for a, b in zip(after, base))} of {len(base)} lower")
    assert drop >= MIN_DROP, f"answer loss {sum(base) / len(base):.3f} -> {sum(after) / len(after):.3f}"


def test_the_demo_run_lifts_relaxed_accuracy_on_fresh_held_out_charts(demo_model, tuned, tmp_path):
    def cli(*args):
        subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True, text=True, timeout=600)

    cli("charts", "generate", "--n", "30", "--kinds", DEMO_KIND, "--seed", "1000", "--look", "demo",
        "--split", "0,0,1", "--qa-per-chart", "8", "--out", str(tmp_path / "test"))
    cli("eval", "run", "--data", str(tmp_path / "test"), "--split", "test", "--model", f"local:{demo_model}",
        "--model", f"local:{demo_model}+{tuned}", "--out", str(tmp_path / "ev"))
    base, adapted = sorted((p.parent for p in (tmp_path / "ev").glob("*/summary.json")), key=lambda r: "+" in r.name)
    cli("eval", "compare", str(base), str(adapted), "--out", str(tmp_path / "paired.json"))
    paired = json.loads((tmp_path / "paired.json").read_text())
    print(f"hbar relaxed accuracy {paired['a']} -> {paired['b']} ({paired['delta']:+}, CI {paired['ci95']})")
    assert paired["n"] == 240 and paired["delta"] >= MIN_LIFT and paired["ci95"][0] > 0, paired
