"""Export a LLaVA-format dataset for other trainers.

llava-json: OUT/{train,val,test}.json, JSON arrays as the original LLaVA trainer reads them
            (--data_path OUT/train.json --image_folder OUT), plus OUT/images/.
hf:         an imagefolder with OUT/{train,validation,test}/metadata.jsonl rows
            {"file_names": [...], "messages": [...], "tolerance" (0.0 = exact), ...} in the Hugging Face / TRL form, loadable with
            datasets.load_dataset("imagefolder", data_dir=OUT): `file_names` becomes an `images`
            column of decoded images, which is what TRL's vision SFT expects.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .dataset import IMAGE_TOKEN, SPLITS, read_records, resolve_image
from .io import atomic_write_text, write_jsonl

HF_SPLITS = {"train": "train", "val": "validation", "test": "test", None: "train"}


def _by_split(src) -> dict:
    groups: dict = {}
    for rec, split, base, _ in read_records(src):
        groups.setdefault(split if split in SPLITS else None, []).append((rec, base))
    return groups


def _copy_image(src: Path, dst: Path) -> None:
    """Hard link when possible (same disk, no extra space), else copy."""
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _image_name(image: str) -> str:
    p = Path(image)
    return p.as_posix() if not p.is_absolute() else f"images/{p.name}"


def export_llava_json(src, out_dir) -> Path:
    out = Path(out_dir)
    for split, items in _by_split(src).items():
        records = []
        for rec, base in items:
            name = _image_name(rec["image"])
            _copy_image(resolve_image(base, rec["image"]), out / name)
            records.append({**rec, "image": name})
        atomic_write_text(out / f"{split or 'data'}.json", json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    return out


def to_messages(rec: dict) -> list[dict]:
    """LLaVA conversation -> TRL messages; the image goes in the first user turn."""
    messages = []
    for k, turn in enumerate(rec["conversations"]):
        text = turn["value"].replace(IMAGE_TOKEN, "").strip()
        if turn["from"] == "human":
            content = ([{"type": "image"}] if not messages else []) + [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": content})
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
    return messages


def _tolerance(rec: dict):
    """Relative tolerance with 0.0 for exact, always present: `datasets` infers one schema for all
    splits from their first rows, so a column may not be missing or null in some of them."""
    tol = rec.get("tolerance")
    if isinstance(rec.get("family"), list):
        return [float(t or 0.0) for t in (tol or [None] * len(rec["family"]))]
    return float(tol or 0.0)


def export_hf(src, out_dir) -> Path:
    out = Path(out_dir)
    for split, items in _by_split(src).items():
        folder = out / HF_SPLITS[split]
        rows = []
        for rec, base in items:
            name = _image_name(rec["image"])
            _copy_image(resolve_image(base, rec["image"]), folder / name)
            row = {"file_names": [name], "messages": to_messages(rec), "id": str(rec.get("id"))}
            for key in ("chart_type", "family", "answer_type"):
                if key in rec:
                    row[key] = rec[key]
            row["tolerance"] = _tolerance(rec)
            rows.append(row)
        write_jsonl(folder / "metadata.jsonl", rows)
    return out


EXPORTERS = {"llava-json": export_llava_json, "hf": export_hf}


def export(src, fmt: str, out_dir) -> Path:
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORTERS)}")
    return EXPORTERS[fmt](src, out_dir)


def zip_folder(folder, zip_path=None) -> Path:
    """folder -> folder.zip (for a download button)."""
    folder = Path(folder)
    base = Path(zip_path).with_suffix("") if zip_path else folder
    return Path(shutil.make_archive(str(base), "zip", root_dir=folder))
