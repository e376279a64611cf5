"""The demo model's pretraining path, end to end at tiny scale on CPU: train, checkpoint, resume, export,
evaluate (training/pretrain.py with the `tiny` preset; ~1 minute on 2 cores)."""
import io
import json
import random

import pytest

from charts.questions import FAMILIES
from charts.render import render, text_boxes
from charts.spec import KINDS, LOOKS, format_value, sample_spec
from charts.tables import data_table
from training.pretrain import PRESETS, main
from training.pretrain_data import (IGNORE, Stage, chat_text, draw_chart, encode, stage_of, tokenizer_corpus,
                                    train_tokenizer)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run 1 trains 4 steps (no eval); run 2 resumes it for 3 more, exports the HF folder and evaluates."""
    root = tmp_path_factory.mktemp("pretrain")
    first = main(["--preset", "tiny", "--out", str(root / "a"), "--steps", "4", "--workers", "1", "--no-eval",
                  "--deadline-s", "120"])
    second = main(["--resume", str(root / "a" / "ckpt"), "--out", str(root / "b"), "--steps", "3", "--workers", "1",
                   "--hf-dir", str(root / "hf"), "--deadline-s", "120"])
    return root, first, second


def test_resume_continues_the_step_count_and_the_chart_stream(runs):
    root, first, second = runs
    assert first["state"]["step"] == 4
    assert second["state"]["step"] == 7
    assert [r["steps"] for r in second["state"]["runs"]] == [[0, 4], [4, 7]]
    assert second["state"]["next_index"] > first["state"]["next_index"]
    saved = json.loads((root / "b" / "ckpt" / "state.json").read_text())
    assert saved["step"] == 7 and all((root / "b" / "ckpt" / n).exists() for n in saved["shards"])


def test_the_glyph_head_is_kept_across_runs_and_never_exported(runs):
    import torch
    from safetensors.torch import load_file

    from training.pretrain_model import GLYPH_HEAD, load_checkpoint
    root = runs[0]
    _, first = load_checkpoint(root / "a" / "ckpt")
    _, second = load_checkpoint(root / "b" / "ckpt")
    assert len([k for k in first if k.startswith(GLYPH_HEAD)]) == 4          # its layer norm and linear
    main(["--resume", str(root / "a" / "ckpt"), "--out", str(root / "c"), "--steps", "0", "--no-eval"])
    _, again = load_checkpoint(root / "c" / "ckpt")
    assert all(torch.equal(again[k], first[k]) for k in first if k.startswith(GLYPH_HEAD))   # loaded, not re-made
    exported = load_file(str(root / "hf" / "model.safetensors"))
    assert not [k for k in exported if "glyph" in k] and exported
    assert len([k for k in second if not k.startswith(GLYPH_HEAD)]) <= len(exported)


def test_an_exported_model_resumes_like_its_checkpoint(runs):
    """A shipped folder (assets/demo-llava) is enough to train on: its pretraining.json is the state and
    its weights the model's, so the step count, the chart stream and the weights carry on."""
    import torch

    from training.pretrain_model import GLYPH_HEAD, PRETRAINING, load_checkpoint
    root, _, second = runs
    saved = json.loads((root / "hf" / PRETRAINING).read_text())
    assert saved["step"] == 7 and "tokenizer" not in saved
    state, weights = load_checkpoint(root / "hf")
    _, ckpt = load_checkpoint(root / "b" / "ckpt")
    assert state["next_index"] == second["state"]["next_index"]
    assert all(torch.equal(weights[k], v) for k, v in ckpt.items() if not k.startswith(GLYPH_HEAD))
    with pytest.raises(FileNotFoundError, match="neither a pretraining checkpoint"):
        load_checkpoint(root / "a")                     # a run's output folder, not its ckpt/
    again = main(["--resume", str(root / "hf"), "--out", str(root / "d"), "--steps", "1", "--workers", "1",
                  "--no-eval", "--deadline-s", "120"])
    assert again["state"]["step"] == 8 and [r["steps"] for r in again["state"]["runs"]][-1] == [7, 8]


def test_exported_model_loads_with_the_auto_classes_and_answers(runs):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    root = runs[0]
    model = AutoModelForImageTextToText.from_pretrained(root / "hf")
    processor = AutoProcessor.from_pretrained(root / "hf")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the highest value?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is the highest value? ASSISTANT:"      # eval.demo's template
    spec = sample_spec("bar", random.Random(0), "demo")
    image = Image.open(io.BytesIO(render(spec))).convert("RGB")
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert isinstance(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), str)
    assert processor.tokenizer.tokenize("2024") == ["2", "0", "2", "4"]       # digits one by one


def test_held_out_kind_is_never_drawn_for_pretraining(runs):
    held = PRESETS["tiny"].held_out
    assert held not in runs[2]["state"]["kinds_trained"]
    assert sum(runs[2]["state"]["kinds_trained"].values()) > 0
    p = PRESETS["demo"]
    for i in range(0, 600_000, 997):
        spec, _, _ = draw_chart(i, p.seed, stage_of(p.stages, i), p.held_out)
        assert spec.kind != p.held_out


def test_eval_json_scores_every_family_seen_swapped_and_prior(runs):
    root = runs[0]
    result = json.loads((root / "b" / "eval.json").read_text())
    assert set(result["seen"]["by_family"]) == set(FAMILIES)
    for key in ("seen_swapped", "seen_prior", "held_out", "held_out_swapped", "held_out_prior", "seen_default"):
        assert result[key]["n"] > 0 and result[key]["by_family"]
    assert result["held_out_kind"] == "hbar" and set(result["held_out"]["by_kind"]) == {"hbar"}
    assert "hbar" not in result["seen"]["by_kind"]
    assert result["step"] == 7 and result["device_seconds"] > 0
    assert set(result["seen"]["table"]) >= {"title", "labels", "values"}
    probe = result["glyph_probe"]
    assert probe["n"] == PRESETS["tiny"].eval_glyphs and probe["px"] == 24
    assert all(0 <= probe[k] <= 100 for k in ("pixels", "tower", "random_tower"))


def test_glyph_cards_draw_the_labelled_digit_in_ink_around_its_centre():
    from training.pretrain_eval import glyph_cards

    pixels, labels, centres = glyph_cards(60, 96, 24, 16, seed=0)
    assert pixels.shape == (60, 96, 96, 3) and set(labels) == set(range(10))
    for img, (x, y) in zip(pixels, centres):
        assert 32 <= x <= 64 and 32 <= y <= 64                  # two patches from every edge
        around, corner = img[y - 10:y + 10, x - 10:x + 10].min(), img[:8, :8].min()
        assert around < 100 < 225 <= corner                     # dark ink at the centre, plain background elsewhere
    again = glyph_cards(60, 96, 24, 16, seed=0)
    assert (again[0] == pixels).all() and again[1] == labels    # a fixed seed: every run probes the same images


def test_the_glyph_probe_reads_features_that_hold_the_digit_and_not_noise():
    import torch

    from training.pretrain_eval import _probe_accuracy

    torch.manual_seed(0)
    y = torch.randint(0, 10, (400,))
    noise = torch.randn(400, 64)
    holds = noise.clone()
    holds[:, :10] += 5 * torch.nn.functional.one_hot(y, 10)     # a perfect reader would be right ~99.9%
    assert _probe_accuracy(holds, y, 300) >= 95
    assert _probe_accuracy(noise, y, 300) <= 30


def test_labels_cover_each_answer_with_its_leading_space_and_eos():
    tok = train_tokenizer(tokenizer_corpus(0, 30, (Stage(0, "demo"),), "hbar"), 300)
    turns = [("What is the value for North?", "$3.4M", 1), ("Generate the table.", "TITLE | X\nA | 1", 2)]
    ids, labels, task = encode(tok, *chat_text(turns), tok.token_to_id("<image>"), 5)
    answers = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE], skip_special_tokens=False)
    assert answers == " $3.4M</s> TITLE | X\nA | 1</s>"
    assert ids.count(tok.token_to_id("<image>")) == 5
    assert {t for t, lab in zip(task, labels) if lab != IGNORE} == {1, 2}


def test_a_reading_stage_mixes_in_cards_whose_target_is_every_line_drawn():
    import numpy as np

    from training.pretrain_data import READ_PROMPT, StreamConfig, reading_card, training_sample
    stages = (Stage(0, "demo"), Stage(10, "demo", read_share=0.5))
    tok = train_tokenizer(tokenizer_corpus(0, 30, stages, "hbar"), 300)
    cfg = StreamConfig(seed=0, stages=stages, held_out="hbar", image_size=384, image_tokens=4, max_length=800,
                       qa_per_chart=2, table_share=0.0, instruct_share=0.0, tokenizer_json=tok.to_str())
    image_id = tok.token_to_id("<image>")
    samples = [training_sample(i, cfg, tok, image_id) for i in range(30)]
    assert all(s["look"] != "read" for s in samples[:10])          # the first stage reads none
    cards = [s for s in samples[10:] if s["look"] == "read"]
    assert 3 <= len(cards) <= 17
    for card in cards:
        assert READ_PROMPT in tok.decode(card["ids"])
        target = tok.decode([t for t, lab in zip(card["ids"], card["labels"]) if lab != IGNORE])
        spec, rng, _ = draw_chart(card["index"], 0, stages[1], "hbar")
        rng.random()                                                 # the draw that chose a card
        pixels, text = reading_card(spec, rng, 384)
        assert target.strip() == text and text.split("\n")[0] == spec.title
        assert np.array_equal(pixels, card["pixels"]) and pixels.shape == (384, 384, 3)
        assert (pixels < 128).any()                                  # the lines are drawn, in dark ink


def test_random_text_cards_draw_lines_no_chart_prints_and_leave_plain_cards_as_they_were():
    from training.pretrain_data import reading_card
    spec, rng, _ = draw_chart(3, 0, Stage(0, "demo"), "hbar")
    state = rng.getstate()
    plain = reading_card(spec, rng, 384)[1]
    rng.setstate(state)
    assert reading_card(spec, rng, 384, random_text=0.0)[1] == plain       # stages before random_text: unchanged
    rng.setstate(state)
    pixels, text = reading_card(spec, rng, 384, random_text=1.0)
    printed = {spec.title, spec.x_label, spec.y_label, *plain.split("\n")}
    assert text and not set(text.split("\n")) & printed and (pixels < 128).any()
    assert any(ch.isdigit() for ch in text)                                  # numbers too, not only words


def test_glyph_targets_put_each_drawn_character_in_the_cell_under_its_ink():
    import numpy as np

    from charts.render import render_glyphs
    from training.pretrain_data import NO_GLYPHS, StreamConfig, glyph_grid, reading_card, training_sample
    spec, rng, _ = draw_chart(5, 0, Stage(0, "demo"), "hbar")
    glyphs: list = []
    pixels, text = reading_card(spec, rng, 384, glyphs=glyphs)
    assert [ch for ch, _, _ in glyphs] == [ch for ch in text if not ch.isspace()]
    png, chart_glyphs = render_glyphs(spec)
    assert png == render(spec)                                         # the same chart, its glyphs beside it
    chart = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(io.BytesIO(png)).convert("L"))
    for image, found in ((pixels.min(axis=2), glyphs), (chart, chart_glyphs)):
        inked = [image[int(y) - 4:int(y) + 5, int(x) - 4:int(x) + 5].min() < image.max() - 60 for _, x, y in found]
        assert len(found) > 10 and sum(inked) >= 0.95 * len(found)     # ink within 4 px of each centre
    grid = glyph_grid(glyphs, (384, 384), 384, 16)
    assert grid.shape == (48, 48)
    for ch, x, y in glyphs[:20]:
        cell = grid[int(y // 8), int(x // 8)]
        assert cell == ord(ch) - 32 or cell > 0                         # its cell (or a neighbour's char) is set
    assert (grid > 0).sum() >= 0.8 * len(glyphs)
    wide = glyph_grid([("7", 639.0, 10.0)], (640, 480), 384, 16)        # padded to 640 x 640, then shrunk
    assert wide[int((10 + 80) * 0.6 // 8), int(639 * 0.6 // 8)] == ord("7") - 32
    stages = (Stage(0, "demo", default_share=0.3, read_share=0.3), Stage(20, "demo", default_share=0.3,
                                                                             read_share=0.3, glyph_targets=True))
    tok = train_tokenizer(tokenizer_corpus(0, 30, stages, "hbar"), 300)
    cfg = StreamConfig(seed=0, stages=stages, held_out="hbar", image_size=384, image_tokens=576, max_length=1200,
                       qa_per_chart=2, table_share=0.0, instruct_share=0.0, tokenizer_json=tok.to_str())
    samples = [training_sample(i, cfg, tok, tok.token_to_id("<image>")) for i in range(40)]
    assert all((s["glyphs"] == NO_GLYPHS).all() for s in samples[:20])  # stages before glyph targets: none
    later = samples[20:]
    assert all((s["glyphs"] == NO_GLYPHS).all() == (s["look"] == "default") for s in later)
    assert {s["look"] for s in later} >= {"read", "demo", "default"}


def test_glyph_loss_reads_cells_from_patch_features_and_skips_images_without_targets():
    import torch

    from training.pretrain import glyph_loss
    from training.pretrain_data import GLYPH_CLASSES, NO_GLYPHS
    torch.manual_seed(0)
    cells = torch.randint(0, GLYPH_CLASSES, (3, 8, 8), dtype=torch.uint8)
    cells[:, ::2] = 0                                                   # empty cells too
    # patch features that hold their 2 x 2 cells' classes one-hot: a linear head can read them exactly
    per_patch = cells.view(3, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(3, 16, 4).long()
    feats = torch.nn.functional.one_hot(per_patch, GLYPH_CLASSES).float().reshape(3, 16, 4 * GLYPH_CLASSES)
    head = torch.nn.Linear(4 * GLYPH_CLASSES, 4 * GLYPH_CLASSES)
    first = glyph_loss(head, feats, cells)[0].item()
    with torch.no_grad():
        head.weight.copy_(20 * torch.eye(4 * GLYPH_CLASSES))
        head.bias.zero_()
    loss, n, read = glyph_loss(head, feats, cells)
    assert loss.item() < 0.01 < first and read == n == (cells > 0).sum()
    blind = cells.clone()
    blind[1] = NO_GLYPHS                                                # an image without targets
    loss_blind, n_blind, _ = glyph_loss(head, feats, blind)
    assert n_blind == (cells[[0, 2]] > 0).sum()
    noise = feats.clone()
    noise[1] = torch.randn_like(noise[1])
    assert glyph_loss(head, noise, blind)[0].item() == pytest.approx(loss_blind.item(), abs=1e-6)


def test_data_table_lists_every_category_and_value_as_printed():
    for kind in KINDS:
        spec = sample_spec(kind, random.Random(f"table:{kind}"), "demo")
        text = data_table(spec)
        assert text.splitlines()[0] == f"TITLE | {spec.title}"
        assert len(text.splitlines()) == 2 + len(spec.categories)
        for i, c in enumerate(spec.categories):
            assert c in text
            series = list(spec.series)[-1]
            fmt = "percent" if kind in ("pie", "donut") else spec.fmt
            assert format_value(spec.series[series][i], fmt) in text


@pytest.mark.parametrize("look", [k for k in LOOKS if k != "default"])
def test_demo_looks_draw_square_charts_whose_text_fits(look):
    for i, kind in enumerate(KINDS * 3):
        spec = sample_spec(kind, random.Random(f"look:{look}:{i}"), look)
        size = LOOKS[look]["size"]
        assert (spec.style["width"], spec.style["height"]) == (size, size)
        assert len(spec.categories) <= max(LOOKS[look]["max_categories"] + 1, 5)   # time axes +1, scatter 5
        for text, (left, top, right, bottom), _ in text_boxes(spec):
            assert left >= -0.5 and top >= -0.5 and right <= size + 0.5 and bottom <= size + 0.5, (kind, text)


def test_chart_workers_stop_once_the_trainer_is_gone():
    """Forkserver workers are not the trainer's children: without this check they outlived a killed
    trainer, drawing charts and holding its output pipe open (a GPU run's `| tee` never ended)."""
    import subprocess
    import sys

    from training.pretrain_data import ChartStream, StreamConfig
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cfg = StreamConfig(seed=0, stages=(Stage(0, "demo"),), held_out="hbar", image_size=32, image_tokens=4,
                       max_length=200, qa_per_chart=2, table_share=1.0, instruct_share=0.0,
                       tokenizer_json=train_tokenizer(["a b c"], 300).to_str(), parent_pid=gone.pid)
    assert list(ChartStream(cfg, 0)) == []


def test_shipped_demo_model_is_the_exported_folder_only_when_complete(runs, tmp_path):
    from eval.demo import shipped_demo_model
    root = runs[0]
    assert shipped_demo_model(root / "hf") == root / "hf"
    assert shipped_demo_model(tmp_path / "missing") is None
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    assert shipped_demo_model(tmp_path / "half") is None


def test_export_writes_a_model_card_from_the_eval_numbers(runs):
    root = runs[0]
    text = (root / "hf" / "README.md").read_text()
    result = json.loads((root / "b" / "eval.json").read_text())
    assert "| family | seen kinds |" in text and "hbar" in text
    for fam in FAMILIES:
        assert f"| {fam} |" in text
    assert f"**{result['seen']['relaxed']:.1f}**" in text and "Device time" in text


def test_an_export_without_eval_takes_its_card_from_a_runs_eval_json(runs):
    """How a GPU run's checkpoint is shipped: exported on the CPU, its card from the run's eval.json."""
    root = runs[0]
    main(["--resume", str(root / "b" / "ckpt"), "--steps", "0", "--no-eval", "--out", str(root / "e"),
          "--card-from", str(root / "b" / "eval.json"), "--hf-dir", str(root / "hf2")])
    assert (root / "hf2" / "README.md").read_text() == (root / "hf" / "README.md").read_text()


def test_learning_rate_warms_up_holds_then_decays_over_the_planned_minutes():
    from training.pretrain import lr_at
    p = PRESETS["demo"]
    plan = p.plan_minutes * 60
    assert lr_at(0, 0.0, p, plan, None) < p.lr / 100
    assert lr_at(5000, plan * 0.5, p, plan, None) == p.lr
    assert lr_at(5000, plan * 0.9, p, plan, None) == pytest.approx(p.lr * (1 - 0.9 * 0.5))
    assert lr_at(9000, plan, p, plan, None) == pytest.approx(p.lr * p.min_lr_ratio)
    assert lr_at(5001, plan * 0.5, p, plan, resumed_at=5000) < p.lr / 10      # a fresh AdamW warms up again


def test_fast_forward_gives_the_llava_models_own_hidden_states(runs):
    """Training concatenates image features at their fixed place instead of LlavaModel's masked_scatter."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from training.pretrain_model import check_fast_forward, pixel_fn
    from training.pretrain_data import prompt_text, test_chart
    root = runs[0]
    model = AutoModelForImageTextToText.from_pretrained(root / "hf", dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(root / "hf")
    tok = processor.tokenizer
    rows = [test_chart(i, 5, "bar", "demo", 64) for i in range(2)]
    prompts = [prompt_text(r["qas"][0]["question"]) for r in rows]
    n_image = model.config.image_seq_length
    enc = [tok(p.replace("<image>", "<image>" * n_image), add_special_tokens=False)["input_ids"] for p in prompts]
    width = min(map(len, enc))
    ids = torch.tensor([e[:width] for e in enc])
    pixels = pixel_fn(processor, torch.device("cpu"))(torch.from_numpy(np.stack([r["pixels"] for r in rows])))
    image_at = int((ids[0] == model.config.image_token_id).nonzero()[0])
    assert check_fast_forward(model, ids, pixels, image_at, n_image)
    assert not check_fast_forward(model, ids, pixels, image_at + 1, n_image)      # the check can fail


def test_table_scores_count_title_row_labels_and_exact_values():
    from training.pretrain_eval import table_scores
    gold = "TITLE | Sales\nRegion | 2023 | 2024\nNorth | 1 | 2\nSouth | 3 | 4"
    assert table_scores([gold], [gold]) == {"n": 1, "title": 100.0, "labels": 100.0, "values": 100.0}
    half = "TITLE | Sale\nRegion | 2023 | 2024\nNorth | 1 | 5"
    assert table_scores([half], [gold]) == {"n": 1, "title": 0.0, "labels": 50.0, "values": 25.0}


def test_demo_checkpoint_fits_what_a_gpu_run_can_send_back(tmp_path):
    """At most 8 files of 16 MiB come back from a run: the demo model's checkpoint takes 5 (4 shards +
    state.json), leaving metrics.jsonl, eval.json and log.txt; the fp16 weights stay under 50 MB."""
    from training.pretrain_model import build_model, hf_tokenizer, load_checkpoint, model_config, save_checkpoint
    p = PRESETS["demo"]
    tok_json = train_tokenizer(tokenizer_corpus(0, 200, p.stages, p.held_out), p.vocab_size).to_str()
    tok = hf_tokenizer(tok_json, p.max_length)
    config = model_config(p, tok)
    config["text_config"]["vocab_size"] = p.vocab_size          # the full vocab, as 3,000 charts give it
    model = build_model(config, tok, 0)
    save_checkpoint(model, {"step": 1, "model_config": config, "tokenizer": tok_json}, tmp_path / "ckpt")
    files = list((tmp_path / "ckpt").iterdir())
    assert len(files) <= 5 and all(f.stat().st_size < 16 * 2**20 for f in files)
    assert sum(f.stat().st_size for f in files if f.suffix == ".safetensors") < 50e6
    state, weights = load_checkpoint(tmp_path / "ckpt")
    assert state["step"] == 1 and "lm_head.weight" not in weights        # tied: stored once


def test_generate_draws_a_dataset_in_the_demo_look(tmp_path):
    """What the demo fine-tune and benchmark need: the held-out kind as the demo model sees charts."""
    from PIL import Image

    from charts import generate, load_qa
    manifest = generate(3, kinds=["hbar"], seed=1, out_dir=tmp_path / "d", look="demo", split=(1, 0, 0))
    assert manifest["settings"]["look"] == "demo"
    items = load_qa(tmp_path / "d")
    assert items and all(Image.open(it["image"]).size == (384, 384) for it in items)
    with pytest.raises(ValueError):
        generate(1, out_dir=tmp_path / "e", look="nope")
