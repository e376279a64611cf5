"""Fine-tuning speed and memory: TRL SFTTrainer (QLoRA) beside training.train, in the same run.

    python benchmarks/gpu_train.py            # one H200: ~8 min, model build included; $OUT/train.json
    python benchmarks/gpu_train.py --tiny     # the same logic on tiny shapes on CPU (TRL skipped if absent)

Model: LLaVA-1.5-7B shapes with random weights (CLIP ViT-L/14-336 + Llama-7B, vocab 32064, 576 image
tokens), built once and saved under --work. Recipe on both sides: QLoRA nf4 (double quant), r128 / alpha 256
/ dropout 0.05 LoRA on every language-model linear, the projector trained in full, gradient checkpointing,
bf16, batch 8, lr 2e-4 cosine. Two datasets:

  (a) fixed: every sample exactly --tokens tokens (576 image tokens + text), no padding;
  (b) charts: charts.generate with multi_turn on (one conversation of --qa questions per chart): short
      answers of variable length, as real chart QA.

Runs (each its own process, so peak memory and Liger's patches belong to one run): `trl`, `project` (the
TrainConfig defaults), and `project` with each speed option set to each other value (`loss_impl=hf`,
`adapter_dtype=float32`, `liger=false`, `packing=true`, `compile=true`, `optim=adamw_torch_fused`, ...), so
the table shows what each pays. Timing: --warm steps, then --timed steps; samples_s = timed samples / wall
time from the end of the last warm-up step to the end of the last step (data loading included; CUDA
synchronised at each step end); step_samples_s is the same from the median forward+backward+optimizer step
alone. tok_s = samples_s x the dataset's mean real tokens per sample; mfu = 6 x N x tok_s / 790 TFLOP/s
(N = 7.063e9). Runs that would pass --deadline are skipped (recorded as such), in the order given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T0 = time.time()
N_PARAMS = 7.063e9      # CLIP ViT-L/14-336 + projector + Llama-7B with a 32064-row vocab, as built here
PEAK_FLOPS = 790e12     # bf16 dense, measured on the H200
LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
WORDS = ("value share percent highest lowest largest smallest maximum minimum category chart title axis legend "
         "label difference ratio sum total average mean rank order first second third increase decrease trend "
         "year month quarter revenue sales users people hours minutes million thousand billion dollars").split()
# the speed options measured one at a time against the defaults: a field (every other value of it), or
# (field, value) for a field without choices
OPTIONS = ("loss_impl", "adapter_dtype", "liger", "packing", "fused_lora", "fused_lora_siblings", "fused_lora_one_node",
           "reuse_dequantized", "compile", ("optim", "adamw_torch_fused"))


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ------------------------------------------------------------------ model and data
def build_model(out: Path, tiny: bool) -> Path:
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from eval.demo import CHAT_TEMPLATE, build_tokenizer

    if (out / "config.json").exists():
        return out
    tok = build_tokenizer()
    if tiny:
        vision = CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4)
        text = LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4)
        image, patch = 64, 16
    else:   # CLIP ViT-L/14-336 + Llama-2-7B
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                  num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
        image, patch = 336, 14
    text.update({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         image_seq_length=(image // patch) ** 2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": image}, crop_size={"height": image, "width": image}), tokenizer=tok,
        patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def chart_data(work: Path, n: int, qa: int) -> Path:
    """(b): chart-QA conversations as charts.generate writes them, multi-turn on."""
    import charts

    out = work / f"charts-mt{n}"
    if not (out / "dataset.json").exists():
        charts.generate(n, seed=0, out_dir=str(out), workers=min(8, os.cpu_count() or 1), qa_per_chart=qa,
                        multi_turn=True, split=(0.9, 0.1, 0.0))
    return out


def fixed_data(work: Path, base: Path, images_from: Path, tokens: int, n: int) -> Path:
    """(a): records whose every sample renders to exactly `tokens` tokens (image tokens included) with this
    model's processor and chat template (a question padded with words, then an answer grown word by word)."""
    import random

    from transformers import AutoProcessor

    from training.data import _tokens_per_image, read_records, to_messages

    out = work / f"fixed{tokens}-{n}"
    if (out / "train.jsonl").exists():
        return out
    processor = AutoProcessor.from_pretrained(base)
    tok = processor.tokenizer
    images = [r["image"] for r in read_records(images_from / "train.jsonl")]
    per_image = _tokens_per_image(processor, [{"image": images[0]}], "pad")
    rng = random.Random(0)

    def length(q, a):
        rec = {"conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}
        text = processor.apply_chat_template(to_messages(rec), tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"]) + per_image - 1

    rows = []
    for i in range(n):
        q = "Describe the chart in detail: " + " ".join(rng.choice(WORDS) for _ in range(20))
        a, tries = rng.choice(WORDS), 0
        while length(q, a) < tokens:
            a += " " + rng.choice(WORDS)
        while length(q, a) != tokens and tries < 200:     # overshot: swap the last word for a shorter one
            a, tries = a.rsplit(" ", 1)[0] + " " + rng.choice(WORDS + ["a", "1"]), tries + 1
            if length(q, a) < tokens:
                a += " a"
        image = Path(images[i % len(images)])
        (out / "images").mkdir(parents=True, exist_ok=True)
        if not (out / "images" / image.name).exists():     # a dataset's images live inside its folder
            (out / "images" / image.name).write_bytes(image.read_bytes())
        rows.append({"id": f"fixed-{i}", "image": f"images/{image.name}", "split": "train",
                     "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]})
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))     # no val: nothing is evaluated
    return out


def dataset_stats(base: Path, data: Path, n: int) -> dict:
    from transformers import AutoProcessor

    from training.data import ChatDataset, read_records

    ds = ChatDataset(read_records(data / "train.jsonl")[:n], AutoProcessor.from_pretrained(base), 4096)
    turns = [sum(t["from"] == "gpt" for t in r["conversations"]) for r in ds.records]
    return {"samples": len(ds), "mean_tokens": round(statistics.mean(ds.lengths), 1), "min_tokens": min(ds.lengths),
            "max_tokens": max(ds.lengths), "mean_answers": round(statistics.mean(turns), 2)}


# ------------------------------------------------------------------ timing
def clock():
    import torch
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.steps, self.ends, self.t = [], [], None

        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.steps.append(now - self.t)
            self.ends.append(now)

    return Clock()


def summarize(c, batch: int, warm: int, mean_tokens: float, n_params: float) -> dict:
    import torch

    timed = len(c.ends) - warm
    if timed < 1:
        raise RuntimeError(f"only {len(c.ends)} steps ran; {warm} are warm-up")
    samples_s = timed * batch / (c.ends[-1] - c.ends[warm - 1]) if warm else batch / statistics.mean(c.steps)
    tok_s = samples_s * mean_tokens
    cuda = torch.cuda.is_available()
    return {"samples_s": round(samples_s, 3), "tok_s": round(tok_s),
            "step_samples_s": round(batch / statistics.median(c.steps[warm:]), 3),
            "mfu": round(6 * n_params * tok_s / PEAK_FLOPS, 4),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
            "steps": len(c.steps), "step_s": [round(x, 3) for x in c.steps]}


def count_params(model) -> float:
    n = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        n += qs.shape.numel() if qs is not None else p.numel()
    return float(n)


# ------------------------------------------------------------------ one run (its own process)
def run_trl(base: Path, data: Path, a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from training.data import read_records, to_messages

    cuda = torch.cuda.is_available()
    kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda:    # QLoRA as TRL's docs set it up; full names: bare ones leave the tower quantized in 5.23
        kwargs.update(device_map={"": 0}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"]))
    model = AutoModelForImageTextToText.from_pretrained(base, **kwargs)
    n_params = N_PARAMS if not a.tiny else count_params(model)
    processor = AutoProcessor.from_pretrained(base)
    recs = read_records(data / "train.jsonl")[:(a.warm + a.timed) * a.batch]
    ds = Dataset.from_list([{"images": [Image.open(r["image"]).convert("RGB")], "messages": to_messages(r)}
                            for r in recs])
    lcfg = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.05, target_modules=LM_LINEARS,
                      modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(a.work / "trl-out"), per_device_train_batch_size=a.batch,
                     max_steps=a.warm + a.timed, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03,
                     bf16=cuda, gradient_checkpointing=True, logging_steps=1, save_strategy="no", report_to="none",
                     max_length=None, dataloader_num_workers=a.workers, remove_unused_columns=False,
                     use_cpu=not cuda, disable_tqdm=True)
    c = clock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor, peft_config=lcfg,
                         callbacks=[c])
    dtypes = sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad})
    trainer.train()
    return {**summarize(c, a.batch, a.warm, a.mean_tokens, n_params), "trainable_dtypes": dtypes}


def run_project(base: Path, data: Path, a, overrides: dict) -> dict:
    import torch
    from transformers import TrainerCallback

    from training.config import TrainConfig
    from training.train import train

    cuda = torch.cuda.is_available()
    cfg = TrainConfig(model=str(base), data=str(data), mode="qlora" if cuda else "lora",
                      output_dir=str(a.work / "project-out"), per_device_batch_size=a.batch,
                      max_steps=a.warm + a.timed, eval_steps=0, eval_limit=0, save_steps=10_000, logging_steps=1,
                      overwrite=True, resume="never", dataloader_workers=a.workers, max_length=4096,
                      gradient_checkpointing=True, lora_r=a.lora_r, lora_alpha=2 * a.lora_r, **overrides)
    info = {}

    class Peek(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            info["trainable_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
            info["n_params"] = count_params(model)

    c = clock()
    result = train(cfg, callbacks=[Peek(), c])
    n_params = N_PARAMS if not a.tiny else info["n_params"]
    return {**summarize(c, a.batch, a.warm, a.mean_tokens, n_params), "status": result["status"],
            "trainable_dtypes": info.get("trainable_dtypes"), "config": overrides}


def one(a) -> dict:
    kind, _, rest = a.one.partition(":")
    data = Path(a.data)
    if kind == "trl":
        return run_trl(a.work / "base", data, a)
    return run_project(a.work / "base", data, a, json.loads(rest or "{}"))


# ------------------------------------------------------------------ the table
def variants() -> list[tuple[str, dict]]:
    """`project` (the defaults) and, for each speed option, the run with it set to each other value."""
    import dataclasses

    from training.config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    first, rest = [], []
    for option in OPTIONS:
        name, value = option if isinstance(option, tuple) else (option, None)
        f = fields[name]
        # choices listed last first: "hf" (the option off) before "liger" for loss_impl
        others = [value] if value is not None else \
            [v for v in reversed(f.metadata.get("choices") or (False, True)) if v != f.default]
        runs = [(f"{name}={str(v).lower()}", {name: v}) for v in others]
        first, rest = first + runs[:1], rest + runs[1:]
    return [("project", {})] + first + rest


def table(res: dict) -> str:
    lines = ["| dataset | run | samples/s | tok/s | MFU | peak GB | vs TRL speed | vs TRL memory |",
             "|---|---|---|---|---|---|---|---|"]
    for ds, runs in res["runs"].items():
        for name, r in runs.items():
            if "samples_s" not in r:
                why = str(r.get("error") or r.get("skipped")).splitlines()[0][:100]
                lines.append(f"| {ds} | {name} | {why} | | | | | |")
                continue
            ratio = r.get("vs_trl", {})
            lines.append(f"| {ds} | {name} | {r['samples_s']} | {r['tok_s']} | {100 * r['mfu']:.1f}% | "
                         f"{r['peak_gb']} | {ratio.get('samples_s', '-')} | {ratio.get('peak_gb', '-')} |")
    return "\n".join(lines)


def ratios(runs: dict) -> None:
    trl = runs.get("trl", {})
    for name, r in runs.items():
        if name != "trl" and "samples_s" in r and "samples_s" in trl:
            r["vs_trl"] = {"samples_s": round(r["samples_s"] / trl["samples_s"], 3),
                           "peak_gb": round(r["peak_gb"] / trl["peak_gb"], 3)
                           if r["peak_gb"] and trl["peak_gb"] else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the logic, not the speed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_train"))
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--timed", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=835, help="sample length of dataset (a)")
    ap.add_argument("--qa", type=int, default=3, help="questions per chart conversation in dataset (b)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=128)
    ap.add_argument("--datasets", default="fixed,charts")
    ap.add_argument("--runs", default="", help="comma-separated run names (default: trl, project and every variant)")
    ap.add_argument("--deadline", type=float, default=500, help="seconds: later runs are skipped")
    ap.add_argument("--run-timeout", type=int, default=150)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--mean-tokens", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args()
    names = [("trl", None)] + variants()
    if a.runs:      # a name may join variants with "+" (fused_lora=true+packing=true): both options set
        known = dict(names)
        wanted = a.runs.split(",")
        for name in wanted:
            if "+" in name and all(part in known for part in name.split("+")):
                names.append((name, {k: v for part in name.split("+") for k, v in known[part].items()}))
        unknown = [w for w in wanted if w not in dict(names)]
        if unknown:     # e.g. a default value (fused_lora=true is "project"): refused here, not dropped
            ap.error(f"unknown run(s) {', '.join(unknown)}; known: {', '.join(known)} (or several joined by +)")
        names = [x for x in names if x[0] in wanted]
    if a.tiny:
        a.batch, a.warm, a.timed, a.workers, a.lora_r = 2, 1, 2, 0, 8
        a.tokens, a.deadline = min(a.tokens, 120), max(a.deadline, 1500)     # a shared CPU is slow, not timed
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if a.one:
        try:
            r = one(a)
        except Exception as e:  # noqa: BLE001 - recorded in the table
            r = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        print("RESULT " + json.dumps(r), flush=True)
        return

    import torch

    cuda = torch.cuda.is_available()
    a.work.mkdir(parents=True, exist_ok=True)
    out = Path(os.environ.get("OUT") or "gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    base = build_model(a.work / "base", a.tiny)
    log("model ready")
    n = (a.warm + a.timed) * a.batch
    charts_dir = chart_data(a.work, n + n // 9 + 2, a.qa)
    data = {"fixed": fixed_data(a.work, base, charts_dir, a.tokens, n), "charts": charts_dir}
    try:
        import trl  # noqa: F401 - only whether it imports
        have_trl = True
    except ImportError:
        have_trl = False
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "date": time.strftime("%Y-%m-%d %H:%M UTC",
           time.gmtime()), "commit": _commit(), "tiny": a.tiny, "mode": "qlora" if cuda else "lora",
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                        if k not in ("one", "data", "mean_tokens")},
           "n_params": N_PARAMS, "peak_flops": PEAK_FLOPS, "versions": _versions(), "datasets": {}, "runs": {}}
    datasets = a.datasets.split(",")
    for ds in datasets:
        res["datasets"][ds] = dataset_stats(base, data[ds], n)
    log("data ready", res["datasets"])
    # TRL and the defaults on both datasets first, then each option turned off on (a), then on (b): what the
    # deadline cuts is the least needed
    order = [(ds, x) for x in names[:2] for ds in datasets] + [(ds, x) for ds in datasets for x in names[2:]]
    logf = open(out / "train_runs.log", "w")
    for ds, (name, overrides) in order:
        runs = res["runs"].setdefault(ds, {})
        left = a.deadline - (time.time() - T0)
        if name == "trl" and not have_trl:
            runs[name] = {"skipped": "trl does not import"}
            continue
        if left < 40:
            runs[name] = {"skipped": f"{left:.0f} s left before the deadline"}
            continue
        spec = "trl" if name == "trl" else "project:" + json.dumps(overrides)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", spec, "--data", str(data[ds]), "--work",
               str(a.work), "--mean-tokens", str(res["datasets"][ds]["mean_tokens"]), "--warm", str(a.warm),
               "--timed", str(a.timed), "--batch", str(a.batch), "--workers", str(a.workers), "--lora-r", str(a.lora_r)]
        t = time.perf_counter()
        # the child imports what this process does (wheels on PYTHONPATH) and the project from ROOT
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}
        try:
            p = subprocess.run(cmd + (["--tiny"] if a.tiny else []), capture_output=True, text=True, env=env,
                               timeout=min(a.run_timeout, max(int(left), 1)))
            stdout, stderr, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr, rc = "", "timeout"
        logf.write(f"===== {ds} {name} rc={rc}\n{stdout}\n{stderr}\n")
        logf.flush()
        line = next((x for x in reversed(stdout.splitlines()) if x.startswith("RESULT ")), None)
        r = json.loads(line[7:]) if line else {"error": f"no result (rc {rc})", "stderr_tail": stderr[-2000:]}
        r["process_s"] = round(time.perf_counter() - t, 1)
        runs[name] = r
        log(ds, name, {k: v for k, v in r.items() if k not in ("traceback", "step_s", "stderr_tail")})
        if "error" in r:
            print(r.get("traceback") or r.get("stderr_tail"), flush=True)
        ratios(runs)
        _write(out, res)
    res["wall_s"] = round(time.time() - T0, 1)
    _write(out, res)
    print("\n" + table(res), flush=True)
    log(f"wrote {out / 'train.json'}")


def _write(out: Path, res: dict) -> None:
    from charts.io import atomic_write_json

    atomic_write_json(out / "train.json", res)


def _commit() -> str:
    if os.environ.get("COMMIT"):        # a copied tree's .git may lag its files: say which code ran
        return os.environ["COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict:
    vers = {}
    for m in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "liger_kernel"):
        try:
            mod = __import__(m)
            vers[m] = getattr(mod, "__version__", "installed")
        except Exception as e:  # noqa: BLE001 - a missing package is a finding, not a failure
            vers[m] = f"n/a ({type(e).__name__})"
    return vers


if __name__ == "__main__":
    main()
