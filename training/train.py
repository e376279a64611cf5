"""Fine-tune a LLaVA-family model on chart QA: QLoRA, LoRA or full, locally or as a SageMaker job.

    python -m training.train --config run.yaml [--lora_r 64 ...]            # flags override the file
    python -m training.train --preset demo-cpu --model workspace/models/demo-llava \\
        --data workspace/datasets/demo --output_dir workspace/runs/demo      # the tiny model, on CPU
    torchrun --nproc_per_node 4 -m training.train --config run.yaml         # several GPUs

Reads top to bottom: config -> model (+4-bit, +LoRA) -> data -> train -> save. The result is
OUTPUT/adapter/ (PEFT adapter; the projector rides along through `modules_to_save`, so
`disable_adapter()` gives the base back), its train_config.yaml and a model card. OUTPUT/metrics.jsonl has
one line per log. SIGTERM (Ctrl-C, `stop`, a spot interruption) saves a checkpoint and exits 143; running
again continues from the newest complete checkpoint (`--resume auto`, the default; training.checkpoints)
with the data order and RNG states of the uninterrupted run, so both end with the same adapter. On
SageMaker the same script reads SM_CHANNEL_TRAIN / SM_MODEL_DIR / SM_OUTPUT_DATA_DIR and checkpoints to
/opt/ml/checkpoints.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from charts.io import append_jsonl, atomic_write_json, atomic_write_text
from training.checkpoints import (COMPLETE_MARKER, ResumeError, checkpoint_global_step, choose_resume,
                                  complete_checkpoints, remove_checkpoints, set_aside_incomplete, trim_metrics)
from training.config import ConfigError, TrainConfig, parse_args
from training.data import (ChatDataset, Collator, EpochSampler, first_question, image_side, load_image, read_records,
                           split_file)
from training.packing import PackingCollator

DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"
DEEPSPEED = {"none": None, "zero2": "zero2.json", "zero3_offload": "zero3_offload.json"}
SAGEMAKER_CHECKPOINTS = Path("/opt/ml/checkpoints")
INTERRUPTED_EXIT = 143      # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class TrainError(RuntimeError):
    """A run refused or failed for a reason the user can act on; the message says what to do."""


# ---------------------------------------------------------------- config checks
def resolve_paths(cfg: TrainConfig, env=os.environ) -> tuple[TrainConfig, dict]:
    """Where data comes from and results go; on SageMaker the toolkit's folders win."""
    changes, paths = {}, {}
    if env.get("SM_CHANNEL_TRAIN") and (not cfg.data or cfg.data.startswith("s3://")):
        changes["data"] = env["SM_CHANNEL_TRAIN"]
    if env.get("SM_CHANNEL_MODEL"):
        changes["model"] = env["SM_CHANNEL_MODEL"]      # a local base model the launcher uploaded
    if env.get("SM_MODEL_DIR"):
        changes["output_dir"] = env["SM_MODEL_DIR"]      # uploaded as model.tar.gz when the job ends
    cfg = cfg.replace(**changes)
    out = Path(cfg.output_dir)
    paths["metrics"] = Path(env["SM_OUTPUT_DATA_DIR"]) / "metrics.jsonl" if env.get("SM_OUTPUT_DATA_DIR") \
        else out / "metrics.jsonl"
    # SageMaker syncs /opt/ml/checkpoints to the job's checkpoint S3 URI, and back after a spot restart.
    paths["checkpoints"] = SAGEMAKER_CHECKPOINTS if SAGEMAKER_CHECKPOINTS.is_dir() else out / "checkpoints"
    paths["adapter"] = out / ("model" if cfg.mode == "full" else "adapter")
    return cfg, paths


def deepspeed_config(cfg: TrainConfig) -> str | None:
    """Path of the DeepSpeed JSON for `cfg.deepspeed`; QLoRA + ZeRO-3 is refused (4-bit weights cannot
    be partitioned by ZeRO-3: LLaVA's own scripts use ZeRO-2 for QLoRA)."""
    name = DEEPSPEED[cfg.deepspeed]
    if name is None:
        return None
    if cfg.mode == "qlora" and cfg.deepspeed.startswith("zero3"):
        raise TrainError("QLoRA cannot be combined with DeepSpeed ZeRO-3: use --deepspeed zero2, or --mode lora "
                         "with zero3_offload if the bf16 model does not fit")
    return str(DEEPSPEED_DIR / name)


def check_output(adapter_dir: Path, overwrite: bool) -> None:
    if (adapter_dir / "adapter_config.json").exists() or (adapter_dir / "config.json").exists():
        if not overwrite:
            raise TrainError(f"{adapter_dir} already holds a trained model; pass --overwrite to replace it, "
                             "or choose another --output_dir")


def check_data(data: str) -> None:
    """Refuse a dataset that fails charts.validate, with its report."""
    import charts

    if not data or not Path(data).exists():
        raise TrainError(f"dataset {data!r} not found: give a folder with train.jsonl (python -m charts generate) "
                         "or a .jsonl file")
    report = charts.validate(data)
    if not report.ok:
        raise TrainError(f"dataset {data} failed validation; fix it before training:\n{report.to_text()}")


def resolve_model(model: str) -> str:
    """A local folder, or a hub id that is reachable (or cached) - otherwise a clear message."""
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    if Path(model).exists() or model.startswith(("/", "./", "~")) or model.count("/") > 1:
        raise TrainError(f"model {model!r}: no such model folder")
    from huggingface_hub import hf_hub_download
    try:
        hf_hub_download(model, "config.json")
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        raise TrainError(f"model {model!r} is not a local folder and not reachable on the Hugging Face hub"
                         + (" (offline: HF_HUB_OFFLINE=1 and not in the local cache)" if offline else f" ({e})"))
    return model


def lora_targets(model, pattern: str, forbidden: list[str]) -> list[str]:
    """Module names the regex (full match, as PEFT applies it) selects; refuses vision/projector hits."""
    import torch

    hits = [n for n, m in model.named_modules() if re.fullmatch(pattern, n) and isinstance(m, torch.nn.Linear)
            or (re.fullmatch(pattern, n) and type(m).__name__.startswith("Linear"))]
    bad = [n for n in hits if any(n == f or n.startswith(f + ".") for f in forbidden)]
    if bad:
        raise TrainError(f"--lora_target {pattern!r} selects {len(bad)} module(s) of the vision tower or projector "
                         f"(e.g. {bad[0]}); LoRA goes on the language model only: anchor the regex on "
                         "'language_model'")
    if not hits:
        raise TrainError(f"--lora_target {pattern!r} selects no linear layer of the model")
    return hits


# ---------------------------------------------------------------- model
def auto_flag(value: str, available: bool) -> bool:
    return available if value == "auto" else value == "true"


def load_model(cfg: TrainConfig, model_path: str, bf16: bool):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from eval.local import skip_modules

    config = AutoConfig.from_pretrained(model_path)
    keep_full = skip_modules(config)          # full names: vision tower, projector, lm_head
    kwargs = {"attn_implementation": cfg.attn_implementation}
    if cfg.mode == "qlora":
        if not torch.cuda.is_available():
            raise TrainError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit training is unreliable on CPU); "
                             "use --mode lora on CPU")
        from transformers import BitsAndBytesConfig
        compute = torch.bfloat16 if bf16 else torch.float16
        kwargs.update(dtype=compute, device_map={"": int(os.environ.get("LOCAL_RANK", 0))},
                      quantization_config=BitsAndBytesConfig(
                          load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                          bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=keep_full))
    elif cfg.mode == "lora":
        kwargs["dtype"] = torch.bfloat16 if bf16 else torch.float32
    else:   # full: fp32 master weights, bf16 autocast (ZeRO shards them when they do not fit)
        kwargs["dtype"] = torch.float32
    model = AutoModelForImageTextToText.from_pretrained(model_path, **kwargs)
    processor = AutoProcessor.from_pretrained(model_path)
    return model, processor, keep_full


def add_lora(model, cfg: TrainConfig, keep_full: list[str], bf16: bool = False):
    """LoRA on the LM's linears; projector trained in full via modules_to_save; vision tower frozen.
    The trained pieces are bf16 under bf16 mixed precision with adapter_dtype bfloat16, else fp32."""
    import torch
    from peft import LoraConfig, get_peft_model

    vision = [n for n in keep_full if "projector" not in n and n != "lm_head"]
    projector = [n for n in keep_full if "projector" in n]
    if cfg.mode == "full":
        for name, p in model.named_parameters():
            frozen = any(name.startswith(v + ".") for v in vision)
            frozen |= not cfg.train_projector and any(name.startswith(q + ".") for q in projector)
            p.requires_grad_(not frozen)
        return model
    lora_targets(model, cfg.lora_target, vision + projector)
    peft_config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_target,
        modules_to_save=([n.rsplit(".", 1)[-1] for n in projector] if cfg.train_projector else [])
        + [m.strip() for m in cfg.modules_to_save.split(",") if m.strip()] or None,
        task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_config)
    # PEFT upcasts LoRA weights to fp32. In bf16 they take half the memory with their gradients and AdamW
    # state (r128 on a 7B model: ~2.5 GB less), as TRL does for QLoRA; autocast computes in bf16 either way.
    dtype = torch.bfloat16 if bf16 and cfg.adapter_dtype == "bfloat16" else torch.float32
    for p in model.parameters():       # the frozen base stays bf16 / 4-bit
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def projector_param(name: str) -> bool:
    return "multi_modal_projector" in name or "mm_projector" in name


# ---------------------------------------------------------------- trainer and callbacks
def _trainer_class():
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    class LlavaTrainer(Trainer):
        """Two learning rates (projector vs language model), and length groups from precomputed lengths
        (the stock sampler would decode every image to measure it)."""

        projector_lr: float = 2e-5
        loss_impl: str = "hf"

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Evaluation keeps the stock path: prediction_step may collect the logits it returns.
            if self.loss_impl == "hf" or not model.training or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            from training.loss import MaskUnsupported, answer_loss
            try:
                loss, outputs = answer_loss(model, inputs, self.loss_impl, num_items_in_batch)
            except MaskUnsupported as e:     # nothing was backpropagated: the stock loss takes this batch over
                print(f"loss_impl {self.loss_impl}: {e}; the rest of the run uses the stock loss (loss_impl hf)",
                      flush=True)
                self.loss_impl = "hf"
                return self.compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # As Trainer.compute_loss scales a loss normalised by num_items_in_batch (counted over all ranks):
            # DDP averages the gradients across ranks.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                loss = loss * (self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu)
            return (loss, outputs) if return_outputs else loss

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                opt_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
                named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
                groups = [{"params": [p for n, p in named if not projector_param(n)], "lr": self.args.learning_rate,
                           "weight_decay": self.args.weight_decay, "name": "language_model"},
                          {"params": [p for n, p in named if projector_param(n)], "lr": self.projector_lr,
                           "weight_decay": 0.0, "name": "projector"}]
                self.optimizer = opt_cls([g for g in groups if g["params"]], **kwargs)
            return self.optimizer

        def _get_train_sampler(self, *args, **kwargs):
            # The order of every epoch is a function of (seed, epoch) alone. Samplers drawing from the global
            # RNG (the stock LengthGroupedSampler) shuffle a resumed epoch differently from the uninterrupted
            # run: the global RNG at resume time is not the one the original epoch started with.
            lengths = getattr(self.train_dataset, "lengths", None)
            grouped = self.group_by_length and lengths
            self.epoch_sampler = EpochSampler(len(self.train_dataset), seed=self.args.data_seed or self.args.seed,
                                              batch_size=self.args.train_batch_size
                                              * self.args.gradient_accumulation_steps,
                                              lengths=lengths if grouped else None)
            return self.epoch_sampler

        def _run_epoch(self, *args, **kwargs):
            # The sampler is told its epoch here, not through the loader: with several processes a resumed
            # epoch's loader nests the sampler four deep (skip -> shard -> batch -> sampler) and neither
            # accelerate's set_epoch nor the Trainer's reaches it; the resumed epoch would be read in epoch
            # 0's order (each rank its shard of it) and end with a different adapter.
            epoch = kwargs["epoch"] if "epoch" in kwargs else args[1]
            if getattr(self, "epoch_sampler", None) is not None:
                self.epoch_sampler.set_epoch(epoch)
            return super()._run_epoch(*args, **kwargs)

        def _save_checkpoint(self, model, trial):
            # Rotation waits until the new checkpoint is marked complete: HF rotates inside its save, so a
            # kill between the two could leave only an unmarked newest checkpoint (save_total_limit 1).
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            if self.args.should_save:
                (folder / COMPLETE_MARKER).unlink(missing_ok=True)    # saved again (SIGTERM on a save step)
            limit = self.args.save_total_limit
            self.args.save_total_limit = None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            if self.args.world_size > 1:
                self.accelerator.wait_for_everyone()      # every rank's shards are on disk
            if self.args.should_save:
                atomic_write_json(folder / COMPLETE_MARKER, {"step": self.state.global_step, "time": time.time()})
                rotate_checkpoints(output_dir=str(folder.parent), save_total_limit=limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint)

    return LlavaTrainer


def _callbacks(metrics_path: Path, processor, questions: list[dict], cfg: TrainConfig, stop: threading.Event):
    from transformers import TrainerCallback

    class MetricsFile(TrainerCallback):
        """OUTPUT/metrics.jsonl: one line per Trainer log (what the tab plots)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                append_jsonl(metrics_path, {"step": state.global_step, "epoch": state.epoch, "time": time.time(),
                                            **{k: v for k, v in logs.items() if k != "total_flos"}})

    class RelaxedAccuracy(TrainerCallback):
        """At each evaluation: greedy answers of the model being trained (adapter active) to val questions,
        scored with relaxed accuracy; printed the way Trainer prints logs, for SageMaker's metric regexes."""

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
            if not questions or not state.is_world_process_zero or cfg.deepspeed == "zero3_offload":
                return
            acc = relaxed_accuracy(model, processor, questions, cfg)
            if metrics is not None:
                metrics["eval_relaxed_accuracy"] = acc
            state.log_history.append({"eval_relaxed_accuracy": acc, "epoch": state.epoch, "step": state.global_step})
            print({"eval_relaxed_accuracy": round(acc, 4), "epoch": state.epoch}, flush=True)
            append_jsonl(metrics_path, {"step": state.global_step, "epoch": state.epoch, "time": time.time(),
                                        "eval_relaxed_accuracy": acc})

    class StopOnSignal(TrainerCallback):
        """SIGTERM -> save a checkpoint at the end of the current step, then stop. Under torchrun every rank
        gets the signal, but not at the same step: a rank that stopped alone would wait in the checkpoint's
        barrier while the others wait in the next step's gradient all-reduce. So the ranks agree each step
        (one all-reduce of a flag) and all stop at the same one."""

        def on_step_end(self, args, state, control, **kwargs):
            if stopping(stop, args):
                control.should_save = True
                control.should_training_stop = True

    return [MetricsFile(), RelaxedAccuracy(), StopOnSignal()]


def stopping(stop: threading.Event, args) -> bool:
    """Whether any rank was asked to stop (this process alone when not distributed). Sets `stop` on every
    rank when one was, so that after training all ranks take the "interrupted" path together."""
    import torch

    if args.world_size <= 1 or not torch.distributed.is_initialized():
        return stop.is_set()
    flag = torch.tensor([int(stop.is_set())], device=args.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item():
        stop.set()
    return stop.is_set()


def relaxed_accuracy(model, processor, questions: list[dict], cfg: TrainConfig, batch_size: int = 8) -> float:
    import torch

    from eval.metrics import relaxed_correctness

    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(questions), batch_size):
            chunk = questions[i:i + batch_size]
            answers = generate(model, processor, chunk, cfg)
            correct += sum(relaxed_correctness(q["answer"], a.strip()) for q, a in zip(chunk, answers))
    finally:
        model.train(was_training)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return correct / len(questions)


def generate(model, processor, questions: list[dict], cfg: TrainConfig) -> list[str]:
    """Greedy answers, batched with left padding (as inference does)."""
    import torch

    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": q["question"]}]}], add_generation_prompt=True) for q in questions]
    images = [load_image(q["image"], cfg.image_aspect_ratio, image_side(processor)) for q in questions]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True, padding_side="left",
                       add_special_tokens=False).to(next(model.parameters()).device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype if hasattr(model, "dtype") else torch.float32)
    # The Trainer runs forward passes under bf16 autocast; generation outside it would feed bf16 activations
    # into the fp32 LoRA / projector weights that (Q)LoRA keeps trainable, and fail on the dtype mismatch.
    device = next(model.parameters()).device
    mixed = device.type == "cuda" and any(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
        out = model.generate(**inputs, max_new_tokens=cfg.eval_max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=processor.tokenizer.pad_token_id)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# ---------------------------------------------------------------- the run
def train(cfg: TrainConfig, callbacks: list | None = None, env=os.environ) -> dict:
    """Run one fine-tune; returns {"status": "completed" | "interrupted", "adapter", "metrics", ...}.
    Raises TrainError for problems the user must fix."""
    import torch
    from transformers import TrainingArguments

    # 1. config
    cfg.validate()              # fields may have been set after construction
    cfg, paths = resolve_paths(cfg, env)
    out, adapter_dir = Path(cfg.output_dir), paths["adapter"]
    check_output(adapter_dir, cfg.overwrite)
    ds_config = deepspeed_config(cfg)
    check_data(cfg.data)
    model_path = resolve_model(cfg.model)
    on_cuda = torch.cuda.is_available()
    bf16 = auto_flag(cfg.bf16, on_cuda and torch.cuda.is_bf16_supported())
    tf32 = auto_flag(cfg.tf32, on_cuda and torch.cuda.get_device_capability()[0] >= 8)
    packing = auto_flag(cfg.packing, on_cuda)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = paths["checkpoints"]
    main_process = int(env.get("RANK", "0")) == 0
    if main_process:
        (out / "result.json").unlink(missing_ok=True)     # it describes an earlier attempt, not this one
        if cfg.overwrite:
            paths["metrics"].unlink(missing_ok=True)      # a fresh run gets a fresh curve
            if cfg.resume in ("auto", "never"):
                remove_checkpoints(ckpt_dir)            # never to be resumed by a later run of this folder
        set_aside_incomplete(ckpt_dir)
    try:
        resume = choose_resume(cfg, ckpt_dir, say=print if main_process else (lambda *_: None))
    except ResumeError as e:
        raise TrainError(str(e)) from None
    if main_process:        # one writer per file: every rank runs this function under torchrun
        trim_metrics(paths["metrics"], checkpoint_global_step(resume) if resume else 0)
        cfg.to_yaml(out / "train_config.yaml")

    # 2. model (+4-bit, +LoRA; vision tower frozen, projector trained in full)
    torch.manual_seed(cfg.seed)
    model, processor, keep_full = load_model(cfg, model_path, bf16)
    if cfg.liger and on_cuda:       # Liger's kernels are Triton: GPU only
        from training.loss import apply_liger
        apply_liger(model)
    if packing:
        from training.packing import packed_attention
        print(f"packing: attention over packed rows by {packed_attention(model, cfg.attn_implementation, on_cuda)}")
    model = add_lora(model, cfg, keep_full, bf16)
    if cfg.fused_lora and cfg.mode != "full":
        from training.fused_lora import fuse_lora
        reuse = cfg.reuse_dequantized and cfg.gradient_checkpointing and cfg.mode == "qlora"
        n = fuse_lora(model, cfg.fused_lora_siblings, cfg.fused_lora_one_node, reuse)
        print(f"fused_lora: {n} LoRA linears add their update inside the matmul"
              + (" (q/k/v and gate/up share one A matmul)" if cfg.fused_lora_siblings else "")
              + (" (one autograd node per half)" if cfg.fused_lora_one_node else "")
              + (" (4-bit backward reuses the dequantized weight)" if reuse else ""))
    if cfg.compile:
        from training.compiling import compile_layers
        print(f"compile: {compile_layers(model)['layers']} decoder layers compiled (torch.compile, regional)")

    # 3. data: answer-only labels from the model's own chat template
    train_records = read_records(split_file(cfg.data, "train"))
    if cfg.max_train_samples:
        train_records = train_records[:cfg.max_train_samples]
    val_file = split_file(cfg.data, "val")
    val_records = read_records(val_file)[:cfg.eval_limit] if val_file and cfg.eval_limit else []
    cache = cfg.dataloader_workers == 0
    train_set = ChatDataset(train_records, processor, cfg.max_length, cfg.image_aspect_ratio, cache)
    val_set = ChatDataset(val_records, processor, cfg.max_length, cfg.image_aspect_ratio, cache) if val_records else None
    if not len(train_set):
        raise TrainError(f"no training sample fits in --max_length {cfg.max_length} tokens (image tokens included)")
    questions = [dict(zip(("question", "answer"), first_question(r)), image=r["image"]) for r in val_records]

    # 4. train
    evaluate = val_set is not None and cfg.eval_steps > 0
    args = TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        bf16=bf16, tf32=tf32 if on_cuda else None, optim=cfg.optim,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        eval_strategy="steps" if evaluate else "no", eval_steps=cfg.eval_steps if evaluate else None,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps, logging_first_step=True, report_to="none", disable_tqdm=True,
        seed=cfg.seed, remove_unused_columns=False, dataloader_num_workers=cfg.dataloader_workers,
        # workers kept across epochs (and evaluations): restarting them re-imports torch and refills the queue
        dataloader_persistent_workers=cfg.dataloader_workers > 0, dataloader_pin_memory=on_cuda,
        deepspeed=ds_config, use_cpu=not on_cuda)
    stop = threading.Event()
    collator = (PackingCollator if packing else Collator)(processor.tokenizer.pad_token_id)
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                               data_collator=collator,
                               callbacks=_callbacks(paths["metrics"], processor, questions, cfg, stop)
                               + list(callbacks or []))
    trainer.projector_lr, trainer.group_by_length = cfg.mm_projector_lr, cfg.group_by_length
    trainer.loss_impl = cfg.loss_impl
    previous = _on_sigterm(stop)
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except torch.cuda.OutOfMemoryError as e:
        raise TrainError("CUDA out of memory: try --mode qlora, a smaller --per_device_batch_size (with a larger "
                         "--grad_accum), --gradient_checkpointing, a shorter --max_length, or "
                         "--deepspeed zero3_offload (LoRA/full)") from e
    finally:
        _restore_sigterm(previous)
    if stop.is_set():
        newest = complete_checkpoints(ckpt_dir)
        return _finish(out, {"status": "interrupted", "step": trainer.state.global_step,
                             "checkpoint": str(newest[-1]) if newest else None}, main_process)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if val_set is not None and (not evals or evals[-1].get("step") != trainer.state.global_step):
        trainer.evaluate()      # the final numbers for the model card, unless the last step just had them
    metrics = {k: _last(trainer, k) for k in ("eval_loss", "eval_relaxed_accuracy")}

    # 5. save: adapter (+ projector) + config + model card, on the main process only
    final = {"step": trainer.state.global_step, "train_loss": _last(trainer, "loss"),
             **{k: v for k, v in metrics.items() if v is not None}}
    zero3 = cfg.deepspeed.startswith("zero3")
    if zero3:
        # ZeRO-3 leaves each rank 1/world of every parameter: save_pretrained on rank 0 alone writes empty
        # tensors. The Trainer gathers the trained ones to rank 0 when every rank calls save_model.
        trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        save_adapter(trainer.model, processor, cfg, adapter_dir, final, weights=not zero3)
    return _finish(out, {"status": "completed", "adapter": str(adapter_dir), "metrics": final,
                         "world_size": args.world_size,
                         "effective_batch_size": args.world_size * args.per_device_train_batch_size
                         * args.gradient_accumulation_steps}, main_process)


def _last(trainer, key):
    values = [h[key] for h in trainer.state.log_history if key in h]
    return values[-1] if values else None


def _finish(out: Path, result: dict, main_process: bool = True) -> dict:
    if main_process:        # rank 0 speaks for the run; the others' result would only race it
        atomic_write_json(out / "result.json", {**result, "time": time.time()})
    return result


def _on_sigterm(stop: threading.Event):
    if threading.current_thread() is not threading.main_thread():
        return None             # signal handlers can only be set from the main thread (the studio's demo)
    return signal.signal(signal.SIGTERM, lambda *_: stop.set())


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def save_adapter(model, processor, cfg: TrainConfig, adapter_dir: Path, metrics: dict, weights: bool = True) -> None:
    """The weights (unless the Trainer just saved them), config, processor for a full model, model card."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    if weights:
        model.save_pretrained(adapter_dir)
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)   # Trainer.save_model's pickle: not a model file
    if cfg.mode == "full":
        processor.save_pretrained(adapter_dir)
    cfg.to_yaml(adapter_dir / "train_config.yaml")
    atomic_write_text(adapter_dir / "README.md", model_card(cfg, metrics))


def model_card(cfg: TrainConfig, metrics: dict) -> str:
    recipe = ["mode", "lora_r", "lora_alpha", "lora_dropout", "lora_target", "train_projector", "learning_rate",
              "mm_projector_lr", "lr_scheduler", "warmup_ratio", "epochs", "max_steps", "per_device_batch_size",
              "grad_accum", "max_length", "image_aspect_ratio", "deepspeed", "seed"]
    rows = "\n".join(f"| {k} | `{getattr(cfg, k)}` |" for k in recipe)
    scores = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                       for k, v in metrics.items() if v is not None)
    return f"""---
base_model: {cfg.model}
library_name: peft
tags: [llava, chart-qa, {cfg.mode}]
---
# Chart-QA {cfg.mode} adapter for `{cfg.model}`

Trained on `{cfg.data}` with `python -m training.train --config train_config.yaml`. The multimodal projector
was {"trained in full and is saved inside this adapter (`modules_to_save`)" if cfg.train_projector else "frozen"};
the vision tower was frozen; LoRA sits on the language model's linear layers only.

## Recipe
| setting | value |
|---|---|
{rows}

## Final metrics
| metric | value |
|---|---|
{scores}

## Use
```python
from transformers import AutoModelForImageTextToText, AutoProcessor
from peft import PeftModel
base = AutoModelForImageTextToText.from_pretrained("{cfg.model}")
model = PeftModel.from_pretrained(base, "path/to/this/folder")   # base answers: `with model.disable_adapter():`
```
"""


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except ConfigError as e:        # before any model loads: one line, no traceback
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        result = train(cfg)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if Path(cfg.output_dir).is_dir():
            _finish(Path(cfg.output_dir), {"status": "failed", "error": str(e)}, int(os.environ.get("RANK", "0")) == 0)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)
    return INTERRUPTED_EXIT if result["status"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
