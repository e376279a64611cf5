"""The speed and memory options of training.train leave training what it was (tiny demo LLaVA, CPU):
the answer-only chunked loss equals the model's own loss (value, gradients, loss curve), bf16 adapters
track the fp32 curve, and the GPU-only kernels are skipped cleanly where they cannot run."""
import json
import warnings
from pathlib import Path

import pytest
import torch

from tests.test_train import make_dataset, quick
from training import loss as loss_mod
from training.config import ConfigError, TrainConfig
from training.train import train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"), n_train=16)


def curve(out) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def trained_dtypes(cfg) -> tuple[list[float], set]:
    from transformers import TrainerCallback

    seen = set()

    class Peek(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen.update(str(p.dtype) for p in model.parameters() if p.requires_grad)

    train(cfg, callbacks=[Peek()])
    return curve(Path(cfg.output_dir)), seen


def a_batch(demo_model, dataset):
    from transformers import AutoProcessor

    from training.data import ChatDataset, Collator, read_records

    processor = AutoProcessor.from_pretrained(demo_model)
    ds = ChatDataset(read_records(dataset / "train.jsonl")[:4], processor, 1024)     # 576 image tokens + the turns
    return Collator(processor.tokenizer.pad_token_id)([ds[i] for i in range(4)])


def lora_model(demo_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(demo_model, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                            modules_to_save=["lm_head"], init_lora_weights=False))


@pytest.mark.parametrize("chunk", [3, 1024])
def test_chunked_answer_loss_equals_the_model_loss_and_its_gradients(demo_model, dataset, monkeypatch, chunk):
    monkeypatch.setattr(loss_mod, "CHUNK", chunk)
    model = lora_model(demo_model)
    model.train()
    batch = a_batch(demo_model, dataset)
    n = int((batch["labels"][:, 1:] != -100).sum())

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    torch.manual_seed(1)
    ref = model(**batch, num_items_in_batch=torch.tensor(n)).loss
    ref_grads = grads(ref)
    torch.manual_seed(1)
    ours, outputs = loss_mod.answer_loss(model, batch, "chunked", torch.tensor(n))
    our_grads = grads(ours)
    assert outputs.logits.shape[0] == 0          # no logits were made for the batch
    assert abs(ours.item() - ref.item()) < 1e-5
    for k, g in ref_grads.items():
        assert torch.allclose(our_grads[k], g, atol=1e-6, rtol=1e-4), k
    # without num_items_in_batch both are the mean over the answer tokens
    torch.manual_seed(1)
    mean, _ = loss_mod.answer_loss(model, batch, "chunked")
    torch.manual_seed(1)
    assert abs(mean.item() - model(**batch).loss.item()) < 1e-5


def test_chunked_loss_leaves_the_loss_curve_of_a_run_equal(demo_model, dataset, tmp_path):
    curves = {}
    for impl in ("hf", "chunked"):
        out = tmp_path / impl
        train(quick(demo_model, dataset, out, loss_impl=impl, max_steps=5, save_steps=100, grad_accum=2,
                    per_device_batch_size=2))
        curves[impl] = curve(out)
    assert len(curves["hf"]) >= 5
    assert curves["chunked"] == pytest.approx(curves["hf"], abs=1e-4)


def test_bf16_adapters_track_the_fp32_curve_within_three_percent(demo_model, dataset, tmp_path):
    # Two steps each (bf16 autocast is slow on a CPU): the first loss is before any update, the second after
    # one update of bf16 (or fp32) adapter weights.
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = quick(demo_model, dataset, tmp_path / dtype, bf16="true", adapter_dtype=dtype, max_steps=2, eval_limit=0,
                    save_steps=100)
        runs[dtype] = trained_dtypes(cfg)
    assert runs["float32"][1] == {"torch.float32"} and runs["bfloat16"][1] == {"torch.bfloat16"}
    ref, got = runs["float32"][0], runs["bfloat16"][0]
    assert len(ref) >= 2 and got == pytest.approx(ref, rel=0.03)


def test_without_bf16_the_adapters_stay_float32(demo_model, dataset, tmp_path):
    _, dtypes = trained_dtypes(quick(demo_model, dataset, tmp_path / "fp32", adapter_dtype="bfloat16", max_steps=1,
                                     save_steps=100))
    assert dtypes == {"torch.float32"}


def test_liger_is_skipped_with_a_warning_when_it_does_not_import(demo_model, monkeypatch):
    import builtins

    from transformers import AutoModelForImageTextToText

    real = builtins.__import__

    def no_liger(name, *a, **kw):
        if name.startswith("liger_kernel"):
            raise ImportError("No module named 'liger_kernel'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_liger)
    model = AutoModelForImageTextToText.from_pretrained(demo_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert loss_mod.apply_liger(model) is False
    assert any("liger_kernel does not import" in str(w.message) for w in caught)


def test_unknown_loss_impl_and_adapter_dtype_are_refused():
    with pytest.raises(ConfigError, match="loss_impl"):
        TrainConfig(loss_impl="fused")
    with pytest.raises(ConfigError, match="adapter_dtype"):
        TrainConfig(adapter_dtype="float16")
