"""Local Hugging Face backend: one copy of a base model serves the base and any number of LoRA adapters.

    from eval.local import LocalBackend
    base = LocalBackend("llava-hf/llava-1.5-7b-hf")                       # 4-bit on CUDA, fp32 on CPU
    tuned = LocalBackend("llava-hf/llava-1.5-7b-hf", "workspace/runs/r1/adapter")
    base.generate([Request(image, "What is the highest value?")])         # same weights in memory

Adapters stay unmerged (merging into a 4-bit base loses precision). PEFT's active adapter is global to
the model, so every switch + generate (and every whole stream) runs under the engine's lock. The base is
run inside `disable_adapter()`, which also reverts a projector trained through `modules_to_save`.
torch / transformers / peft are imported inside functions: `import eval.local` stays light.
"""
from __future__ import annotations

import json
import re
import threading
import warnings
from pathlib import Path
from typing import Iterator

from eval.images import pad_to_square
from eval.protocol import Request, trimmed

QUANTIZE = ("auto", "4bit", "none")
# Top-level module names kept out of 4-bit: vision towers and projectors are small and lose accuracy
# (and 4-bit + LoRA on the projector breaks its shape), lm_head is kept for output quality.
_SKIP_LEAVES = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "mm_projector", "lm_head")


class AdapterError(ValueError):
    """An adapter folder cannot be used with this base; the message says why and what to do."""


class _Cancelled:
    """Stopping criterion that ends generation when a stream's consumer goes away (closed generator),
    so the engine lock is not held for tokens nobody reads."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def resolve_device(device: str = "auto") -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_quantize(quantize: str, device: str) -> str:
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE)}")
    on_cuda = device.startswith("cuda")
    if quantize == "auto":
        return "4bit" if on_cuda else "none"
    if quantize == "4bit" and not on_cuda:
        raise ValueError("4-bit loading needs a CUDA GPU (bitsandbytes on CPU is unreliable); use quantize='none'")
    return quantize


def skip_modules(config) -> list[str]:
    """Full names of the vision tower, projector and lm_head of the model `config` builds, found on
    the meta device (no memory), because bitsandbytes' skip list needs full names."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    names: list[str] = []
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in _SKIP_LEAVES and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def _display_name(path_or_id: str) -> str:
    p = Path(str(path_or_id).rstrip("/"))
    if p.name == "adapter" and p.parent.name:        # workspace/runs/NAME/adapter -> NAME/adapter
        return f"{p.parent.name}/adapter"
    return p.name or str(path_or_id)


class Engine:
    """One loaded base model (+ processor) and the adapters attached to it."""

    def __init__(self, base: str, quantize: str, device: str, trust_remote_code: bool = False):
        self.base, self.quantize, self.device = base, quantize, device
        self.trust_remote_code = trust_remote_code
        self.lock = threading.Lock()          # switch + generate (or a whole stream) is one critical section
        self.adapters: dict[str, str] = {}    # resolved adapter folder -> PEFT adapter name
        self.load_seconds = 0.0
        self._load()

    # ---- loading ----
    def _load(self) -> None:
        import time

        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        start = time.perf_counter()
        kwargs: dict = {"trust_remote_code": self.trust_remote_code}
        if self.device.startswith("cuda"):
            kwargs.update(dtype=torch.bfloat16, device_map={"": self.device})
        else:
            kwargs.update(dtype=torch.float32)
        if self.quantize == "4bit":
            from transformers import BitsAndBytesConfig
            config = AutoConfig.from_pretrained(self.base, trust_remote_code=self.trust_remote_code)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip_modules(config))
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.base, **kwargs)
            processor = AutoProcessor.from_pretrained(self.base, trust_remote_code=self.trust_remote_code)
        except OSError as e:
            raise OSError(f"cannot load base model {self.base!r}: {e}. Give a local folder in Hugging Face "
                          "layout or a hub id (with network access, or already in the HF cache).") from e
        model.eval()
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"       # decoder-only batched generation continues from the right edge
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model                    # the base object; PEFT injects LoRA layers into it in place
        self.peft = None                      # the PeftModel wrapper once an adapter is attached
        self.processor, self.tokenizer = processor, tokenizer
        self.adapters = {}
        self._linear_shapes, self._param_shapes = self._shapes(model)
        text_config = getattr(model.config, "text_config", model.config)
        self.hidden_size = getattr(text_config, "hidden_size", None)
        self.max_positions = getattr(text_config, "max_position_embeddings", None)
        self.load_seconds = time.perf_counter() - start

    @staticmethod
    def _shapes(model):
        """(in, out) of every linear layer and the logical shape of every parameter, recorded before
        any adapter wraps them, to check an adapter against the base without touching the model."""
        linear, params = {}, {}
        for name, module in model.named_modules():
            if hasattr(module, "in_features") and hasattr(module, "out_features"):
                linear[name] = (module.in_features, module.out_features)
        for name, p in model.named_parameters():
            quant_state = getattr(p, "quant_state", None)   # bitsandbytes packs 4-bit weights
            params[name] = tuple(quant_state.shape if quant_state is not None else p.shape)
        return linear, params

    def attach(self, adapter_dir: str | Path) -> tuple[str, list[str]]:
        """Attach an adapter once (later calls reuse it); returns (PEFT adapter name, warnings)."""
        path = Path(adapter_dir).expanduser().resolve()
        key = str(path)
        with self.lock:
            if key in self.adapters:
                return self.adapters[key], []
            notes = check_adapter(path, self)
            name = f"adapter_{len(self.adapters) + 1}"
            self._load_adapter(path, name)
            self.adapters[key] = name
            return name, notes

    def _load_adapter(self, path: Path, name: str) -> None:
        from peft import PeftModel

        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            else:
                self.peft.load_adapter(str(path), adapter_name=name)
            self.peft.eval()
        except Exception as e:
            # A failed load may leave half-injected LoRA layers behind: reload a clean base.
            self._load()
            raise AdapterError(f"adapter {str(path)!r} does not load into base {self.base!r}: "
                               f"{_short(e)}") from e

    # ---- generation ----
    def _inputs(self, requests: list[Request]):
        conversations, images = [], []
        for r in requests:
            content = ([{"type": "image"}] if r.image is not None else []) + [{"type": "text", "text": r.question}]
            conversations.append([{"role": "user", "content": content}])
            if r.image is not None:
                images.append(pad_to_square(r.image.convert("RGB")))
        prompts = [self.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                   for c in conversations]
        kwargs = {"text": prompts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self._vision_dtype())
        length = inputs["input_ids"].shape[1]
        longest = max(r.max_new_tokens for r in requests)
        if self.max_positions and length + longest > self.max_positions:
            raise ValueError(f"prompt is {length} tokens + {longest} new tokens, but the model's context is "
                             f"{self.max_positions} tokens: shorten the question or max new tokens")
        return inputs

    def _vision_dtype(self):
        for p in self.model.parameters():
            if p.is_floating_point() and getattr(p, "quant_state", None) is None:
                return p.dtype
        import torch
        return torch.float32

    @staticmethod
    def _settings(request: Request, extra: dict) -> dict:
        settings = {"max_new_tokens": request.max_new_tokens}
        if request.temperature > 0:
            settings.update(do_sample=True, temperature=request.temperature, top_p=request.top_p)
        else:
            settings["do_sample"] = False
        return {**settings, **extra}

    def _activate(self, adapter: str | None):
        """Context manager selecting `adapter` (None = the base). Call with the lock held."""
        import contextlib
        if adapter is None:
            return self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()
        self.peft.set_adapter(adapter)
        return contextlib.nullcontext()

    def generate(self, requests: list[Request], adapter: str | None, extra: dict | None = None) -> list[str]:
        import torch

        # Requests with and without images cannot share one processor call; settings must be equal in a batch.
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.image is None, r.max_new_tokens, r.temperature, r.top_p), []).append(i)
        answers: list[str] = [""] * len(requests)
        with self.lock, torch.inference_mode():
            for indices in groups.values():
                batch = [requests[i] for i in indices]
                inputs = self._inputs(batch)
                with self._activate(adapter):
                    out = self.model.generate(**inputs, **self._settings(batch[0], extra or {}))
                texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                for i, text in zip(indices, texts):
                    answers[i] = text.strip()
        return answers

    def next_token_logits(self, request: Request, adapter: str | None):
        """Scores for the first answer token (float32, CPU): a tie-proof check that two ways of running
        a model compute the same thing, where greedy text can flip on near-equal bf16 logits."""
        import torch
        with self.lock, torch.inference_mode():
            inputs = self._inputs([request])
            with self._activate(adapter):
                return self.model(**inputs).logits[0, -1].float().cpu()

    def stream(self, request: Request, adapter: str | None, extra: dict | None = None) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        with self.lock:
            inputs = self._inputs([request])
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            cancel, errors = threading.Event(), []
            settings = self._settings(request, extra or {})

            def run():
                try:
                    with torch.inference_mode(), self._activate(adapter):
                        self.model.generate(**inputs, **settings, streamer=streamer,
                                            stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]))
                except BaseException as e:      # surface it to the reader instead of leaving it waiting
                    errors.append(e)
                    streamer.end()

            thread = threading.Thread(target=run, name="local-stream", daemon=True)
            thread.start()
            try:
                # Trim like generate() does: hold whitespace back until more text follows it.
                yield from trimmed(streamer)
                if errors:
                    raise errors[0]
            finally:
                cancel.set()
                thread.join()


def _short(e: Exception, limit: int = 400) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir)
    if not path.is_dir():
        raise AdapterError(f"adapter folder not found: {path}")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{path} is not a PEFT adapter folder (no adapter_config.json); give the folder "
                           "that training saved the adapter in, e.g. workspace/runs/NAME/adapter")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_file} is not valid JSON ({e.msg})") from None


def _adapter_shapes(adapter_dir: Path) -> dict[str, tuple]:
    """Tensor shapes from the adapter's weight file header (safetensors: no weights are read)."""
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if (adapter_dir / "adapter_model.bin").is_file():
        # .bin is a pickle: loading one from an untrusted folder can run code, so only safetensors is read.
        raise AdapterError(f"{adapter_dir} holds adapter_model.bin (a pickle); the studio loads only safetensors. "
                           "Re-save it with PeftModel.save_pretrained(dir, safe_serialization=True).")
    raise AdapterError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors (or .bin)")


def _adapter_hidden_size(shapes: dict[str, tuple]) -> int | None:
    """The language model's width an adapter was trained for: the input size of its q_proj LoRA."""
    for key, shape in sorted(shapes.items()):
        if re.search(r"language_model.*\.q_proj\.lora_A\.weight$", key) or key.endswith("q_proj.lora_A.weight"):
            return shape[1]
    return None


def check_adapter(adapter_dir: Path, engine: Engine) -> list[str]:
    """Raise AdapterError when the adapter cannot fit the engine's base; return warnings otherwise."""
    config = read_adapter_config(adapter_dir)
    notes = []
    trained_on = config.get("base_model_name_or_path")
    if trained_on and _display_name(trained_on).lower() != _display_name(engine.base).lower():
        notes.append(f"adapter {_display_name(str(adapter_dir))} was trained on {trained_on!r}, "
                     f"not {engine.base!r}; answers may be poor")
    if config.get("peft_type", "LORA") != "LORA":
        return notes                          # other PEFT types: leave the checks to PEFT's own loader
    names = list(engine._linear_shapes)
    shapes = _adapter_shapes(adapter_dir)
    for key, shape in sorted(shapes.items()):
        module = re.sub(r"^base_model\.model\.", "", key)
        match = re.match(r"(.+)\.lora_([AB])\.weight$", module)
        if match:
            target, which = match.groups()
            if target not in engine._linear_shapes:
                raise AdapterError(
                    f"adapter {str(adapter_dir)!r} targets {target!r}, which base {engine.base!r} does not have "
                    f"(its layers are named like {names[len(names) // 2]!r}). It was made for another "
                    "architecture or naming; adapters from the original LLaVA code must be converted to the "
                    "Hugging Face layout first.")
            fan_in, fan_out = engine._linear_shapes[target]
            got = shape[1] if which == "A" else shape[0]
            want = fan_in if which == "A" else fan_out
            if got != want:
                where = f"{target} has {want} {'inputs' if which == 'A' else 'outputs'} here, the adapter expects {got}"
                hidden = _adapter_hidden_size(shapes)
                sizes = (f"was trained for a model with hidden size {hidden}; this base ({engine.base}) has "
                         f"{engine.hidden_size}" if hidden and engine.hidden_size and hidden != engine.hidden_size
                         else f"does not fit this base ({engine.base})")
                hint = (f"Use the base it was trained on ({trained_on})." if notes else
                        "Use the base it was trained on.")
                raise AdapterError(f"adapter {str(adapter_dir)!r} {sizes} ({where}). {hint}")
        elif not re.search(r"\.lora_\w+", module) and module in engine._param_shapes:
            if tuple(shape) != engine._param_shapes[module]:     # modules_to_save, e.g. the projector
                raise AdapterError(
                    f"adapter {str(adapter_dir)!r} holds {module} of shape {list(shape)}, but this base "
                    f"({engine.base}) has {list(engine._param_shapes[module])}: it was trained for another model.")
    return notes


_ENGINES: dict[tuple, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def get_engine(base: str, quantize: str = "auto", device: str = "auto", trust_remote_code: bool = False) -> Engine:
    """The one Engine for (base, quantize, device), loaded on first use."""
    device = resolve_device(device)
    quantize = resolve_quantize(quantize, device)
    local = Path(base).expanduser()
    base_key = str(local.resolve()) if local.exists() else base
    key = (base_key, quantize, device)
    with _ENGINES_LOCK:      # held while loading, so two callers never load the same base twice
        if key not in _ENGINES:
            _ENGINES[key] = Engine(base_key, quantize, device, trust_remote_code)
        return _ENGINES[key]


def loaded_engines() -> dict[tuple, Engine]:
    with _ENGINES_LOCK:
        return dict(_ENGINES)


def release_engines() -> None:
    """Forget every loaded base (frees its memory once no backend refers to it)."""
    with _ENGINES_LOCK:
        _ENGINES.clear()
    import gc
    gc.collect()


class LocalBackend:
    """A base model, or base + one adapter, served from the shared engine for that base."""

    def __init__(self, base: str, adapter: str | Path | None = None, quantize: str = "auto",
                 device: str = "auto", trust_remote_code: bool = False, generate_kwargs: dict | None = None):
        if adapter is not None:
            read_adapter_config(Path(adapter).expanduser())   # fail fast, before loading a big base
        self.engine = get_engine(str(base), quantize, device, trust_remote_code)
        self.adapter_dir = Path(adapter).expanduser().resolve() if adapter is not None else None
        self.adapter_name, self.warnings = (None, [])
        if self.adapter_dir is not None:
            self.adapter_name, self.warnings = self.engine.attach(self.adapter_dir)
            for note in self.warnings:
                warnings.warn(note, stacklevel=2)
        self.name = _display_name(str(base)) + (f" + {_display_name(str(self.adapter_dir))}" if adapter else "")
        self.max_batch = 8 if self.engine.device.startswith("cuda") else 4
        self.generate_kwargs = dict(generate_kwargs or {})   # e.g. min_new_tokens for benchmarks

    def generate(self, requests: list[Request]) -> list[str]:
        return self.engine.generate(list(requests), self.adapter_name, self.generate_kwargs) if requests else []

    def stream(self, request: Request) -> Iterator[str]:
        return self.engine.stream(request, self.adapter_name, self.generate_kwargs)


def list_adapters(workspace: str | Path) -> list[Path]:
    """Adapter folders of runs in the workspace: runs/NAME/ itself or any folder right under it
    (runs/NAME/adapter for finished runs, runs/NAME/checkpoint-N while training)."""
    runs = Path(workspace) / "runs"
    found = set(runs.glob("*/adapter_config.json")) | set(runs.glob("*/*/adapter_config.json"))
    return sorted((f.parent for f in found), key=lambda p: (p.relative_to(runs).parts[0], p.name != "adapter", str(p)))
