"""The local engine: one base copy serves the base and LoRA adapters in shared batches, with answers
identical to separate runs, streams that cut on character boundaries, and cancellation that frees it."""
import json
import threading
import time

import pytest
from PIL import Image

from conftest import ROOT
from eval.compare import list_adapters
from eval.engine import Detokenizer
from eval.local import AdapterError, skip_modules
from eval.pool import ModelPool
from eval.protocol import Request

LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def make_adapter(base_dir, out_dir, seed=1, hidden_size=None, projector=True, target=LM_LINEARS, full=()):
    """A random LoRA adapter (init_lora_weights=False so it changes answers), optionally for a base whose
    language model has another hidden size, optionally with the projector in modules_to_save."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    if hidden_size is None:
        model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    else:
        config = AutoConfig.from_pretrained(base_dir)
        config.text_config.hidden_size = hidden_size
        config.text_config.intermediate_size = hidden_size * 2
        model = AutoModelForImageTextToText.from_config(config)
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False,
                      modules_to_save=(["multi_modal_projector"] if projector else []) + list(full) or None,
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():       # modules trained in full (e.g. lm_head, embed_tokens)
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name and any(f in name for f in full):
                p.add_(torch.randn_like(p) * 0.5)
    if projector:   # a "trained" projector, so the base's rows must keep the base's own
        with torch.no_grad():
            for p in peft_model.base_model.model.model.multi_modal_projector.modules_to_save["default"].parameters():
                p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapter(demo_model, tmp_path_factory):
    return make_adapter(demo_model, tmp_path_factory.mktemp("runs") / "r1" / "adapter")


@pytest.fixture(scope="module")
def adapter2(demo_model, tmp_path_factory):
    return make_adapter(demo_model, tmp_path_factory.mktemp("runs") / "r2" / "adapter", seed=7)


@pytest.fixture(scope="module")
def requests_():
    """The shipped example charts and questions (a blank image gets an empty answer from the demo model)."""
    examples = json.loads((ROOT / "assets" / "examples" / "examples.json").read_text())
    return [Request(Image.open(ROOT / e["image"]).convert("RGB"), e["question"], max_new_tokens=10) for e in examples]


def singles(backend, requests):
    return [backend.generate([r])[0] for r in requests]


def peft_answers(demo_model, adapter, requests):
    """What plain transformers + PEFT generate: the reference the engine must reproduce."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from eval.images import pad_to_square
    # float32 as the engine runs on CPU: the shipped weights are fp16, and fp16 on CPU decodes only <unk>
    model = AutoModelForImageTextToText.from_pretrained(demo_model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(demo_model)
    peft = PeftModel.from_pretrained(model, str(adapter)).eval() if adapter else None
    out = []
    for r in requests:
        prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": r.question}]}], add_generation_prompt=True)
        x = processor(text=[prompt], images=[pad_to_square(r.image)], return_tensors="pt")
        with torch.inference_mode():
            ids = (peft or model).generate(**x, max_new_tokens=r.max_new_tokens, do_sample=False)
        text = processor.tokenizer.decode(ids[0, x["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append(text.replace("\ufffd", "").strip())     # the engine drops bytes that are not UTF-8
    return out


def test_base_and_adapter_from_one_copy_match_plain_transformers_and_peft(demo_model, adapter, requests_):
    pool = ModelPool()
    base, tuned = pool.backend(f"local:{demo_model}"), pool.backend(f"local:{demo_model}+{adapter}")
    assert base.engine is tuned.engine and len(pool.loaded()) == 1
    expected_base, expected_tuned = peft_answers(demo_model, None, requests_), peft_answers(demo_model, adapter, requests_)
    assert expected_base != expected_tuned, "the random adapter should change the answers"
    # interleaved, so every order of rows is exercised
    assert singles(tuned, requests_) == expected_tuned
    assert singles(base, requests_) == expected_base
    assert singles(tuned, requests_) == expected_tuned


def test_adapters_that_replace_lm_head_and_embeddings_match_peft(demo_model, tmp_path, requests_):
    full = make_adapter(demo_model, tmp_path / "full", seed=3, full=("lm_head", "embed_tokens"))
    pool = ModelPool()
    base, tuned = pool.backend(f"local:{demo_model}"), pool.backend(f"local:{demo_model}+{full}")
    assert singles(tuned, requests_) == peft_answers(demo_model, full, requests_)
    together = base.engine.generate(requests_ * 2, [0] * 3 + [tuned.slot] * 3)
    assert together == peft_answers(demo_model, None, requests_) + peft_answers(demo_model, full, requests_)


def test_mixed_batches_and_batches_match_single_requests(demo_model, adapter, adapter2, requests_):
    pool = ModelPool()
    backends = [pool.backend(f"local:{demo_model}" + (f"+{a}" if a else "")) for a in (None, adapter, adapter2)]
    alone = [singles(b, requests_) for b in backends]
    engine = backends[0].engine
    mixed = engine.generate(requests_ * 3, [b.slot for b in backends for _ in requests_])
    assert mixed == alone[0] + alone[1] + alone[2]
    assert backends[1].generate(requests_) == alone[1]


def test_questions_about_one_chart_prefill_its_head_once_with_the_same_answers(demo_model, adapter, requests_):
    """A benchmark asks several questions per chart: rows with the same image and adapter prefill the
    template + image tokens once and copy its cache. Answers equal the unshared batch's, token for token."""
    pool = ModelPool()
    base, tuned = pool.backend(f"local:{demo_model}"), pool.backend(f"local:{demo_model}+{adapter}")
    engine, generator = base.engine, base.engine.generator
    questions = ["What is the title of the chart?", "Which category has the highest value?", "How many bars?"]
    asked = [Request(r.image, q, max_new_tokens=8) for r in requests_ for q in questions]
    slots = [0] * len(asked) + [tuned.slot] * len(asked)
    batch = engine.prepare([(r, s, {}) for r, s in zip(asked * 2, slots)])
    group_of, _, firsts = generator._shared_heads(batch.rows)
    assert len(firsts) == 2 * len(requests_) and len(set(group_of)) == len(firsts)   # one head per (chart, slot)
    try:
        generator.share_prefixes = False
        unshared, unshared_logits = engine.generate(asked * 2, slots), engine.first_logits(asked * 2, slots)
    finally:
        generator.share_prefixes = True
    shared, shared_logits = engine.generate(asked * 2, slots), engine.first_logits(asked * 2, slots)
    assert shared == unshared
    assert shared[:len(asked)] != shared[len(asked):], "the adapter's rows should answer differently"
    assert (shared_logits - unshared_logits).abs().max() < 1e-4


def test_both_sides_streaming_at_once_share_one_batch_and_equal_one_at_a_time(demo_model, adapter, requests_):
    pool = ModelPool()
    base, tuned = pool.backend(f"local:{demo_model}"), pool.backend(f"local:{demo_model}+{adapter}")
    request = requests_[0]
    alone = ["".join(base.stream(request)), "".join(tuned.stream(request))]
    assert alone == [base.generate([request])[0], tuned.generate([request])[0]]
    before = base.engine.batches
    streams = [base.stream(request), tuned.stream(request)]     # submitted together, as Compare's sides are
    together = ["".join(s) for s in streams]
    assert together == alone
    assert base.engine.batches == before + 1, "both sides should have been decoded in one batch"


def test_stopping_a_stream_frees_the_engine_within_a_step(demo_model, requests_):
    backend = ModelPool().backend(f"local:{demo_model}", generate_kwargs={"min_new_tokens": 400})
    long = Request(requests_[0].image, requests_[0].question, max_new_tokens=400)
    start = time.perf_counter()
    full = "".join(backend.stream(long))
    full_s = time.perf_counter() - start
    stream = backend.stream(long)
    next(iter(stream))
    stream.close()                       # e.g. the user pressed Stop
    start = time.perf_counter()
    assert backend.generate([Request(requests_[0].image, "which category", max_new_tokens=2)])
    assert time.perf_counter() - start < max(0.5, full_s / 3), "the next request waited for the stopped one"
    assert len(full) > 0


def test_a_dropped_stream_cancels_its_row(demo_model, requests_):
    backend = ModelPool().backend(f"local:{demo_model}", generate_kwargs={"min_new_tokens": 300})
    stream = backend.stream(Request(requests_[0].image, "q", max_new_tokens=300))
    pieces = iter(stream)
    next(pieces)
    pieces.close()                       # the consumer went away (closed tab) without calling close()
    deadline = time.time() + 5
    while backend.engine.busy and time.time() < deadline:
        time.sleep(0.01)
    assert not backend.engine.busy and stream.tokens < 300


def test_stray_bytes_never_reach_the_answer_as_replacement_characters(demo_model, requests_):
    """The random demo base emits bytes that are not UTF-8; its answers showed U+FFFD boxes."""
    backend = ModelPool().backend(f"local:{demo_model}", generate_kwargs={"min_new_tokens": 64})
    long = [Request(r.image, r.question, max_new_tokens=64) for r in requests_]
    assert not any("\ufffd" in text for text in backend.generate(long))
    assert not any("\ufffd" in "".join(backend.stream(r)) for r in long)


def test_a_finished_row_ends_its_stream_while_the_batch_goes_on(demo_model, requests_):
    pool = ModelPool()
    short = pool.backend(f"local:{demo_model}")
    long = pool.backend(f"local:{demo_model}", generate_kwargs={"min_new_tokens": 300})
    streams = [short.stream(Request(None, "hi", max_new_tokens=2)), long.stream(Request(None, "hi", max_new_tokens=300))]
    start = time.perf_counter()
    "".join(streams[0])
    first = time.perf_counter() - start
    "".join(streams[1])
    assert first < (time.perf_counter() - start) / 3, "the 2-token side waited for the 300-token side"


def test_streamed_text_is_cut_on_character_boundaries(demo_model):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    text = "Sales in € rose 5% — naïve 東京 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decode = lambda i: tokenizer.decode(i, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    assert "\ufffd" in "".join(decode([t]) for t in ids), "the test needs a character split across tokens"
    detok = Detokenizer(decode)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == decode(ids)


def test_concurrent_threads_give_sequential_answers(demo_model, adapter, requests_):
    pool = ModelPool()
    base, tuned = pool.backend(f"local:{demo_model}"), pool.backend(f"local:{demo_model}+{adapter}")
    expected = {"base": singles(base, requests_), "tuned": singles(tuned, requests_)}
    results, errors = {"base": [], "tuned": []}, []

    def hammer(label, backend, use_stream):
        try:
            for _ in range(3):
                for r in requests_:
                    text = "".join(backend.stream(r)) if use_stream else backend.generate([r])[0]
                    results[label].append(text)
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=("base", base, False)),
               threading.Thread(target=hammer, args=("tuned", tuned, True))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert results["base"] == expected["base"] * 3
    assert results["tuned"] == expected["tuned"] * 3


def test_model_generate_path_gives_the_same_answers(demo_model, adapter, requests_):
    """Models other than LLaVA-1.5 run through transformers' generate: same answers on the demo model."""
    pool = ModelPool()
    tuned = pool.backend(f"local:{demo_model}+{adapter}")
    fast = singles(tuned, requests_)
    tuned.engine.generator = None
    assert singles(tuned, requests_) == fast


def test_pool_loads_once_per_options_and_unloads(demo_model, requests_):
    pool = ModelPool(max_engines=1)
    a = pool.backend(f"local:{demo_model}")
    assert pool.backend(f"local:{demo_model}").engine is a.engine
    b = pool.backend(f"local:{demo_model}", device="cpu")      # other options: another engine; LRU evicts a
    assert b.engine is not a.engine and [e["base"] for e in pool.loaded()] == [str(demo_model)]
    with pytest.raises(RuntimeError, match="unloaded"):        # not a job queued to a stopped worker, forever
        a.generate(requests_[:1])
    assert pool.unload() == 1 and pool.loaded() == []


def test_unload_before_exit_waits_for_an_engine_finishing_its_batch():
    import threading

    class Engine:        # a worker that delivered its last token and is still leaving its batch
        busy, closed = True, None

        def close(self, wait=0.0):
            self.closed = wait

    pool, engine = ModelPool(), Engine()
    pool._engines["k"] = engine
    threading.Timer(0.2, setattr, (engine, "busy", False)).start()
    assert pool.unload(wait=5.0) == 1 and engine.closed == 5.0       # closed and joined, not left running
    assert pool.loaded() == []


def test_adapter_trained_on_another_base_name_warns(demo_model, adapter, tmp_path, requests_):
    other = tmp_path / "other"
    other.mkdir()
    for f in adapter.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "llava-hf/llava-1.5-7b-hf"
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="llava-1.5-7b-hf"):
        backend = ModelPool().backend(f"local:{demo_model}+{other}")
    assert backend.name == "demo-llava + other" and backend.generate(requests_[:1])


def test_missing_or_non_peft_adapter_folder_is_refused(demo_model, tmp_path):
    pool = ModelPool()
    with pytest.raises(AdapterError, match="adapter folder not found"):
        pool.backend(f"local:{demo_model}+{tmp_path / 'nope'}")
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        pool.backend(f"local:{demo_model}+{tmp_path}")


def test_name_batch_size_and_text_only_requests(demo_model, adapter):
    backend = ModelPool().backend(f"local:{demo_model}+{adapter}")
    assert backend.name == "demo-llava + r1/adapter" and backend.max_batch == 4
    assert isinstance(backend.generate([Request(None, "what is the total", max_new_tokens=5)])[0], str)


def test_four_bit_is_refused_on_cpu(demo_model):
    with pytest.raises(ValueError, match="CUDA"):
        ModelPool().backend(f"local:{demo_model}", quantize="4bit", device="cpu")


def test_skip_modules_are_full_names_of_vision_projector_and_head(demo_model):
    from transformers import AutoConfig
    assert skip_modules(AutoConfig.from_pretrained(demo_model)) == [
        "model.vision_tower", "model.multi_modal_projector", "lm_head"]


def test_list_adapters_finds_run_adapters(tmp_path):
    for folder in ("runs/a/adapter", "runs/a/checkpoint-5", "runs/b/adapter", "runs/c/logs"):
        (tmp_path / folder).mkdir(parents=True)
    for folder in ("runs/a/adapter", "runs/a/checkpoint-5", "runs/b/adapter"):
        (tmp_path / folder / "adapter_config.json").write_text("{}")
    assert [p.relative_to(tmp_path).as_posix() for p in list_adapters(tmp_path)] == [
        "runs/a/adapter", "runs/a/checkpoint-5", "runs/b/adapter"]
    assert list_adapters(tmp_path / "empty") == []


def test_a_pickled_adapter_is_refused_without_being_loaded(tmp_path, demo_model):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "x"}')
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterError, match="safetensors"):
        ModelPool().backend(f"local:{demo_model}+{adapter}")
