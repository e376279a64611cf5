"""`TrainConfig`: the one description of a fine-tuning run.

Each field is documented once, in its `help`. From the dataclass come the CLI flags of
`python -m training.train`, the YAML files (`--config run.yaml`), the Fine-tune tab's form, the
SageMaker hyperparameters, and the `train_config.yaml` saved beside every adapter. It is a
`charts.config.JobConfig` like the other jobs' configs (dict / YAML round trip, `option` fields, `ConfigError`),
with its own flags (`--lora_r`, in groups) because SageMaker passes hyperparameters as `--name value`:

    cfg = TrainConfig.from_yaml("run.yaml")
    cfg = parse_args(["--config", "run.yaml", "--lora_r", "64"])      # flags override the file
    hp = to_hyperparameters(cfg)                                        # and back: from_hyperparameters(hp)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

# ConfigError is charts.config's, re-exported: `from training.config import ConfigError` names the same class.
from charts.config import ConfigError, JobConfig, boolean, option

# LoRA goes on the language model's linear layers only: a bare ["q_proj", "v_proj"] would also hit
# the CLIP tower's attention, which LLaVA keeps frozen.
LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class TrainConfig(JobConfig):
    cli = "python -m training.train"
    # Checked however it is made (CLI, YAML, form, launcher, preset, replace), before any model loads: a bad
    # value costs a one-line message, not a model load and a traceback.
    validate_on_init = True

    # --- what to train on, and where the result goes
    model: str = option("llava-hf/llava-1.5-7b-hf", "Base model: a local folder or a Hugging Face hub id.",
                        group="data")
    data: str = option("", "Dataset folder with train.jsonl/val.jsonl (LLaVA conversation format) or one .jsonl "
                           "file; for SageMaker an s3:// prefix (empty: the SM_CHANNEL_TRAIN folder).", group="data")
    output_dir: str = option("runs/run", "Run folder: metrics.jsonl, checkpoints/, adapter/.", group="data")
    overwrite: bool = option(False, "Start over: replace an adapter already in output_dir (otherwise the run is "
                                    "refused) and ignore its checkpoints.", group="data")
    # --- recipe
    mode: str = option("qlora", "qlora: 4-bit nf4 base + LoRA; lora: bf16 base + LoRA; full: train the whole "
                                "language model.", choices=("qlora", "lora", "full"), group="recipe")
    lora_r: int = option(128, "LoRA rank.", group="recipe")
    lora_alpha: int = option(256, "LoRA alpha (scale = alpha / r).", group="recipe")
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.", group="recipe")
    lora_target: str = option(LM_LINEARS, "Regex (full match) of module names that get LoRA; must not hit the "
                                          "vision tower.", group="recipe")
    train_projector: bool = option(True, "Train the multimodal projector in full (saved inside the adapter).",
                                   group="recipe")
    modules_to_save: str = option("", "More modules trained in full and saved in the adapter, comma-separated "
                                      "(e.g. lm_head,embed_tokens, when new tokens must be learnt).",
                                  group="recipe")
    learning_rate: float = option(2e-4, "Peak learning rate of the language model (LoRA) weights.", group="recipe")
    mm_projector_lr: float = option(2e-5, "Peak learning rate of the projector.", group="recipe")
    weight_decay: float = option(0.0, "AdamW weight decay.", group="recipe")
    lr_scheduler: str = option("cosine", "Learning-rate schedule after warmup.",
                               choices=("cosine", "linear", "constant_with_warmup"), group="recipe")
    warmup_ratio: float = option(0.03, "Fraction of the steps spent warming up.", group="recipe")
    epochs: float = option(1.0, "Passes over the training split (ignored when max_steps > 0).", group="recipe")
    max_steps: int = option(-1, "Stop after this many optimizer steps (-1: run all epochs).", group="recipe")
    per_device_batch_size: int = option(8, "Samples per GPU per forward pass.", group="recipe")
    grad_accum: int = option(1, "Forward passes per optimizer step.", group="recipe")
    max_length: int = option(2048, "Longest sample in tokens, image tokens included; longer samples are "
                                   "dropped (truncating would cut image tokens or answers).", group="recipe")
    image_aspect_ratio: str = option("pad", "pad: centre the chart on a square of its mean colour (LLaVA); "
                                            "none: let the processor crop.", choices=("pad", "none"), group="recipe")
    # --- speed and memory
    bf16: str = option("auto", "bf16 mixed precision (auto: on when the GPU supports it).",
                       choices=("auto", "true", "false"), group="speed")
    tf32: str = option("auto", "TF32 matmuls on Ampere+ GPUs (auto: on when available).",
                       choices=("auto", "true", "false"), group="speed")
    gradient_checkpointing: bool = option(True, "Recompute activations in backward: less memory, ~30% slower.",
                                          group="speed")
    group_by_length: bool = option(True, "Batch samples of similar length together (less padding).", group="speed")
    attn_implementation: str = option("sdpa", "Attention kernel passed to from_pretrained.",
                                      choices=("sdpa", "eager", "flash_attention_2"), group="speed")
    optim: str = option("adamw_torch", "Optimizer name as TrainingArguments knows it (e.g. paged_adamw_8bit).",
                        group="speed")
    deepspeed: str = option("none", "DeepSpeed ZeRO config shipped in training/deepspeed/ (zero2 for QLoRA; "
                                    "zero3_offload for full runs short of memory).",
                            choices=("none", "zero2", "zero3_offload"), group="speed")
    loss_impl: str = option("liger", "Training loss: chunked = from the answer positions only, their logits made "
                                     "1024 tokens at a time (no full-vocabulary logits for the batch); liger = "
                                     "the same with Liger's fused kernel (GPU with liger_kernel, else chunked: "
                                     "fastest and smallest on an H200, docs/BENCHMARKS.md); hf = the model's own "
                                     "loss over logits of every position.",
                            choices=("chunked", "liger", "hf"), group="speed")
    liger: bool = option(True, "Liger kernels for RMSNorm, SwiGLU and RoPE (GPU with liger_kernel installed; "
                               "skipped with a warning otherwise).", group="speed")
    adapter_dtype: str = option("bfloat16", "Dtype of the trained LoRA and projector weights (and their optimizer "
                                            "state) under bf16 mixed precision: bfloat16 halves their memory (as TRL "
                                            "and the QLoRA paper do); float32 as PEFT upcasts them. Without bf16 "
                                            "(CPU) they stay float32.",
                                choices=("bfloat16", "float32"), group="speed")
    packing: str = option("auto", "Padding-free batches: a batch's samples end to end in one row, position ids "
                                  "restarting per sample, attention kept within each sample (on CUDA torch's "
                                  "varlen flash kernel when it runs, else SDPA with a block-diagonal mask; "
                                  "flash_attention_2 reads the same boundaries). The loss is unchanged; no pad "
                                  "tokens are computed; a batch of equal lengths has none and stays a plain batch. "
                                  "auto: on with CUDA (where it was measured faster, docs/BENCHMARKS.md), off on "
                                  "CPU.", choices=("auto", "true", "false"), group="speed")
    fused_lora: bool = option(True, "Each LoRA linear adds its low-rank update inside the second matmul "
                                    "(addmm's epilogue) instead of PEFT's clone, scale and add over the layer's "
                                    "output: same arithmetic, fewer passes over memory.", group="speed")
    fused_lora_siblings: bool = option(True, "With fused_lora, the q/k/v and the gate/up linears of a layer, which "
                                             "read one input, share its dropout mask and one matmul with their A "
                                             "matrices stacked (LoRA on a fused qkv_proj): fewer kernels, the same "
                                             "parameters; one mask where PEFT draws three.", group="speed")
    fused_lora_one_node: bool = option(True, "With fused_lora, each half of a LoRA linear's low-rank path (dropout "
                                             "and A; B's addmm) is one autograd node with a written-out backward: "
                                             "the same kernels and numbers, less host time per step.", group="speed")
    reuse_dequantized: bool = option(True, "With fused_lora and gradient checkpointing, a 4-bit layer's backward "
                                           "reuses the bf16 weight dequantized in checkpoint's recompute instead "
                                           "of dequantizing it again: one layer's weights more memory (about 0.4 "
                                           "GB for a 7B model), fewer kernels and host time. With "
                                           "fused_lora_one_node, 13% faster on chart QA on an H200.", group="speed")
    compile: bool = option(False, "torch.compile each decoder layer of the language model (regional: one compile "
                                  "shared by all layers, under gradient checkpointing and LoRA); if a layer fails "
                                  "to compile the layers run eagerly, with the reason logged.", group="speed")
    dataloader_workers: int = option(2, "Processes that load and preprocess images.", group="speed")
    # --- evaluation, checkpoints, logging
    eval_steps: int = option(50, "Evaluate (val loss + relaxed accuracy) every N steps; 0: only at the end.",
                             group="eval")
    eval_limit: int = option(100, "Val questions answered by greedy generation at each evaluation.", group="eval")
    eval_max_new_tokens: int = option(16, "Tokens generated per val answer.", group="eval")
    save_steps: int = option(50, "Checkpoint every N steps.", group="eval")
    save_total_limit: int = option(2, "Checkpoints kept (oldest deleted).", group="eval")
    logging_steps: int = option(5, "Log loss and learning rate every N steps.", group="eval")
    resume: str = option("auto", "auto: continue from the newest complete checkpoint if any; never: start over; "
                                 "or a checkpoint folder.", group="eval")
    seed: int = option(42, "Random seed (data order, LoRA init).", group="eval")
    max_train_samples: int = option(0, "Use only the first N training samples (0: all).", group="eval")

    def problems(self) -> list[str | None]:
        return [check(self) for check in _CHECKS]


# The optimizer names TrainingArguments accepts (transformers.training_args.OptimizerNames, kept here so
# checking a config needs no torch import; tests/test_train_config.py compares the two).
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit",
    "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit",
    "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb",
    "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor",
    "galore_adamw_layerwise", "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo",
    "grokadamw", "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw",
    "apollo_adamw_layerwise", "stable_adamw")


def _at_least(name: str, low, note: str = ""):
    def check(cfg):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
            return f"{name}: {value!r} must be >= {low}{note}"
    return check


def _between(name: str, low: float, high: float, high_open: bool = True):
    def check(cfg):
        value = getattr(cfg, name)
        ok = isinstance(value, (int, float)) and low <= value and (value < high if high_open else value <= high)
        if not ok:
            return f"{name}: {value!r} must be in [{low}, {high}{')' if high_open else ']'}"
    return check


def _positive(name: str):
    def check(cfg):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            return f"{name}: {value!r} must be > 0"
    return check


def _length(cfg) -> str | None:
    # epochs 0 with no max_steps would "complete" at step 0 and save an untrained adapter.
    if cfg.max_steps == -1 or cfg.max_steps == 0:
        if not isinstance(cfg.epochs, (int, float)) or not cfg.epochs > 0:
            return f"epochs: {cfg.epochs!r} must be > 0 (or set max_steps)"
    if not isinstance(cfg.max_steps, int) or (cfg.max_steps != -1 and cfg.max_steps < 1):
        return f"max_steps: {cfg.max_steps!r} must be -1 (run all epochs) or >= 1"
    return None


def _optimizer(cfg) -> str | None:
    if cfg.optim not in OPTIMIZERS:
        close = [o for o in OPTIMIZERS if cfg.optim and (cfg.optim in o or o in cfg.optim)][:4]
        return f"optim: unknown optimizer {cfg.optim!r}" + (f" (did you mean {', '.join(close)}?)" if close else
                                                            " (e.g. adamw_torch, paged_adamw_8bit)")
    return None


def _regex(cfg) -> str | None:
    try:
        re.compile(cfg.lora_target)
    except (re.error, TypeError) as e:
        return f"lora_target: {cfg.lora_target!r} is not a regular expression ({e})"
    return None


def _names(cfg) -> str | None:
    bad = [m for m in str(cfg.modules_to_save).split(",") if m.strip() and not re.fullmatch(r"[\w.]+", m.strip())]
    if bad:
        return f"modules_to_save: {bad[0].strip()!r} is not a module name"
    if not str(cfg.model).strip():
        return "model: empty (a local folder or a Hugging Face hub id)"
    if not str(cfg.output_dir).strip():
        return "output_dir: empty"
    if not str(cfg.resume).strip():
        return "resume: empty (auto, never or a checkpoint folder)"
    return None


_CHECKS = (
    _length, _optimizer, _regex, _names,
    _at_least("lora_r", 1), _positive("lora_alpha"), _between("lora_dropout", 0.0, 1.0),
    _positive("learning_rate"), _at_least("mm_projector_lr", 0), _at_least("weight_decay", 0),
    _between("warmup_ratio", 0.0, 1.0), _at_least("per_device_batch_size", 1), _at_least("grad_accum", 1),
    _at_least("max_length", 1), _at_least("dataloader_workers", 0), _at_least("eval_steps", 0, " (0: only at the end)"),
    _at_least("eval_limit", 0), _at_least("eval_max_new_tokens", 1), _at_least("save_steps", 1),
    _at_least("save_total_limit", 1, " (a checkpoint to resume from)"), _at_least("logging_steps", 1),
    _at_least("seed", 0), _at_least("max_train_samples", 0, " (0: all)"),
)


# ---------------------------------------------------------------- presets (dict literals)
PRESETS: dict[str, dict] = {
    # The seed blog's stage-2 recipe (LLaVA's finetune_qlora.sh), on the Hugging Face stack.
    "llava-1.5-7b-qlora": {
        "model": "llava-hf/llava-1.5-7b-hf", "mode": "qlora", "lora_r": 128, "lora_alpha": 256,
        "lora_dropout": 0.05, "learning_rate": 2e-4, "mm_projector_lr": 2e-5, "lr_scheduler": "cosine",
        "warmup_ratio": 0.03, "bf16": "true", "tf32": "true", "gradient_checkpointing": True,
        "max_length": 2048, "image_aspect_ratio": "pad", "group_by_length": True, "epochs": 1.0,
        "per_device_batch_size": 16, "grad_accum": 1, "deepspeed": "zero2",
    },
    # The shipped demo model (assets/demo-llava, 23M parameters, pretrained) taught the chart kind held out
    # of its pretraining (hbar) on 2 CPU cores in ~3 minutes: training/demo.py's dataset (multi-turn
    # records, one image encoding per chart), one epoch of its 180 train charts. A standard LoRA on the
    # language model + the projector: the base already knows the vocabulary and the answer formats, so
    # unlike a random model nothing is trained in full; a 10x higher learning rate than the 7B recipe
    # because the run is 45 steps long, and held constant after the warmup: a cosine spends the second half
    # of so short a run below half the rate, and on the run-14 base it lifted hbar by 11.7 points where the
    # constant rate lifts it by 23.8 (1.5e-3: 17.5, 3e-3: 17.9; docs/BENCHMARKS.md, "Demo model (CPU)").
    # max_length: 576 image tokens + 8 questions and answers.
    "demo-cpu": {
        "model": "assets/demo-llava", "mode": "lora", "lora_r": 16, "lora_alpha": 32,
        "lora_dropout": 0.0, "learning_rate": 2e-3, "mm_projector_lr": 1e-3, "lr_scheduler": "constant_with_warmup",
        "warmup_ratio": 0.05, "bf16": "false", "tf32": "false", "gradient_checkpointing": False,
        "max_length": 1024, "epochs": 1.0, "max_steps": 45, "per_device_batch_size": 4, "grad_accum": 1,
        "eval_steps": 0, "eval_limit": 12, "eval_max_new_tokens": 8, "save_steps": 15, "logging_steps": 5,
        "dataloader_workers": 0, "attn_implementation": "sdpa", "deepspeed": "none",
    },
}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return TrainConfig.from_dict({**PRESETS[name], **overrides})


# ---------------------------------------------------------------- CLI
def cli_flag(name: str) -> str:
    return f"--{name}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Fine-tune a LLaVA-family model (QLoRA, LoRA or full). Flags override --config/--preset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file with TrainConfig fields.")
    parser.add_argument("--preset", choices=list(PRESETS), help="Start from a named recipe.")
    groups = {}
    for f in dataclasses.fields(TrainConfig):
        g = f.metadata["group"]
        groups.setdefault(g, parser.add_argument_group(g))
        kwargs = {"help": f.metadata["help"].replace("%", "%%"), "default": argparse.SUPPRESS}   # "30% slower"
        if isinstance(f.default, bool):
            # `--flag`, `--flag false` and SageMaker's `--flag True` all parse.
            kwargs.update(type=boolean, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs["type"] = type(f.default)
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        groups[g].add_argument(cli_flag(f.name), **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults <- preset <- YAML file <- flags."""
    args = build_parser().parse_args(argv)
    base: dict = {}
    if args.preset:
        base.update(PRESETS[args.preset])
    if args.config:
        base.update(TrainConfig.yaml_fields(Path(args.config)))
    base.update({k: v for k, v in vars(args).items() if k not in ("config", "preset")})
    return TrainConfig.from_dict(base)


def to_argv(cfg: TrainConfig, only_changed: bool = True) -> list[str]:
    """The flags that reproduce `cfg` (those that differ from the defaults, unless asked for all)."""
    default = TrainConfig()
    argv = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if only_changed and value == getattr(default, f.name):
            continue
        argv += [cli_flag(f.name), str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def command(cfg: TrainConfig, config_path: str | None = None) -> str:
    """A copy-paste shell command for the run."""
    import shlex

    parts = ["python", "-m", "training.train"]
    parts += ["--config", config_path] if config_path else to_argv(cfg)
    return shlex.join(parts)


# ---------------------------------------------------------------- SageMaker hyperparameters
MAX_HYPERPARAMETERS = 100
MAX_HYPERPARAMETER_CHARS = 2500


def to_hyperparameters(cfg: TrainConfig) -> dict[str, str]:
    """All fields as SageMaker hyperparameters. Values are JSON-encoded strings, as the SageMaker
    SDK sends them: the training toolkit json-decodes each one and passes `--name value` to the script."""
    hp = {f.name: json.dumps(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    check_hyperparameters(hp)
    return hp


def from_hyperparameters(hp: dict[str, str]) -> TrainConfig:
    """What the training script sees on SageMaker: the toolkit's `--name str(json.loads(value))` flags."""
    argv = []
    for name, value in hp.items():
        if name.startswith("sagemaker_"):
            continue
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            decoded = value
        argv += [cli_flag(name), str(decoded)]
    return parse_args(argv)


def check_hyperparameters(hp: dict[str, str]) -> None:
    """Limits the SageMaker API enforces but botocore does not check client-side."""
    if len(hp) > MAX_HYPERPARAMETERS:
        raise ValueError(f"{len(hp)} hyperparameters; SageMaker accepts at most {MAX_HYPERPARAMETERS}")
    for k, v in hp.items():
        if not isinstance(v, str):
            raise ValueError(f"hyperparameter {k}: values must be strings, got {type(v).__name__}")
        if len(k) > 256:
            raise ValueError(f"hyperparameter name {k[:40]}...: longer than 256 characters")
        if len(v) > MAX_HYPERPARAMETER_CHARS:
            raise ValueError(f"hyperparameter {k}: {len(v)} characters; SageMaker accepts at most "
                             f"{MAX_HYPERPARAMETER_CHARS}")


def form_fields() -> list[dict]:
    """What a UI needs to draw one input per field: name, flag, help, type, default, choices, group."""
    return [{"name": f.name, "flag": cli_flag(f.name), "help": f.metadata["help"], "type": type(f.default),
             "default": f.default, "choices": f.metadata.get("choices"), "group": f.metadata["group"]}
            for f in dataclasses.fields(TrainConfig)]
