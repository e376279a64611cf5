"""Checkpoints that are complete or absent, and which one a run continues from.

HF Trainer writes a checkpoint folder file by file; a kill in the middle leaves a folder that looks like
the newest checkpoint and makes every resume crash. training.train writes COMPLETE_MARKER into the folder
after everything else, resumes only from marked folders (the newest), and moves unmarked ones aside.
On resume, metrics.jsonl keeps only the rows up to the checkpoint's step.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from charts.io import read_jsonl, write_jsonl
from training.config import TrainConfig

# Written into a checkpoint folder after everything else (weights, optimizer, scheduler, RNG states, trainer
# state): a folder without it was cut short by a kill and is never resumed from.
COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class ResumeError(RuntimeError):
    """The checkpoint asked for cannot be resumed from; the message says why."""


def checkpoint_step(folder: Path) -> int | None:
    m = CHECKPOINT_RE.match(Path(folder).name)
    return int(m.group(1)) if m else None


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [p for p in Path(ckpt_dir).iterdir() if p.is_dir() and checkpoint_step(p) is not None and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def set_aside_incomplete(ckpt_dir: Path, say=print) -> None:
    """Move checkpoints a kill cut short out of the way (to incomplete-checkpoint-N): never resumed from,
    and not counted by rotation, which would otherwise delete a complete one to keep them."""
    if not Path(ckpt_dir).is_dir():
        return
    import shutil
    for p in sorted(Path(ckpt_dir).iterdir()):
        if p.is_dir() and checkpoint_step(p) is not None and not is_complete(p):
            aside = p.with_name("incomplete-" + p.name)
            shutil.rmtree(aside, ignore_errors=True)
            p.rename(aside)
            say(f"{p} is incomplete (its save was interrupted): moved to {aside.name}, not resumed from")


def choose_resume(cfg: TrainConfig, ckpt_dir: Path, say=print) -> Path | None:
    """The checkpoint this run continues from (None: step 0), and a line saying which and why."""
    if cfg.resume == "never":
        say("resume never: starting at step 0")
        return None
    if cfg.resume != "auto":
        chosen = Path(cfg.resume)
        if not chosen.is_dir():
            raise ResumeError(f"--resume {cfg.resume}: no such checkpoint folder")
        if not is_complete(chosen):
            raise ResumeError(f"--resume {cfg.resume}: the checkpoint is incomplete (no {COMPLETE_MARKER}; its save "
                             "was interrupted); pick an earlier one or --resume auto")
        say(f"resuming from {chosen}")
        return chosen
    if cfg.overwrite:
        return None
    found = complete_checkpoints(ckpt_dir)
    if not found:
        say(f"no complete checkpoint in {ckpt_dir}: starting at step 0")
        return None
    say(f"resuming from {found[-1]} (step {checkpoint_step(found[-1])}, the newest complete checkpoint)")
    return found[-1]


def checkpoint_global_step(folder: Path) -> int:
    try:
        return int(json.loads((Path(folder) / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return checkpoint_step(folder) or 0


def trim_metrics(path: Path, step: int, say=print) -> None:
    """Keep the metrics rows up to `step` (where the run continues from): rows a killed attempt logged past
    its last checkpoint are redone by this run and would otherwise draw a second curve."""
    rows = list(read_jsonl(path))
    kept = [r for r in rows if isinstance(r.get("step"), (int, float)) and r["step"] <= step]
    if len(kept) != len(rows) or (rows and Path(path).read_bytes()[-1:] != b"\n"):
        write_jsonl(path, kept)
        if len(kept) != len(rows):
            say(f"metrics.jsonl: dropped {len(rows) - len(kept)} row(s) logged after step {step} by an earlier attempt")




def remove_checkpoints(ckpt_dir: Path) -> None:
    import shutil
    if Path(ckpt_dir).is_dir():
        for p in Path(ckpt_dir).iterdir():
            if p.is_dir() and (checkpoint_step(p) is not None or p.name.startswith("incomplete-checkpoint-")):
                shutil.rmtree(p, ignore_errors=True)
