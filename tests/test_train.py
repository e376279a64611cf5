"""training.train on the shipped demo model (CPU, a few steps of 2 samples, each 576 image tokens): labels,
LoRA placement, the projector's learning rate and persistence, SIGTERM -> checkpoint -> resume, and the
refusals."""
import contextlib
import io
import json
import os
import random
import re
import signal
from pathlib import Path

import pytest
import torch

from training.config import preset
from training.data import IGNORE, encode, fallback_labels, to_messages
from training.train import TrainError, deepspeed_config, lora_targets, resolve_paths, train


def make_dataset(folder: Path, n_train: int = 24, seed: int = 0) -> Path:
    """A few bar 'charts' drawn with PIL, in LLaVA conversation format; every third record has two turns."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, k in (("train", n_train), ("val", 6), ("test", 6)):
        rows = []
        for i in range(k):
            v, name = rng.randint(1, 9), f"{split}{i}"
            img = Image.new("RGB", (96, 64), "white")
            ImageDraw.Draw(img).rectangle([10, 60 - 5 * v, 30, 60], fill=(200, 30, 30))
            img.save(folder / "images" / f"{name}.png")
            conv = [{"from": "human", "value": "<image>\nWhat is the value of the bar?"}, {"from": "gpt", "value": str(v)}]
            if i % 3 == 0:
                conv += [{"from": "human", "value": "What is twice that value?"}, {"from": "gpt", "value": str(2 * v)}]
            rows.append({"id": name, "image": f"images/{name}.png", "conversations": conv, "chart_type": "bar",
                         "family": "value", "answer_type": "number", "split": split})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def quick(demo_model, data, out, **kw):
    base = dict(model=str(demo_model), data=str(data), output_dir=str(out), max_steps=4, per_device_batch_size=2,
                save_steps=2, eval_steps=0, eval_limit=4, logging_steps=1, dataloader_workers=0)
    return preset("demo-cpu", **{**base, **kw})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def finished(demo_model, dataset, tmp_path_factory):
    """One short finished run shared by several tests: (result, output folder, printed log)."""
    out = tmp_path_factory.mktemp("run")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = train(quick(demo_model, dataset, out, eval_steps=2))
    return result, out, buf.getvalue()


@pytest.fixture(scope="module")
def processor(demo_model):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(demo_model)


MULTI = {"conversations": [{"from": "human", "value": "<image>\nWhat is the value of A?"}, {"from": "gpt", "value": "15%"},
                           {"from": "human", "value": "Is it the largest?"}, {"from": "gpt", "value": "yes"}]}


def _label_text(processor, labels):
    return [processor.tokenizer.decode([t]) for t in labels.tolist() if t != IGNORE]


def test_labels_cover_only_the_answers_and_their_eos(processor):
    from PIL import Image
    sample = encode(processor, to_messages(MULTI), [Image.new("RGB", (64, 64))])
    assert "".join(_label_text(processor, sample["labels"])).split("</s>") == [" 15%", " yes", ""]
    assert (sample["labels"] == IGNORE).sum() > 16          # the prompt and the 16 image tokens are masked


def test_fallback_mask_equals_the_template_mask_on_the_demo_model(processor):
    from PIL import Image
    images = [Image.new("RGB", (64, 64))]
    template = encode(processor, to_messages(MULTI), images, use_template_mask=True)
    fallback = encode(processor, to_messages(MULTI), images, use_template_mask=False)
    assert torch.equal(template["input_ids"], fallback["input_ids"])
    assert torch.equal(template["labels"], fallback["labels"])


def test_a_template_mask_on_image_tokens_gives_way_to_the_answer_characters(processor, monkeypatch):
    # transformers 5.17 marks the answers' positions of the unexpanded prompt: the first image tokens
    from PIL import Image
    images = [Image.new("RGB", (64, 64))]
    fallback = encode(processor, to_messages(MULTI), images, use_template_mask=False)
    real = processor.apply_chat_template

    def misplaced(*args, **kwargs):
        out = real(*args, **kwargs)
        if "assistant_masks" not in getattr(out, "keys", lambda: ())():
            return out                                   # the fallback's text rendering
        ids = out["input_ids"][0]
        shifted = torch.zeros_like(ids)
        shifted[(ids == processor.image_token_id).nonzero()[:2, 0]] = 1
        out["assistant_masks"] = shifted[None]
        return out

    monkeypatch.setattr(processor, "apply_chat_template", misplaced)
    sample = encode(processor, to_messages(MULTI), images, use_template_mask=True)
    assert torch.equal(sample["labels"], fallback["labels"])


def test_fallback_adds_an_eos_after_answers_when_the_template_has_none(demo_model):
    from PIL import Image
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(demo_model)
    # the llava-hf shape: no {% generation %}, a turn ends with a space instead of EOS
    proc.chat_template = (proc.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
                          .replace("{{ eos_token }}", "{{ ' ' }}"))
    out, labels = fallback_labels(proc, to_messages(MULTI), [Image.new("RGB", (64, 64))])
    assert "".join(_label_text(proc, labels)).split("</s>") == [" 15%", " yes", ""]
    assert "USER" not in "".join(_label_text(proc, labels))


def test_lora_goes_on_language_model_linears_only_and_a_vision_hitting_regex_is_refused(demo_model):
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(demo_model)
    forbidden = ["model.vision_tower", "model.multi_modal_projector"]
    hits = lora_targets(model, preset("demo-cpu").lora_target, forbidden)
    assert hits and all(".language_model." in h for h in hits)
    with pytest.raises(TrainError, match="vision tower"):
        lora_targets(model, r".*\.(q_proj|v_proj)", forbidden)


def test_a_run_writes_adapter_with_projector_config_card_and_metrics(finished):
    result, out, printed = finished
    assert result["status"] == "completed"
    from safetensors.torch import load_file
    keys = load_file(out / "adapter" / "adapter_model.safetensors").keys()
    assert any("multi_modal_projector" in k for k in keys) and any("lora_A" in k for k in keys)
    assert not any("vision_tower" in k for k in keys)
    assert (out / "adapter" / "train_config.yaml").exists()
    assert "Final metrics" in (out / "adapter" / "README.md").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows) and any("eval_loss" in r for r in rows)
    assert any("eval_relaxed_accuracy" in r for r in rows)
    assert all({"step", "epoch", "time"} <= set(r) for r in rows)


def test_printed_log_lines_match_the_sagemaker_metric_regexes(finished):
    from training.sagemaker import METRIC_DEFINITIONS
    printed = finished[2]
    for metric in METRIC_DEFINITIONS:
        assert re.search(metric["Regex"], printed), metric["Name"]


def test_projector_gets_its_own_learning_rate_group(demo_model, dataset, tmp_path):
    from transformers import TrainerCallback
    seen = {}

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, model=None, **kw):
            seen["groups"] = [(g["name"], g["lr"], len(g["params"])) for g in optimizer.param_groups]
            control.should_training_stop = True

    train(quick(demo_model, dataset, tmp_path, max_steps=1, learning_rate=1e-3, mm_projector_lr=1e-5),
          callbacks=[Grab()])
    names = {name: n for name, _, n in seen["groups"]}
    assert set(names) == {"language_model", "projector"} and names["projector"] == 4    # 2 linears x (w, b)


def test_sigterm_saves_a_checkpoint_and_resume_restores_adapter_and_projector(demo_model, dataset, tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class TermDuringStep2(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = quick(demo_model, dataset, tmp_path, max_steps=3, save_steps=100)
    first = train(cfg, callbacks=[TermDuringStep2()])
    assert first["status"] == "interrupted" and first["checkpoint"].endswith("checkpoint-2")
    assert not (tmp_path / "adapter").exists()
    saved = load_file(Path(first["checkpoint"]) / "adapter_model.safetensors")
    seen = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["step"] = state.global_step
            seen["weights"] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

    second = train(cfg, callbacks=[Snapshot()])
    assert second["status"] == "completed" and seen["step"] == 2
    assert set(seen["weights"]) == set(saved)
    assert any("multi_modal_projector" in k for k in saved) and any("lora_B" in k for k in saved)
    for k, v in saved.items():
        assert torch.equal(seen["weights"][k].to(v.dtype), v), k
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)   # trained, not the zero init


def test_invalid_dataset_is_refused_with_the_validation_report(demo_model, dataset, tmp_path):
    bad = make_dataset(tmp_path / "bad", n_train=4)
    rows = [json.loads(line) for line in (bad / "train.jsonl").read_text().splitlines()]
    rows[0]["conversations"][0]["value"] = "What is the value of the bar?"      # no <image> placeholder
    (bad / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TrainError, match="failed validation") as e:
        train(quick(demo_model, bad, tmp_path / "out"))
    assert "image" in str(e.value).lower()


def test_an_existing_adapter_is_not_overwritten_without_the_flag(finished, demo_model, dataset):
    out = finished[1]
    with pytest.raises(TrainError, match="--overwrite"):
        train(quick(demo_model, dataset, out))


def test_unknown_model_gets_a_clear_message(dataset, tmp_path):
    with pytest.raises(TrainError, match="not a local folder"):
        train(quick("nobody/no-such-llava", dataset, tmp_path))
    with pytest.raises(TrainError, match="no such model folder"):
        train(quick(tmp_path / "missing" / "model", dataset, tmp_path))


def test_qlora_with_zero3_is_refused_and_zero2_resolves_to_a_shipped_config():
    with pytest.raises(TrainError, match="ZeRO-3"):
        deepspeed_config(preset("llava-1.5-7b-qlora", deepspeed="zero3_offload"))
    path = deepspeed_config(preset("llava-1.5-7b-qlora"))
    assert json.loads(Path(path).read_text())["zero_optimization"]["stage"] == 2
    path = deepspeed_config(preset("llava-1.5-7b-qlora", mode="lora", deepspeed="zero3_offload"))
    assert json.loads(Path(path).read_text())["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_sagemaker_environment_decides_data_model_and_output(tmp_path):
    env = {"SM_CHANNEL_TRAIN": "/opt/ml/input/data/train", "SM_CHANNEL_MODEL": "/opt/ml/input/data/model",
           "SM_MODEL_DIR": "/opt/ml/model", "SM_OUTPUT_DATA_DIR": str(tmp_path)}
    cfg, paths = resolve_paths(preset("llava-1.5-7b-qlora", data=""), env)
    assert (cfg.data, cfg.model, cfg.output_dir) == ("/opt/ml/input/data/train", "/opt/ml/input/data/model",
                                                      "/opt/ml/model")
    assert paths["adapter"] == Path("/opt/ml/model/adapter") and paths["metrics"] == tmp_path / "metrics.jsonl"
