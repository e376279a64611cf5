"""Many LoRA adapters on one copy of a base model, chosen per row of a batch.

PEFT's adapter switch is global to the model, so base and adapter requests take turns. Here every LoRA'd
linear layer holds the A and B matrices of all attached adapters side by side, and a small per-row table
says which adapter each row of the batch uses (none for the base). One forward then serves the base and
any number of adapters at once, with static shapes, so the decode step can be compiled and captured in a
CUDA graph. For each adapter s present in the batch (the base needs nothing):

    y = base(x) + (x @ A_s.T) @ B_s                 # every row uses s; B_s already holds s's scale
    y = base(x) + ((x @ A_s.T) @ B_s) * rows_of_s   # a mixed batch: other rows add exact zeros

so a row gets the same numbers alone as in a mixed batch, and adapters absent from the batch cost nothing.
A projector trained in full (`modules_to_save`) is kept as a separate copy per adapter and applied to that
adapter's rows. Only LoRA on the language model is served this way;
other PEFT types, DoRA and LoRA on the vision tower are refused with a message.
"""
from __future__ import annotations

import copy
import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_PROJECTOR = ("multi_modal_projector", "mm_projector")
_SWAPPABLE = ("embed_tokens", "lm_head")     # trained in full by some recipes (the demo's): swapped per row


class AdapterError(ValueError):
    """An adapter folder cannot be used with this base; the message says why and what to do."""


class Rows:
    """Which adapter each row of the running batch uses, shared by every LoRA layer: a one-hot table
    (column 0 is the base) and, as plain Python values the forward branches on, the adapters present
    and whether every row uses the same one. `key` names that mix: one compiled/captured step each."""

    def __init__(self, max_rows: int, device, dtype):
        self.max_rows, self.device, self.dtype = max_rows, device, dtype
        self.onehot = torch.zeros(max_rows, 1, device=device, dtype=dtype)
        self.present: tuple[int, ...] = ()         # adapter slots (not the base) used by some row
        self.uniform = True                        # every row (padding included) uses the same slot

    @property
    def active(self) -> bool:
        """False when no row uses an adapter (LoRA is skipped)."""
        return bool(self.present)

    @property
    def key(self) -> tuple:
        return (self.present, self.uniform)

    def resize(self, n_adapters: int) -> None:
        self.onehot = torch.zeros(self.max_rows, n_adapters + 1, device=self.device, dtype=self.dtype)

    def set(self, slots: list[int]) -> None:
        """slots[i] = 0 for the base, k for the k-th adapter; rows beyond len(slots) are padding."""
        if len(slots) > self.max_rows:
            raise ValueError(f"{len(slots)} rows, at most {self.max_rows}")
        table = torch.zeros_like(self.onehot, device="cpu")
        table[torch.arange(len(slots)), torch.tensor(slots, dtype=torch.long)] = 1
        self.onehot.copy_(table)          # in place: a captured graph keeps reading the same memory
        self.present, self.uniform = self.mix(slots)

    @staticmethod
    def mix(slots: list[int]) -> tuple:
        """(adapters present, all rows alike) of a batch of these slots: the `key` it decodes with."""
        return tuple(sorted({s for s in slots if s})), len(set(slots)) <= 1

    def of(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """1 for rows of `x` (its first dimension) that use `slot`, 0 for the others, shaped to broadcast."""
        return self.onehot[: x.shape[0], slot].view(-1, *[1] * (x.dim() - 1))


class LoraLinear(nn.Module):
    """A base linear layer plus the LoRA of every adapter that targets it."""

    def __init__(self, base: nn.Module, rows: Rows):
        super().__init__()
        self.base, self.rows = base, rows
        self.parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # slot -> (A (r, in), B.T * scale (r, out))

    def add(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        dtype = self.rows.dtype
        self.parts[slot] = (a.to(self.rows.device, dtype).contiguous(),
                            (b.t() * scale).to(self.rows.device, dtype).contiguous())

    def remove(self, slot: int) -> None:
        self.parts.pop(slot, None)

    def forward(self, x):
        y = self.base(x)
        rows = self.rows
        for slot in rows.present:
            part = self.parts.get(slot)
            if part is None:
                continue
            a, b = part
            delta = ((x.to(a.dtype) @ a.t()) @ b).to(y.dtype)
            y = y + (delta if rows.uniform else delta * rows.of(slot, x).to(y.dtype))
        return y


class RowSwitch(nn.Module):
    """A module some adapters replace in full (embed_tokens, lm_head): each row of the batch gets its
    adapter's copy, or the base's. Rows are the first dimension of the input."""

    def __init__(self, base: nn.Module, rows: Rows):
        super().__init__()
        self.base, self.rows = base, rows
        self.own = nn.ModuleDict()                     # str(slot) -> that adapter's copy

    @property
    def weight(self):                                  # code that reads embed_tokens.weight sees the base's
        return self.base.weight

    def forward(self, x):
        rows = self.rows
        present = [str(s) for s in rows.present if str(s) in self.own]
        if rows.uniform and present:            # every row is this adapter's: the base's copy is not needed
            return self.own[present[0]](x)
        out = self.base(x)
        for slot in present:                    # adapters absent from the batch cost nothing
            pick = rows.onehot[: x.shape[0], int(slot)].to(torch.bool)
            out = torch.where(pick.view(-1, *[1] * (out.dim() - 1)), self.own[slot](x).to(out.dtype), out)
        return out


def read_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir)
    if not path.is_dir():
        raise AdapterError(f"adapter folder not found: {path}")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{path} is not a PEFT adapter folder (no adapter_config.json); give the folder "
                           "that training saved the adapter in, e.g. workspace/runs/NAME/adapter")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file} is not a JSON object")
    return config


def weights_file(adapter_dir: Path) -> Path:
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        return weights
    if (adapter_dir / "adapter_model.bin").is_file():
        # .bin is a pickle: loading one from an untrusted folder can run code, so only safetensors is read.
        raise AdapterError(f"{adapter_dir} holds adapter_model.bin (a pickle); the studio loads only safetensors. "
                           "Re-save it with PeftModel.save_pretrained(dir, safe_serialization=True).")
    raise AdapterError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors")


def tensor_shapes(adapter_dir: Path) -> dict[str, tuple]:
    """Tensor shapes from the weight file's header (no weights are read)."""
    from safetensors import safe_open
    try:
        with safe_open(str(weights_file(adapter_dir)), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: say so in one line
        raise AdapterError(f"{adapter_dir}: adapter_model.safetensors cannot be read ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def _scale(config: dict, module: str, rank: int) -> float:
    alpha = config.get("lora_alpha", rank)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def split_weights(adapter_dir: Path, config: dict, linear_names: set[str]) -> tuple[dict, dict]:
    """({module: (A, B, scale)}, {projector parameter: tensor}) of an adapter, checked for what the
    engine can serve. Raises AdapterError naming the first thing it cannot."""
    from safetensors.torch import load_file

    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{adapter_dir}: a {config.get('peft_type')} adapter; the studio serves LoRA adapters")
    if config.get("use_dora"):
        raise AdapterError(f"{adapter_dir}: DoRA adapters are not served; merge it into the base instead")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError(f"{adapter_dir}: adapters that train biases are not served; retrain with bias='none'")
    try:
        tensors = load_file(str(weights_file(adapter_dir)))
    except AdapterError:
        raise
    except Exception as e:  # noqa: BLE001
        raise AdapterError(f"{adapter_dir}: adapter_model.safetensors cannot be read ({_first_line(e)})") from None
    pairs: dict[str, dict] = {}
    full: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        match = _LORA_KEY.match(name)
        if match:
            module, which = match.groups()
            if "vision_tower" in module or "vision_model" in module:
                raise AdapterError(f"{adapter_dir}: LoRA on the vision tower ({module}) is not served; the engine "
                                   "encodes each image once for the base and every adapter")
            pairs.setdefault(module, {})[which] = value
        elif any(p in name for p in _PROJECTOR + _SWAPPABLE):
            full[name.replace(".modules_to_save.default", "").replace(".original_module", "")] = value
        elif "lora_embedding" in name or "lora_magnitude" in name:
            raise AdapterError(f"{adapter_dir}: holds {name}; only LoRA on linear layers is served")
        else:
            raise AdapterError(f"{adapter_dir}: replaces {name} in full; only the projector, embed_tokens and "
                               "lm_head can be swapped per request (merge the adapter into the base to serve it)")
    loras = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{adapter_dir}: {module} has lora_{'A' if 'A' in ab else 'B'} only")
        if module not in linear_names:
            raise AdapterError(f"adapter {str(adapter_dir)!r} targets {module!r}, which this base does not have. It "
                               "was made for another architecture or naming; adapters from the original LLaVA code "
                               "must be converted to the Hugging Face layout first.")
        rank = ab["A"].shape[0]
        loras[module] = (ab["A"], ab["B"], _scale(config, module, rank))
    if not loras and not full:
        raise AdapterError(f"{adapter_dir}: the adapter holds no LoRA weights")
    return loras, full


class Adapters:
    """The adapters attached to one model: which slot each has, their LoRA layers and projectors."""

    def __init__(self, model: nn.Module, rows: Rows):
        self.model, self.rows = model, rows
        self.layers: dict[str, LoraLinear] = {}
        self.projectors: dict[int, nn.Module] = {}      # slot -> this adapter's own projector copy
        self.slots: dict[str, int] = {}                 # adapter key -> slot (1, 2, ...)
        self.projector_name: str | None = None          # where the projector lives in the model

    @contextmanager
    def projector_of(self, slot: int):
        """The model with `slot`'s own projector in place (for code paths that call the model whole)."""
        if slot not in self.projectors:
            yield
            return
        parent_name, _, child = self.projector_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        original = getattr(parent, child)
        setattr(parent, child, self.projectors[slot])
        try:
            yield
        finally:
            setattr(parent, child, original)

    def attach(self, key: str, loras: dict, projector_state: dict) -> int:
        """Add one adapter; nothing changes unless every tensor fits (so a failed attach leaves the
        others exactly as they were)."""
        if key in self.slots:
            return self.slots[key]
        modules = dict(self.model.named_modules())
        swapped = {k: v for k, v in projector_state.items() if not any(p in k for p in _PROJECTOR)}
        projector_state = {k: v for k, v in projector_state.items() if any(p in k for p in _PROJECTOR)}
        projector = self._projector_copy(modules, projector_state) if projector_state else None
        copies = self._full_copies(modules, swapped)
        for module, (a, b, _) in loras.items():
            base = modules[module].base if isinstance(modules[module], LoraLinear) else modules[module]
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise AdapterError(f"{module} has {base.in_features} inputs and {base.out_features} outputs here; "
                                   f"the adapter expects {a.shape[1]} and {b.shape[0]}: it was trained for another "
                                   "model. Use the base it was trained on.")
        slot = max(self.slots.values(), default=0) + 1
        if slot >= self.rows.onehot.shape[1]:
            self.rows.resize(slot)
        for module, (a, b, scale) in loras.items():
            self._layer(module, modules).add(slot, a, b, scale)
        if projector is not None:
            self.projectors[slot] = projector
        for name, copy_ in copies.items():
            self._switch(name, modules).own[str(slot)] = copy_
        self.slots[key] = slot
        return slot

    def _full_copies(self, modules: dict, state: dict) -> dict[str, nn.Module]:
        """{module name: this adapter's copy of it} for embed_tokens / lm_head trained in full."""
        copies = {}
        for name in sorted({k.rsplit(".", 1)[0] for k in state}):
            if name not in modules:
                raise AdapterError(f"the adapter replaces {name}, which this base does not have")
            base = modules[name].base if isinstance(modules[name], RowSwitch) else modules[name]
            own = copy.deepcopy(base)
            expected = own.state_dict()
            given = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            for k, v in given.items():
                if k not in expected or tuple(v.shape) != tuple(expected[k].shape):
                    raise AdapterError(f"the adapter holds {name}.{k} of shape {list(v.shape)}, but this base has "
                                       f"{list(expected[k].shape) if k in expected else 'no such tensor'}: it was "
                                       "trained for another model.")
            own.load_state_dict({**expected, **{k: v.to(expected[k].dtype) for k, v in given.items()}})
            copies[name] = own.eval()
        return copies

    def _switch(self, name: str, modules: dict) -> RowSwitch:
        module = modules[name]
        if isinstance(module, RowSwitch):
            return module
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else self.model
        switch = RowSwitch(module, self.rows)
        setattr(parent, child, switch)
        return switch

    def detach(self, key: str) -> None:
        slot = self.slots.pop(key, None)
        if slot is None:
            return
        for layer in self.layers.values():
            layer.remove(slot)
        self.projectors.pop(slot, None)
        for module in self.model.modules():
            if isinstance(module, RowSwitch) and str(slot) in module.own:
                del module.own[str(slot)]

    def _layer(self, module: str, modules: dict) -> LoraLinear:
        if module not in self.layers:
            parent_name, _, child = module.rpartition(".")
            parent = modules[parent_name] if parent_name else self.model
            layer = LoraLinear(getattr(parent, child), self.rows)
            setattr(parent, child, layer)
            self.layers[module] = layer
        return self.layers[module]

    def _projector_copy(self, modules: dict, state: dict) -> nn.Module:
        names = set(state)
        root = next((m for m in modules if m.endswith(_PROJECTOR) and any(n.startswith(m + ".") for n in names)), None)
        if root is None:
            raise AdapterError(f"the adapter's projector ({sorted(names)[0]}) is not in this base")
        self.projector_name = root
        projector = copy.deepcopy(modules[root])
        own = {k[len(root) + 1:]: v for k, v in state.items()}
        expected = projector.state_dict()
        for k, v in own.items():
            if k not in expected:
                raise AdapterError(f"the adapter's projector has {root}.{k}, which this base's projector lacks")
            if tuple(v.shape) != tuple(expected[k].shape):
                raise AdapterError(f"the adapter holds {root}.{k} of shape {list(v.shape)}, but this base has "
                                   f"{list(expected[k].shape)}: it was trained for another model.")
        projector.load_state_dict({**expected, **{k: v.to(expected[k].dtype) for k, v in own.items()}})
        return projector.eval()
