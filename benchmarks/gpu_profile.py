"""Where the GPU time goes: torch.profiler tables of a Benchmark run and of a QLoRA training step.

    python3 benchmarks/gpu_profile.py serve train     # one H200: ~4 min with the model builds; $OUT/profile_*.txt
    python3 benchmarks/gpu_profile.py --tiny serve    # the same logic on CPU with tiny shapes

serve: benchmarks/gpu_serve.py's base, r128 adapter and questions (7B shapes, bf16, random weights);
       eval.run.run_eval on --n questions, base and base + adapter, timed whole; then again with the wall
       split into the engine's parts (prepare on the CPU, vision tower + projector, language-model prefill,
       decode steps; CUDA synchronised around each part); then one batch of --profile-batch questions
       under the profiler.
train: benchmarks/gpu_train.py's dataset (a) (fixed 835-token samples) with the TrainConfig defaults (or
       --train-set FIELD=VALUE); two steps after the warm-up under the profiler, with the CPU ops that took the
       most host time; then one more step with every host-GPU synchronisation counted by the code that made it.
Each table: GPU kernel time by category (GEMM, 4-bit dequantize, attention, Triton, elementwise, copies,
optimizer, other), the share of the profiled wall during which the GPU was busy, and the top kernels.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = Path(os.environ.get("OUT") or "gpu_out")
CATEGORIES = (   # first match wins: (category, substrings of the kernel name, lower case)
    ("dequantize", ("dequant",)),
    ("attention", ("flash", "fmha", "attention", "efficient")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "sm90", "splitk")),
    ("optimizer", ("adam", "multi_tensor")),
    ("triton", ("triton",)),
    ("copy", ("copy", "memcpy", "memset", "cat", "index", "scatter", "gather", "fill")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "norm", "softmax", "unrolled")),
)


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def report(prof, wall_s: float, title: str, top: int = 30) -> str:
    """Kernel time by category and the top kernels of a finished torch.profiler run."""
    from torch.autograd import DeviceType
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_cat, by_name, spans = defaultdict(float), defaultdict(lambda: [0.0, 0]), []
    for e in kernels:
        us = e.time_range.elapsed_us()
        by_cat[category(e.name)] += us
        by_name[e.name][0] += us
        by_name[e.name][1] += 1
        spans.append((e.time_range.start, e.time_range.end))
    busy, end = 0.0, None          # union of kernel intervals: time the GPU ran anything
    for s, t in sorted(spans):
        if end is None or s > end:
            busy, end = busy + (t - s), t
        elif t > end:
            busy, end = busy + (t - end), t
    total = sum(by_cat.values()) or 1.0
    lines = [f"== {title}", f"profiled wall {wall_s * 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms "
             f"({100 * busy / 1e3 / max(wall_s * 1e3, 1e-9):.0f}%), {len(kernels)} kernels, kernel time "
             f"{total / 1e3:.1f} ms", "", f"{'category':<12} {'ms':>9} {'share':>6}"]
    for c, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"{c:<12} {us / 1e3:9.1f} {100 * us / total:5.1f}%")
    lines += ["", f"{'kernel':<100} {'calls':>6} {'ms':>9} {'share':>6}"]
    for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{name[:100]:<100} {n:6d} {us / 1e3:9.1f} {100 * us / total:5.1f}%")
    return "\n".join(lines) + "\n"


def profiler():
    import torch
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts)


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------ serve
def serve(a) -> str:
    import charts
    import gpu_serve
    from eval.engine import Generator
    from eval.local import Engine
    from eval.pool import ModelPool
    from eval.run import run_eval

    work = Path(a.work_serve)
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / "base", work / "adapter"
    if not (base / "config.json").exists():
        gpu_serve.build_base(base, a.tiny)
    if not (adapter / "adapter_config.json").exists():
        gpu_serve.build_adapter(base, adapter, rank=8 if a.tiny else 128)
    data = work / "charts"
    if not (data / "dataset.json").exists():
        charts.generate((a.n + 2) // 3 + 1, seed=0, out_dir=str(data), workers=min(15, os.cpu_count() or 1),
                        qa_per_chart=3, split=(1, 0, 0), instruct_share=0.0)
    pool = ModelPool()
    opts = {"generate_kwargs": {"min_new_tokens": 16}, "compile": False}
    ref, pair = f"local:{base}", [f"local:{base}", f"local:{base}+{adapter}"]
    backend = pool.backend(ref, **opts)
    pool.backend(pair[1], **opts)
    log("serve: loaded", backend.engine.describe())
    run_eval(data, [ref], work / "warm", limit=32, backend_options=opts, pool=pool)
    out = [f"model {backend.engine.describe()}, {a.n} questions, 16 new tokens", ""]

    def timed_run(tag, models):
        shutil.rmtree(work / f"evals-{tag}", ignore_errors=True)      # a rerun scores again, not resumes
        sync()
        t = time.perf_counter()
        sums = run_eval(data, models, work / f"evals-{tag}", limit=a.n, max_new_tokens=16, backend_options=opts,
                        pool=pool)
        sync()
        wall = time.perf_counter() - t
        line = (f"{tag}: {len(models)} model(s) x {a.n} questions in {wall:.2f} s = {len(models) * a.n / wall:.1f} "
                f"answers/s, batch {sums[0]['execution']['batch_size']}, concurrency "
                f"{sums[0]['execution']['concurrency']}")
        log(line)
        return line, wall

    line, base_s = timed_run("eager-base", [ref])
    out.append(line)
    line, pair_s = timed_run("eager-pair", pair)
    out += [line, f"pair / base: {pair_s / base_s:.2f}"]
    parts = defaultdict(float)
    counts = defaultdict(int)

    def clocked(name, fn):
        def wrapper(*args, **kw):
            sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                sync()
                parts[name] += time.perf_counter() - t
                counts[name] += 1
        return wrapper

    originals = {(Engine, "prepare"): Engine.prepare, (Generator, "_image_features"): Generator._image_features,
                 (Generator, "_prefill"): Generator._prefill, (Generator, "decode"): Generator.decode}
    for (cls, name), fn in originals.items():
        setattr(cls, name, clocked(f"{cls.__name__}.{name}", fn))
    try:
        out.append(timed_run("eager-base-split", [ref])[0])
    finally:
        for (cls, name), fn in originals.items():
            setattr(cls, name, fn)
    vision = parts["Generator._image_features"]
    out += ["", f"{'part (synchronised)':<40} {'s':>7} {'calls':>6}",
            f"{'prepare (CPU: template, tokens, pixels)':<40} {parts['Engine.prepare']:7.2f} {counts['Engine.prepare']:6d}",
            f"{'vision tower + projector':<40} {vision:7.2f} {counts['Generator._image_features']:6d}",
            f"{'LM prefill (+ masks, embeddings)':<40} {parts['Generator._prefill'] - vision:7.2f} "
            f"{counts['Generator._prefill']:6d}",
            f"{'decode steps':<40} {parts['Generator.decode']:7.2f} {counts['Generator.decode']:6d}", ""]
    from eval.protocol import Request
    from eval.run import load_questions
    from PIL import Image
    qs = load_questions(data)[: a.profile_batch]
    requests = [Request(Image.open(q["image"]).convert("RGB"), q["question"], max_new_tokens=16) for q in qs]
    engine = backend.engine
    engine.generate(requests, [0] * len(requests), {"min_new_tokens": 16})     # this batch's shapes, once
    with profiler() as prof:
        sync()
        t = time.perf_counter()
        engine.generate(requests, [0] * len(requests), {"min_new_tokens": 16})
        sync()
        wall = time.perf_counter() - t
    out.append(report(prof, wall, f"one engine.generate of {len(requests)} questions (prepare included)"))
    pool.unload(wait=10)
    return "\n".join(out)


# ------------------------------------------------------------------ train
def train(a) -> str:
    import gpu_train
    import torch
    from transformers import TrainerCallback

    from training.config import TrainConfig
    from training.train import train as run_train

    work = Path(a.work_train)
    work.mkdir(parents=True, exist_ok=True)
    base = gpu_train.build_model(work / "base", a.tiny)
    batch, warm, steps = (2, 1, 1) if a.tiny else (8, 3, 2)
    n = (warm + steps + 1) * batch
    charts_dir = gpu_train.chart_data(work, n + n // 9 + 2, 3)
    data = gpu_train.fixed_data(work, base, charts_dir, 120 if a.tiny else 835, n)
    cuda = torch.cuda.is_available()
    state = {}

    class Profile(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            if st.global_step == warm:
                sync()
                state["prof"] = profiler().__enter__()
                state["t"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            if st.global_step == warm + steps and "prof" in state:
                sync()
                state["wall"] = time.perf_counter() - state["t"]
                state["prof"].__exit__(None, None, None)
                state["syncs"] = SyncWatch()           # the next step (its batch fetch included)
            elif st.global_step == warm + steps + 1 and "syncs" in state:
                state["syncs"].stop()

    cfg = TrainConfig.from_dict({
        "model": str(base), "data": str(data), "mode": "qlora" if cuda else "lora", "output_dir": str(work / "profile-out"),
        "per_device_batch_size": batch, "max_steps": warm + steps + 1, "eval_steps": 0, "eval_limit": 0,
        "save_steps": 10_000, "logging_steps": 1, "overwrite": True, "resume": "never",
        "dataloader_workers": 0 if a.tiny else 4, "max_length": 4096, "gradient_checkpointing": True,
        "lora_r": 8 if a.tiny else 128, "lora_alpha": 16 if a.tiny else 256,
        **dict(kv.split("=", 1) for kv in a.train_set)}).validate()
    run_train(cfg, callbacks=[Profile()])
    changed = ", ".join(a.train_set) or "none"
    title = (f"{steps} QLoRA steps, batch {batch} x 835 tokens, TrainConfig defaults (changed: {changed}; loss_impl="
             f"{cfg.loss_impl}, liger={cfg.liger}, packing={cfg.packing}, fused_lora={cfg.fused_lora}); "
             f"{batch * steps / state['wall']:.2f} samples/s under the profiler")
    return (report(state["prof"], state["wall"], title, top=40) + "\n" + cpu_report(state["prof"]) + "\n"
            + state["syncs"].report())


def cpu_report(prof, top: int = 25) -> str:
    """The CPU ops that took the most host time (self), where a GPU left idle waits for its next launch."""
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    lines = [f"{'CPU op (self time)':<60} {'calls':>7} {'ms':>9}"]
    lines += [f"{e.key[:60]:<60} {e.count:7d} {e.self_cpu_time_total / 1e3:9.1f}" for e in rows]
    return "\n".join(lines) + "\n"


class SyncWatch:
    """Every operation that makes the host wait for the GPU (torch.cuda.set_sync_debug_mode), counted by
    the Python lines that led to it, until stop()."""

    def __init__(self):
        import traceback
        import warnings

        import torch
        self.counts, self.torch, self.warnings = defaultdict(int), torch, warnings
        self.show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" not in str(message):
                return self.show(message, category, filename, lineno, file, line)
            frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename][-4:]
            self.counts[" <- ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames))] += 1

        warnings.showwarning = show
        self.filters = warnings.filters[:]
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self):
        if self.torch.cuda.is_available():
            self.torch.cuda.set_sync_debug_mode("default")
        self.warnings.showwarning, self.warnings.filters[:] = self.show, self.filters

    def report(self) -> str:
        lines = [f"host-GPU synchronisations in one training step: {sum(self.counts.values())}"]
        lines += [f"{n:5d}  {where}" for where, n in sorted(self.counts.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines) + "\n"


def _short(path: str) -> str:
    return path.split("site-packages/")[-1].replace(str(ROOT) + "/", "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", choices=("serve", "train"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--profile-batch", type=int, default=128)
    ap.add_argument("--work-serve", default="/tmp/gpu_serve")
    ap.add_argument("--work-train", default="/tmp/gpu_train")
    ap.add_argument("--train-set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a TrainConfig field to change for the train profile (repeatable)")
    a = ap.parse_args()
    if a.tiny:
        a.n, a.profile_batch = 12, 6
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    OUT.mkdir(parents=True, exist_ok=True)
    for part in a.parts:
        text = {"serve": serve, "train": train}[part](a)
        (OUT / f"profile_{part}.txt").write_text(text)
        print(text, flush=True)


if __name__ == "__main__":
    main()
