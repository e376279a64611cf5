"""Base vs fine-tuned from ONE 4-bit copy of a LLaVA-1.5-7B-shaped model: load time, GPU memory, batch-1
decode speed with and without the adapter, and that the shared copy computes what separate single-model
runs compute (first-token scores identical; greedy answers compared), also with two threads hammering
base and adapter at once.

    python benchmarks/gpu_compare.py            # H100: random weights, real shapes (~3-4 minutes)
    python benchmarks/gpu_compare.py --tiny     # CPU: the tiny demo model, checks the logic only

Weights are random (no real LLaVA weights exist here): compute cost does not depend on their values, and
min_new_tokens = max_new_tokens keeps random models from stopping early. The model is saved in bf16 and
loaded through the normal from_pretrained path (4-bit nf4 on CUDA), exactly as the studio loads a hub id.
Only torch/transformers/peft/bitsandbytes and eval.{local,protocol,images,demo} are imported.
Results: a table on stdout and $OUT/gpu_compare.json (./gpu_out when OUT is unset).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


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
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaProcessor(image_processor=ImageProcessor(size={"shortest_edge": 336},
                                                              crop_size={"height": 336, "width": 336}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def build_adapter(base: Path, out: Path, rank: int) -> Path:
    """A random LoRA on the LM linears + the projector in modules_to_save (perturbed, so it matters)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.bfloat16 if device == "cuda" else None,
                                                        device_map={"": device})
    torch.manual_seed(1)
    lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=LM_LINEARS, init_lora_weights=False,
                      modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * p.float().std().to(p.dtype))
    peft_model.save_pretrained(out)
    del peft_model, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def requests(n: int, max_new: int, size: int):
    from PIL import Image

    from eval.protocol import Request
    colours = [(200, 30, 30), (20, 90, 200), (30, 160, 60), (240, 200, 20)]
    questions = ["What is the value of the highest bar?", "Which category has the lowest value?",
                 "How many categories are shown in the chart?", "What is the difference between North and South?"]
    return [Request(Image.new("RGB", (size + 40 * i, size), colours[i % 4]), questions[i % 4], max_new_tokens=max_new)
            for i in range(n)]


def gpu_memory_gb() -> float | None:
    import torch
    return round(torch.cuda.memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def tokens_per_second(backend, request, repeats: int) -> float:
    backend.generate([request])                     # warm-up (kernels, caches)
    start = time.perf_counter()
    for _ in range(repeats):
        backend.generate([request])
    return round(request.max_new_tokens * repeats / (time.perf_counter() - start), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny demo model (CPU); checks the logic only")
    parser.add_argument("--work", default="/tmp/gpu_compare", help="where the random model and adapter are saved")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from eval.demo import build_tokenizer as LocalTokenizer
    from eval.local import LocalBackend, get_engine, release_engines
    out_dir = Path(os.environ.get("OUT") or "gpu_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) / ("tiny" if args.tiny else "llava-7b-shaped")
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("no CUDA GPU: run with --tiny to check the logic on CPU", file=sys.stderr)
        return 2
    quantize = "4bit" if cuda else "none"
    results: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "quantize": quantize,
                     "torch": torch.__version__, "tiny": args.tiny, "max_new_tokens": args.max_new_tokens}
    import peft
    import transformers
    results.update(transformers=transformers.__version__, peft=peft.__version__)

    t = time.perf_counter()
    base_dir = build_base(work / "base", args.tiny)
    adapter_dir = build_adapter(base_dir, work / "adapter", rank=8 if args.tiny else 128)
    results["build_s"] = round(time.perf_counter() - t, 1)
    extra = {"min_new_tokens": args.max_new_tokens}
    reqs = requests(4, args.max_new_tokens, 64 if args.tiny else 336)

    # Correctness runs keep to the tokenizer's ids (the embedding has 32064 rows, the tiny tokenizer ~1k)
    # so answers decode to visible text.
    vocab = len(LocalTokenizer())
    check = {**extra, "suppress_tokens": list(range(vocab, 32064))} if not args.tiny else extra
    logits = lambda b: [b.engine.next_token_logits(r, b.adapter_name) for r in reqs]   # noqa: E731

    # 1-2: separate single-model runs (a fresh engine each), the reference answers and scores.
    release_engines()
    alone = LocalBackend(str(base_dir), quantize=quantize, generate_kwargs=check)
    base_alone, base_alone_logits = [alone.generate([r])[0] for r in reqs], logits(alone)
    del alone
    release_engines()
    alone = LocalBackend(str(base_dir), adapter_dir, quantize=quantize, generate_kwargs=check)
    tuned_alone, tuned_alone_logits = [alone.generate([r])[0] for r in reqs], logits(alone)
    del alone
    release_engines()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # 3: one shared copy serving both.
    t = time.perf_counter()
    engine = get_engine(str(base_dir), quantize)
    results["load_s"] = round(time.perf_counter() - t, 1)
    results["gpu_gb_base_only"] = gpu_memory_gb()
    base = LocalBackend(str(base_dir), quantize=quantize, generate_kwargs=extra)
    t = time.perf_counter()
    adapter = LocalBackend(str(base_dir), adapter_dir, quantize=quantize, generate_kwargs=extra)
    results["adapter_attach_s"] = round(time.perf_counter() - t, 2)
    results["gpu_gb_base_plus_adapter"] = gpu_memory_gb()
    results["engines_loaded"] = 1 if base.engine is adapter.engine is engine else 2
    results["base_tok_s"] = tokens_per_second(base, reqs[0], args.repeats)
    results["adapter_tok_s"] = tokens_per_second(adapter, reqs[0], args.repeats)
    base.generate_kwargs = adapter.generate_kwargs = check

    # Scores: shared copy vs separate runs must agree to float noise; base vs adapter must not.
    shared_logits = {"adapter": logits(adapter), "base": logits(base)}
    diff = lambda xs, ys: max(float((x - y).abs().max()) for x, y in zip(xs, ys))   # noqa: E731
    results["logit_diff_base_shared_vs_alone"] = round(diff(shared_logits["base"], base_alone_logits), 4)
    results["logit_diff_adapter_shared_vs_alone"] = round(diff(shared_logits["adapter"], tuned_alone_logits), 4)
    results["logit_diff_base_vs_adapter"] = round(diff(base_alone_logits, tuned_alone_logits), 4)
    results["adapters_change_answers"] = results["logit_diff_base_vs_adapter"] > 0.1
    shared = {"base": [], "adapter": []}
    for r in reqs:                                   # interleaved: every switch direction
        shared["adapter"].append(adapter.generate([r])[0])
        shared["base"].append(base.generate([r])[0])
    results["greedy_text_equal"] = (f"{sum(map(str.__eq__, shared['base'], base_alone))}/{len(reqs)} base, "
                                    f"{sum(map(str.__eq__, shared['adapter'], tuned_alone))}/{len(reqs)} adapter")
    tolerance = 0.05 if cuda else 1e-4
    results["shared_equals_separate"] = (results["logit_diff_base_shared_vs_alone"] <= tolerance and
                                         results["logit_diff_adapter_shared_vs_alone"] <= tolerance)

    hammered, errors = {"base": [], "adapter": []}, []

    def hammer(label, backend, use_stream):
        try:
            for _ in range(2):
                for r in reqs[:2]:
                    hammered[label].append("".join(backend.stream(r)) if use_stream else backend.generate([r])[0])
        except Exception as e:                       # noqa: BLE001 - reported in the results
            errors.append(f"{label}: {type(e).__name__}: {e}")

    t = time.perf_counter()
    threads = [threading.Thread(target=hammer, args=("base", base, False)),
               threading.Thread(target=hammer, args=("adapter", adapter, True))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    results["hammer_s"] = round(time.perf_counter() - t, 1)
    # A missing lock shows as answers of the other model from the first token on. Random bf16 weights
    # give near-tied logits, and decode kernels are not bitwise deterministic, so greedy text may
    # still flip a late token run to run (the first-token scores above are the exact check). Exact
    # matches are counted; a pass needs each answer to follow its own model's sequential answer for at
    # least 8 characters and further than the other model's.
    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    checks = [(h, own, other) for label, other_label in (("base", "adapter"), ("adapter", "base"))
              for h, own, other in zip(hammered[label], shared[label][:2] * 2, shared[other_label][:2] * 2)]
    results["hammer_exact"] = f"{sum(h == own for h, own, _ in checks)}/{len(checks)}"
    results["hammer_min_common_prefix_chars"] = min((prefix(h, own) for h, own, _ in checks), default=0)
    results["threads_equal_sequential"] = not errors and len(checks) == 8 and all(
        prefix(h, own) >= min(8, len(own)) and prefix(h, own) > prefix(h, other) for h, own, other in checks)
    results["errors"] = errors
    if cuda:
        results["gpu_gb_peak"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    results["answers"] = {"base_alone": base_alone, "base_shared": shared["base"], "adapter_alone": tuned_alone,
                          "adapter_shared": shared["adapter"], "hammered": hammered}

    (out_dir / "gpu_compare.json").write_text(json.dumps(results, indent=2))
    width = max(map(len, results))
    for key, value in results.items():
        if key != "answers":
            print(f"{key:<{width}}  {value}")
    print(f"wrote {out_dir / 'gpu_compare.json'}")
    ok = results["shared_equals_separate"] and results["threads_equal_sequential"] and results["adapters_change_answers"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
