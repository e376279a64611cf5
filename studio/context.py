"""What every tab is given: where the workspace is, which base/adapter the studio opened with, and the
model pool that owns every loaded model (one copy of each base, shared by all tabs and users)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eval.pool import ModelPool


@dataclass(frozen=True)
class Studio:
    workspace: Path           # datasets/, runs/, evals/, jobs.jsonl, endpoints.json, votes.jsonl
    base: str                 # base model: a local folder or a hub id
    adapter: str | None = None  # default LoRA adapter folder for side B, if any
    pool: ModelPool = field(default_factory=ModelPool, compare=False)
    quantize: str = "auto"    # auto: bf16 when the base fits the GPU, else 4-bit; "4bit" / "none" force one
    compile: bool | str = "auto"   # compile the decode step on CUDA (auto: on with CUDA); False loads fast

    def path(self, *parts: str) -> Path:
        return self.workspace.joinpath(*parts)

    def local_options(self) -> dict:
        return {"quantize": self.quantize, "compile": self.compile}

    def backend_options(self, wire: str | None = None) -> dict:
        """Options per backend kind, as the tabs open models: local precision; endpoints with what
        endpoints.json recorded at deploy, or `wire` for endpoints deployed elsewhere."""
        sagemaker = {"workspace": self.workspace, **({"wire": wire} if wire and wire != "recorded" else {})}
        return {"local": self.local_options(), "sagemaker": sagemaker}
