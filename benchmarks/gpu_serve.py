"""Serving speed on one GPU: plain Hugging Face beside the studio's engine, in ONE run, one process.

    python3 benchmarks/gpu_serve.py            # a CUDA GPU: LLaVA-1.5-7B shapes, random weights (~8 minutes)
    python3 benchmarks/gpu_serve.py --tiny     # CPU: the tiny demo model, checks the logic only

A. batch-1 decode, 64 new tokens forced (min_new_tokens = max_new_tokens), ~625-token image+question prompt:
   plain HF bf16 (dynamic cache), bf16 static cache + compile, 4-bit nf4, 4-bit + unmerged PEFT LoRA r128;
   the studio's engine (eval.pool -> eval.local): base, base + adapter, streamed, both sides at once, with the
   decode step compiled (the default on CUDA) and again uncompiled (`*_nocompile`), plus the compile warm-up.
B. 256 questions of generated charts, 16 new tokens forced: plain HF bf16 batched generate at 16/64/128
   beside eval.run.run_eval with its defaults (base; base + adapter in one run).
C. correctness: the engine's first-token scores beside plain HF's, base and adapter (PEFT).
`--phases B` runs B alone (~3 minutes): the studio then loads uncompiled, which its benchmark path is either
way (batches of more than 4 rows run the eager step).
Every timed call includes building inputs (template + processor) and decoding text. Random weights: compute
cost does not depend on their values. Results: $OUT/serving.json (rewritten after every phase) and a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T0 = time.time()
R: dict = {"errors": {}}
OUT = Path(os.environ.get("OUT") or "gpu_out")
LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
NEW_A, NEW_B = 64, 16
COMPILED, UNCOMPILED = {"compile": True}, {"compile": False}     # engine options (the pool keys on them)


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def save():
    OUT.mkdir(parents=True, exist_ok=True)
    R["elapsed_s"] = round(time.time() - T0, 1)
    (OUT / "serving.json").write_text(json.dumps(R, indent=2, default=str))


def phase(name, fn, *a, cost=0, deadline=None, **k):
    """Run one measurement; a failure is recorded with its traceback and the run goes on."""
    if deadline and time.time() - T0 + cost > deadline:
        R["errors"][name] = f"skipped: {time.time() - T0:.0f} s elapsed"
        return None
    log("---", name)
    try:
        return fn(*a, **k)
    except Exception as e:  # noqa: BLE001 - a finding, recorded
        R["errors"][name] = traceback.format_exc()
        log(f"FAILED {name}: {type(e).__name__}: {e}")
    finally:
        save()


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gb(x):
    return round(x / 2**30, 2)


def free():
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn, reps):
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return ts


def figures(t64s, t1s, new=NEW_A):
    """End-to-end tok/s of a 64-token answer, decode-only tok/s (64 minus 1 tokens), time to first token."""
    m64, m1 = statistics.median(t64s), statistics.median(t1s)
    return {"tok_s": round(new / m64, 2), "decode_tok_s": round((new - 1) / (m64 - m1), 2) if m64 > m1 else None,
            "ttft_s": round(m1, 4), "t64_s": [round(t, 4) for t in t64s], "t1_s": [round(t, 4) for t in t1s]}


# ------------------------------------------------------------------ the model (random weights)
def build_base(out: Path, tiny: bool) -> Path:
    """Save a random LLaVA (tiny demo, or CLIP ViT-L/14-336 + Llama-7B shapes) with its processor."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from eval.demo import CHAT_TEMPLATE, build_demo_model, build_tokenizer
    if tiny:
        return build_demo_model(out)
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    tokenizer = build_tokenizer()       # ~1k ids; the embedding keeps the real 32064 rows (same compute)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token, image_seq_length=576,
                         vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):          # random init on the GPU: seconds instead of minutes on CPU
        model = LlavaForConditionalGeneration(config).eval()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():   # the tokenizer has ~1k ids: keep answers inside it, so streams carry visible text
        model.lm_head.weight[len(tokenizer):] = 0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaProcessor(image_processor=ImageProcessor(size={"shortest_edge": 336},
                                                              crop_size={"height": 336, "width": 336}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    free()
    return out


def build_adapter(base: Path, out: Path, rank: int) -> Path:
    """A random LoRA on the LM linears + the projector in modules_to_save (perturbed, so it matters)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    cuda = torch.cuda.is_available()
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16 if cuda else None,
                                                        device_map={"": "cuda" if cuda else "cpu"})
    torch.manual_seed(1)
    lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=LM_LINEARS, init_lora_weights=False,
                      modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)              # random but small, as trained adapters are: answers stay finite
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * p.float().std().to(p.dtype))
    peft_model.save_pretrained(out)
    del peft_model, model
    free()
    return out


# ------------------------------------------------------------------ plain HF (the anchors)
def plain_inputs(model, processor, pairs):
    import torch
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": q}]}],
                                             add_generation_prompt=True) for _, q in pairs]
    x = processor(images=[im for im, _ in pairs], text=prompts, return_tensors="pt", padding=True).to(model.device)
    x["pixel_values"] = x["pixel_values"].to(torch.bfloat16 if model.device.type == "cuda" else torch.float32)
    return x


def plain_generate(model, processor, pairs, new, **kw):
    import torch
    with torch.inference_mode():
        x = plain_inputs(model, processor, pairs)
        out = model.generate(**x, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
        processor.batch_decode(out[:, x["input_ids"].shape[1]:], skip_special_tokens=True)
    return out.shape[1] - x["input_ids"].shape[1]


def plain_logits(model, processor, pair):
    import torch
    with torch.inference_mode():
        return model(**plain_inputs(model, processor, [pair])).logits[0, -1].float().cpu()


def a_plain(name, model, processor, pair, reps, **kw):
    assert plain_generate(model, processor, [pair], NEW_A, **kw) == NEW_A      # warm-up
    plain_generate(model, processor, [pair], 1, **kw)
    r = figures(timed(lambda: plain_generate(model, processor, [pair], NEW_A, **kw), reps),
                timed(lambda: plain_generate(model, processor, [pair], 1, **kw), reps))
    R.setdefault("A", {})[name] = r
    log(name, {k: v for k, v in r.items() if not k.startswith("t")})
    return r


def b_plain(name, model, processor, questions, batch):
    from PIL import Image

    from eval.run import DEFAULT_SUFFIX

    def pairs(qs):
        return [(Image.open(q["image"]).convert("RGB"), q["question"] + DEFAULT_SUFFIX) for q in qs]
    plain_generate(model, processor, pairs(questions[:batch]), NEW_B)       # warm-up at this shape
    sync()
    t = time.perf_counter()
    for i in range(0, len(questions), batch):
        assert plain_generate(model, processor, pairs(questions[i:i + batch]), NEW_B) == NEW_B
    sync()
    wall = time.perf_counter() - t
    R.setdefault("B", {})[name] = r = {"n": len(questions), "batch": batch, "wall_s": round(wall, 3),
                                       "answers_s": round(len(questions) / wall, 2)}
    log(name, r)


# ------------------------------------------------------------------ the studio's engine
def a_studio(base_b, tuned_b, pair, reps, tag=""):
    from eval.protocol import Request
    full, one = Request(pair[0], pair[1], max_new_tokens=NEW_A), Request(pair[0], pair[1], max_new_tokens=1)
    for name, b in ((f"studio_base{tag}", base_b), (f"studio_adapter{tag}", tuned_b)):
        b.generate_kwargs = {"min_new_tokens": NEW_A}
        b.generate([full])
        t64 = timed(lambda: b.generate([full]), reps)
        b.generate_kwargs = {"min_new_tokens": 1}
        t1 = timed(lambda: b.generate([one]), reps)
        b.generate_kwargs = {"min_new_tokens": NEW_A}
        r = figures(t64, t1)

        def streamed():
            t, first = time.perf_counter(), None
            for _ in b.stream(full):
                first = first if first is not None else time.perf_counter() - t
            return time.perf_counter() - t, first if first is not None else float("nan")
        runs = [streamed() for _ in range(reps)]
        r["stream_tok_s"] = round(NEW_A / statistics.median(w for w, _ in runs), 2)
        r["stream_ttft_s"] = round(statistics.median(f for _, f in runs), 4)
        r["stream_ratio"] = round(r["stream_tok_s"] / r["tok_s"], 3)
        R.setdefault("A", {})[name] = r
        log(name, {k: v for k, v in r.items() if not k.startswith("t") or k.startswith("tok")})

    def both():
        streams = [base_b.stream(full), tuned_b.stream(full)]
        done = []

        def read(s):
            "".join(s)
            done.append(time.perf_counter())
        t = time.perf_counter()
        threads = [threading.Thread(target=read, args=(s,)) for s in streams]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return max(done) - t
    both()
    walls = [both() for _ in range(reps)]
    alone = {k: NEW_A / R["A"][f"studio_{k}{tag}"]["stream_tok_s"] for k in ("base", "adapter")}
    wall = statistics.median(walls)
    R["A"][f"studio_both_sides{tag}"] = r = {"wall_s": round(wall, 4),
                                             "ratio_vs_base_alone": round(wall / alone["base"], 3),
                                             "ratio_vs_adapter_alone": round(wall / alone["adapter"], 3)}
    log(f"both sides{tag}", r)


def b_studio(pool, base, adapter, data, n, work, options):
    import shutil

    from eval.run import run_eval
    opts = {"generate_kwargs": {"min_new_tokens": NEW_B}, **options}     # the engine loaded before
    refs = {"base": f"local:{base}", "pair": [f"local:{base}", f"local:{base}+{adapter}"]}
    run_eval(data, [refs["base"]], work / "warm", limit=32, backend_options=opts, pool=pool)    # warm this path once
    generator = pool.backend(refs["base"], **opts).engine.generator
    # base_unshared: each row prefills its whole prompt (no shared chart head), as before the heads were shared
    for tag, models in (("base", [refs["base"]]), ("pair", refs["pair"]), ("base_unshared", [refs["base"]])):
        out = work / f"evals-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        generator.share_prefixes = tag != "base_unshared"
        t = time.perf_counter()
        sums = run_eval(data, models, out, limit=n, max_new_tokens=NEW_B, backend_options=opts, pool=pool)
        wall = time.perf_counter() - t
        generator.share_prefixes = True
        R.setdefault("B", {})[f"studio_eval_{tag}"] = r = {
            "n": sums[0]["n"], "models": len(models), "batch": sums[0]["execution"]["batch_size"],
            "wall_s": round(wall, 3), "answers_s": round(len(models) * sums[0]["n"] / wall, 2),
            "questions_s": round(sums[0]["n"] / wall, 2), "n_errors": [s["n_errors"] for s in sums]}
        log(f"studio_eval_{tag}", r)


def c_correctness(pool, base, adapter, pair, plain_ref, options):
    import torch

    from eval.protocol import Request
    request = Request(pair[0], pair[1], max_new_tokens=1)
    engine = pool.backend(f"local:{base}", **options).engine
    slot = pool.backend(f"local:{base}+{adapter}", **options).slot
    logits = engine.first_logits([request, request], [0, slot])
    c = {}
    for k, name in ((0, "base"), (1, "adapter")):
        if name in plain_ref:
            ref = plain_ref[name]
            c[f"{name}_max_abs_diff"] = round(float((logits[k] - ref).abs().max()), 4)
            c[f"{name}_top1_equal"] = bool(logits[k].argmax() == ref.argmax())
            c[f"{name}_cosine"] = round(float(torch.nn.functional.cosine_similarity(logits[k], ref, dim=0)), 6)
    c["base_vs_adapter_max_abs_diff"] = round(float((logits[0] - logits[1]).abs().max()), 4)
    R["C"] = c
    log("correctness", c)


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default="/tmp/gpu_serve")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=625)
    ap.add_argument("--deadline", type=float, default=550, help="seconds: optional phases are skipped after this")
    ap.add_argument("--phases", default="A,B,C", help="which of A (batch 1), B (batched), C (correctness) to run")
    args = ap.parse_args()

    import peft
    import torch
    import transformers
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        sys.exit("no CUDA GPU: run with --tiny to check the logic on CPU")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    R.update(device=torch.cuda.get_device_name(0) if cuda else "cpu", date=datetime.now(timezone.utc).isoformat(),
             commit=os.environ.get("COMMIT") or commit or "unknown", tiny=args.tiny,
             versions={"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__})
    save()
    import charts
    from eval.run import load_questions
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    base = build_base(work / "base", args.tiny) if not (work / "base" / "config.json").exists() else work / "base"
    adapter = work / "adapter"
    if not (adapter / "adapter_config.json").exists():
        build_adapter(base, adapter, rank=8 if args.tiny else 128)
    data = work / "charts"
    n = args.n if not args.tiny else 16
    if not (data / "dataset.json").exists():
        charts.generate((n + 2) // 3 + 1, seed=0, out_dir=str(data), workers=min(15, os.cpu_count() or 1),
                        qa_per_chart=3, split=(1, 0, 0), instruct_share=0.0)
    questions = load_questions(data)[:n]
    R["build_s"] = round(time.perf_counter() - t, 1)
    log("built base, adapter and", len(questions), "questions in", R["build_s"], "s")

    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig
    processor = AutoProcessor.from_pretrained(base)
    processor.tokenizer.padding_side = "left"
    img = Image.open(questions[0]["image"]).convert("RGB")
    words = "what is the value of the highest bar in this chart compared with the lowest one".split()
    q, k = questions[0]["question"], 0
    target = args.prompt_tokens if not args.tiny else 60
    def prompt_tokens(text):
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return len(processor(images=[img], text=[processor.apply_chat_template(chat, add_generation_prompt=True)])
                   ["input_ids"][0])
    while prompt_tokens(q) < target:
        q += " " + words[k % len(words)]
        k += 1
    from eval.images import pad_to_square
    pair = (pad_to_square(img), q)
    reps = args.reps
    phases = set(args.phases.split(","))
    R["phases"] = sorted(phases)
    dev = "cuda" if cuda else "cpu"
    plain_ref: dict = {}

    # ---- plain HF bf16: dynamic, batched, static + compile
    def plain_bf16():
        t = time.perf_counter()
        m = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16 if cuda else torch.float32,
                                                        device_map={"": dev}).eval()
        R.setdefault("load", {})["plain_bf16_s"] = round(time.perf_counter() - t, 1)
        plain_ref["base"] = plain_logits(m, processor, pair)
        if "A" in phases:
            phase("A_plain_bf16_dynamic", a_plain, "plain_bf16_dynamic", m, processor, pair, reps)
        for b in ((16, 64, 128) if not args.tiny else (4, 8)) if "B" in phases else ():
            phase(f"B_plain_bf16_b{b}", b_plain, f"plain_bf16_b{b}", m, processor, questions, b)

        def static():
            t = time.perf_counter()
            plain_generate(m, processor, [pair], NEW_A, cache_implementation="static")
            first = time.perf_counter() - t
            a_plain("plain_bf16_static_compile", m, processor, pair, reps, cache_implementation="static")
            R["A"]["plain_bf16_static_compile"]["first_call_s"] = round(first, 1)
        if "A" in phases:
            phase("A_plain_bf16_static_compile", static)
        from peft import PeftModel
        pm = PeftModel.from_pretrained(m, str(adapter)).eval()
        plain_ref["adapter"] = plain_logits(pm, processor, pair)
        del pm, m
        free()
    phase("plain_bf16", plain_bf16)

    # ---- the studio: compiled decode (the CUDA default), then uncompiled in a fresh pool
    from eval.pool import ModelPool
    free()

    def studio_load(pool, tag, options):
        say = lambda msg: log("  ", msg)          # noqa: E731
        t = time.perf_counter()
        b = pool.backend(f"local:{base}", on_progress=say, **options)
        after_base = torch.cuda.memory_allocated() if cuda else 0
        t_adapter = time.perf_counter()
        tb = pool.backend(f"local:{base}+{adapter}", on_progress=say, **options)   # attaches, warms adapter mixes
        after_adapter = torch.cuda.memory_allocated() if cuda else 0
        e = b.engine
        R.setdefault("load", {})[f"studio{tag}"] = r = {
            "s": round(time.perf_counter() - t, 1), "mode": e.describe(), "load_s": round(e.load_seconds, 1),
            "warm_s": round(e.warm_seconds, 1), "adapter_attach_warm_s": round(time.perf_counter() - t_adapter, 1),
            "compile_s": round(e.compile_seconds, 1), "compiled_shapes": sorted(map(str, e.generator.compiled_keys)),
            "compile_error": e.generator.compile_error, "graph_error": e.generator.graph_error,
            "base_gb": gb(after_base), "with_adapter_gb": gb(after_adapter)}
        log(f"studio load{tag}", r)
        return b, tb

    pool = ModelPool()
    options = COMPILED if "A" in phases else UNCOMPILED
    loaded = phase("studio_load", studio_load, pool, "", options)
    if loaded:
        base_b, tuned_b = loaded
        if "C" in phases:
            phase("C_correctness", c_correctness, pool, base, adapter, pair, plain_ref, options)
        if "A" in phases:
            phase("A_studio", a_studio, base_b, tuned_b, pair, reps)
        if "B" in phases:
            phase("B_studio", b_studio, pool, base, adapter, data, n, work, options)
        if cuda:
            R["load"]["studio"]["peak_gb"] = gb(torch.cuda.max_memory_allocated())
            R["load"]["studio"]["graph_error"] = base_b.engine.generator.graph_error
            R["load"]["studio"]["compile_error"] = base_b.engine.generator.compile_error
    pool.unload()
    base_b = tuned_b = loaded = None
    free()

    pool = ModelPool()
    loaded = "A" in phases and phase("studio_load_nocompile", studio_load, pool, "_nocompile", UNCOMPILED, cost=20,
                                     deadline=args.deadline)
    if loaded:
        phase("A_studio_nocompile", a_studio, *loaded, pair, reps, "_nocompile", cost=30, deadline=args.deadline)
    pool.unload()
    loaded = None
    free()

    # ---- plain HF 4-bit (+ PEFT): last, skipped when time is short
    def plain_4bit():
        from peft import PeftModel

        from eval.local import skip_modules
        from transformers import AutoConfig
        if cuda:
            q4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16,
                                    llm_int8_skip_modules=skip_modules(AutoConfig.from_pretrained(base)))
            m = AutoModelForImageTextToText.from_pretrained(base, quantization_config=q4, dtype=torch.bfloat16,
                                                            device_map={"": dev}).eval()
        else:
            m = AutoModelForImageTextToText.from_pretrained(base).eval()
        a_plain("plain_4bit", m, processor, pair, 2)
        pm = PeftModel.from_pretrained(m, str(adapter)).eval()
        a_plain("plain_4bit_peft_r128", pm, processor, pair, 2)
    if "A" in phases:
        phase("plain_4bit", plain_4bit, cost=100, deadline=args.deadline)

    # ---- the figures the issue tracks
    A, B = R.get("A", {}), R.get("B", {})
    get = lambda d, k, f: (d.get(k) or {}).get(f)          # noqa: E731
    plain_best = max((v["answers_s"] for k, v in B.items() if k.startswith("plain")), default=None)
    eval_base, eval_pair = get(B, "studio_eval_base", "wall_s"), get(B, "studio_eval_pair", "wall_s")
    R["summary"] = {
        "decode_base_tok_s": get(A, "studio_base", "decode_tok_s"),
        "decode_adapter_tok_s": get(A, "studio_adapter", "decode_tok_s"),
        "e2e_base_tok_s": get(A, "studio_base", "tok_s"), "e2e_adapter_tok_s": get(A, "studio_adapter", "tok_s"),
        "stream_ratio": get(A, "studio_base", "stream_ratio"),
        "stream_ratio_adapter": get(A, "studio_adapter", "stream_ratio"),
        "ttft_s": get(A, "studio_base", "stream_ttft_s"),
        "both_sides_ratio": get(A, "studio_both_sides", "ratio_vs_base_alone"),
        "decode_base_nocompile_tok_s": get(A, "studio_base_nocompile", "decode_tok_s"),
        "decode_adapter_nocompile_tok_s": get(A, "studio_adapter_nocompile", "decode_tok_s"),
        "both_sides_ratio_nocompile": get(A, "studio_both_sides_nocompile", "ratio_vs_base_alone"),
        "compile_warm_s": get(R.get("load", {}), "studio", "compile_s"),
        "warm_s": get(R.get("load", {}), "studio", "warm_s"),
        "eval_base_answers_s": get(B, "studio_eval_base", "answers_s"),
        "eval_pair_ratio": round(eval_pair / eval_base, 3) if eval_base and eval_pair else None,
        "eval_base_unshared_answers_s": get(B, "studio_eval_base_unshared", "answers_s"),
        "anchor_static_tok_s": get(A, "plain_bf16_static_compile", "decode_tok_s"),
        "anchor_static_e2e_tok_s": get(A, "plain_bf16_static_compile", "tok_s"),
        "anchor_dynamic_tok_s": get(A, "plain_bf16_dynamic", "decode_tok_s"),
        "anchor_eval_best_answers_s": plain_best,
        "device": R["device"], "date": R["date"], "commit": R["commit"]}
    save()
    s = R["summary"]
    s["anchor_4bit_peft_tok_s"] = get(A, "plain_4bit_peft_r128", "decode_tok_s")
    rows = [("batch-1 decode, base vs plain bf16 static + compile (tok/s)", "decode_base_tok_s", "anchor_static_tok_s"),
            ("batch-1 decode, base: compiled vs uncompiled engine (tok/s)", "decode_base_tok_s",
             "decode_base_nocompile_tok_s"),
            ("batch-1 decode, base + adapter: compiled vs uncompiled engine (tok/s)", "decode_adapter_tok_s",
             "decode_adapter_nocompile_tok_s"),
            ("batch-1 decode, base + adapter vs plain 4-bit + PEFT (tok/s)", "decode_adapter_tok_s",
             "anchor_4bit_peft_tok_s"),
            ("benchmark, base (answers/s)", "eval_base_answers_s", "anchor_eval_best_answers_s"),
            ("benchmark, base: chart heads shared vs not (answers/s)", "eval_base_answers_s",
             "eval_base_unshared_answers_s")]
    print("\n| what | studio | anchor | ratio |\n|---|---:|---:|---:|")
    for label, mine, anchor in rows:
        ratio = f"{s[mine] / s[anchor]:.2f}x" if s.get(mine) and s.get(anchor) else "-"
        print(f"| {label} | {s.get(mine)} | {s.get(anchor)} | {ratio} |")
    for key in ("stream_ratio", "ttft_s", "both_sides_ratio", "both_sides_ratio_nocompile", "eval_pair_ratio",
                "compile_warm_s"):
        print(f"| {key} | {s.get(key)} | | |")
    print(f"errors: {list(R['errors'])}")


if __name__ == "__main__":
    main()
