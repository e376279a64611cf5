"""LLaVA conversation records -> model inputs with answer-only labels.

A record is `{"id", "image": "images/x.png", "conversations": [{"from": "human", "value": "<image>\\nQ"},
{"from": "gpt", "value": "A"}, ...]}`. It becomes chat `messages` with content lists, and the processor's
own chat template renders it, so training sees exactly the prompt that inference sends.

Labels are -100 everywhere except the assistant answers (and the EOS after each, so the model learns to
stop). When the template marks answers with `{% generation %}` the processor computes that mask; real
llava-hf templates do not, so `fallback_labels` finds each answer's characters by rendering the
conversation turn by turn and maps them onto tokens.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# ---------------------------------------------------------------- records
def split_file(data: str | Path, split: str) -> Path | None:
    """`data` is a dataset folder (train.jsonl, val.jsonl, ...) or one .jsonl / .json file (train only)."""
    data = Path(data)
    if data.is_file():
        return data if split == "train" else None
    for name in (f"{split}.jsonl", f"{split}.json"):
        if (data / name).is_file():
            return data / name
    return None


def read_records(path: Path) -> list[dict]:
    """Records with `image` made absolute (relative paths are relative to the file's folder)."""
    from charts.io import read_jsonl

    path = Path(path)
    text = path.read_text(encoding="utf-8").lstrip()
    rows = json.loads(text) if text.startswith("[") else list(read_jsonl(path))
    for r in rows:
        if r.get("image"):
            r["image"] = str((path.parent / r["image"]).resolve())
    return rows


def to_messages(record: dict) -> list[dict]:
    """LLaVA `conversations` -> HF chat messages; each `<image>` becomes an image content item."""
    messages = []
    for turn in record["conversations"]:
        role = ROLES[turn["from"]]
        text = turn["value"]
        content = []
        if role == "user" and "<image>" in text:
            content += [{"type": "image"}] * text.count("<image>")
            text = text.replace("<image>\n", "").replace("<image>", "").strip()
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


def first_question(record: dict) -> tuple[str, str]:
    """The first (question, answer) pair: what eval generation asks of each val record."""
    conv = record["conversations"]
    q = conv[0]["value"].replace("<image>\n", "").replace("<image>", "").strip()
    return q, conv[1]["value"]


def load_image(path: str, aspect: str = "pad", max_side: int | None = None):
    """RGB, shrunk to `max_side` (the processor resizes to its own size anyway; decoding a full-size chart
    into float arrays first costs ~100 ms), then padded to a square of its mean colour (LLaVA's `pad`)."""
    from eval.images import downsize, load_image as _load, pad_to_square

    img = _load(path)
    if max_side:
        img = downsize(img, max_side)
    return pad_to_square(img) if aspect == "pad" else img


def image_side(processor) -> int | None:
    """Twice the processor's target edge: room for LLaVA-NeXT's tiles, far less than a raw chart."""
    ip = getattr(processor, "image_processor", None)
    sizes = [v for d in (getattr(ip, "crop_size", None), getattr(ip, "size", None)) if isinstance(d, dict)
             for v in d.values() if isinstance(v, int)]
    return 2 * max(sizes) if sizes else None


# ---------------------------------------------------------------- labels
def has_generation_marks(processor) -> bool:
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", "") or ""
    return "{% generation %}" in template or "{%- generation %}" in template


def encode(processor, messages: list[dict], images: list, use_template_mask: bool | None = None) -> dict:
    """One sample as tensors without a batch dimension: input_ids, attention_mask, labels, pixel_values..."""
    if use_template_mask is None:
        use_template_mask = has_generation_marks(processor)
    if use_template_mask:
        out = processor.apply_chat_template(_with_images(messages, images), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, return_tensors="pt")
        ids = out["input_ids"][0]
        mask = out.pop("assistant_masks")[0].bool()
        _extend_over_spaces(mask, ids, processor.tokenizer)
        labels = ids.masked_fill(~mask, IGNORE)
        # Some transformers versions lose the mask (e.g. long image prompts); 5.17 puts it where the answers sat
        # before the image token was expanded, on image tokens. Either way the answers are found by characters.
        image_id = _image_token_id(processor)
        if not mask.any() or (image_id is not None and bool(mask[ids == image_id].any())):
            out, labels = fallback_labels(processor, messages, images)
    else:
        out, labels = fallback_labels(processor, messages, images)
    sample = {k: v[0] if k in ("input_ids", "attention_mask") else v for k, v in out.items()}
    sample["labels"] = labels
    return sample


def _extend_over_spaces(mask, ids, tokenizer) -> None:
    """Templates put the space after "ASSISTANT:" outside `{% generation %}`, but inference prompts end at
    the colon: the model must learn to produce that space token too, or greedy decoding starts wrong."""
    for i in range(len(mask) - 1, 0, -1):
        if mask[i] and not mask[i - 1]:
            text = tokenizer.decode([int(ids[i - 1])])
            if text and not text.strip(" ") and int(ids[i - 1]) not in tokenizer.all_special_ids:
                mask[i - 1] = True


def _with_images(messages, images):
    it = iter(images)
    return [{**m, "content": [{**c, "image": next(it)} if c["type"] == "image" else c for c in m["content"]]}
            for m in messages]


def answer_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return (text, [(start, end) of each answer]). Each answer is found
    by rendering the prefix up to its turn; an EOS is appended to an answer the template leaves open."""
    render = lambda msgs, gen=False: processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    eos = processor.tokenizer.eos_token
    pieces, spans, done = [], [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, after = render(messages[:i], gen=True), render(messages[:i + 1])
        if not after.startswith(before):        # generation prompt not a prefix (e.g. trailing space)
            before = render(messages[:i])
        if not after.startswith(done) or not after.startswith(before):
            raise ValueError("the chat template does not render conversations as a growing prefix; "
                             "answer-only labels cannot be computed for it")
        pieces.append(before[len(done):])
        answer = after[len(before):]
        core = answer.rstrip()
        if eos and eos not in core:
            # llava-hf templates end a turn with a space, not EOS: without one the model never learns to stop
            core += eos
        # Labels start right after the generation prompt (a leading space is what inference must produce
        # first); trailing whitespace is not a label (it may merge into the next turn's first token).
        start = sum(map(len, pieces))
        spans.append((start, start + len(core)))
        pieces.append(core + answer[len(answer.rstrip()):])
        done = after
    pieces.append(render(messages)[len(done):])
    return "".join(pieces), spans


def fallback_labels(processor, messages: list[dict], images: list):
    """Labels without `{% generation %}`: answer character spans -> tokens via offsets, then the
    image token is expanded as the processor expands it (its copies are never labels)."""
    import torch

    text, spans = answer_spans(processor, messages)
    tok = processor.tokenizer
    out = processor(text=[text], images=images or None, return_tensors="pt", add_special_tokens=False)
    plain = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    flat = [IGNORE] * len(plain["input_ids"])
    for j, (s, e) in enumerate(plain["offset_mapping"]):
        if e > s and any(s < b and e > a for a, b in spans):
            flat[j] = plain["input_ids"][j]
    image_id = _image_token_id(processor)
    labels, ids, j = [], out["input_ids"][0].tolist(), 0
    plain_ids = plain["input_ids"]
    i = 0
    while i < len(ids):
        if image_id is not None and ids[i] == image_id and j < len(plain_ids) and plain_ids[j] == image_id:
            while i < len(ids) and ids[i] == image_id:
                labels.append(IGNORE)
                i += 1
            while j < len(plain_ids) and plain_ids[j] == image_id:
                j += 1
            continue
        if j >= len(plain_ids) or ids[i] != plain_ids[j]:
            raise ValueError("tokenizer and processor disagree on the prompt's tokens; cannot align labels")
        labels.append(flat[j])
        i, j = i + 1, j + 1
    return out, torch.tensor(labels)


def _image_token_id(processor):
    tid = getattr(processor, "image_token_id", None)
    if tid is None and getattr(processor, "image_token", None):
        tid = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return tid


# ---------------------------------------------------------------- dataset and collator
class ChatDataset:
    """Map-style dataset over LLaVA records; images are decoded in `__getitem__` (dataloader workers)."""

    def __init__(self, records: list[dict], processor, max_length: int, aspect: str = "pad", cache: bool = False):
        self.processor, self.aspect, self.max_side = processor, aspect, image_side(processor)
        # Small runs in one process (the CPU demo) revisit the same samples every epoch: decoding and
        # resizing the PNG dominates their step time. Workers would each hold a copy, so no cache there.
        self.cache: dict[int, dict] | None = {} if cache else None
        self.use_template_mask = has_generation_marks(processor)
        texts = [processor.apply_chat_template(to_messages(r), tokenize=False) for r in records]
        image_tokens = _tokens_per_image(processor, records, aspect)
        lengths = [len(ids) + (image_tokens - 1) * t.count("<image>")
                   for ids, t in zip(processor.tokenizer(texts, add_special_tokens=False)["input_ids"], texts)]
        keep = [i for i, n in enumerate(lengths) if n <= max_length]
        if len(keep) < len(records):
            warnings.warn(f"{len(records) - len(keep)} samples are longer than max_length={max_length} tokens "
                          "and were left out (truncation would cut image tokens or answers)")
        self.records = [records[i] for i in keep]
        self.lengths = [lengths[i] for i in keep]     # for length-grouped batches

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        r = self.records[i]
        images = [load_image(r["image"], self.aspect, self.max_side)] if r.get("image") else []
        sample = encode(self.processor, to_messages(r), images, self.use_template_mask)
        if self.cache is not None:
            self.cache[i] = sample
        return sample


def _tokens_per_image(processor, records: list[dict], aspect: str) -> int:
    """How many tokens the processor expands one `<image>` into, measured on the first image."""
    r = next((r for r in records if r.get("image")), None)
    if r is None:
        return 1
    text = "<image>" if getattr(processor, "image_token", None) is None else processor.image_token
    image = load_image(r["image"], aspect, image_side(processor))
    n = processor(text=[text], images=[image], add_special_tokens=False)["input_ids"][0]
    return len(n)


class Collator:
    """Right-pads input_ids / attention_mask / labels; concatenates image tensors."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        width = max(len(b["input_ids"]) for b in batch)

        def pad(key, value):
            return torch.stack([torch.nn.functional.pad(b[key], (0, width - len(b[key])), value=value) for b in batch])

        out = {"input_ids": pad("input_ids", self.pad_token_id), "attention_mask": pad("attention_mask", 0),
               "labels": pad("labels", IGNORE)}
        for key in batch[0]:
            if key not in out and torch.is_tensor(batch[0][key]):
                out[key] = torch.cat([b[key] for b in batch if key in b])
        return out


class EpochSampler:
    """Training order as a function of (seed, epoch) only, so a resumed run sees the batches the
    uninterrupted run saw. The Trainer calls `set_epoch` before each epoch, also on the loader that skips
    a resumed epoch's finished batches. With `lengths`, batches group samples of similar length (the
    Trainer's LengthGroupedSampler order, from this sampler's own generator).

    Under torchrun every rank builds the same order and the Trainer's accelerator gives each rank every
    world_size-th batch of it: disjoint shares that together are the epoch, as with DistributedSampler
    (so this sampler must not shard again). Its epoch is set by LlavaTrainer: a resumed epoch's sharded
    loader does not pass `set_epoch` down to it."""

    def __init__(self, n: int, seed: int, batch_size: int = 1, lengths: list[int] | None = None):
        self.n, self.seed, self.batch_size, self.lengths = n, seed, batch_size, lengths
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import torch

        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.lengths:
            from transformers.trainer_pt_utils import get_length_grouped_indices
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
        return iter(torch.randperm(self.n, generator=generator).tolist())
