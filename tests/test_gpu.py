"""On a CUDA GPU: 4-bit loading with adapters from one base copy, and QLoRA training steps. Skipped on CPU."""
import pytest
from PIL import Image

from eval.local import LocalBackend, release_engines
from eval.protocol import Request
from test_local_backend import make_adapter
from test_train import make_dataset, quick

pytestmark = pytest.mark.gpu


def test_4bit_base_and_adapter_from_one_copy_score_like_separate_runs(demo_model, tmp_path):
    import bitsandbytes as bnb
    import torch

    adapter = make_adapter(demo_model, tmp_path / "adapter")
    request = Request(Image.effect_noise((80, 60), 40).convert("RGB"), "which category is largest", max_new_tokens=8)
    release_engines()
    base_alone = LocalBackend(str(demo_model), quantize="4bit").engine.next_token_logits(request, None)
    release_engines()
    alone = LocalBackend(str(demo_model), adapter, quantize="4bit")
    tuned_alone = alone.engine.next_token_logits(request, alone.adapter_name)
    release_engines()
    base, tuned = LocalBackend(str(demo_model), quantize="4bit"), LocalBackend(str(demo_model), adapter, quantize="4bit")
    assert base.engine is tuned.engine
    model = base.engine.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if "language_model" in n)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules()
                   if "vision_tower" in n or "multi_modal_projector" in n or n.endswith("lm_head"))
    assert torch.allclose(base.engine.next_token_logits(request, None), base_alone, atol=1e-3)
    assert torch.allclose(tuned.engine.next_token_logits(request, tuned.adapter_name), tuned_alone, atol=1e-3)
    assert not torch.allclose(base_alone, tuned_alone, atol=1e-2)
    assert all(isinstance(text, str) for text in base.generate([request, request]) + tuned.generate([request]))


def test_qlora_steps_train_and_save_adapter_with_projector(demo_model, tmp_path):
    from safetensors import safe_open

    from training.train import train

    data = make_dataset(tmp_path / "ds")
    result = train(quick(demo_model, data, tmp_path / "run", mode="qlora", bf16="true"))
    assert result["status"] == "completed"
    with safe_open(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any("lora_A" in k for k in keys) and any("multi_modal_projector" in k for k in keys)
