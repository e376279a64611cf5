"""Local Hugging Face models: one copy of a base serves the base and any number of LoRA adapters at once.

    from eval.pool import ModelPool
    pool = ModelPool()
    base = pool.backend("local:llava-hf/llava-1.5-7b-hf")                 # bf16 on a GPU it fits, else 4-bit
    tuned = pool.backend("local:llava-hf/llava-1.5-7b-hf+workspace/runs/r1/adapter")   # same weights in memory
    base.generate([Request(image, "What is the highest value?")])

An Engine owns one loaded model and a worker thread that runs every generation. Requests that arrive
together (Compare's two sides, or a benchmark's base and adapter rows) are decoded in ONE batch, each row
with its own adapter (eval.lora), so both sides stream at once. On CUDA the decode step is compiled (torch.compile)
and captured as a CUDA graph while the model loads and adapters attach. A closed stream (Stop, a closed tab)
cancels its row, which leaves the batch at the next step. Adapters are attached once and never change meaning:
a failed attach leaves the others as they were. Models other than LLaVA-1.5-style run through `model.generate` instead.
"""
from __future__ import annotations

import functools
import queue
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from eval.images import pad_to_square
from eval.lora import AdapterError, read_config, split_weights, tensor_shapes
from eval.protocol import Request, trimmed

__all__ = ["AdapterError", "Engine", "LocalBackend", "read_adapter_config", "skip_modules"]

QUANTIZE = ("auto", "4bit", "none")
GATHER_S = 0.01             # how long the worker waits for a second stream to batch with the first
# Top-level module names kept out of 4-bit: vision towers and projectors are small and lose accuracy
# (and 4-bit + LoRA on the projector breaks its shape), lm_head is kept for output quality.
_SKIP_LEAVES = ("vision_tower", "vision_model", "visual", "multi_modal_projector", "mm_projector", "lm_head")
read_adapter_config = read_config


def resolve_device(device: str = "auto") -> str:
    import torch
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


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


def weight_bytes(config) -> int:
    """Bytes of the model's weights in bf16, counted on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return 2 * sum(p.numel() for p in model.parameters())


def choose_precision(quantize: str, device: str, config) -> tuple[str, str]:
    """("4bit" or "none", why). auto: bf16 when the base fits in free GPU memory with room for the KV
    cache and activations, 4-bit nf4 otherwise; full precision on CPU."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE)}")
    on_cuda = device.startswith("cuda")
    if quantize == "4bit" and not on_cuda:
        raise ValueError("4-bit loading needs a CUDA GPU (bitsandbytes on CPU is unreliable); use quantize='none'")
    if quantize != "auto":
        return quantize, "forced"
    if not on_cuda:
        return "none", "CPU"
    import torch
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    need = weight_bytes(config)
    if need * 1.25 + 6 * 2**30 <= free:
        return "none", f"bf16 weights {need / 2**30:.1f} GiB fit in {free / 2**30:.0f} GiB free"
    return "4bit", f"bf16 weights {need / 2**30:.1f} GiB do not fit in {free / 2**30:.0f} GiB free"


def _display_name(path_or_id: str) -> str:
    p = Path(str(path_or_id).rstrip("/"))
    if p.name == "adapter" and p.parent.name:        # workspace/runs/NAME/adapter -> NAME/adapter
        return f"{p.parent.name}/adapter"
    return p.name or str(path_or_id)


@dataclass
class _Job:
    """Requests submitted together; `mergeable` jobs (single streams) may share a batch with others."""
    items: list[tuple[Request, int, dict]]          # (request, adapter slot, extra settings)
    emits: list[Callable[[int], None] | None]
    cancel: threading.Event = field(default_factory=threading.Event)
    prepared: object = None
    mergeable: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    result: list[list[int]] | None = None
    error: BaseException | None = None


class Engine:
    """One loaded base model (+ processor), the adapters attached to it, and the worker that runs it."""

    def __init__(self, base: str, quantize: str = "auto", device: str = "auto", trust_remote_code: bool = False,
                 graphs: bool = True, compile: bool | str = "auto",
                 on_progress: Callable[[str], None] | None = None):
        self.base, self.device, self.graphs_requested = base, resolve_device(device), bool(graphs)
        if compile not in ("auto", True, False):
            raise ValueError(f"compile={compile!r}: expected 'auto', True or False")
        # auto: on CUDA, where fused kernels repay tens of seconds of compiling at load; on CPU they do not
        self.compile = self.device.startswith("cuda") if compile == "auto" else bool(compile)
        self.trust_remote_code = trust_remote_code
        self.requested = quantize
        self.adapters_lock = threading.Lock()     # attach/detach vs the worker's forward
        self.slots: dict[str, int] = {}           # resolved adapter folder -> slot
        self.warnings_for: dict[str, list[str]] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._held: deque = deque()
        self._closed = False                      # close() was called: no job is taken after it
        self._submit_lock = threading.Lock()      # a job is either queued before close()'s stop or refused
        self.busy = False
        self.batches = 0                          # forward batches run (both Compare sides share one)
        self.last_used = time.monotonic()
        self.compile_seconds = 0.0                # of warm-up time, spent on batches that compiled the step
        say = on_progress or (lambda _msg: None)
        start = time.perf_counter()
        self._load(say)
        self.load_seconds = time.perf_counter() - start
        self._worker = threading.Thread(target=self._serve, name=f"engine-{_display_name(base)}", daemon=True)
        self._worker.start()
        start = time.perf_counter()
        self.warm_up(say)
        self.warm_seconds = time.perf_counter() - start

    # ---- loading ----
    def _load(self, say) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        from eval.engine import Generator
        from eval.lora import Adapters, Rows

        try:
            config = AutoConfig.from_pretrained(self.base, trust_remote_code=self.trust_remote_code)
            self.quantize, self.precision_reason = choose_precision(self.requested, self.device, config)
            say(f"loading {_display_name(self.base)} ({'4-bit nf4' if self.quantize == '4bit' else 'full precision'})")
            kwargs: dict = {"trust_remote_code": self.trust_remote_code}
            if self.device.startswith("cuda"):
                kwargs.update(dtype=torch.bfloat16, device_map={"": self.device})
            else:
                kwargs.update(dtype=torch.float32)
            if self.quantize == "4bit":
                from transformers import BitsAndBytesConfig
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip_modules(config))
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
        self.model, self.processor, self.tokenizer = model, processor, tokenizer
        self.linear_shapes, self.param_shapes = self._shapes(model)
        text_config = getattr(model.config, "text_config", model.config)
        self.hidden_size = getattr(text_config, "hidden_size", None)
        self.max_positions = getattr(text_config, "max_position_embeddings", None) or 4096
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.rows = Rows(256, model.device, dtype)
        self.adapters = Adapters(model, self.rows)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self.eos_ids.add(tokenizer.eos_token_id)
        self.fast = model.config.model_type == "llava" and hasattr(model, "lm_head")
        self.generator = None
        self.fallback_reason = None
        if self.fast:
            self.image_tokens = self._count_image_tokens()
            image_part = self.image_tokens + 128
            self.generator = Generator(model, self.rows, self.adapters.projectors, self.eos_ids,
                                       tokenizer.pad_token_id, min(self.max_positions, image_part + 640),
                                       use_graphs=self.graphs_requested and self.device.startswith("cuda"),
                                       use_compile=self.compile)

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

    def _count_image_tokens(self) -> int:
        from PIL import Image
        prompt = self._prompt(Request(Image.new("RGB", (8, 8)), "x"))
        ids = self.processor(text=[prompt], images=[Image.new("RGB", (8, 8))], return_tensors="pt")["input_ids"]
        return int((ids == self.model.config.image_token_id).sum())

    def warm_up(self, say=lambda _msg: None) -> None:
        """Run each bucketed shape once (base, the last adapter, both: what Compare sends), so compiling and
        capture happen here, never on a user's first click; if batching fails here, use model.generate."""
        from PIL import Image

        from eval.lora import Rows
        image = Image.new("RGB", (32, 32), "white")
        g = self.generator
        last = max(self.slots.values()) if self.slots else 0
        mixes = [[0], [0, 0]] + ([[last], [0, last]] if last else [])     # others capture uncompiled
        mixes = mixes if g is not None and (g.use_graphs or g.use_compile) else [m for m in mixes if len(m) == 1]
        if g is not None:                          # here, and only here, new shapes may compile
            g.compile_new_shapes = True
        for k, slots in enumerate(mixes):
            compiling = self.generator is not None and self.generator.compiling and \
                (len(slots), Rows.mix(slots)) not in self.generator.compiled_keys
            who = "base + adapter" if len(set(slots)) > 1 else ("adapter" if slots[0] else "base")
            say(f"{'compiling the decode step' if compiling else 'warming up'}: batch {len(slots)}, {who}")
            t = time.perf_counter()
            try:
                self.generate([Request(image, "warm up", max_new_tokens=3)] * len(slots), slots, {"min_new_tokens": 3})
            except Exception as e:  # noqa: BLE001 - recorded, shown in the header
                if k or self.generator is None:
                    raise
                self.fallback_reason, self.generator = f"{type(e).__name__}: {e}"[:300], None
                say(f"batched decoding failed ({self.fallback_reason}); using model.generate")
            self.compile_seconds += (time.perf_counter() - t) if compiling else 0.0
        if g is not None:
            g.compile_new_shapes = False
            if g.use_compile and g.compile_error:
                say(f"compiling the decode step failed ({g.compile_error}); decoding uncompiled")

    def describe(self) -> str:
        precision = "4-bit nf4" if self.quantize == "4bit" else ("bf16" if self.device.startswith("cuda") else "fp32")
        g, decode = self.generator, "model.generate"
        if g is not None:
            compiled = "compiled " if g.compiling and g.compiled_keys else ""
            decode = compiled + ("CUDA graphs" if g.use_graphs and g.graph_error is None else "eager")
            decode += f" (graph capture failed: {g.graph_error})" if g.graph_error else ""
            decode += f" (compile failed: {g.compile_error})" if g.use_compile and g.compile_error else ""
        decode += f" ({self.fallback_reason})" if self.fallback_reason else ""
        return f"{precision} ({self.precision_reason}), decode: {decode}"

    # ---- adapters ----
    def attach(self, adapter_dir: str | Path) -> tuple[int, list[str]]:
        """Attach an adapter once (later calls reuse it); returns (slot, warnings)."""
        path = Path(adapter_dir).expanduser().resolve()
        key = str(path)
        with self.adapters_lock:
            if key in self.slots:
                return self.slots[key], self.warnings_for[key]
            notes = check_adapter(path, self)
            loras, projector = split_weights(path, read_config(path), set(self.linear_shapes))
            slot = self.adapters.attach(key, loras, projector)
            self.slots[key], self.warnings_for[key] = slot, notes
            if self.generator is not None:
                self.generator.forget_graphs(adapters_only=True)
        return slot, notes

    # ---- generation ----
    def _prompt(self, r: Request) -> str:
        content = ([{"type": "image"}] if r.image is not None else []) + [{"type": "text", "text": r.question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def prepare(self, items: list[tuple[Request, int, dict]], emits=None, cancel=None):
        """CPU work of a batch (templates, tokens, pixels; each distinct image processed once)."""
        from eval.engine import Batch, Row

        images, index = [], {}
        for r, _, _ in items:
            if r.image is not None and id(r.image) not in index:
                index[id(r.image)] = len(images)
                images.append(pad_to_square(r.image.convert("RGB")))
        image_token = getattr(self.processor, "image_token", "<image>")
        texts = [self._prompt(r).replace(image_token, image_token * self.image_tokens) for r, _, _ in items]
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        pixels = self._pixels(images) if images else None
        rows = []
        for i, ((r, slot, extra), tokens) in enumerate(zip(items, ids)):
            self._check_length(len(tokens), r.max_new_tokens)
            rows.append(Row(ids=tokens, image=index[id(r.image)] if r.image is not None else None, slot=slot,
                            max_new=r.max_new_tokens, min_new=int(extra.get("min_new_tokens", 0)),
                            temperature=r.temperature, top_p=r.top_p, emit=emits[i] if emits else None, cancel=cancel))
        return Batch(rows, pixels)

    def _pixels(self, images: list):
        """The image processor over many images in threads (PIL's resize lets go of the GIL)."""
        import torch
        process = lambda chunk: self.processor.image_processor(chunk, return_tensors="pt")["pixel_values"]  # noqa: E731
        if len(images) < 16:
            return process(images)
        chunks = [images[i:i + 8] for i in range(0, len(images), 8)]
        return torch.cat(list(cpu_pool().map(process, chunks)))

    def _check_length(self, prompt: int, new: int) -> None:
        if prompt + new > self.max_positions:
            raise ValueError(f"prompt is {prompt} tokens + {new} new tokens, but the model's context is "
                             f"{self.max_positions} tokens: shorten the question or max new tokens")

    def _run(self, jobs: list[_Job]) -> list[list[int]]:
        with self.adapters_lock:
            if self.generator is None:
                return self._hf_generate(jobs)
            rows, pixels = [], []
            for job in jobs:
                batch = job.prepared or self.prepare(job.items, job.emits, job.cancel)
                offset = sum(p.shape[0] for p in pixels)
                for row in batch.rows:
                    row.image = None if row.image is None else row.image + offset
                rows += batch.rows
                if batch.pixel_values is not None:
                    pixels.append(batch.pixel_values)
            import torch

            from eval.engine import Batch
            return self.generator.run(Batch(rows, torch.cat(pixels) if pixels else None))

    def _hf_generate(self, jobs: list[_Job]) -> list[list[int]]:
        """Any other image-text model: transformers' generate, one adapter slot at a time."""
        import torch
        out = []
        for job in jobs:
            for (r, slot, extra), emit in zip(job.items, job.emits):
                kwargs = {"text": [self._prompt(r)], "return_tensors": "pt"}
                if r.image is not None:
                    kwargs["images"] = [pad_to_square(r.image.convert("RGB"))]
                inputs = self.processor(**kwargs).to(self.model.device)
                if "pixel_values" in inputs:
                    inputs["pixel_values"] = inputs["pixel_values"].to(next(self.model.parameters()).dtype)
                self._check_length(inputs["input_ids"].shape[1], r.max_new_tokens)
                self.rows.set([slot])
                settings = {"max_new_tokens": r.max_new_tokens, "min_new_tokens": int(extra.get("min_new_tokens", 0)),
                            "do_sample": r.temperature > 0, "pad_token_id": self.tokenizer.pad_token_id}
                if r.temperature > 0:
                    settings.update(temperature=r.temperature, top_p=r.top_p)
                with torch.inference_mode(), self.adapters.projector_of(slot):
                    ids = self.model.generate(**inputs, **settings)[0, inputs["input_ids"].shape[1]:].tolist()
                ids = [t for t in ids if t not in self.eos_ids]
                for t in ids + [None]:
                    if emit:
                        emit(t)
                out.append(ids)
        return out

    def _serve(self) -> None:
        """The worker: take a job, gather streams that arrive with it, run them as one batch."""
        import torch
        torch.set_grad_enabled(False)
        while True:
            job = self._held.popleft() if self._held else self._jobs.get()
            if job is None:                       # close(): the engine is being dropped
                return
            jobs = [job]
            if job.mergeable:
                deadline = time.monotonic() + GATHER_S
                while len(jobs) < 4:
                    try:
                        more = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if more is None or not more.mergeable:
                        self._held.append(more)
                        break
                    jobs.append(more)
            for j in [j for j in jobs if j.mergeable and j.cancel.is_set()]:     # closed before it started
                jobs.remove(j)
                j.result = [[]]
                j.done.set()
            if not jobs:
                continue
            self.busy, self.last_used = True, time.monotonic()
            self.batches += 1
            try:
                results = self._run(jobs)
                k = 0
                for j in jobs:
                    j.result, k = results[k:k + len(j.items)], k + len(j.items)
            except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
                for j in jobs:
                    j.error = e
            finally:
                self.busy, self.last_used = False, time.monotonic()
                for j in jobs:
                    j.done.set()

    def close(self, wait: float = 0.0) -> None:
        """Stop the worker once its queue is done; `wait` s for it to end (before exiting: not inside torch)."""
        with self._submit_lock:
            self._closed = True
            self._jobs.put(None)
        self._worker.join(wait)

    def submit(self, job: _Job) -> _Job:
        with self._submit_lock:
            if self._closed:     # a job queued after the stop would wait forever
                raise RuntimeError(f"{_display_name(self.base)} was unloaded to make room for another model; open it again")
            self._jobs.put(job)
        return job

    def generate(self, requests: list[Request], slots: list[int], extra: dict | None = None) -> list[str]:
        if not requests:
            return []
        items = [(r, s, extra or {}) for r, s in zip(requests, slots)]
        job = _Job(items, [None] * len(items))
        job.prepared = self.prepare(items) if self.generator is not None else None   # in the caller's thread
        self.submit(job).done.wait()
        if job.error is not None:
            raise job.error
        return [self.decode(ids).strip() for ids in job.result]

    def first_logits(self, requests: list[Request], slots: list[int]):
        """First-answer-token scores per request (float32, CPU), from the same prefill generation uses."""
        with self.adapters_lock:
            return self.generator.first_logits(self.prepare([(r, s, {}) for r, s in zip(requests, slots)]))

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids. Byte sequences that are not UTF-8 (a model emitting stray bytes) are
        dropped rather than shown as U+FFFD boxes; a character split across tokens appears once complete."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return text.replace("\ufffd", "")

    def stream(self, request: Request, slot: int, extra: dict | None = None) -> "TokenStream":
        return TokenStream(self, request, slot, extra or {})


class TokenStream:
    """Text of one generation as it is produced, cut only on character boundaries (a multi-byte
    character split across tokens is held back until complete). `tokens` counts the tokens so far.
    Closing it (or dropping it half-read) cancels the generation at the engine's next step."""

    exact = True

    def __init__(self, engine: Engine, request: Request, slot: int, extra: dict):
        self.engine, self.tokens = engine, 0
        self._queue: queue.Queue = queue.Queue()
        self._job = _Job([(request, slot, extra)], [self._queue.put], mergeable=True)
        engine.submit(self._job)
        self._pieces = self._read()

    def _read(self) -> Iterator[str]:
        from eval.engine import Detokenizer
        text = Detokenizer(self.engine.decode)
        try:
            while True:
                try:
                    token = self._queue.get(timeout=0.05)
                except queue.Empty:
                    if self._job.done.is_set() and self._queue.empty():
                        break
                    continue
                if token is None:             # the row is done, though the batch may go on
                    break
                self.tokens += 1
                piece = text.add(token)
                if piece:
                    yield piece
            if self._job.error is not None:
                raise self._job.error
            rest = text.flush()
            if rest:
                yield rest
        finally:
            self._job.cancel.set()

    def __iter__(self):
        return trimmed(self._pieces)

    def close(self) -> None:
        self._job.cancel.set()          # the engine drops this row at its next step
        try:
            self._pieces.close()
        except ValueError:              # being read in another thread: the cancel flag ends it there
            pass


def check_adapter(adapter_dir: Path, engine: Engine) -> list[str]:
    """Raise AdapterError when the adapter cannot fit the engine's base; return warnings otherwise."""
    config = read_config(adapter_dir)
    notes = []
    trained_on = config.get("base_model_name_or_path")
    if trained_on and _display_name(trained_on).lower() != _display_name(engine.base).lower():
        notes.append(f"adapter {_display_name(str(adapter_dir))} was trained on {trained_on!r}, "
                     f"not {engine.base!r}; answers may be poor")
    shapes = tensor_shapes(adapter_dir)
    a_shapes = {k.removeprefix("base_model.model.")[:-len(".lora_A.weight")]: v for k, v in shapes.items()
                if k.endswith("lora_A.weight")}
    hidden = next((v[1] for k, v in sorted(a_shapes.items()) if k.endswith("q_proj")), None)
    for target, shape in sorted(a_shapes.items()):
        if target in engine.linear_shapes and shape[1] != engine.linear_shapes[target][0]:
            fan_in = engine.linear_shapes[target][0]
            size = (f"was trained for a model with hidden size {hidden}; this base ({engine.base}) has "
                    f"{engine.hidden_size}" if hidden and hidden != engine.hidden_size
                    else f"does not fit this base ({engine.base})")
            hint = f"Use the base it was trained on ({trained_on})." if notes else "Use the base it was trained on."
            raise AdapterError(f"adapter {str(adapter_dir)!r} {size} ({target} has {fan_in} inputs here, the "
                               f"adapter expects {shape[1]}). {hint}")
    return notes


class LocalBackend:
    """A base model, or base + one adapter, served from an engine of a ModelPool."""

    streams = True

    def __init__(self, engine: Engine, adapter: str | Path | None = None, generate_kwargs: dict | None = None):
        self.engine = engine
        self.adapter_dir = Path(adapter).expanduser().resolve() if adapter is not None else None
        self.slot, self.warnings = 0, []
        if self.adapter_dir is not None:
            read_config(self.adapter_dir)          # a clear message for a folder that is not an adapter
            self.slot, self.warnings = engine.attach(self.adapter_dir)
            for note in self.warnings:
                warnings.warn(note, stacklevel=2)
        self.name = _display_name(engine.base) + (f" + {_display_name(str(self.adapter_dir))}" if adapter else "")
        on_cuda = engine.device.startswith("cuda")
        self.max_batch = engine_batch(engine) if on_cuda else 4
        unknown = set(generate_kwargs or {}) - {"min_new_tokens"}
        if unknown:
            raise ValueError(f"generate_kwargs {sorted(unknown)} are not supported; only min_new_tokens is")
        self.generate_kwargs = dict(generate_kwargs or {})   # e.g. min_new_tokens for benchmarks

    def generate(self, requests: list[Request]) -> list[str]:
        return self.engine.generate(list(requests), [self.slot] * len(requests), self.generate_kwargs)

    def stream(self, request: Request) -> TokenStream:
        return self.engine.stream(request, self.slot, self.generate_kwargs)


def generate_together(backends: dict, requests: list[Request], on_progress=None) -> dict[str, list[str] | Exception]:
    """Answers of every backend (by label) to the same requests. Local backends on one engine share
    each batch (the base and every adapter in one forward, each image encoded once); others go in
    chunks of their own max_batch. A backend that fails gets its exception instead of answers, and the
    others go on. on_progress(label, done, total) after each chunk."""
    out: dict[str, list[str] | Exception] = {label: [] for label in backends}
    groups: dict[tuple, list[str]] = {}
    for label, backend in backends.items():
        key = ("engine", id(backend.engine)) if isinstance(backend, LocalBackend) else ("own", label)
        groups.setdefault(key, []).append(label)
    for labels in groups.values():
        first = backends[labels[0]]
        step = max(1, first.max_batch // len(labels))
        try:
            for start in range(0, len(requests), step):
                chunk = requests[start:start + step]
                if isinstance(first, LocalBackend):
                    texts = first.engine.generate(chunk * len(labels),
                                                  [backends[k].slot for k in labels for _ in chunk], first.generate_kwargs)
                    for k, label in enumerate(labels):
                        out[label] += texts[k * len(chunk):(k + 1) * len(chunk)]
                else:
                    out[labels[0]] += first.generate(chunk)
                if on_progress:
                    for label in labels:
                        on_progress(label, len(out[label]), len(requests))
        except Exception as e:  # noqa: BLE001 - this group failed; the others still answer
            for label in labels:
                out[label] = e
    return out


@functools.lru_cache(maxsize=1)
def cpu_pool():
    """One small thread pool for CPU work around the GPU (image decoding, resizing)."""
    import os
    from concurrent.futures import ThreadPoolExecutor
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="images")


def engine_batch(engine: Engine, new_tokens: int = 16) -> int:
    """Rows per batch from free GPU memory (what the driver has free plus what torch holds unused):
    each row holds its KV cache (prompt + new tokens) and prefill activations; half of it is used."""
    import torch
    config = getattr(engine.model.config, "text_config", engine.model.config)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tokens = getattr(engine, "image_tokens", 576) + 64 + new_tokens
    kv = 2 * config.num_hidden_layers * heads * head_dim * tokens * 2
    activations = tokens * (config.hidden_size * 6 + config.intermediate_size * 3) * 2
    device = torch.device(engine.device)
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(max(1, min(256, free * 0.5 // (kv + activations))))
