"""The demo LLaVA's parts for training/pretrain.py: tokenizer, processor, model, checkpoints, export.

Standard Hugging Face classes only (`LlavaForConditionalGeneration` = CLIP vision tower -> projector ->
Llama; `LlavaProcessor` with eval.demo's chat template), so an exported folder loads through
`AutoModelForImageTextToText` / `AutoProcessor` as a hub checkpoint does. A checkpoint that crosses GPU
runs is not that folder but its smallest resumable form (fp16 shards + one state.json), because what a
run can send back is at most 8 files of 16 MiB.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from charts.io import atomic_write_json
from training.pretrain_data import IMAGE

STATE = "state.json"
PRETRAINING = "pretraining.json"  # an exported folder's training state: it resumes like a checkpoint
GLYPH_HEAD = "glyph_head."      # checkpoint prefix of the training-only glyph head (never exported)
SHARD_BYTES = 15_000_000        # under the 16 MiB a file may be to come back from the GPU machine


# ---------------------------------------------------------------- tokenizer, processor, model
def hf_tokenizer(tokenizer_json: str, max_length: int):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from eval.demo import CHAT_TEMPLATE
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": IMAGE}, padding_side="left",
        chat_template=CHAT_TEMPLATE, model_max_length=max_length)


def build_processor(p, tokenizer):
    from transformers import LlavaProcessor
    try:    # the PIL processor needs no torchvision (never installed on CPU machines)
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    from eval.demo import CHAT_TEMPLATE
    image_processor = ImageProcessor(size={"shortest_edge": p.image_size},
                                     crop_size={"height": p.image_size, "width": p.image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=p.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def model_config(p, tokenizer) -> dict:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    vision = CLIPVisionConfig(image_size=p.image_size, patch_size=p.patch_size, hidden_size=p.vision_hidden,
                              intermediate_size=p.vision_mlp, num_hidden_layers=p.vision_layers,
                              num_attention_heads=p.vision_heads, projection_dim=p.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=p.text_hidden, intermediate_size=p.text_mlp,
                       num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads,
                       num_key_value_heads=p.text_kv_heads, max_position_embeddings=max(2048, p.max_length + 64),
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    # vision_feature_layer -1: a tower trained from scratch for this model has no reason to waste its top layer
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         image_seq_length=(p.image_size // p.patch_size) ** 2, projector_hidden_act="gelu",
                         tie_word_embeddings=True)
    return config.to_dict()


def build_model(config: dict, tokenizer, seed: int, weights: dict | None = None):
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig.from_dict(config))
    if weights is not None:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    embed = model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and model.lm_head.weight is not embed.weight:
        model.lm_head.weight = embed.weight      # tied for certain: the checkpoint stores the matrix once
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    return model


def glyph_head(p):
    """The glyph loss's linear read-out: a patch's tower features, layer-normed (the residual stream of a
    tower without its post-layernorm runs to hundreds), -> the classes of its 2 x 2 cells
    (pretrain_data.GLYPH_CLASSES). Only training uses it; what it teaches stays in the tower."""
    import torch

    from training.pretrain_data import GLYPH_CLASSES
    return torch.nn.Sequential(torch.nn.LayerNorm(p.vision_hidden), torch.nn.Linear(p.vision_hidden, 4 * GLYPH_CLASSES))


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(model, state: dict, ckpt: Path, extra=None) -> None:
    """fp16 weights in shards of <= SHARD_BYTES (tied lm_head stored once) + state.json, swapped in whole;
    `extra` is a training-only module (the glyph head) stored beside the model under its GLYPH_HEAD prefix."""
    import torch
    from safetensors.torch import save_file
    tmp = ckpt.with_name(ckpt.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seen, shards, cur, size = set(), [], {}, 0
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = dict(model.state_dict())
    if extra is not None:
        tensors.update({GLYPH_HEAD + k: v for k, v in extra.state_dict().items()})
    for name, t in tensors.items():
        # the tied lm_head is the embedding: stored once, re-tied on load (by name too, not only by storage)
        if t.data_ptr() in seen or (tied and name == "lm_head.weight"):
            continue
        seen.add(t.data_ptr())
        t = t.detach().to("cpu", dtype=torch.float16 if t.is_floating_point() else t.dtype)
        if cur and size + t.numel() * t.element_size() > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t.contiguous()
        size += t.numel() * t.element_size()
    shards.append(cur)
    names = [f"weights-{k + 1:02d}-of-{len(shards):02d}.safetensors" for k in range(len(shards))]
    for n, sd in zip(names, shards):
        save_file(sd, str(tmp / n))
    state["shards"] = names
    atomic_write_json(tmp / STATE, state)
    old = ckpt.with_name(ckpt.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if ckpt.exists():
        ckpt.rename(old)
    tmp.rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: Path) -> tuple[dict, dict]:
    """(state, fp16 weights) of a checkpoint folder, or of a folder export_hf wrote (such as assets/demo-llava):
    its pretraining.json, tokenizer and config are the state, its weights the model's (no glyph head)."""
    import torch
    from safetensors.torch import load_file
    ckpt = Path(ckpt)
    if (ckpt / STATE).exists():
        state = json.loads((ckpt / STATE).read_text(encoding="utf-8"))
    elif (ckpt / PRETRAINING).exists():
        config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        config.pop("dtype", None)       # the export's storage type: training builds the model in fp32
        state = {**json.loads((ckpt / PRETRAINING).read_text(encoding="utf-8")), "model_config": config,
                 "tokenizer": (ckpt / "tokenizer.json").read_text(encoding="utf-8")}
        from transformers import LlavaForConditionalGeneration     # its own mapping of the hub key names
        model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float16)
        return state, {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        raise FileNotFoundError(f"{ckpt} is neither a pretraining checkpoint ({STATE}) nor a model that "
                                f"training/pretrain.py exported ({PRETRAINING})")
    weights = {}
    for n in state["shards"]:
        weights.update(load_file(str(ckpt / n)))
    return state, weights


def export_hf(model, processor, out_dir: Path, state: dict | None = None) -> Path:
    """The model in fp16 + its processor in the standard layout (what assets/demo-llava ships), and with
    `state` its pretraining.json, so that a later run can resume from the folder itself."""
    import torch
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    copy.deepcopy(model).to("cpu", dtype=torch.float16).save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if state is not None:
        atomic_write_json(tmp / PRETRAINING, {k: v for k, v in state.items()
                                              if k not in ("tokenizer", "model_config", "shards")})
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


# ---------------------------------------------------------------- the training forward
def image_features(model, pixel_values, tower=None):
    """The tower's patch features that LLaVA projects (its vision_feature_layer, CLS dropped); `tower`: another
    tower of the same shape in the model's place (the glyph probe's random control)."""
    tower = model.model.vision_tower if tower is None else tower
    vision = tower(pixel_values, output_hidden_states=True, return_dict=True)
    feats = vision.hidden_states[model.config.vision_feature_layer]
    return feats[:, 1:] if model.config.vision_feature_select_strategy == "default" else feats


def llava_hidden(model, ids, pixel_values, image_at: int, n_image: int, feats=None):
    """LlavaModel's forward for sequences whose image tokens all sit at [image_at, image_at + n_image)
    (every training row starts "USER: <image>"): the projected image features are concatenated in place
    instead of masked_scatter, skipping its per-step host sync. `check_fast_forward` compares the two.
    `feats`: image_features(model, pixel_values) when the caller has them already."""
    import torch
    lm = model.model
    feats = image_features(model, pixel_values) if feats is None else feats
    embeds = lm.get_input_embeddings()(ids)
    feats = lm.multi_modal_projector(feats).to(embeds.dtype)
    embeds = torch.cat([embeds[:, :image_at], feats, embeds[:, image_at + n_image:]], dim=1)
    return lm.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state


def check_fast_forward(model, ids, pixel_values, image_at: int, n_image: int) -> bool:
    """Whether llava_hidden gives LlavaModel's own hidden states on two rows (in fp32)."""
    import torch
    with torch.no_grad():
        ref = model.model(input_ids=ids[:2], pixel_values=pixel_values[:2], use_cache=False).last_hidden_state
        try:        # another transformers version may lay LlavaModel out otherwise: then use its forward
            ours = llava_hidden(model, ids[:2], pixel_values[:2], image_at, n_image)
        except (AttributeError, TypeError, IndexError, RuntimeError):
            return False
    return ref.shape == ours.shape and torch.allclose(ref, ours, atol=1e-4, rtol=1e-4)


def pixel_fn(processor, device):
    """uint8 NHWC on the device -> the processor's normalized NCHW floats."""
    import torch
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, device=device).view(1, 3, 1, 1)
    return lambda u8: (u8.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def check_encoding(processor, tok, p) -> None:
    """The worker-side encoding must give the very ids the saved processor gives (else training and
    inference would see different prompts): checked once per run on a sample prompt."""
    from PIL import Image

    from training.pretrain_data import encode, prompt_text
    text = prompt_text("What is the value for Q1 2024 in $3.4M?")
    ours = encode(tok, text, [], tok.token_to_id(IMAGE), (p.image_size // p.patch_size) ** 2)[0]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text.split("\n", 1)[1][:-11]}]}]
    rendered = processor.apply_chat_template(msgs, add_generation_prompt=True)
    theirs = processor(images=[Image.new("RGB", (p.image_size, p.image_size), "white")], text=[rendered],
                       return_tensors="pt")["input_ids"][0].tolist()
    if rendered != text or ours != theirs:
        raise RuntimeError(f"worker encoding differs from the processor's: {rendered!r} vs {text!r}")
