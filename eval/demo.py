"""The demo models: the shipped chart-reading LLaVA, and a random tiny one built in code.

The studio, its tests and CI run on `assets/demo-llava` (shipped_demo_model()): a 23M-parameter LLaVA
(CLIP-style vision 6 x 384 on 384 px in 16 px patches = 576 image tokens, Llama-style text 7 x 384,
vocab 1362) pretrained from scratch on the project's own charts by training/pretrain.py, with
`hbar` held out; its README.md is the model card. `assets/demo-adapter` (shipped_demo_adapter()) is
the `demo-cpu` LoRA that teaches it hbar charts (training/demo.py makes it). Nothing is downloaded.

    python -m eval demo-model --out /tmp/tiny-llava      # the random tiny LLaVA (build_demo_model)

build_demo_model is the real architecture at toy size with random (seeded) weights: a 64 px image
becomes 16 image tokens, 2 layers of width 64, a byte-level BPE trained here on chart vocabulary. Its
answers are gibberish; it remains for the GPU benchmarks, which need a model of a given shape, not
one that reads. Both load with `AutoModelForImageTextToText` / `AutoProcessor` like a hub checkpoint.
"""
from __future__ import annotations

import string
from pathlib import Path

IMAGE_SIZE = 64
PATCH_SIZE = 16
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2

# LLaVA-1.5 layout ("USER: <image>\n{q} ASSISTANT: {a}</s>") with {% generation %} marking the answer,
# so apply_chat_template(..., return_assistant_tokens_mask=True) yields answer-only labels.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% generation %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ eos_token }}"
    "{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_WORDS = """
what is the value of share percentage percent highest lowest largest smallest maximum minimum which
category has how many categories are shown in chart title x axis y axis legend label difference between
ratio sum total average mean rank order first second third increase decrease from to trend yes no
is greater less than more fewer compared does exceed by year month quarter revenue sales users people
hours minutes million thousand billion dollars euros units visitors students market region country
north south east west product team device mobile desktop tablet social media email search direct
pie donut bar line area scatter funnel grouped stacked infographic series value values data answer
question the a an of and or in on for at by with per vs
""".split()


def _corpus() -> list[str]:
    digits = [f"{i}" for i in range(0, 2100, 7)] + [f"{i}.{j}" for i in range(0, 100, 3) for j in (0, 5)]
    money = [f"${i}" for i in range(1, 100, 3)] + [f"{i}%" for i in range(0, 101)] + [f"{i}k" for i in range(1, 50)]
    sentences = [" ".join(_WORDS[i:i + 12]) for i in range(0, len(_WORDS), 5)]
    caps = [w.capitalize() for w in _WORDS]
    return sentences + caps + digits + money + list(string.printable)


def build_tokenizer():
    """Byte-level BPE (encodes any text), vocab ~1k, `<image>` as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus() * 3, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left", chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def build_demo_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny LLaVA from `seed` and save model + processor to `out_dir` (atomically: a
    half-built folder is never left behind under the final name)."""
    import shutil

    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    try:    # the PIL processor needs no torchvision (never installed on CPU machines)
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:     # older transformers 5.x
        from transformers import CLIPImageProcessor as ImageProcessor

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         image_seq_length=IMAGE_TOKENS, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # LLaVA pads images to a square of the mean colour (image_aspect_ratio "pad") before resizing.
    image_processor = ImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


# The trained demo model (training/pretrain.py exports it; its README.md is the model card) and its
# hbar adapter (training/demo.py trains it with the demo-cpu preset).
ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_MODEL = ASSETS / "demo-llava"
SHIPPED_ADAPTER = ASSETS / "demo-adapter"
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def shipped_demo_model(path: str | Path = SHIPPED_MODEL) -> Path | None:
    """`path` (assets/demo-llava) when it holds a complete exported model with its processor, else None."""
    path = Path(path)
    complete = all((path / f).is_file() for f in _MODEL_FILES) and any(
        (path / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))
    return path if complete else None


DEMO_NAME = "demo-llava"


def is_demo_model(ref: str | Path) -> bool:
    """Whether a base (a path or a `local:` ref, with or without `+adapter`) is the demo model: the folder that
    the studio links and training/pretrain.py exports is always named demo-llava."""
    base = str(ref).removeprefix("local:").split("+", 1)[0].rstrip("/")
    return Path(base).name == DEMO_NAME


def shipped_demo_adapter(path: str | Path = SHIPPED_ADAPTER) -> Path | None:
    """`path` (assets/demo-adapter) when it holds a LoRA adapter in safetensors, else None."""
    path = Path(path)
    return path if all((path / f).is_file() for f in _ADAPTER_FILES) else None
