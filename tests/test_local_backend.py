"""LocalBackend: one base copy serves the base and LoRA adapters, with answers identical to separate runs."""
import json
import threading

import pytest
from PIL import Image

from eval.local import AdapterError, LocalBackend, list_adapters, loaded_engines, release_engines, skip_modules
from eval.protocol import Request

LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def make_adapter(base_dir, out_dir, seed=1, hidden_size=None, projector=True):
    """A random LoRA adapter (init_lora_weights=False so it changes answers), optionally for a base whose
    language model has another hidden size, optionally with the projector in modules_to_save."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    if hidden_size is None:
        model = AutoModelForImageTextToText.from_pretrained(base_dir)
    else:
        config = AutoConfig.from_pretrained(base_dir)
        config.text_config.hidden_size = hidden_size
        config.text_config.intermediate_size = hidden_size * 2
        model = AutoModelForImageTextToText.from_config(config)
    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LM_LINEARS, init_lora_weights=False,
                      modules_to_save=["multi_modal_projector"] if projector else None, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    if projector:   # a "trained" projector, so disable_adapter must revert it for the base's answers
        with torch.no_grad():
            for p in peft_model.base_model.model.model.multi_modal_projector.modules_to_save["default"].parameters():
                p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapter(demo_model, tmp_path_factory):
    return make_adapter(demo_model, tmp_path_factory.mktemp("runs") / "r1" / "adapter")


@pytest.fixture(scope="module")
def requests_():
    images = [Image.new("RGB", (80, 50), (200, 30, 30)), Image.new("RGB", (40, 90), (0, 0, 200)),
              Image.effect_noise((64, 64), 40).convert("RGB")]
    questions = ["what is the value of the highest bar", "which category", "how many categories are shown in chart"]
    return [Request(img, q, max_new_tokens=10) for img, q in zip(images, questions)]


def singles(backend, requests):
    return [backend.generate([r])[0] for r in requests]


def test_base_and_adapter_from_one_copy_match_separate_runs(demo_model, adapter, requests_):
    release_engines()
    base_alone = singles(LocalBackend(str(demo_model)), requests_)
    release_engines()
    tuned_alone = singles(LocalBackend(str(demo_model), adapter), requests_)   # never runs disable_adapter
    release_engines()

    base, tuned = LocalBackend(str(demo_model)), LocalBackend(str(demo_model), adapter)
    assert len(loaded_engines()) == 1 and base.engine is tuned.engine
    assert tuned_alone != base_alone, "the random adapter should change the answers"
    # interleaved, so every switch direction is exercised
    assert singles(tuned, requests_) == tuned_alone
    assert singles(base, requests_) == base_alone
    assert singles(tuned, requests_) == tuned_alone


def test_batch_matches_single_requests(demo_model, adapter, requests_):
    for backend in (LocalBackend(str(demo_model)), LocalBackend(str(demo_model), adapter)):
        assert backend.generate(requests_) == singles(backend, requests_)


def test_stream_concatenation_equals_generate(demo_model, adapter, requests_):
    for backend in (LocalBackend(str(demo_model)), LocalBackend(str(demo_model), adapter)):
        for r in requests_:
            pieces = list(backend.stream(r))
            assert pieces and "".join(pieces) == backend.generate([r])[0]


def test_concurrent_base_and_adapter_threads_give_sequential_answers(demo_model, adapter, requests_):
    base, tuned = LocalBackend(str(demo_model)), LocalBackend(str(demo_model), adapter)
    expected = {"base": singles(base, requests_), "tuned": singles(tuned, requests_)}
    results, errors = {"base": [], "tuned": []}, []

    def hammer(label, backend, use_stream):
        try:
            for _ in range(4):
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
    assert results["base"] == expected["base"] * 4
    assert results["tuned"] == expected["tuned"] * 4


def test_abandoned_stream_releases_the_engine(demo_model, requests_):
    backend = LocalBackend(str(demo_model))
    stream = backend.stream(requests_[0])
    next(stream)
    stream.close()                       # e.g. the user pressed Stop
    assert backend.generate(requests_[:1])   # would deadlock if the lock were still held


def test_adapter_for_another_hidden_size_is_refused_clearly(demo_model, tmp_path, requests_):
    wrong = make_adapter(demo_model, tmp_path / "wrong", hidden_size=32, projector=False)
    with pytest.raises(AdapterError, match=r"trained for a model with hidden size 32.*has 64"):
        LocalBackend(str(demo_model), wrong)
    # the shared base is untouched and still answers
    assert LocalBackend(str(demo_model)).generate(requests_[:1])


def test_missing_or_non_peft_adapter_folder_is_refused(demo_model, tmp_path):
    with pytest.raises(AdapterError, match="adapter folder not found"):
        LocalBackend(str(demo_model), tmp_path / "nope")
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        LocalBackend(str(demo_model), tmp_path)


def test_adapter_trained_on_another_base_name_warns(demo_model, adapter, tmp_path, requests_):
    other = tmp_path / "other"
    other.mkdir()
    for f in adapter.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "llava-hf/llava-1.5-7b-hf"
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="llava-1.5-7b-hf"):
        backend = LocalBackend(str(demo_model), other)
    assert backend.name == "demo-llava + other" and backend.generate(requests_[:1])


def test_name_batch_size_and_text_only_requests(demo_model, adapter):
    backend = LocalBackend(str(demo_model), adapter)
    assert backend.name == "demo-llava + r1/adapter" and backend.max_batch == 4
    assert isinstance(backend.generate([Request(None, "what is the total", max_new_tokens=5)])[0], str)


def test_four_bit_is_refused_on_cpu(demo_model):
    with pytest.raises(ValueError, match="CUDA"):
        LocalBackend(str(demo_model), quantize="4bit", device="cpu")


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
        LocalBackend(str(demo_model), adapter=str(adapter)).generate([Request(None, "hi", max_new_tokens=2)])
