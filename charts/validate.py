"""Check any LLaVA-format dataset (a folder, a .jsonl, a .json array) before training on it.

Every defect of the blog's public sample is an error here: no <image> placeholder (LLaVA then
trains a text-only model), repeated ids, "How many ..." answered with a percentage, a JSON array
where JSON Lines was promised; and no train/test split is a warning.
"""
from __future__ import annotations

import json
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .dataset import IMAGE_TOKEN, SPLITS, resolve_image
from .questions import ANSWER_TYPES, parse_number

MAX_PIXELS = 40_000_000          # a chart is far smaller; bigger is a decompression bomb or a mistake
MAX_IMAGE_BYTES = 50 * 2 ** 20

MESSAGES = {
    "not_found": "path does not exist",
    "no_data_files": "no .jsonl/.json data files found",
    "no_records": "the data files hold no records: there is nothing to train or evaluate on",
    "not_utf8": "line is not valid UTF-8 text (the trainer reads UTF-8 and would stop there)",
    "jsonl_is_json_array": "a .jsonl file holds one JSON array: JSON Lines (one record per line) expected",
    "json_is_json_lines": "a .json file holds JSON Lines: the LLaVA trainer expects one JSON array",
    "json_not_array": "a .json file holds a single object, not an array of records",
    "bad_json": "line is not valid JSON",
    "not_an_object": "record is not a JSON object",
    "missing_id": "record has no id",
    "duplicate_id": "id used by more than one record",
    "missing_image_field": "record has no image",
    "image_missing": "image file not found",
    "image_outside_dataset": "image path is absolute or leads out of the dataset folder (it is never read)",
    "image_unreadable": "image cannot be decoded",
    "image_too_large": "image too large (possible decompression bomb)",
    "no_conversations": "conversations missing or empty",
    "bad_turn": "turn is not an object with 'from' and 'value'",
    "turns_not_alternating": "turns must alternate human, gpt, human, gpt ... and end with gpt",
    "empty_turn": "turn has an empty value",
    "missing_image_token": "first human turn has no <image> placeholder: LLaVA would train a text-only model",
    "image_token_repeated": "<image> appears more than once in the conversation",
    "image_token_misplaced": "<image> appears in a turn other than the first human turn",
    "image_token_not_first": "<image> is not at the start of the first human turn (convention: '<image>\\n' first)",
    "how_many_percent": "a 'how many' question is answered with a percentage, not a count",
    "how_many_not_count": "a 'how many' question is not answered with a whole number",
    "yes_no_mismatch": "a yes/no question is not answered with Yes or No",
    "answer_not_number": "answer_type says number/percent but the answer is not a number",
    "unknown_answer_type": f"answer_type is not one of {', '.join(ANSWER_TYPES)}",
    "metadata_misaligned": "family/answer_type/tolerance list length differs from the number of answers",
    "image_in_several_splits": "the same image is used in more than one split (test leaks into training)",
    "split_field_mismatch": "the record's split field differs from the file it is in",
    "no_split": "no train/test split: every record is in one set, so evaluation would reuse training images",
}
WARNING_CODES = {"no_split", "image_token_not_first", "how_many_not_count", "unknown_answer_type",
                 "split_field_mismatch"}
_AUX = {"is", "are", "was", "were", "does", "do", "did", "can", "could", "has", "have", "had", "will",
        "would", "should"}


@dataclass
class Issue:
    code: str
    file: str
    line: int | None = None
    record_id: str | None = None
    detail: str = ""

    def where(self) -> str:
        loc = f"{self.file}:{self.line}" if self.line else self.file
        return f"{loc}" + (f" id={self.record_id}" if self.record_id is not None else "")


@dataclass
class Report:
    path: str
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def codes(self) -> set[str]:
        return {i.code for i in self.errors + self.warnings}

    def add(self, code: str, file, line=None, record_id=None, detail: str = "") -> None:
        issue = Issue(code, str(file), line, None if record_id is None else str(record_id), detail)
        (self.warnings if code in WARNING_CODES else self.errors).append(issue)

    def to_text(self, examples: int = 5) -> str:
        status = "OK" if self.ok else "FAILED"
        lines = [f"Validation of {self.path}: {status} ({len(self.errors)} errors, {len(self.warnings)} warnings)"]
        c = self.counts
        if c:
            per_split = ", ".join(f"{k} {v}" for k, v in c.get("records_per_split", {}).items())
            lines.append(f"records: {c.get('records', 0)} ({per_split}); questions: {c.get('questions', 0)}; "
                         f"images: {c.get('images', 0)}")
        for title, issues in (("ERRORS", self.errors), ("WARNINGS", self.warnings)):
            if not issues:
                continue
            lines.append(title)
            groups = defaultdict(list)
            for i in issues:
                groups[i.code].append(i)
            for code, group in groups.items():
                lines.append(f"  [{code}] x{len(group)}: {MESSAGES[code]}")
                for i in group[:examples]:
                    lines.append(f"    - {i.where()}" + (f": {i.detail}" if i.detail else ""))
                if len(group) > examples:
                    lines.append(f"    ... and {len(group) - examples} more")
        return "\n".join(lines)


def _files(path: Path, report: Report) -> list[Path]:
    if path.is_file():
        return [path]
    split_files = [path / f"{s}.jsonl" for s in SPLITS if (path / f"{s}.jsonl").exists()]
    return split_files or sorted(p for p in path.iterdir()
                                 if p.suffix in (".json", ".jsonl") and p.name != "dataset.json")


def _parse(f: Path, report: Report) -> list[tuple[int, object]]:
    raw = f.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.add("not_utf8", f.name, raw.count(b"\n", 0, e.start) + 1, detail=f"byte {raw[e.start]:#04x} at "
                   f"offset {e.start}")
    text = raw.decode("utf-8", errors="replace")    # go on, so the other defects are reported too
    stripped = text.lstrip()
    if stripped.startswith("["):
        if f.suffix == ".jsonl":
            report.add("jsonl_is_json_array", f.name, 1)
        try:
            return _array_items(text)
        except (json.JSONDecodeError, ValueError) as e:
            report.add("bad_json", f.name, getattr(e, "lineno", None), detail=getattr(e, "msg", str(e)))
            return []
    if f.suffix == ".json":
        try:
            obj = json.loads(text)
            report.add("json_not_array", f.name, 1)
            return [(1, obj)]
        except json.JSONDecodeError:
            report.add("json_is_json_lines", f.name, 1)
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                report.add("bad_json", f.name, n, detail=e.msg)
    return out


def _array_items(text: str) -> list[tuple[int, object]]:
    """(line where the element starts, element) for a JSON array, so reports point at real lines."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    out = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise ValueError("unterminated JSON array")
        if text[pos] == "]":
            return out
        obj, end = decoder.raw_decode(text, pos)
        out.append((text.count("\n", 0, pos) + 1, obj))
        pos = end


def _check_image(p: Path) -> str | None:
    """None if the image decodes; else an issue code."""
    from PIL import Image
    if not p.is_file():
        return "image_missing"
    if p.stat().st_size > MAX_IMAGE_BYTES:
        return "image_too_large"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if im.size[0] * im.size[1] > MAX_PIXELS:
                    return "image_too_large"
                im.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return "image_too_large"
    except Exception:
        return "image_unreadable"
    return None


def _is_yes_no_question(q: str) -> bool:
    """'Is A larger than B?', also after a lead-in ('According to the chart, is ...?'); not 'A or B?'.
    Only the first line counts: an instruction may follow it ('...?\nAnswer with a single word.')."""
    q = q.strip().split("\n")[0]
    if " or " in q.lower() or not q.rstrip().endswith("?"):
        return False
    clauses = [q] + re.split(r"[,:]\s+", q)[1:]
    return any((words := re.findall(r"[A-Za-z']+", c)) and words[0].lower() in _AUX for c in clauses)


def _check_pair(q: str, a: str, answer_type, report: Report, where: tuple) -> None:
    ql, al = q.lower(), a.strip().lower().rstrip(".")
    if "how many" in ql:
        if "%" in a or "percent" in al:
            report.add("how_many_percent", *where, detail=f"{q.strip()!r} -> {a!r}")
        else:
            x = parse_number(a)
            if x is None or x != int(x):
                report.add("how_many_not_count", *where, detail=f"{q.strip()!r} -> {a!r}")
    if (answer_type == "yes/no" or _is_yes_no_question(q)) and al not in ("yes", "no"):
        report.add("yes_no_mismatch", *where, detail=f"{q.strip()!r} -> {a!r}")
    if answer_type in ("number", "percent") and parse_number(a) is None:
        report.add("answer_not_number", *where, detail=repr(a))
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        report.add("unknown_answer_type", *where, detail=repr(answer_type))


def _check_record(rec, f: Path, line: int, report: Report) -> int:
    """Checks one record's own content; returns its number of answered questions."""
    rid = rec.get("id")
    where = (f.name, line, rid)
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        report.add("no_conversations", *where)
        return 0
    if not all(isinstance(t, dict) and "from" in t and isinstance(t.get("value"), str) for t in conv):
        report.add("bad_turn", *where)
        return 0
    roles = [t["from"] for t in conv]
    if roles != ["human", "gpt"] * (len(conv) // 2) or len(conv) % 2:
        report.add("turns_not_alternating", *where, detail=" ".join(roles))
    if any(not t["value"].strip() for t in conv):
        report.add("empty_turn", *where)
    first_human = next((k for k, t in enumerate(conv) if t["from"] == "human"), None)
    tokens = sum(t["value"].count(IMAGE_TOKEN) for t in conv)
    if first_human is None or IMAGE_TOKEN not in conv[first_human]["value"]:
        report.add("missing_image_token", *where)
    elif not conv[first_human]["value"].startswith(IMAGE_TOKEN):
        report.add("image_token_not_first", *where)
    if tokens > 1:
        report.add("image_token_repeated", *where)
    if any(IMAGE_TOKEN in t["value"] for k, t in enumerate(conv) if k != first_human):
        report.add("image_token_misplaced", *where)
    pairs = [(conv[k]["value"], conv[k + 1]["value"]) for k in range(0, len(conv) - 1)
             if conv[k]["from"] == "human" and conv[k + 1]["from"] == "gpt"]
    types = rec.get("answer_type")
    for key in ("family", "answer_type", "tolerance"):
        if isinstance(rec.get(key), list) and len(rec[key]) != len(pairs):
            report.add("metadata_misaligned", *where, detail=key)
    for k, (q, a) in enumerate(pairs):
        t = types[k] if isinstance(types, list) and k < len(types) else (None if isinstance(types, list) else types)
        _check_pair(q.replace(IMAGE_TOKEN, ""), a, t, report, where)
    return len(pairs)


def validate(path) -> Report:
    """Validate a dataset folder, a .jsonl or a .json array; see MESSAGES for what is checked."""
    path = Path(path)
    report = Report(str(path))
    if not path.exists():
        report.add("not_found", path)
        return report
    files = _files(path, report)
    if not files:
        report.add("no_data_files", path)
        return report
    ids: dict[str, str] = {}
    image_splits: dict[Path, set] = defaultdict(set)
    image_status: dict[Path, str | None] = {}
    per_split: dict[str, int] = defaultdict(int)
    records = questions = 0
    for f in files:
        file_split = f.stem if f.stem in SPLITS else None
        for line, rec in _parse(f, report):
            records += 1
            if not isinstance(rec, dict):
                report.add("not_an_object", f.name, line)
                continue
            rid = rec.get("id")
            where = (f.name, line, rid)
            if rid is None or rid == "":
                report.add("missing_id", *where)
            elif str(rid) in ids:
                report.add("duplicate_id", *where, detail=f"first seen at {ids[str(rid)]}")
            else:
                ids[str(rid)] = f"{f.name}:{line}"
            split = rec.get("split") or file_split
            if file_split and rec.get("split") and rec["split"] != file_split:
                report.add("split_field_mismatch", *where, detail=f"split={rec['split']!r} in {f.name}")
            per_split[split or "no split"] += 1
            questions += _check_record(rec, f, line, report)
            if not rec.get("image"):
                report.add("missing_image_field", *where)
                continue
            try:
                img = resolve_image(f.parent, str(rec["image"]))
            except ValueError:
                report.add("image_outside_dataset", *where, detail=str(rec["image"]))
                continue
            if img not in image_status:
                image_status[img] = _check_image(img)
                if image_status[img]:
                    report.add(image_status[img], *where, detail=str(rec["image"]))
            image_splits[img].add(split)
    for img, splits in image_splits.items():
        named = sorted(s for s in splits if s)
        if len(named) > 1:
            report.add("image_in_several_splits", img.name, detail=", ".join(named))
    if not records:
        report.add("no_records", path, detail=", ".join(f.name for f in files))
    elif not ({"test", "val"} & set(per_split)):
        report.add("no_split", path, detail=f"splits seen: {', '.join(sorted(per_split))}")
    report.counts = {"records": records, "questions": questions, "images": len(image_status),
                     "records_per_split": dict(per_split), "files": [f.name for f in files]}
    return report
