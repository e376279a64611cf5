"""The shipped demo model (assets/demo-llava) loads through the same from_pretrained path as a hub checkpoint,
fits the asset budget, reads 384 px charts as 576 image tokens and answers in readable text. The random
tiny builder (eval.demo.build_demo_model, for the GPU benchmarks) stays reproducible."""
import hashlib
import json

from transformers import AutoModelForImageTextToText, AutoProcessor

from eval.demo import SHIPPED_ADAPTER, build_demo_model, shipped_demo_adapter

MAX_ASSET_MB = 50


def test_demo_model_loads_with_the_auto_classes(demo_model):
    model = AutoModelForImageTextToText.from_pretrained(demo_model)
    processor = AutoProcessor.from_pretrained(demo_model)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_shipped_model_and_adapter_fit_the_asset_budget_in_safetensors(demo_model):
    files = [f for d in (demo_model, SHIPPED_ADAPTER) for f in d.iterdir()]
    assert sum(f.stat().st_size for f in files) < MAX_ASSET_MB * 2**20
    assert not [f.name for f in files if f.suffix in (".bin", ".pt", ".pkl")]
    assert shipped_demo_adapter() == SHIPPED_ADAPTER
    config = json.loads((SHIPPED_ADAPTER / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and set(config.get("modules_to_save") or []) <= {"multi_modal_projector"}
    assert config["base_model_name_or_path"] == "assets/demo-llava"      # no path of the machine that trained it
    assert (demo_model / "README.md").read_text().startswith("# demo-llava")     # the model card


def test_chat_template_is_llava_1_5_and_expands_the_image(demo_model):
    from PIL import Image
    processor = AutoProcessor.from_pretrained(demo_model)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which bar is highest?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhich bar is highest? ASSISTANT:"
    ids = processor(images=[Image.new("RGB", (80, 40))], text=[prompt], return_tensors="pt")["input_ids"]
    assert int((ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == (384 // 16) ** 2


def test_assistant_mask_covers_the_answer_and_its_eos(demo_model):
    from PIL import Image
    processor = AutoProcessor.from_pretrained(demo_model)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Share of A?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "42%"}]}]
    out = processor.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        images=[Image.new("RGB", (32, 32))])
    answer = [t for t, m in zip(out["input_ids"][0], out["assistant_masks"][0]) if m]
    assert processor.tokenizer.decode(answer).strip() == "42%</s>"


def test_same_seed_builds_identical_weights(tmp_path):
    a = build_demo_model(tmp_path / "a", seed=3)
    b = build_demo_model(tmp_path / "b", seed=3)
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b)
