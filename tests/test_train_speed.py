"""The speed and memory options of training.train leave training what it was (tiny demo LLaVA, CPU):
the answer-only chunked loss equals the model's own loss (value, gradients, loss curve), bf16 adapters
track the fp32 curve, and the GPU-only kernels are skipped cleanly where they cannot run."""
import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

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


# each curve test turns one speed option on against a reference with none (fused_lora is on by default)
CURVE = dict(max_steps=3, save_steps=100, grad_accum=2, per_device_batch_size=2, eval_limit=0, fused_lora=False)


@pytest.fixture(scope="module")
def reference_curve(demo_model, dataset, tmp_path_factory):
    """The loss curve of a short run with the plain answer-only loss (the CPU default) and no speed option:
    what each option's run is compared with."""
    out = tmp_path_factory.mktemp("reference")
    train(quick(demo_model, dataset, out, loss_impl="chunked", **CURVE))
    assert len(curve(out)) >= 3
    return curve(out)


def test_chunked_loss_leaves_the_loss_curve_of_a_run_equal(demo_model, dataset, tmp_path, reference_curve):
    train(quick(demo_model, dataset, tmp_path, loss_impl="hf", **CURVE))      # full-vocabulary logits
    assert reference_curve == pytest.approx(curve(tmp_path), abs=1e-4)


def test_a_model_without_boolean_logits_to_keep_trains_on_the_stock_loss(demo_model, dataset, tmp_path,
                                                                          reference_curve, monkeypatch, capsys):
    # transformers 5.17's LLaVA (the GPU image's) slices hidden_states[:, logits_to_keep] and raises IndexError
    from transformers import LlavaForConditionalGeneration

    real = LlavaForConditionalGeneration.forward

    def old_forward(self, *args, logits_to_keep=0, **kwargs):
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
            raise IndexError("too many indices for tensor of dimension 3")
        return real(self, *args, logits_to_keep=logits_to_keep, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "forward", old_forward)
    train(quick(demo_model, dataset, tmp_path, loss_impl="chunked", **CURVE))
    assert "the rest of the run uses the stock loss (loss_impl hf)" in capsys.readouterr().out
    assert reference_curve == pytest.approx(curve(tmp_path), abs=1e-4)


def test_bf16_adapters_track_the_fp32_curve_within_three_percent(demo_model, dataset, tmp_path):
    # Two steps of one sample each (bf16 autocast is slow on a CPU): the first loss is before any update, the
    # second after one update of bf16 (or fp32) adapter weights.
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = quick(demo_model, dataset, tmp_path / dtype, bf16="true", adapter_dtype=dtype, max_steps=2, eval_limit=0,
                    per_device_batch_size=1, save_steps=100)
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


# ---------------------------------------------------------------- packing
def packed_and_padded(demo_model, dataset, n=4):
    from transformers import AutoProcessor

    from training.data import ChatDataset, Collator, read_records
    from training.packing import PackingCollator

    processor = AutoProcessor.from_pretrained(demo_model)
    ds = ChatDataset(read_records(dataset / "train.jsonl")[:n], processor, 1024)
    samples = [ds[i] for i in range(n)]
    pad = processor.tokenizer.pad_token_id
    return samples, PackingCollator(pad)(samples), Collator(pad)(samples)


def test_a_batch_of_equal_lengths_stays_a_plain_batch_when_packing(demo_model, dataset):
    from training.packing import PackingCollator

    samples, packed, padded = packed_and_padded(demo_model, dataset)
    same = [samples[0]] * 3
    plain = PackingCollator(0)(same)
    assert plain["input_ids"].shape == (3, len(samples[0]["input_ids"])) and "cu_seq_lens_q" not in plain
    assert bool(plain["attention_mask"].all())
    assert "cu_seq_lens_q" in packed and packed["input_ids"].shape[0] == 1      # unequal lengths: one packed row


def token_losses(logits, labels):
    """Per-position cross-entropy of the next token (0 where it is not a label)."""
    shifted = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), shifted, ignore_index=-100,
                                             reduction="none")


def forward(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_packed_batch_gives_every_sample_its_padded_loss(demo_model, dataset):
    from transformers import AutoModelForImageTextToText

    samples, packed, padded = packed_and_padded(demo_model, dataset)
    lengths = [len(s["input_ids"]) for s in samples]
    assert len(set(lengths)) > 1 and packed["input_ids"].shape == (1, sum(lengths))     # no pad token in the row
    assert "attention_mask" not in packed and packed["cu_seq_lens_q"].tolist()[-1] == sum(lengths)
    model = AutoModelForImageTextToText.from_pretrained(demo_model, dtype=torch.float32).eval()
    pack_loss = token_losses(forward(model, packed), packed["labels"])[0]
    pad_loss = token_losses(forward(model, padded), padded["labels"])
    start = 0
    for i, n in enumerate(lengths):
        ours, ref = pack_loss[start:start + n], pad_loss[i, :n]
        # the same labelled positions (the last token of a sample never predicts the next sample's first)
        assert ours.nonzero().flatten().tolist() == ref.nonzero().flatten().tolist()
        assert abs(ours.sum().item() - ref.sum().item()) < 1e-4, i
        start += n


def test_a_packed_token_never_attends_to_another_sample(demo_model, dataset):
    from transformers import AutoModelForImageTextToText

    samples, packed, _ = packed_and_padded(demo_model, dataset, n=2)
    model = AutoModelForImageTextToText.from_pretrained(demo_model, dtype=torch.float32).eval()
    first = len(samples[0]["input_ids"])
    changed = {**packed, "input_ids": packed["input_ids"].clone(), "pixel_values": packed["pixel_values"].clone()}
    text = (changed["input_ids"][0, :first] != model.config.image_token_id).nonzero().flatten()[1:]
    changed["input_ids"][0, text] = torch.randint(10, 200, (len(text),))    # sample 1's text and image changed
    changed["pixel_values"][0] = torch.randn_like(changed["pixel_values"][0])
    before, after = forward(model, packed), forward(model, changed)
    assert (before[0, :first] - after[0, :first]).abs().max() > 1e-2           # sample 1 did change
    assert torch.allclose(before[0, first:], after[0, first:], atol=1e-5)   # sample 2 did not


def test_packing_leaves_the_loss_curve_of_a_run_equal(demo_model, dataset, tmp_path, reference_curve):
    train(quick(demo_model, dataset, tmp_path, loss_impl="chunked", packing="true", **CURVE))
    assert curve(tmp_path) == pytest.approx(reference_curve, abs=2e-4)


# ---------------------------------------------------------------- fused LoRA
@pytest.mark.parametrize("one_node", [False, True], ids=["autograd", "one-node"])
def test_fused_lora_gives_peft_losses_and_gradients_with_dropout(demo_model, dataset, one_node):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForImageTextToText

    from training.fused_lora import fuse_lora

    batch = a_batch(demo_model, dataset)

    def run(fused):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(demo_model, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, init_lora_weights=False,
                                                 target_modules=r".*language_model.*\.(q_proj|o_proj|gate_proj)"))
        if fused:
            assert fuse_lora(model, one_node=one_node) == sum(isinstance(m, LoraLayer) for m in model.modules()) > 0
        model.train()
        torch.manual_seed(1)                  # the same dropout masks, drawn in the same order
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad(), model.disable_adapter():      # PEFT's own path: the base alone
            model.eval()
            base = model(**batch).loss
        return loss.item(), grads, base.item()

    (plain, plain_grads, plain_base), (fused, fused_grads, fused_base) = run(False), run(True)
    assert fused == pytest.approx(plain, abs=1e-5) and fused_base == pytest.approx(plain_base, abs=1e-6)
    assert fused_base != pytest.approx(fused, abs=1e-3), "the random adapter should change the loss"
    assert plain_grads.keys() == fused_grads.keys()
    for name, g in plain_grads.items():
        assert torch.allclose(fused_grads[name], g, atol=1e-5, rtol=1e-4), name


def test_fused_lora_leaves_the_loss_curve_of_a_run_equal(demo_model, dataset, tmp_path, reference_curve, capsys):
    train(quick(demo_model, dataset, tmp_path, loss_impl="chunked", **{**CURVE, "fused_lora": True}))
    assert "LoRA linears add their update inside the matmul" in capsys.readouterr().out
    assert curve(tmp_path) == pytest.approx(reference_curve, abs=1e-4)


def sibling_run(demo_model, batch, siblings, dropout, one_node=False):
    """Loss and LoRA gradients of one forward+backward with q/k/v and gate/up LoRA, PEFT's forward or fused."""
    from peft import LoraConfig, get_peft_model

    from training.fused_lora import fuse_lora

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(demo_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                             target_modules=r".*language_model.*_proj"))
    n = fuse_lora(model, siblings=True, one_node=one_node) if siblings else 0
    model.train()
    torch.manual_seed(1)
    loss = model(**batch).loss
    loss.backward()
    return n, loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("one_node", [False, True], ids=["autograd", "one-node"])
def test_sibling_lora_without_dropout_gives_peft_losses_and_gradients(demo_model, dataset, one_node):
    batch = a_batch(demo_model, dataset)
    _, plain, plain_grads = sibling_run(demo_model, batch, False, 0.0)
    n, fused, fused_grads = sibling_run(demo_model, batch, True, 0.0, one_node)
    layers = AutoConfig.from_pretrained(demo_model).text_config.num_hidden_layers
    assert n == 7 * layers                  # q k v o gate up down, each fused; 5 of them in two sibling groups
    assert fused == pytest.approx(plain, abs=1e-5)
    assert plain_grads.keys() == fused_grads.keys()
    for name, g in plain_grads.items():
        assert torch.allclose(fused_grads[name], g, atol=1e-5, rtol=1e-4), name


def test_one_node_lora_under_bf16_autocast_gives_autograds_outputs_and_gradients():
    # autocast runs the Functions' forward matmuls in bf16 over fp32 weights (the Trainer's bf16 with fp32
    # adapters): their backward must follow, as autograd's own does
    from training.fused_lora import add_low_rank, low_rank

    def run(one_node):
        torch.manual_seed(0)
        x, result = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 12, requires_grad=True)
        a, b = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = add_low_rank(result, low_rank(x, [a], torch.nn.Identity(), one_node), b, 0.5, one_node)
        out.float().square().sum().backward()
        return out, [t.grad for t in (x, result, a, b)]

    (plain, plain_grads), (fused, fused_grads) = run(False), run(True)
    assert fused.dtype == plain.dtype and torch.allclose(fused.float(), plain.float())
    for g, ref in zip(fused_grads, plain_grads):
        assert g.dtype == ref.dtype and torch.allclose(g, ref, rtol=2e-2, atol=2e-2)


def test_sibling_lora_draws_one_dropout_mask_for_an_input_read_three_times(demo_model, dataset, monkeypatch):
    masks = []
    dropout = torch.nn.Dropout.forward

    def counted(self, x):
        masks.append(x.shape)
        return dropout(self, x)

    monkeypatch.setattr(torch.nn.Dropout, "forward", counted)
    batch = a_batch(demo_model, dataset)
    sibling_run(demo_model, batch, False, 0.1)
    plain, masks[:] = len(masks), []
    sibling_run(demo_model, batch, True, 0.1)
    layers = AutoConfig.from_pretrained(demo_model).text_config.num_hidden_layers
    assert (plain, len(masks)) == (7 * layers, 4 * layers)      # q/k/v -> 1, gate/up -> 1, o, down


def test_sibling_and_one_node_lora_keep_a_checkpointed_run_with_dropout_within_one_percent(demo_model, dataset,
                                                                                            tmp_path, capsys):
    # demo-cpu trains without dropout (where both are exact, as above): here with PEFT's dropout on, under
    # gradient checkpointing's recompute (masks redrawn there), against the plain fused forward
    runs = {}
    for on in (False, True):
        train(quick(demo_model, dataset, tmp_path / str(on), loss_impl="chunked", lora_dropout=0.1,
                    gradient_checkpointing=True,
                    **{**CURVE, "fused_lora": True, "fused_lora_siblings": on, "fused_lora_one_node": on}))
        runs[on] = curve(tmp_path / str(on))
    out = capsys.readouterr().out
    assert "share one A matmul" in out and "one autograd node per half" in out
    assert len(runs[True]) >= 3 and runs[True] != runs[False]          # other masks, so not the same numbers
    assert runs[True] == pytest.approx(runs[False], rel=0.01)


def four_bit_run(demo_model, batch, reuse, steps=3):
    """Loss curve, first-step LoRA gradients and autograd node names of a few checkpointed QLoRA steps on 4-bit
    layers (CPU: train() itself refuses QLoRA without CUDA)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from eval.local import skip_modules
    from training.fused_lora import fuse_lora

    torch.manual_seed(0)
    q4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                            llm_int8_skip_modules=skip_modules(AutoConfig.from_pretrained(demo_model)))
    model = AutoModelForImageTextToText.from_pretrained(demo_model, quantization_config=q4, dtype=torch.float32,
                                                        device_map={"": "cpu"})
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                             target_modules=r".*language_model.*_proj"))
    assert fuse_lora(model, siblings=True, reuse=reuse) > 0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses, grads, nodes = [], None, set()
    for _ in range(steps):
        loss = model(**batch).loss
        if grads is None:
            seen, todo = set(), [loss.grad_fn]
            while todo:
                node = todo.pop()
                if node is not None and node not in seen:
                    seen.add(node)
                    todo.extend(n for n, _ in node.next_functions)
            nodes = {type(node).__name__ for node in seen}
        loss.backward()
        if grads is None:
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, grads, nodes


def test_reused_dequantized_weights_leave_the_4bit_loss_curve_and_gradients_without_bitsandbytes_backward(
        demo_model, dataset):
    batch = {k: v[:2] for k, v in a_batch(demo_model, dataset).items()}
    plain, plain_grads, plain_nodes = four_bit_run(demo_model, batch, reuse=False)
    reused, grads, nodes = four_bit_run(demo_model, batch, reuse=True)
    assert "MatMul4BitBackward" in plain_nodes and "MatMul4BitBackward" not in nodes
    assert plain[-1] < plain[0]                             # it trains
    assert reused == pytest.approx(plain, rel=1e-4)         # the stated tolerance: the same curve to 1e-4
    assert grads.keys() == plain_grads.keys()
    for name, g in plain_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-5, rtol=1e-3), name


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
    """What torch's CUDA varlen kernel computes (causal attention within each segment), in plain SDPA."""
    assert kw in ({"is_causal": True}, {"window_size": (-1, 0)}, {"window_size": (-1, 0), "scale": kw.get("scale")})
    out = torch.empty_like(q)
    for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:]):
        seg = [t[a:b].transpose(0, 1)[None].float() for t in (q, k, v)]
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(*seg, is_causal=True, scale=kw.get("scale"))[0] \
            .transpose(0, 1).to(q.dtype)
    return out


def test_varlen_attention_path_matches_the_block_mask(demo_model, dataset, monkeypatch):
    # The CUDA path's plumbing (attention swapped on the language model only, boundaries from the collator, no
    # mask built, padded batches still on SDPA) on CPU, with the kernel replaced by its definition.
    from torch.nn.attention import varlen
    from transformers import AutoModelForImageTextToText

    from training import packing

    monkeypatch.setattr(varlen, "varlen_attn", reference_varlen)
    monkeypatch.setattr(packing, "_KERNEL", {})
    monkeypatch.setattr(packing, "varlen_available", lambda device: None)
    samples, packed, padded = packed_and_padded(demo_model, dataset)
    model = AutoModelForImageTextToText.from_pretrained(demo_model, dtype=torch.float32).eval()
    masked, masked_padded = forward(model, packed), forward(model, padded)
    calls = []
    real = packing.call_varlen
    monkeypatch.setattr(packing, "call_varlen", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert packing.packed_attention(model, "sdpa", on_cuda=True) == "varlen"
    assert model.config.text_config._attn_implementation == packing.VARLEN
    assert model.config.vision_config._attn_implementation == "sdpa"
    got = forward(model, packed)
    assert len(calls) == model.config.text_config.num_hidden_layers
    assert torch.allclose(got, masked, atol=1e-4)
    assert torch.allclose(forward(model, padded), masked_padded, atol=1e-4) and len(calls) == len(
        model.model.language_model.layers)     # the padded batch did not take the varlen path


# ---------------------------------------------------------------- compile, dropout, optimizer
@pytest.mark.slow
def test_compiled_layers_leave_the_loss_curve_equal(demo_model, dataset):
    # Inductor on CPU compiles the shared layer code once (~15 s), so the curve is two AdamW steps on one
    # batch (a second shape would compile again) with LoRA and gradient checkpointing, as training runs it.
    from training.compiling import compile_layers

    batch = a_batch(demo_model, dataset)

    def losses(compiled):
        model = lora_model(demo_model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        if compiled:
            assert compile_layers(model)["layers"] == model.config.text_config.num_hidden_layers
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        out = []
        for _ in range(2):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    eager, compiled = losses(False), losses(True)
    assert compiled == pytest.approx(eager, abs=1e-4)


def test_the_compile_option_compiles_the_layers_of_a_run(demo_model, dataset, tmp_path, monkeypatch, capsys,
                                                         reference_curve):
    # The wiring (TrainConfig.compile -> compile_layers after LoRA, before the Trainer), with dynamo's eager
    # backend: it traces the layers as inductor would, without the minute of C++ builds for each new shape.
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    train(quick(demo_model, dataset, tmp_path, loss_impl="chunked", compile=True, **CURVE))
    assert "decoder layers compiled" in capsys.readouterr().out
    assert curve(tmp_path) == pytest.approx(reference_curve, abs=1e-5)


def test_all_decoder_layers_share_one_compiled_graph(demo_model):
    # A KV cache in the layers' inputs (the config's use_cache default, without gradient checkpointing) made
    # dynamo compile once per layer: 32 layers of a 7B pass its recompile limit of 8 and the rest run eagerly.
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import AutoModelForImageTextToText

    from training.compiling import compile_layers

    torch._dynamo.reset()
    counters.clear()
    model = AutoModelForImageTextToText.from_pretrained(demo_model, dtype=torch.float32).train()
    compile_layers(model, backend="eager")
    ids = torch.randint(10, 200, (1, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_a_layer_that_fails_to_compile_runs_eagerly_with_the_reason(demo_model, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from training.compiling import compile_layers

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("inductor: no lowering for bitsandbytes::gemv_4bit")
        return call

    model = AutoModelForImageTextToText.from_pretrained(demo_model, dtype=torch.float32).train()    # no dropout
    ids = torch.randint(10, 200, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    monkeypatch.setattr(torch, "compile", broken)
    state = compile_layers(model)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = model(input_ids=ids).logits
    assert state["layers"] == model.config.text_config.num_hidden_layers and "gemv_4bit" in state["failed"]
    assert sum("run eagerly" in str(w.message) for w in caught) == 1 and torch.equal(got, ref)


def test_lora_dropout_zero_builds_no_dropout_module(demo_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    def dropouts(p):
        model = AutoModelForImageTextToText.from_pretrained(demo_model, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=p, target_modules=r".*language_model.*\.q_proj"))
        return {type(m).__name__ for n, m in model.named_modules() if n.endswith("lora_dropout.default")}

    assert dropouts(0.0) == {"Identity"} and dropouts(0.05) == {"Dropout"}


def test_adamw_torch_is_foreach_and_the_fused_one_is_accepted(demo_model, tmp_path):
    from transformers import TrainingArguments
    from transformers.trainer_optimizer import _get_adamw_torch  # noqa: F401 - the mapping the names go through

    from transformers import Trainer

    for name, fused in (("adamw_torch", None), ("adamw_torch_fused", True)):
        TrainConfig(optim=name)      # the project's OPTIMIZERS list accepts both
        args = TrainingArguments(output_dir=str(tmp_path), optim=name, report_to="none", use_cpu=True)
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        assert cls is torch.optim.AdamW and kwargs.get("fused") is fused


def test_speed_fields_default_to_what_the_gpu_measured_fastest():
    from training.config import form_fields

    fields = {f["name"]: f for f in form_fields()}
    assert fields["packing"]["group"] == fields["compile"]["group"] == fields["fused_lora"]["group"] == "speed"
    cfg = TrainConfig()
    assert (cfg.packing, cfg.fused_lora, cfg.fused_lora_siblings, cfg.compile) == ("auto", True, True, False)
    with pytest.raises(ConfigError, match="packing"):
        TrainConfig.from_dict({"packing": "sometimes"})
    with pytest.raises(ConfigError, match="true or false"):
        TrainConfig.from_dict({"compile": "sometimes"})
