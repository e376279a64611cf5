"""Pretrain the demo's small chart-reading LLaVA from scratch on the project's own synthetic charts.

    python -m training.pretrain --preset demo --out OUT [--resume CKPT] --minutes 8 --workers 15
    python -m training.pretrain --preset tiny --out /tmp/tiny                     # the whole path on CPU, ~1 min
    python -m training.pretrain --resume OUT/ckpt --out OUT2 --eval-only          # score a checkpoint (GPU)
    python -m training.pretrain --resume OUT/ckpt --out /tmp/x --steps 0 --no-eval --hf-dir assets/demo-llava
    python -m training.pretrain_card --eval OUT/eval.json --ckpt OUT/ckpt --out assets/demo-llava  # its card

On the GPU machine (one H200, 16 cores), from the repo root, one run of ~9 minutes:

    export PYTHONPATH=$PWD; bash training/pretrain_gpu.sh

It resumes from .gpu/demo-ckpt/ when that carried folder holds a checkpoint, and writes $OUT/ckpt/,
metrics.jsonl, eval.json and log.txt (8 files at most); copy $OUT/ckpt/ to .gpu/demo-ckpt/ for the next
run. Two such runs fill the preset's 14-minute training plan, the second one decaying the learning rate.

What it builds: a standard Hugging Face `LlavaForConditionalGeneration` (CLIP-style vision tower ->
MLP projector -> Llama) with a byte-level BPE tokenizer whose digits are single tokens and the studio's
chat template (eval.demo.CHAT_TEMPLATE), so `AutoModelForImageTextToText` / `AutoProcessor` load the
exported folder like a hub checkpoint. Why each size is what it is: see PRESETS below.

What it trains on: charts drawn by charts/ in DataLoader worker processes while the GPU trains
(training/pretrain_data.py), each chart one sequence of its questions plus its data table (the
Pix2Struct / MatCha / DePlot target: the table makes the model read every label and value, where a
question asks about one), answer-only loss, the kinds and looks of a curriculum, one kind held out.
In the curriculum's last stage the vision tower also has a loss of its own, `glyph_loss`: which character
lies in each half-patch cell of the image, where the renderer drew it (the answers alone never taught the
tower to tell digits apart).

Why a hand-written loop, not the HF Trainer: the data is an endless stream fed through a GPU-resident
replay buffer (generation on 16 cores is slower than training, so each chart is used a few times while
new ones arrive), and a run must stop on a wall-clock deadline with a checkpoint that fits through a
64 MiB transfer. The loop is `train()`; the model, loss and optimizer are the standard ones.

Output (OUT): ckpt/ (fp16 safetensors shards <= 16 MB + state.json: step, data position, schedule,
model config, tokenizer; optimizer state is not kept, a resumed run re-warms a fresh AdamW),
metrics.jsonl (loss and throughput every ~30 s), eval.json (training/pretrain_eval.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from charts.io import append_jsonl, atomic_write_json
from training.pretrain_data import IGNORE, IMAGE, TASK_QA, TASK_TABLE, Stage, StreamConfig
from training.pretrain_model import (GLYPH_HEAD, STATE, build_model, build_processor, check_encoding,
                                     check_fast_forward, export_hf, glyph_head, hf_tokenizer, image_features,
                                     llava_hidden, load_checkpoint, model_config, pixel_fn, save_checkpoint)

EASY_KINDS = ("bar", "pie", "line", "infographic")


@dataclass
class PretrainPreset:
    name: str
    seed: int = 0
    # --- model. 384 px in 16 px patches = 576 image tokens: the demo look's 12-14 pt type (17-19 px)
    # puts a letter's height in about one patch, the scale at which Pix2Struct-style models read text;
    # 14 px patches would cost 1.4x the tokens, 32 px ones would put whole words in one patch.
    image_size: int = 384
    patch_size: int = 16
    vision_hidden: int = 384     # reading is the hard part: the vision tower gets as much as the LM
    vision_layers: int = 6
    vision_heads: int = 6
    vision_mlp: int = 1536
    text_hidden: int = 384
    text_layers: int = 7         # 6 + 7 layers of 384: ~23M parameters, ~46 MB in fp16 (the cap is 50)
    text_heads: int = 6
    text_kv_heads: int = 2
    text_mlp: int = 1024
    vocab_size: int = 2048       # chart words and numbers only: a small vocab keeps the tied embedding small
    max_length: int = 1024       # 576 image tokens + ~8 questions + a data table
    # --- data
    held_out: str = "hbar"       # shares every family with bar; the demo fine-tune teaches it
    qa_per_chart: int = 8
    table_share: float = 0.9     # charts whose sequence ends with the data-table turn
    instruct_share: float = 0.5  # first questions ending with the benchmark's short-answer instruction
    qa_weight: float = 0.5       # loss = qa_weight * mean(QA tokens) + (1 - qa_weight) * mean(table tokens)
    glyph_weight: float = 0.5    # ... + glyph_weight * glyph_loss, in stages with glyph targets
    # Curriculum by chart index (reproducible, whatever the speed): big type, few simple kinds first;
    # then every kind but the held-out one in the demo look; then a share of the full default style range.
    # At ~450 charts/s drawn, a GPU run draws ~190k charts: the third stage starts early in the second run.
    # The fourth was added after run 3 (which stopped at chart 470,620) could count bars but read almost no
    # text: 30% of samples become reading cards (pretrain_data.reading_card), the text-reading warm-up of
    # Pix2Struct and Donut, with the chart's own strings in large type as the whole picture. Run 4 (to chart
    # 791,248) learned to write such cards but not to read them: it wrote some other chart's strings, which
    # the language prior predicts. From chart 800,000 half of a card's lines are random words and numbers.
    # Run 5 (to chart 1,089,077) still read no values, and a linear probe found its tower told digits apart
    # no better than random weights (pretrain_eval.glyph_probe): the answer loss, through the LM, never asked
    # the tower for glyphs. From chart 1,090,000 every demo-look image also trains the tower directly on
    # which character lies in each half-patch cell (glyph_loss; the renderer knows where it drew each one).
    stages: tuple = (Stage(0, "demo-easy", EASY_KINDS), Stage(30_000, "demo"),
                     Stage(250_000, "demo", default_share=0.15),
                     Stage(470_000, "demo", default_share=0.15, read_share=0.3),
                     Stage(800_000, "demo", default_share=0.15, read_share=0.3, random_text=0.5),
                     Stage(1_090_000, "demo", default_share=0.15, read_share=0.3, random_text=0.5,
                           glyph_targets=True))
    tokenizer_charts: int = 3000
    # --- schedule: warmup, constant, then a linear decay over the last decay_share of the planned
    # training time (warmup-stable-decay). The plan is in minutes of training, summed over runs, because
    # device time comes in runs of ~8 minutes whose speed is unknown in advance: two runs of the GPU
    # script fill 14 minutes, and the second one decays without anyone changing a setting. Stable is
    # also what a fresh AdamW after each resume wants.
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 300
    resume_warmup_steps: int = 100
    plan_minutes: float = 14.0
    decay_share: float = 0.2
    weight_decay: float = 0.05
    # --- replay buffer on the GPU (uint8 images: 20k x 442 KB = 8.8 GB)
    buffer_charts: int = 20_000
    min_ready: int = 1500        # charts in the buffer before the first step
    loader_batch: int = 16       # charts per worker hand-off
    # --- run
    checkpoint_minutes: float = 3.0
    log_seconds: float = 30.0
    eval_seen_charts: int = 240
    eval_held_out_charts: int = 80
    eval_default_charts: int = 80    # seen kinds in the full default style range: how far the reading carries
    eval_table_charts: int = 48      # charts per split also asked for their whole data table
    eval_table_tokens: int = 320     # a 6 x 4 table of "$340.4k"s, digits one token each, fits
    eval_batch: int = 256
    eval_reserve_s: float = 75.0  # kept free at the end of --deadline-s for the eval and the save
    eval_glyphs: int = 600           # images of the glyph probe (pretrain_eval.glyph_probe)
    prior_charts: int = 3000
    test_seed: int = 424242

    def replace(self, **kw) -> "PretrainPreset":
        return dataclasses.replace(self, **kw)


PRESETS = {
    "demo": PretrainPreset("demo"),
    # Every step of the path on 2 CPU cores in about a minute: tiny sizes, a handful of steps.
    "tiny": PretrainPreset("tiny", image_size=64, vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64,
                           text_hidden=32, text_layers=2, text_heads=2, text_kv_heads=1, text_mlp=64, vocab_size=400,
                           max_length=400, qa_per_chart=4,
                           stages=(Stage(0, "demo-easy", EASY_KINDS), Stage(12, "demo"),
                                   Stage(24, "demo", default_share=0.3, read_share=0.3, glyph_targets=True)),
                           tokenizer_charts=150, batch_size=4, lr=3e-3, warmup_steps=2, resume_warmup_steps=2,
                           plan_minutes=60.0, buffer_charts=48, min_ready=8, loader_batch=4, log_seconds=0.0,
                           eval_seen_charts=8, eval_held_out_charts=4, eval_default_charts=4, eval_table_charts=2, eval_table_tokens=24, eval_batch=32, eval_reserve_s=25.0, eval_glyphs=40,
                           prior_charts=150),
}


# ---------------------------------------------------------------- replay buffer
def to_device(x, device):
    """A CPU tensor on `device` without waiting: `torch.tensor(..., device="cuda")` and plain `.to()`
    synchronize the stream, which would stall the GPU once or twice per step."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x


class Replay:
    """The last `capacity` charts on the GPU (uint8 images and glyph cells) with their token rows on the
    CPU. Batches take every chart not yet trained on first, then fill up with random earlier ones."""

    def __init__(self, capacity: int, size: int, cells: int, device):
        import torch
        self.pixels = torch.empty((capacity, size, size, 3), dtype=torch.uint8, device=device)
        self.glyphs = torch.empty((capacity, cells, cells), dtype=torch.uint8, device=device)
        self.rows: list = [None] * capacity
        self.capacity, self.filled, self.next, self.device = capacity, 0, 0, device
        self.fresh: deque[int] = deque()
        self.added = 0

    def add(self, batch: dict) -> None:
        import torch
        n = len(batch["ids"])
        slots = [(self.next + k) % self.capacity for k in range(n)]
        at = to_device(torch.tensor(slots), self.device)
        self.pixels[at] = batch["pixels"].to(self.device, non_blocking=True)
        self.glyphs[at] = batch["glyphs"].to(self.device, non_blocking=True)
        for s, ids, labels, task in zip(slots, batch["ids"], batch["labels"], batch["task"]):
            self.rows[s] = (ids, labels, task)
        self.fresh.extend(slots)
        self.next = (self.next + n) % self.capacity
        self.filled = min(self.capacity, self.filled + n)
        self.added += n

    def take(self, k: int, rng: random.Random) -> list[int]:
        out = [self.fresh.popleft() for _ in range(min(k, len(self.fresh)))]
        return out + [rng.randrange(self.filled) for _ in range(k - len(out))]


def _feed(loader, q: queue.Queue, stop: threading.Event, pin: bool, errors: list) -> None:
    """Move worker batches into `q` as tensors until `stop` (a thread: the trainer never waits on a
    worker). A worker's exception is kept in `errors` for the trainer to raise."""
    from training.pretrain_data import to_torch
    try:
        for batch in loader:
            batch = to_torch(batch, pin)
            while not stop.is_set():
                try:
                    q.put(batch, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
    except Exception as e:  # noqa: BLE001 - handed to the training thread, which raises it
        errors.append(e)


def _batch(replay: Replay, slots: list[int], pad_id: int, p: PretrainPreset):
    """Right-padded ids (to a multiple of 32: fewer distinct shapes), and the answer positions with
    their targets and loss weights, found on the CPU so the step never waits on the GPU."""
    import torch
    from torch.nn.utils.rnn import pad_sequence
    rows = [replay.rows[s] for s in slots]
    ids = pad_sequence([r[0] for r in rows], batch_first=True, padding_value=pad_id).long()
    labels = pad_sequence([r[1] for r in rows], batch_first=True, padding_value=IGNORE).long()
    task = pad_sequence([r[2] for r in rows], batch_first=True, padding_value=0)
    width = -(-ids.shape[1] // 32) * 32
    if width > ids.shape[1]:
        extra = width - ids.shape[1]
        ids = torch.nn.functional.pad(ids, (0, extra), value=pad_id)
        labels = torch.nn.functional.pad(labels, (0, extra), value=IGNORE)
        task = torch.nn.functional.pad(task, (0, extra), value=0)
    tgt = labels[:, 1:].reshape(-1)
    pos = (tgt != IGNORE).nonzero().squeeze(1)
    kind = task[:, 1:].reshape(-1)[pos]
    n_qa, n_table = int((kind == TASK_QA).sum()), int((kind == TASK_TABLE).sum())
    qa_w = p.qa_weight if n_table else 1.0
    weight = torch.where(kind == TASK_TABLE, torch.tensor((1 - qa_w) / max(1, n_table)),
                         torch.tensor(qa_w / max(1, n_qa)))
    return ids, pos, tgt[pos], weight, kind, int((ids != pad_id).sum())


def glyph_loss(head, feats, cells):
    """The glyph loss (Stage.glyph_targets): cross-entropy of each 2 x 2 cell's character class read by
    `head` from its patch's features, as the mean over cells holding a character plus the mean over empty
    ones, halved (most cells are empty); images without targets (NO_GLYPHS) count for nothing. No host
    sync. Returns (loss, n_cells_with_a_character, n_of_them_read_right) as tensors."""
    import torch

    from training.pretrain_data import GLYPH_CLASSES, NO_GLYPHS
    b, n, _ = feats.shape
    g = int(n ** 0.5)
    logits = head(feats).float().view(b, g, g, 2, 2, GLYPH_CLASSES).permute(0, 1, 3, 2, 4, 5)
    logits = logits.reshape(-1, GLYPH_CLASSES)                     # the cells in (2g, 2g) row-major order
    t = cells.reshape(-1).long()
    known = t != NO_GLYPHS
    ce = torch.nn.functional.cross_entropy(logits, torch.where(known, t, 0), reduction="none")
    has, empty = (known & (t > 0)).float(), (known & (t == 0)).float()
    loss = 0.5 * (ce * has).sum() / has.sum().clamp(min=1) + 0.5 * (ce * empty).sum() / empty.sum().clamp(min=1)
    return loss, has.sum(), ((logits.argmax(1) == t).float() * has).sum()


def lr_at(step: int, trained_s: float, p: PretrainPreset, plan_s: float, resumed_at: int | None) -> float:
    """Warmup over steps, then constant, then linear decay to min_lr_ratio over the plan's last seconds."""
    warm = min(1.0, (step + 1) / max(1, p.warmup_steps))
    if resumed_at is not None:      # the fresh AdamW of a resumed run re-learns its moments first
        warm = min(warm, (step - resumed_at + 1) / max(1, p.resume_warmup_steps))
    decay_from = plan_s * (1 - p.decay_share)
    f = 1.0 if trained_s < decay_from else 1 - (1 - p.min_lr_ratio) * (trained_s - decay_from) / max(1e-9, plan_s - decay_from)
    return p.lr * warm * max(p.min_lr_ratio, f)


def log(msg: str, t0: float) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------- training
def train(model, head, processor, p: PretrainPreset, state: dict, cfg: StreamConfig, out: Path, args, t0: float,
          device) -> dict:
    """Train until the step budget, --steps, --minutes or the deadline; checkpoint every few minutes.
    `head` is the glyph loss's read-out (glyph_loss), trained from the first stage with glyph targets.
    Updates and returns `state`."""
    import torch
    from training.pretrain_data import chart_loader
    cuda = device.type == "cuda"
    named = [*model.named_parameters(), *((GLYPH_HEAD + n, q) for n, q in head.named_parameters())]
    decay = [q for n, q in named if q.ndim >= 2 and "embed" not in n]
    rest = [q for n, q in named if q.ndim < 2 or "embed" in n]
    glyphs_on = p.glyph_weight > 0 and any(s.glyph_targets for s in p.stages)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=p.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda)
    forward = torch.compile(model.model, dynamic=True) if args.compile else model.model
    to_pixels = pixel_fn(processor, device)
    replay = Replay(p.buffer_charts, p.image_size, 2 * (p.image_size // p.patch_size), device)
    loader = chart_loader(cfg, state["next_index"], args.workers, p.loader_batch)
    q: queue.Queue = queue.Queue(maxsize=max(8, 2 * args.workers))
    stop = threading.Event()
    batches = iter(loader)
    errors: list = []
    feeder = threading.Thread(target=_feed, args=(batches, q, stop, cuda, errors), daemon=True)
    feeder.start()
    rng = random.Random(f"{p.seed}:replay:{state['step']}")
    resumed_at = state["step"] if state["step"] else None
    plan_s = state["plan_minutes"] * 60
    trained_s0 = state.get("train_seconds", 0.0)
    kinds, looks = Counter(state["kinds_trained"]), Counter(state["looks_trained"])
    pad_id = processor.tokenizer.pad_token_id
    image_id, n_image = model.config.image_token_id, (p.image_size // p.patch_size) ** 2
    fast, image_at = None, None     # decided on the first batch
    start_step, start_index, t_wait = state["step"], state["next_index"], time.time()
    trained0, generated0 = state["charts_trained"], state["charts_generated"]

    def pull(block: bool) -> None:
        if errors:
            raise RuntimeError("a chart worker failed") from errors[0]
        while len(replay.fresh) < p.batch_size:
            try:
                batch = q.get(timeout=5) if block else q.get_nowait()
            except queue.Empty:
                return
            replay.add(batch)
            state["next_index"] = max(state["next_index"], max(batch["index"]) + 1)
            kinds.update(batch["kind"])
            looks.update(batch["look"])
            block = False

    need = min(p.min_ready, p.buffer_charts)
    while replay.filled < need and time.time() - t_wait < 300:
        replay.fresh.clear()                # pull() stops at a batch's worth of fresh charts: keep filling
        pull(block=True)
    if not replay.filled:
        raise RuntimeError("no chart arrived from the workers in 300 s")
    replay.fresh = deque(range(replay.filled))
    t_start = time.time()
    log(f"buffer ready: {replay.filled} charts in {t_start - t_wait:.1f}s; training from step {state['step']}", t0)
    budget_end = min(t_start + args.minutes * 60, t0 + args.deadline_s - (p.eval_reserve_s if not args.no_eval else 10))
    next_ckpt = t_start + p.checkpoint_minutes * 60

    def window(now: float) -> dict:
        return {"t": now, "charts": 0, "tokens": 0, "added": replay.added, "loss": 0.0, "qa": 0.0, "table": 0.0,
                "n_qa": 0, "n_table": 0, "steps": 0, "glyph": 0.0, "glyphs": 0.0, "glyphs_read": 0.0}
    win = window(time.time())
    trained = 0
    model.train()
    head.train()
    while (trained_s0 + time.time() - t_start < plan_s and state["step"] - start_step < args.steps
           and time.time() < budget_end):
        pull(block=replay.filled == 0)
        slots = replay.take(p.batch_size, rng)
        ids, pos, tgt, weight, kind, n_tok = _batch(replay, slots, pad_id, p)
        ids_cpu = ids
        lr = lr_at(state["step"], trained_s0 + time.time() - t_start, p, plan_s, resumed_at)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, pos, tgt, weight, kind_d = (to_device(x, device) for x in (ids, pos, tgt, weight, kind))
        at = to_device(torch.tensor(slots), device)
        pv = to_pixels(replay.pixels[at])
        if fast is None:
            image_at = int((ids_cpu[0] == image_id).nonzero()[0])
            fast = check_fast_forward(model, ids, pv, image_at, n_image) and not args.compile
            log(f"forward: {'image features concatenated at ' + str(image_at) if fast else 'LlavaModel'}", t0)
        if fast and not bool((ids_cpu[:, image_at] == image_id).all()):
            raise RuntimeError("a training row does not start with its image tokens")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            feats = image_features(model, pv) if fast or glyphs_on else None    # (LlavaModel's own: a 2nd pass)
            if fast:
                h = llava_hidden(model, ids, pv, image_at, n_image, feats)
            else:
                h = forward(input_ids=ids, pixel_values=pv, use_cache=False).last_hidden_state
            logits = model.lm_head(h[:, :-1].reshape(-1, h.shape[-1])[pos])
        per_tok = torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="none")
        loss = (per_tok * weight).sum()
        if glyphs_on:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                g_loss, g_n, g_read = glyph_loss(head, feats, replay.glyphs[at])
            loss = loss + p.glyph_weight * g_loss
            win["glyph"] = win["glyph"] + g_loss.detach()
            win["glyphs"] = win["glyphs"] + g_n
            win["glyphs_read"] = win["glyphs_read"] + g_read
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([q for _, q in named], 1.0)
        opt.step()
        state["step"] += 1
        win["steps"] += 1
        win["charts"] += len(slots)
        trained += len(slots)
        win["tokens"] += n_tok
        d = per_tok.detach()
        win["loss"] = win["loss"] + loss.detach()
        win["qa"] = win["qa"] + (d * (kind_d == TASK_QA)).sum()
        win["table"] = win["table"] + (d * (kind_d == TASK_TABLE)).sum()
        win["n_qa"] += int((kind == TASK_QA).sum())
        win["n_table"] += int((kind == TASK_TABLE).sum())
        now = time.time()
        if now - win["t"] >= p.log_seconds:
            dt = now - win["t"]
            rec = {"step": state["step"], "loss": round(float(win["loss"]) / win["steps"], 4),
                   "qa_loss": round(float(win["qa"]) / max(1, win["n_qa"]), 4),
                   "table_loss": round(float(win["table"]) / max(1, win["n_table"]), 4), "lr": round(lr, 6),
                   **({"glyph_loss": round(float(win["glyph"]) / win["steps"], 4),
                       "glyph_acc": round(float(win["glyphs_read"]) / max(1.0, float(win["glyphs"])), 4)}
                      if glyphs_on else {}),
                   "charts_per_s": round(win["charts"] / dt, 1),
                   "fresh_charts_per_s": round((replay.added - win["added"]) / dt, 1),
                   "tokens_per_s": round(win["tokens"] / dt), "buffer": replay.filled,
                   "reuse": round((trained0 + trained) / max(1, generated0 + replay.added), 2),
                   "elapsed_s": round(now - t0, 1)}
            state["charts_trained"], state["charts_generated"] = trained0 + trained, generated0 + replay.added
            append_jsonl(out / "metrics.jsonl", rec)
            log(json.dumps(rec), t0)
            win = window(now)
        if now >= next_ckpt:       # a run killed after this point resumes from here, its plan time included
            state.update(kinds_trained=dict(kinds), looks_trained=dict(looks),
                         train_seconds=round(trained_s0 + now - t_start, 1))
            save_checkpoint(model, state, out / "ckpt", head)
            log(f"checkpoint at step {state['step']}", t0)
            next_ckpt = now + p.checkpoint_minutes * 60
    stop.set()
    state["charts_trained"], state["charts_generated"] = trained0 + trained, generated0 + replay.added
    train_s = time.time() - t_start
    state["train_seconds"] = round(trained_s0 + train_s, 1)
    state.update(kinds_trained=dict(kinds), looks_trained=dict(looks))
    state["runs"].append({"steps": [start_step, state["step"]], "train_s": round(train_s, 1),
                          "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                          "charts_per_s": round((state["step"] - start_step) * p.batch_size / max(train_s, 1e-9), 1),
                          "charts_generated": replay.added, "charts": [start_index, state["next_index"]],
                          "stages": [dataclasses.asdict(s) for s in p.stages]})
    feeder.join(timeout=15)
    shutdown = getattr(batches, "_shutdown_workers", None)     # end the workers now, not at garbage collection
    if shutdown:
        shutdown()
    return state


# ---------------------------------------------------------------- the run
def fresh_state(p: PretrainPreset, tok_json: str, config: dict) -> dict:
    return {"format": 1, "preset": p.name, "seed": p.seed, "step": 0, "next_index": 0, "plan_minutes": p.plan_minutes,
            "charts_trained": 0, "charts_generated": 0, "train_seconds": 0.0, "kinds_trained": {}, "looks_trained": {},
            "held_out": p.held_out, "runs": [], "model_config": config, "tokenizer": tok_json}


def run(args) -> dict:
    t0 = time.time()
    import torch
    from tokenizers import Tokenizer

    from training import pretrain_data as data
    from training.pretrain_eval import evaluate, glyph_probe, table
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = None
    if args.resume:
        state, weights = load_checkpoint(Path(args.resume))
        p = PRESETS[args.preset or state["preset"]]
    else:
        p = PRESETS[args.preset or "demo"]
    p = p.replace(**parse_overrides(args.set or []))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if weights is None:
        texts = data.tokenizer_corpus(p.seed, p.tokenizer_charts, p.stages, p.held_out)
        tok_json = data.train_tokenizer(texts, p.vocab_size).to_str()
        hf_tok = hf_tokenizer(tok_json, p.max_length)
        state = fresh_state(p, tok_json, model_config(p, hf_tok))
    else:
        hf_tok = hf_tokenizer(state["tokenizer"], p.max_length)
    if args.plan_minutes:
        state["plan_minutes"] = args.plan_minutes
    state.setdefault("plan_minutes", p.plan_minutes)      # checkpoints of the step-planned first version
    tok = Tokenizer.from_str(state["tokenizer"])
    processor = build_processor(p, hf_tok)
    check_encoding(processor, tok, p)
    head_weights = {k[len(GLYPH_HEAD):]: weights.pop(k) for k in list(weights or {}) if k.startswith(GLYPH_HEAD)}
    model = build_model(state["model_config"], hf_tok, p.seed, weights).to(device)
    head = glyph_head(p)
    if head_weights:
        head.load_state_dict({k: v.float() for k, v in head_weights.items()})
    head = head.to(device)
    n_params = sum(t.numel() for t in model.parameters())
    log(f"preset {p.name}: {n_params / 1e6:.2f}M parameters ({n_params * 2 / 1e6:.1f} MB fp16), "
        f"{(p.image_size // p.patch_size) ** 2} image tokens, vocab {len(hf_tok)}, step {state['step']}, "
        f"device {device}", t0)
    cfg = StreamConfig(seed=p.seed, stages=p.stages, held_out=p.held_out, image_size=p.image_size,
                       image_tokens=(p.image_size // p.patch_size) ** 2, patch_size=p.patch_size,
                       max_length=p.max_length,
                       qa_per_chart=p.qa_per_chart, table_share=p.table_share, instruct_share=p.instruct_share,
                       tokenizer_json=state["tokenizer"], parent_pid=os.getpid())
    trains = not args.eval_only and args.steps > 0
    if trains:
        state = train(model, head, processor, p, state, cfg, out, args, t0, device)
    if trains:
        state["runs"][-1]["wall_s"] = round(time.time() - t0, 1)
    save_checkpoint(model, state, out / "ckpt", head)
    log(f"checkpoint at step {state['step']} -> {out / 'ckpt'}", t0)
    result = {}
    if not args.no_eval:
        final = p.stages[-1]
        seen = data.training_kinds(final, p.held_out)
        jobs = {"seen": [(i, p.test_seed, seen[i % len(seen)], final.look, p.image_size)
                         for i in range(p.eval_seen_charts)],
                "held_out": [(i, p.test_seed, p.held_out, final.look, p.image_size)
                             for i in range(p.eval_held_out_charts)],
                "seen_default": [(i, p.test_seed, seen[i % len(seen)], "default", p.image_size)
                                 for i in range(p.eval_default_charts)]}
        # a pool only pays for its start-up on a real test set
        charts = {k: data.test_charts(v, args.workers if len(v) >= 64 else 1) for k, v in jobs.items()}
        prior = data.answer_prior(p.seed, final, p.held_out, p.prior_charts)
        image_id, n_img = tok.token_to_id(IMAGE), (p.image_size // p.patch_size) ** 2
        encode_prompt = lambda q: data.encode(tok, data.prompt_text(q), [], image_id, n_img)[0]  # noqa: E731
        to_pixels = pixel_fn(processor, device)
        result = evaluate(model, hf_tok, charts, encode_prompt, to_pixels, prior, device,
                          p.eval_batch, table_charts=p.eval_table_charts, table_tokens=p.eval_table_tokens)
        result["glyph_probe"] = glyph_probe(model, to_pixels, device, p.eval_glyphs)
        result.update(step=state["step"], preset=p.name, held_out_kind=p.held_out, seen_kinds=list(seen),
                      look=final.look, test_seed=p.test_seed, params=n_params, train_seconds=state["train_seconds"],
                      device_seconds=round(sum(r.get("wall_s", 0) for r in state["runs"]), 1),
                      kinds_trained=state["kinds_trained"])
        atomic_write_json(out / "eval.json", result)
        if trains:       # the run's device time includes its eval
            state["runs"][-1]["wall_s"] = round(time.time() - t0, 1)
            result["device_seconds"] = round(sum(r.get("wall_s", 0) for r in state["runs"]), 1)
            atomic_write_json(out / "ckpt" / STATE, state)
            atomic_write_json(out / "eval.json", result)
        print(table(result), flush=True)
        log(f"eval: seen {result['seen']['relaxed']} (swapped {result['seen_swapped']['relaxed']}, "
            f"prior {result['seen_prior']['relaxed']}), held-out {result['held_out']['relaxed']} "
            f"in {result['eval_seconds']}s -> {out / 'eval.json'}", t0)
    if args.hf_dir:
        from training.pretrain_card import write_card
        if not result and args.card_from:        # a GPU run's eval.json, for an export made elsewhere
            result = json.loads(Path(args.card_from).read_text(encoding="utf-8"))
        export_hf(model, processor, Path(args.hf_dir), state)
        if result:
            write_card(result, state, Path(args.hf_dir))
        log(f"exported the model and processor{' and its card' if result else ''} to {args.hf_dir}", t0)
    log(f"done in {time.time() - t0:.1f}s", t0)
    return {"state": state, "eval": result}


def parse_overrides(pairs: list[str]) -> dict:
    """["batch_size=128", "lr=2e-3"] -> typed preset fields (the type of each field's default)."""
    fields = {f.name: f for f in dataclasses.fields(PretrainPreset)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in fields or key in ("name", "stages"):
            raise SystemExit(f"--set {pair}: not a preset field; choose from "
                             + ", ".join(k for k in fields if k not in ("name", "stages")))
        out[key] = type(getattr(PRESETS["demo"], key))(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training.pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="a PRESETS key (default: the checkpoint's, else demo)")
    ap.add_argument("--out", required=True, help="output folder: ckpt/, metrics.jsonl, eval.json")
    ap.add_argument("--resume", help="a checkpoint folder (OUT/ckpt of an earlier run) or an exported model "
                                     "(--hf-dir, e.g. assets/demo-llava) to continue from")
    ap.add_argument("--minutes", type=float, default=8.0, help="training time of this run")
    ap.add_argument("--deadline-s", type=float, default=540.0,
                    help="wall-clock budget of the whole run from start, the eval and the save included")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="chart-drawing processes")
    ap.add_argument("--steps", type=int, default=10**9, help="at most this many steps in this run")
    ap.add_argument("--plan-minutes", type=float, default=0.0,
                    help="training minutes summed over all runs, the end of the decay (default: the checkpoint's, "
                         "else the preset's); raise it to train on after the plan was reached")
    ap.add_argument("--eval-only", action="store_true", help="no training: score --resume's checkpoint")
    ap.add_argument("--no-eval", action="store_true", help="skip the end-of-run evaluation")
    ap.add_argument("--hf-dir", help="also write the model + processor here in the Hugging Face layout")
    ap.add_argument("--card-from", metavar="EVAL_JSON",
                    help="with --hf-dir and --no-eval: write the model card from this eval.json (a GPU run's)")
    ap.add_argument("--set", nargs="*", metavar="FIELD=VALUE", help="override preset fields, e.g. batch_size=128")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model's forward")
    ap.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
    # end now: a daemon thread still waiting on a chart worker must not hold the interpreter's exit
    os._exit(0)
