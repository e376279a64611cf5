"""Question sets for benchmark runs: a dataset folder, a ChartQA-style file or folder, or LLaVA records,
as question dicts {id, image, question, answers, split, chart_type, family, answer_type} in a fixed order.
An image name that is absolute or leads out of its folder is refused (an `image_error` on that question)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from charts.io import inside, read_jsonl


class DatasetError(ValueError):
    """The question file or folder cannot be used; the message says which and why."""


def _read_records(path: Path) -> list[dict]:
    try:
        if path.suffix == ".jsonl":
            rows = list(read_jsonl(path))
        else:
            rows = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON/JSON Lines ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"{path}: expected a list of objects (records), got {type(rows).__name__}")
    return rows


def _chartqa_split(path: Path) -> str:
    """ChartQA names files test_human.json / test_augmented.json: report those two splits separately."""
    for name in ("human", "augmented"):
        if name in path.stem.lower():
            return name
    return path.stem


def load_chartqa(path: str | Path, images: str | Path | None = None) -> list[dict]:
    """A ChartQA-style file `[{"imgname", "query", "label"}]` as question dicts. Images are looked up
    in `images`, else in ChartQA's own layout (`png/` beside the file), else beside the file."""
    path = Path(path)
    rows = _read_records(path)
    if images is None:
        images = path.parent / "png" if (path.parent / "png").is_dir() else path.parent
    images, split = Path(images), _chartqa_split(path)
    questions = []
    for n, row in enumerate(rows):
        missing = [k for k in ("imgname", "query", "label") if k not in row]
        if missing:
            raise DatasetError(f"{path}: record {n} lacks {missing}; a ChartQA-style record has "
                               "imgname, query and label")
        label = row["label"]
        golds = [str(x) for x in label] if isinstance(label, list) else [str(label)]
        image, image_error = _chartqa_image(images, row["imgname"])
        q = {"id": f"{split}/{row['imgname']}/{n}", "image": image, "question": str(row["query"]), "answers": golds,
             "split": split, "chart_type": row.get("chart_type", "unknown"), "family": row.get("family", "unknown"),
             "answer_type": row.get("answer_type", "")}
        questions.append({**q, "image_error": image_error} if image_error else q)
    _check_images_found(path, images, questions)
    return questions


def _chartqa_image(images: Path, name) -> tuple[str, str | None]:
    """(absolute path, None) for an image name inside the image folder, else ("", why): an absolute
    name or one with '..' is never read."""
    if Path(str(name)).is_absolute():
        return "", f"image {name!r} refused: an absolute path (names are relative to the image folder {images})"
    try:
        return str(inside(images, str(name))), None
    except ValueError as e:
        return "", f"image {name!r} refused: it leads out of the image folder ({e})"


def _check_images_found(path: Path, images: Path, questions: list[dict]) -> None:
    """When not one image exists, the image folder is wrong: say so once, instead of one error per sample."""
    named = [q for q in questions if q["image"]]
    missing = [q for q in named if not Path(q["image"]).is_file()]
    if named and len(missing) == len(named):
        first = ", ".join(Path(q["image"]).name for q in missing[:3])
        raise DatasetError(f"{path}: {len(missing)} of {len(named)} images not found in {images.resolve()} "
                           f"(first: {first}); give the folder that holds them with --images")


def _is_chartqa_file(path: Path) -> bool:
    rows = _read_records(path)
    return bool(rows) and {"imgname", "query"} <= set(rows[0])


def load_questions(data: str | Path, split: str | None = None, images: str | Path | None = None) -> list[dict]:
    """Questions of a dataset folder (our layout, or ChartQA's test folder with *_human/*_augmented
    files), a ChartQA-style file, or a LLaVA-format file -- in a fixed order."""
    path = Path(data)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.is_dir():
        chartqa = sorted(path.glob("*_human.json")) + sorted(path.glob("*_augmented.json"))
        if chartqa and not any((path / f"{s}.jsonl").exists() for s in ("train", "val", "test")):
            questions = [q for f in chartqa for q in load_chartqa(f, images)]
        else:
            questions = _load_llava(path, split)
            split = None   # charts.load_qa already selected it
    elif _is_chartqa_file(path):
        questions = load_chartqa(path, images)
    else:
        questions = _load_llava(path, split)
        split = None
    if split:
        questions = [q for q in questions if q.get("split") == split]
    if not questions:
        raise DatasetError(f"{path}: no questions" + (f" in split {split!r}" if split else "") +
                           "; expected a dataset folder, ChartQA-style records (imgname, query, label) "
                           "or LLaVA records (id, image, conversations)")
    seen = set()
    for q in questions:
        if q["id"] in seen:
            raise DatasetError(f"{path}: question id {q['id']!r} appears twice; ids must be unique to resume")
        seen.add(q["id"])
    return questions


def _load_llava(path: Path, split: str | None) -> list[dict]:
    import charts
    try:
        return charts.load_qa(path, split=split)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: not a dataset folder, ChartQA-style file or LLaVA-format file ({e})") from None


def question_set_hash(questions: list[dict]) -> str:
    """Same hash <=> same questions, same golds, same order (image paths excluded: folders move)."""
    h = hashlib.sha256()
    for q in questions:
        h.update(json.dumps([q["id"], q["question"], q["answers"]], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()[:16]
