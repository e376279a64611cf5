"""Chart generation under bad input and kills: an empty kind list, datasets that `validate` must refuse,
a torn journal, and a SIGKILLed `python -m charts generate` (no orphaned workers; a rerun resumes exactly)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import charts
from charts.dataset import SPLITS

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _files(out: Path) -> dict[str, bytes]:
    """Every file a user reads (images, split files, the saved config less its own `out`), by relative path."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != "dataset.json" and not p.name.startswith(".")}
    if "generate_config.yaml" in files:
        files["generate_config.yaml"] = b"\n".join(line for line in files["generate_config.yaml"].splitlines()
                                                   if not line.startswith(b"out: "))
    return files


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("field", ["kinds", "families"])
def test_an_empty_kind_or_family_list_is_refused_not_read_as_all(tmp_path, field):
    args = {"kinds": ["bar"], "families": ["value"]}
    args[field] = []
    with pytest.raises(ValueError, match="at least one"):
        charts.generate(2, args["kinds"], out_dir=tmp_path / "ds", families=args["families"])
    assert not (tmp_path / "ds" / "images").exists()


def test_cli_with_no_kind_exits_with_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "charts", "generate", "--out", str(tmp_path / "ds"), "--n", "2",
                          "--kinds", ""], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert out.returncode == 2 and out.stderr.startswith("error:") and "Traceback" not in out.stderr


def _wired(blocks, button):
    """The function a button's click runs, as the running app would call it."""
    return next(f.fn for f in blocks.fns.values() if any(t[0] == button._id for t in f.targets))


def test_charts_tab_with_no_kind_ticked_shows_an_error_and_writes_nothing(tmp_path):
    import gradio as gr

    from studio import charts_tab
    from studio.context import Studio
    with gr.Blocks() as demo:
        parts = charts_tab.build(Studio(tmp_path, "base"))
    on_generate = _wired(demo, parts["generate"])
    with pytest.raises(gr.Error, match="chart kind"):
        on_generate("ds", [], list(charts.FAMILIES), 4, 0, 3, "0.8,0.1,0.1", False, 0.5)
    assert not (tmp_path / "datasets" / "ds").exists()


# ---------------------------------------------------------------- validate
def test_validate_refuses_an_empty_dataset(tmp_path):
    for s in SPLITS:
        (tmp_path / f"{s}.jsonl").write_text("")
    report = charts.validate(tmp_path)
    assert not report.ok and "no_records" in report.codes()
    (tmp_path / "blank.jsonl").write_text("\n\n")
    assert "no_records" in charts.validate(tmp_path / "blank.jsonl").codes()


def test_validate_refuses_bytes_that_are_not_utf8(tmp_path, dataset_dir):
    path = tmp_path / "train.jsonl"
    lines = (dataset_dir / "train.jsonl").read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1].replace(b"<image>", b"<image>\xff\xfe caf\xe9", 1))
    report = charts.validate(path)
    assert not report.ok and "not_utf8" in report.codes()
    assert any(i.code == "not_utf8" and i.line == 2 for i in report.errors)


# ---------------------------------------------------------------- journal
@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "ref"
    charts.generate(12, seed=5, out_dir=out, workers=1)
    return out


def test_a_torn_journal_line_is_repaired_so_every_later_rerun_works(tmp_path, dataset_dir):
    target = tmp_path / "ds"

    def die(done, total):
        if done >= 5:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        charts.generate(12, seed=5, out_dir=target, workers=1, on_progress=die)
    with open(target / ".progress.jsonl", "a") as f:
        f.write('{"index": 7, "ima')                       # the kill tore the line being written
    with pytest.raises(KeyboardInterrupt):                 # a resumed run killed again ...
        charts.generate(12, seed=5, out_dir=target, workers=1, on_progress=lambda d, t: die(d - 3, t))
    charts.generate(12, seed=5, out_dir=target, workers=1)  # ... and a third run still finishes
    charts.generate(12, seed=5, out_dir=target, workers=1)
    assert _files(target) == _files(dataset_dir)


def test_a_journal_broken_in_the_middle_is_tolerated(tmp_path, dataset_dir):
    target = tmp_path / "ds"
    charts.generate(12, seed=5, out_dir=target, workers=1)
    journal = target / ".progress.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:3]) + '{"index": 3, "ima' + "".join(lines[3:]))  # as older versions left it
    charts.generate(12, seed=5, out_dir=target, workers=1)
    assert _files(target) == _files(dataset_dir)


# ---------------------------------------------------------------- kills of the real CLI
def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def _generate_cmd(out: Path, n: int) -> list[str]:
    return [sys.executable, "-m", "charts", "generate", "--out", str(out), "--n", str(n), "--seed", "2",
            "--workers", "2"]


def _start_and_kill(out: Path, n: int, sig=signal.SIGKILL) -> list[int]:
    """Start the CLI, wait until some charts are done and the workers run, send `sig`; returns its descendants."""
    proc = subprocess.Popen(_generate_cmd(out, n), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    journal, deadline = out / ".progress.jsonl", time.time() + 60
    try:
        while not (journal.exists() and journal.read_text().count("\n") >= 8):
            assert proc.poll() is None and time.time() < deadline, "generation ended before it could be killed"
            time.sleep(0.02)
        family, todo = [], [proc.pid]
        while todo:
            kids = _children(todo.pop())
            family += kids
            todo += kids
        assert family, "expected worker processes"
        assert journal.read_text().count("\n") < n, "generation finished before the kill"
        proc.send_signal(sig)
    finally:
        if proc.poll() is None and sig == signal.SIGKILL:
            proc.kill()
        proc.wait(timeout=60)
    return family


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_generation_leaves_no_process_behind(tmp_path, sig):
    family = _start_and_kill(tmp_path / "ds", 600, sig)
    deadline = time.time() + 8
    while any(_alive(p) for p in family) and time.time() < deadline:
        time.sleep(0.1)
    left = [p for p in family if _alive(p)]
    for p in left:          # do not leak them into the rest of the test session
        os.kill(p, signal.SIGKILL)
    assert not left, f"processes of the killed generation still alive: {left}"


def test_killed_generation_resumes_to_the_same_dataset_as_an_uninterrupted_run(tmp_path):
    n = 48
    subprocess.run(_generate_cmd(tmp_path / "whole", n), cwd=ROOT, env=ENV, check=True, capture_output=True)
    _start_and_kill(tmp_path / "resumed", n)
    assert not (tmp_path / "resumed" / "train.jsonl").exists()
    subprocess.run(_generate_cmd(tmp_path / "resumed", n), cwd=ROOT, env=ENV, check=True, capture_output=True)
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")
