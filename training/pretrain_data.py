"""Pretraining data for training/pretrain.py: charts drawn on the fly in DataLoader worker processes.

Each chart i of the stream is drawn from random.Random(f"{seed}:{i}") (as charts.dataset.make_chart
does), with the look and kinds of the curriculum stage that index i falls in, so the stream is the same
whatever the worker count and a resumed run continues it from the index it reached. One chart becomes
ONE sequence: the image, then its questions as turns in the chat template's layout, then (for most
charts) its data table as the last turn, so no answer can be copied from the table. Labels are the
answers only (the space after "ASSISTANT:", the answer, its EOS), as training.data's masks are; the
worker tokenizes with the raw `tokenizers` object (no transformers import, no Jinja per chart) and
training/pretrain.py checks once at start that its ids equal what the saved processor produces.

Workers return numpy arrays (see `collate`); the trainer's feeder thread makes them tensors. This module is the DataLoader's (its workers import it), so torch is imported at the top, unlike the
rest of the project; only training/pretrain.py imports it.
"""
from __future__ import annotations

import functools
import io
import os
import random
from dataclasses import dataclass

import torch

IGNORE = -100
IMAGE = "<image>"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE]
EOS = "</s>"
TASK_QA, TASK_TABLE = 1, 2
# Glyph targets (Stage.glyph_targets): each patch of the image is split into 2 x 2 cells, and each cell's
# class is the character whose ink centre lies in it: 0 none, 1-94 the printable ASCII characters, 95 any
# other; NO_GLYPHS marks an image without targets (a chart in the default look).
GLYPH_CLASSES, NO_GLYPHS = 96, 255


# ---------------------------------------------------------------- curriculum
@dataclass(frozen=True)
class Stage:
    start: int                     # first chart index of the stage
    look: str                      # charts.spec.LOOKS key
    kinds: tuple[str, ...] = ()    # () = every kind but the held-out one
    default_share: float = 0.0     # share of charts drawn in the full default style range instead
    read_share: float = 0.0        # share of samples that are reading cards (reading_card) instead of charts
    random_text: float = 0.0       # share of a card's lines drawn at random (words, numbers), not the chart's
    glyph_targets: bool = False    # every demo-look image also carries where each character is (glyph_grid)


def stage_of(stages: tuple[Stage, ...], index: int) -> Stage:
    current = stages[0]
    for s in stages:
        if index >= s.start:
            current = s
    return current


def training_kinds(stage: Stage, held_out: str) -> tuple[str, ...]:
    from charts.spec import KINDS
    return tuple(k for k in (stage.kinds or KINDS) if k != held_out)


def draw_chart(index: int, seed: int, stage: Stage, held_out: str):
    """(spec, rng) of training chart `index`; the held-out kind is never drawn."""
    from charts.spec import sample_spec
    rng = random.Random(f"{seed}:{index}")
    kinds = training_kinds(stage, held_out)
    look = "default" if stage.default_share and rng.random() < stage.default_share else stage.look
    return sample_spec(kinds[index % len(kinds)], rng, look), rng, look


# ---------------------------------------------------------------- reading cards
READ_PROMPT = "Read the text in the image, line by line."


@functools.cache
def _chart_words() -> tuple[str, ...]:
    from charts.spec import CATEGORY_SETS, TIME_AXES
    return (tuple(w for *_, cats in CATEGORY_SETS.values() for c in cats for w in c.split())
            + tuple(w for *_, labels in TIME_AXES for w in labels))


def random_line(rng: random.Random) -> str:
    """Words of the charts' vocabulary in a random order, and a number in a random chart format: a line
    whose words and digits no language prior predicts, so that the only way to write it is to read it."""
    from charts.spec import format_value
    words = _chart_words()
    line = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
    if rng.random() < 0.8:
        fmt = rng.choice(("percent", "decimal", "comma", "dollar", "short"))
        low, high = (-1, 2.5) if fmt in ("percent", "decimal") else (1, 7)
        line += " " + format_value(10 ** rng.uniform(low, high), fmt)
    return line


CARD_FONTS = ("DejaVu Sans", "Liberation Sans", "DejaVu Serif")


def reading_card(spec, rng: random.Random, size: int, random_text: float = 0.0, glyphs: list | None = None):
    """A text-reading sample, the warm-up Pix2Struct and Donut learn to read from: the strings a chart of
    `spec` prints (title, axis labels, each category with its value as formatted on the chart) drawn as
    lines of 14-30 px type (a letter 1-2 patches high) at random places on a plain light background; with
    `random_text`, that share of the lines are random_line()s instead. With a `glyphs` list, each drawn
    character's (char, x, y) ink centre is appended to it (charts.canvas.glyph_centres).
    Returns (uint8 size x size x 3 pixels, the lines drawn, top to bottom, one per text line)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from charts.canvas import DPI, _font, glyph_centres
    from charts.spec import format_value
    values = next(iter(spec.series.values()), [])
    strings = [f"{c} {format_value(v, spec.fmt)}" for c, v in zip(spec.categories, values)]
    strings += [x for x in (spec.x_label, spec.y_label) if x]
    rng.shuffle(strings)
    strings = [spec.title] + strings[:rng.randint(2, 7)]
    if random_text:
        strings = [random_line(rng) if rng.random() < random_text else x for x in strings]
    background = tuple(rng.randint(225, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    family = rng.choice(CARD_FONTS)
    lines, y = [], rng.randint(4, 24)
    for k, text in enumerate(strings):
        px = rng.randint(18, 30) if k == 0 else rng.randint(14, 24)
        font = _font(family, px * 72 / DPI, k == 0)        # charts' cached fonts, sized in points
        width = draw.textlength(text, font=font)
        if width > size - 8:                # too wide: smaller type, down to 12 px
            px = int(px * (size - 8) / width)
            if px < 12:
                continue                    # a line that does not fit is left out of the card and its target
            font = _font(family, px * 72 / DPI, k == 0)
            width = draw.textlength(text, font=font)
        if y + px * 1.3 > size or width > size - 8:
            continue
        xy = (rng.randint(4, int(size - 4 - width)), y)
        draw.text(xy, text, fill=ink, font=font)
        if glyphs is not None:
            glyphs += glyph_centres([(text, xy, "la", font, ink, 0)])
        lines.append(text)
        y += int(px * rng.uniform(1.3, 2.2))
    return np.asarray(img, dtype=np.uint8), "\n".join(lines)


def glyph_grid(glyphs: list, source: tuple[int, int], size: int, patch: int):
    """uint8 (2g, 2g) cell classes (GLYPH_CLASSES) of an image of `source` (w, h) pixels shown as
    chart_pixels() shows it (padded to a square, resized to `size`), g = size // patch patches a side."""
    import numpy as np
    cells = 2 * (size // patch)
    grid = np.zeros((cells, cells), dtype=np.uint8)
    side = max(source)
    dx, dy, scale = (side - source[0]) // 2, (side - source[1]) // 2, size / side
    cell = patch / 2
    for ch, x, y in glyphs:
        i, j = int((y + dy) * scale // cell), int((x + dx) * scale // cell)
        if 0 <= i < cells and 0 <= j < cells:
            grid[i, j] = ord(ch) - 32 if 33 <= ord(ch) <= 126 else GLYPH_CLASSES - 1
    return grid


# ---------------------------------------------------------------- tokenizer
def tokenizer_corpus(seed: int, n_charts: int, stages: tuple[Stage, ...], held_out: str) -> list[str]:
    """Words the model will read and write: questions, answers, tables of charts like the training ones."""
    from charts.dataset import SHORT_ANSWER_INSTRUCTION
    from charts.questions import make_questions
    from charts.tables import TABLE_PROMPTS, data_table
    texts = ["USER: ", " ASSISTANT: ", SHORT_ANSWER_INSTRUCTION, *TABLE_PROMPTS]
    for i in range(n_charts):
        stage = stages[i % len(stages)]
        spec, rng, _ = draw_chart(10_000_000 + i, seed, stage, held_out)   # indices the stream never reaches
        texts.append(data_table(spec))
        for qa in make_questions(spec, rng):
            texts.append(f"USER: {qa.question} ASSISTANT: {qa.answer}")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (any text encodes) with every digit a token of its own, so a value is read and
    written digit by digit instead of as a few arbitrary merged chunks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


# ---------------------------------------------------------------- sequences
def chat_text(turns: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int, int]]]:
    """The chat template's rendering of an image + `turns` (eval.demo.CHAT_TEMPLATE: "USER: <image>\\nQ
    ASSISTANT: A</s>USER: Q2 ..."), and the (start, end, task) character span of each answer: from the
    space after "ASSISTANT:" (inference prompts end at the colon) through the EOS."""
    parts, spans, pos = [], [], 0
    for k, (q, a, *task) in enumerate(turns):
        head = ("USER: " + IMAGE + "\n" if k == 0 else "USER: ") + q + " ASSISTANT:"
        parts.append(head)
        pos += len(head)
        answer = " " + a + EOS
        spans.append((pos, pos + len(answer), task[0] if task else TASK_QA))
        parts.append(answer)
        pos += len(answer)
    return "".join(parts), spans


def prompt_text(question: str) -> str:
    """What the processor's chat template gives for one question with add_generation_prompt=True."""
    return "USER: " + IMAGE + "\n" + question + " ASSISTANT:"


def encode(tok, text: str, spans, image_id: int, image_tokens: int):
    """(ids, labels, task) lists with the one image token expanded to `image_tokens` copies."""
    enc = tok.encode(text, add_special_tokens=False)
    ids, labels, task = [], [], []
    for tid, (s, e) in zip(enc.ids, enc.offsets):
        if tid == image_id:
            ids += [image_id] * image_tokens
            labels += [IGNORE] * image_tokens
            task += [0] * image_tokens
            continue
        hit = next((t for a, b, t in spans if s < b and e > a), 0)
        ids.append(tid)
        labels.append(tid if hit else IGNORE)
        task.append(hit)
    return ids, labels, task


def chart_pixels(png: bytes, size: int):
    """uint8 HxWx3 array of the chart as the processor sees it: padded to a square of its mean colour
    (eval.local and training.data pad the same way), then resized to size x size."""
    import numpy as np
    from PIL import Image

    from eval.images import pad_to_square
    img = pad_to_square(Image.open(io.BytesIO(png)).convert("RGB"))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


@dataclass
class StreamConfig:
    """What a worker needs to draw and encode charts (picklable; workers rebuild the tokenizer)."""
    seed: int
    stages: tuple[Stage, ...]
    held_out: str
    image_size: int
    image_tokens: int
    max_length: int
    qa_per_chart: int
    table_share: float
    instruct_share: float
    tokenizer_json: str
    patch_size: int = 16
    parent_pid: int = 0            # the trainer: workers stop when it is gone


def _alive(pid: int) -> bool:
    if not pid:
        return True
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def training_sample(index: int, cfg: StreamConfig, tok, image_id: int) -> dict:
    import numpy as np

    from charts.dataset import SHORT_ANSWER_INSTRUCTION
    from charts.questions import make_questions
    from charts.render import render, render_glyphs
    from charts.tables import TABLE_PROMPTS, data_table
    stage = stage_of(cfg.stages, index)
    spec, rng, look = draw_chart(index, cfg.seed, stage, cfg.held_out)
    cells = 2 * (cfg.image_size // cfg.patch_size)
    no_glyphs = np.full((cells, cells), NO_GLYPHS, dtype=np.uint8)
    if stage.read_share and rng.random() < stage.read_share:
        glyphs: list = []
        pixels, text = reading_card(spec, rng, cfg.image_size, stage.random_text, glyphs)
        if text:      # (on a tiny image no line may fit: then the chart it came from)
            ids, labels, task = encode(tok, *chat_text([(READ_PROMPT, text, TASK_TABLE)]), image_id, cfg.image_tokens)
            grid = (glyph_grid(glyphs, (cfg.image_size,) * 2, cfg.image_size, cfg.patch_size)
                    if stage.glyph_targets else no_glyphs)
            return {"index": index, "kind": spec.kind, "look": "read", "pixels": pixels, "ids": ids[:cfg.max_length],
                    "labels": labels[:cfg.max_length], "task": task[:cfg.max_length], "glyphs": grid}
    # in the default look, type shrunk to a fraction of a patch gives cells of several characters each
    if stage.glyph_targets and look != "default":
        png, glyphs = render_glyphs(spec)
        grid = glyph_grid(glyphs, (spec.style["width"], spec.style["height"]), cfg.image_size, cfg.patch_size)
    else:
        png, grid = render(spec), no_glyphs
    qas = make_questions(spec, rng)
    rng.shuffle(qas)
    turns = [(q.question, q.answer, TASK_QA) for q in qas[:cfg.qa_per_chart]]
    if turns and rng.random() < cfg.instruct_share:       # the benchmark's prompt form, as charts.generate mixes it
        turns[0] = (turns[0][0] + SHORT_ANSWER_INSTRUCTION, *turns[0][1:])
    if rng.random() < cfg.table_share:
        turns.append((rng.choice(TABLE_PROMPTS), data_table(spec), TASK_TABLE))
    while True:      # too long: drop questions (the table, the densest target, stays)
        ids, labels, task = encode(tok, *chat_text(turns), image_id, cfg.image_tokens)
        if len(ids) <= cfg.max_length or len(turns) <= 1:
            break
        turns.pop(-2 if turns[-1][2] == TASK_TABLE and len(turns) > 1 else -1)
    return {"index": index, "kind": spec.kind, "look": look,
            "pixels": chart_pixels(png, cfg.image_size), "ids": ids[:cfg.max_length],
            "labels": labels[:cfg.max_length], "task": task[:cfg.max_length], "glyphs": grid}


def _tokenizer(cfg: StreamConfig):
    from tokenizers import Tokenizer
    return Tokenizer.from_str(cfg.tokenizer_json)


def _as_arrays(sample: dict) -> dict:
    import numpy as np
    out = dict(sample)
    for key in ("ids", "labels"):
        out[key] = np.asarray(sample[key], dtype=np.int32)
    out["task"] = np.asarray(sample["task"], dtype=np.int8)
    return out


def collate(samples: list[dict]) -> dict:
    """Images stacked, token rows kept ragged; numpy, not tensors, so a batch travels through the worker's
    pipe rather than /dev/shm (often 64 MB in containers: DataLoader tensors would overflow it)."""
    import numpy as np
    return {"pixels": np.stack([s["pixels"] for s in samples]), "glyphs": np.stack([s["glyphs"] for s in samples]),
            "ids": [s["ids"] for s in samples], "labels": [s["labels"] for s in samples],
            "task": [s["task"] for s in samples], "index": [s["index"] for s in samples],
            "kind": [s["kind"] for s in samples], "look": [s["look"] for s in samples]}


def to_torch(batch: dict, pin: bool) -> dict:
    """A collated batch as tensors (images pinned for an asynchronous copy to the GPU)."""
    pixels, glyphs = torch.from_numpy(batch["pixels"]), torch.from_numpy(batch["glyphs"])
    out = dict(batch, pixels=pixels.pin_memory() if pin else pixels, glyphs=glyphs.pin_memory() if pin else glyphs)
    for key in ("ids", "labels", "task"):
        out[key] = [torch.from_numpy(a) for a in batch[key]]
    return out


class ChartStream(torch.utils.data.IterableDataset):
    """Training charts start, start+1, ... for ever; worker w of W draws start+w, start+w+W, ..."""

    def __init__(self, cfg: StreamConfig, start: int):
        self.cfg, self.start = cfg, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if info:
            try:
                os.nice(10)      # the training process must win the cores it needs to feed the GPU
            except OSError:
                pass
        tok = _tokenizer(self.cfg)
        image_id = tok.token_to_id(IMAGE)
        i = self.start + wid
        # forkserver workers are the server's children, not the trainer's, so DataLoader's own watchdog
        # (which watches the parent) would keep them drawing charts for ever after a trainer that died
        while _alive(self.cfg.parent_pid):
            yield _as_arrays(training_sample(i, self.cfg, tok, image_id))
            i += nw


def chart_loader(cfg: StreamConfig, start: int, workers: int, per_batch: int):
    """An endless DataLoader of `per_batch`-chart groups drawn by `workers` processes (forkserver: they
    fork from a clean server with matplotlib loaded, never from the CUDA-holding trainer)."""
    import multiprocessing
    kw = {}
    if workers:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["charts.render", "charts.questions", "matplotlib.figure",
                                    "matplotlib.backends.backend_agg", "training.pretrain_data"])
        kw = dict(multiprocessing_context=ctx, prefetch_factor=4, persistent_workers=False)
    return torch.utils.data.DataLoader(ChartStream(cfg, start), batch_size=per_batch, num_workers=workers,
                                       collate_fn=collate, **kw)


# ---------------------------------------------------------------- test charts
def test_chart(index: int, seed: int, kind: str, look: str, size: int) -> dict:
    """A fresh test chart (another seed than training) with one question of every family that fits it,
    each ending with the benchmark's short-answer instruction (eval.run appends it by default)."""
    from charts.dataset import SHORT_ANSWER_INSTRUCTION
    from charts.questions import make_questions
    from charts.render import render
    from charts.spec import sample_spec
    from charts.tables import TABLE_PROMPTS, data_table
    rng = random.Random(f"{seed}:test:{kind}:{index}")
    spec = sample_spec(kind, rng, look)
    qas = [{"question": q.question + SHORT_ANSWER_INSTRUCTION, "answer": q.answer, "family": q.family,
            "answer_type": q.answer_type, "kind": kind} for q in make_questions(spec, rng)]
    return {"pixels": chart_pixels(render(spec), size), "qas": qas, "kind": kind,
            "table_prompt": TABLE_PROMPTS[0], "table": data_table(spec)}


def _test_chart_job(args):
    return test_chart(*args)


def test_charts(jobs: list[tuple], workers: int) -> list[dict]:
    """test_chart(*job) for each job, in `workers` processes when there are several."""
    if workers <= 1 or len(jobs) < 8:
        return [test_chart(*j) for j in jobs]
    import multiprocessing
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(workers) as pool:
        return pool.map(_test_chart_job, jobs, chunksize=4)


def answer_prior(seed: int, stage: Stage, held_out: str, n_charts: int) -> dict[str, str]:
    """The most common answer per family over training-like charts: what a model that does not look
    at the image can best answer (no rendering needed, so it is cheap)."""
    from collections import Counter, defaultdict

    from charts.questions import make_questions
    counts: dict[str, Counter] = defaultdict(Counter)
    for i in range(n_charts):
        spec, rng, _ = draw_chart(20_000_000 + i, seed, stage, held_out)
        for q in make_questions(spec, rng):
            counts[q.family][q.answer] += 1
    return {fam: c.most_common(1)[0][0] for fam, c in counts.items()}
