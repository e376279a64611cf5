"""Small file helpers every layer uses: atomic writes, JSON Lines, and the one rule for user paths."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file in the same folder and a rename,
    so a reader (or a killed writer) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Write all rows at once, atomically."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one row as one write of one line; with O_APPEND a concurrent reader sees
    whole lines, and a crash loses at most the line being written (read_jsonl skips it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike, strict: bool = False) -> Iterator[dict]:
    """Yield one dict per line. A torn last line (from a killed writer) is skipped unless
    `strict`; any other bad line raises ValueError naming the file and line number."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not strict:
                return
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None


def inside(root: str | os.PathLike, user_path: str | os.PathLike) -> Path:
    """`user_path` resolved inside `root`, or ValueError with a one-line reason. A relative path is taken
    from `root`; an absolute one must already lie under it. '..' is refused outright (even when it would
    stay inside) and symlinks are followed before the check, so no spelling leads out. Every path typed
    into the studio goes through here before anything is read or written."""
    text = os.fspath(user_path).strip() if user_path is not None else ""
    if not text:
        raise ValueError("empty path")
    if "\x00" in text:
        raise ValueError("a path cannot contain a NUL byte")
    path = Path(text)
    if ".." in path.parts:
        raise ValueError(f"'..' is not allowed in a path: {text}")
    base = Path(root).resolve()
    full = (base / path).resolve()
    if not full.is_relative_to(base):
        raise ValueError(f"{text} is outside {base}: give a path inside it")
    return full
