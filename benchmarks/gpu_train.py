"""Training speed and memory of training.train on LLaVA-1.5-7B shapes (random weights), plus kill-and-resume.

    python benchmarks/gpu_train.py                 # one H100: ~5 min; JSON to $OUT/gpu_train.json (or ./gpu_out)
    python benchmarks/gpu_train.py --tiny          # the same logic with tiny shapes on CPU (a smoke test)

Builds the real architecture from a config (CLIP ViT-L/14-336 + Llama-7B, vocab 32064, 576 image tokens),
saves it locally, renders a small chart dataset with charts.generate, then runs QLoRA and LoRA steps through
training.train (batch 8, gradient checkpointing) and reports step time, samples/s, tokens/s and peak memory
against the baseline in notes/GPU.md. The kill-and-resume check SIGTERMs a QLoRA subprocess mid-run,
re-runs it, and verifies the run resumed at the checkpoint with adapter and projector weights restored.
Needs torch, transformers, peft, accelerate (+ bitsandbytes on CUDA); no gradio, boto3 or datasets.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import TrainConfig  # noqa: E402

# notes/GPU.md, one H100 80GB, LLaVA-1.5-7B shapes, batch 8, gradient checkpointing
BASELINE = {"lora": {"samples_s": 8.4, "tokens_s": 5900, "peak_gb": 23.3},
            "qlora": {"samples_s": 6.3, "tokens_s": 4500, "peak_gb": 15.7},
            "trl-qlora": {"samples_s": 6.5, "tokens_s": 5400, "peak_gb": 10.5}}


def build_model(out: Path, tiny: bool) -> Path:
    import torch
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from eval.demo import CHAT_TEMPLATE, build_tokenizer

    if (out / "config.json").exists():
        return out
    tok = build_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
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
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id,
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
    return out


def make_data(out: Path, n: int) -> Path:
    import charts

    if not (out / "dataset.json").exists():
        charts.generate(n, seed=0, out_dir=str(out), workers=min(8, os.cpu_count() or 1), qa_per_chart=3)
    return out


def timed_run(cfg: TrainConfig) -> dict:
    """In-process training.train with a callback that times steps (first two are warm-up)."""
    import torch
    from transformers import TrainerCallback

    from training.train import train

    times, seen = [], {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seen["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - seen["t"])

    start = time.time()
    result = train(cfg, callbacks=[Clock()])
    steady = times[2:] or times
    step = statistics.median(steady)
    batch = cfg.per_device_batch_size * cfg.grad_accum
    tokens = _mean_tokens(cfg)
    out = {"steps": len(times), "step_s": round(step, 3), "samples_s": round(batch / step, 2),
           "tokens_s": round(batch * tokens / step), "mean_tokens": round(tokens),
           "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None,
           "wall_s": round(time.time() - start, 1), "status": result["status"]}
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def _mean_tokens(cfg: TrainConfig) -> float:
    from transformers import AutoProcessor

    from training.data import ChatDataset, read_records, split_file

    records = read_records(split_file(cfg.data, "train"))[:64]
    ds = ChatDataset(records, AutoProcessor.from_pretrained(cfg.model), cfg.max_length, cfg.image_aspect_ratio)
    return statistics.mean(ds.lengths)


def kill_and_resume(cfg: TrainConfig, work: Path) -> dict:
    """SIGTERM a subprocess run mid-way; the re-run must start at its checkpoint with the same weights."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from training.train import train

    cfg = cfg.replace(output_dir=str(work / "resume"), max_steps=12, save_steps=1000, overwrite=False)
    path = work / "resume.yaml"
    cfg.to_yaml(path)
    # keep what PYTHONPATH already holds (e.g. carried wheels): the child imports the same packages
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                                      os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "training.train", "--config", str(path)], env=env,
                            stdout=open(work / "resume.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if steps and max(steps) >= 4:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=300)
    if not (Path(cfg.output_dir) / "result.json").exists():
        return {"exit_code": code, "ok": False, "log_tail": (work / "resume.log").read_text()[-3000:]}
    result = json.loads((Path(cfg.output_dir) / "result.json").read_text())
    ckpt = Path(result["checkpoint"])
    saved = load_file(ckpt / "adapter_model.safetensors")
    seen = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["step"] = state.global_step
            seen["weights"] = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}

    second = train(cfg, callbacks=[Snapshot()])
    same = all(k in seen["weights"] and bool((seen["weights"][k] == v.float()).all()) for k, v in saved.items())
    return {"exit_code": code, "interrupted_at": result.get("step"), "checkpoint": ckpt.name,
            "resumed_at": seen.get("step"), "weights_restored": same,
            "projector_in_checkpoint": any("multi_modal_projector" in k for k in saved),
            "final_status": second["status"], "ok": code != 0 and same and seen.get("step") == result.get("step")}


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the logic, not the speed")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--work", default="/tmp/gpu_train")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cuda = torch.cuda.is_available()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = build_model(work / ("tiny-llava" if args.tiny else "llava-7b-shapes"), args.tiny)
    data = make_data(work / "charts", 24 if args.tiny else 48)
    print(f"model + data ready in {time.time() - t0:.0f} s", flush=True)

    from eval.demo import build_demo_model
    demo = build_demo_model(work / "demo-llava") if not (work / "demo-llava" / "config.json").exists() \
        else work / "demo-llava"
    common = dict(data=str(data), max_steps=args.steps, per_device_batch_size=2 if args.tiny else 8,
                  eval_steps=0, eval_limit=0, save_steps=1000, logging_steps=1, overwrite=True,
                  dataloader_workers=0 if args.tiny else 4, max_length=2048, gradient_checkpointing=True,
                  resume="never")
    runs = {}
    modes = ["qlora", "lora"] if cuda else ["lora"]
    for mode in modes:
        cfg = TrainConfig(model=str(model), mode=mode, output_dir=str(work / f"run-{mode}"), **common)
        runs[mode] = timed_run(cfg)
        print(mode, runs[mode], flush=True)
    runs["demo-lora"] = timed_run(TrainConfig(model=str(demo), mode="lora", lora_r=16, lora_alpha=32,
                                              output_dir=str(work / "run-demo"), **common))
    print("demo-lora", runs["demo-lora"], flush=True)
    resume_mode = "qlora" if cuda else "lora"
    resume = kill_and_resume(TrainConfig(model=str(model), mode=resume_mode, **{**common, "resume": "auto"}), work)
    print("kill-and-resume", resume, flush=True)

    print("\n| run | step s | samples/s | tokens/s | peak GB | baseline samples/s | baseline tok/s | baseline GB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        b = BASELINE.get(name, {})
        print(f"| {name} | {r['step_s']} | {r['samples_s']} | {r['tokens_s']} | {r['peak_gb']} | "
              f"{b.get('samples_s', '-')} | {b.get('tokens_s', '-')} | {b.get('peak_gb', '-')} |")
    print("| (TRL SFTTrainer QLoRA, GPU.md) | 1.23 | 6.5 | 5400 | 10.5 | | | |")
    print(f"kill-and-resume ({resume_mode}): {'OK' if resume['ok'] else 'FAILED'} {resume}")
    out_dir = Path(os.environ.get("OUT") or "gpu_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "tiny": args.tiny, "runs": runs,
              "kill_and_resume": resume, "baseline": BASELINE, "wall_s": round(time.time() - t0, 1),
              "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                           "peft": __import__("peft").__version__}}
    (out_dir / "gpu_train.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out_dir / 'gpu_train.json'} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
