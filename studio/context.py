"""What every tab is given: where the workspace is and which demo/base model the studio opened with."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Studio:
    workspace: Path           # datasets/, runs/, evals/, jobs.jsonl, endpoints.json, votes.jsonl
    base: str                 # base model: a local folder or a hub id
    adapter: str | None = None  # default LoRA adapter folder for side B, if any

    def path(self, *parts: str) -> Path:
        return self.workspace.joinpath(*parts)
