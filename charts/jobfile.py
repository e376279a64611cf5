"""The child's side of a background job (`python -m charts generate` / `python -m eval run` started by
training.launchers): with `--job-file PATH` the CLI keeps PATH, a small JSON file, up to date with its
progress and, when it ends, its outcome, so a launcher (or a restarted studio) reads both without
parsing logs:

    {"done": 40, "total": 120, "desc": "demo-llava 40/120", "updated": 1700000000.0}
    {"done": 120, "total": 120, ..., "status": "completed", "rc": 0}      # or "failed" / "stopped"

Every write is atomic, so a reader never sees half a file.
"""
from __future__ import annotations

import signal
import sys
import time
import traceback
from pathlib import Path

from .io import atomic_write_json

MIN_INTERVAL_S = 0.5      # progress ticks can be per sample; the file need not be rewritten that often


class JobFile:
    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.state: dict = {"done": 0, "total": 0, "desc": ""}
        self._last = 0.0

    def progress(self, done: int, total: int, desc: str = "") -> None:
        self.state.update(done=int(done), total=int(total), desc=desc)
        now = time.time()
        if self.path and (now - self._last >= MIN_INTERVAL_S or done >= total):
            self._last = now
            atomic_write_json(self.path, {**self.state, "updated": now})

    def finish(self, status: str, rc: int, error: str = "") -> None:
        if self.path:
            atomic_write_json(self.path, {**self.state, "status": status, "rc": rc, "error": error,
                                          "updated": time.time()})


def run_job(path: str | Path | None, body) -> int:
    """Run `body(jobfile) -> exit code` and record how it ended. SIGTERM (what Stop sends) ends it like
    Ctrl-C, so `finally` blocks close pools and files on the way out."""
    job = JobFile(path)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        rc = body(job)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        job.finish("stopped" if code >= 128 else ("completed" if code == 0 else "failed"), code)
        raise
    except KeyboardInterrupt:
        job.finish("stopped", 130)
        raise
    except BaseException as e:
        job.finish("failed", 1, "".join(traceback.format_exception_only(type(e), e)).strip())
        raise
    job.finish("completed" if rc == 0 else "failed", rc)
    return rc
