"""The README's "The loop, from a terminal" runs as written, so the README cannot drift from the CLIs.

Every command of the section's bash blocks runs in a fresh folder, with `python` meaning this interpreter and
the tiny demo model where the README names a model (`workspace/models/demo-llava`, and a local folder
`llava-hf/llava-1.5-7b-hf` that the hub id resolves to first). The only edits are the size knobs in SCALE;
the only commands left out are those in SKIP (GPU, AWS, servers), each with its reason. Both tables must
name text that is still in the README, so a changed command shows up here instead of going untested.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## The loop, from a terminal"

# Documented sizes -> test sizes (README text -> replacement; {port} is a free loopback port).
SCALE = {
    "--n 2000": "--n 12",
    "--output_dir workspace/runs/demo\n": "--output_dir workspace/runs/demo --max_steps 2\n",  # demo-cpu: 300 steps
    "--port 8080": "--port {port}",
    "127.0.0.1:8080 ": "127.0.0.1:{port} ",
}

# A README command containing the key -> why it does not run here.
SKIP = {
    "--preset llava-1.5-7b-qlora": "needs a CUDA GPU (4-bit, bf16, DeepSpeed) and the 7B base; its stand-in "
                                   "is the demo run copied to workspace/runs/r1",
    "python -m training resume train-1": "the 2-step job may have completed before `stop`, and then there is "
                                         "nothing to resume (tests/reliability/test_training.py resumes one)",
    '--data "ChartQA Dataset/test"': "needs the ChartQA files and an OpenAI-compatible server on :8000",
    "# same handler as the endpoint": "a server that never exits; the block below runs it in the background",
    "python -m training.serving deploy": "creates a paid SageMaker endpoint",
    "python -m training.serving delete": "deletes a SageMaker endpoint",
    "training/pretrain_gpu.sh": "pretrains on a CUDA GPU, ~9 minutes a run (tests/test_pretrain.py runs the "
                                "same path with the tiny preset, the resume from an exported folder included)",
    "--card-from OUT/eval.json": "exports a GPU run's checkpoint, which needs that run (tests/test_pretrain.py "
                                 "exports one with its card)",
    "python app.py": "starts the studio; its environment is checked by a side-by-side against sagemaker:chartqa-r1",
}


def section_text() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end > 0 else len(text)]


def commands(section: str) -> list[str]:
    """The commands of the section's ```bash blocks, continuation lines joined, each ending in a newline."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", "").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(line + "\n")
    return out


def check_tables(section: str) -> None:
    cmds = commands(section)
    assert cmds, f"no ```bash blocks under {SECTION!r}"
    for old in SCALE:
        assert old in section, f"SCALE: {old!r} is no longer in the README's loop: update tests/test_readme.py"
    for key in SKIP:
        hits = [c for c in cmds if key in c]
        assert len(hits) == 1, f"SKIP: {key!r} matches {len(hits)} README commands (want 1): update the table"


def test_the_readme_tables_name_text_that_is_still_in_the_loop_section():
    check_tables(section_text())


def _env(tmp: Path) -> dict[str, str]:
    # No AWS settings of this machine: the endpoint recipe must bring its own region and credentials.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_CONFIG_FILE": str(tmp / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws"),
            "AWS_EC2_METADATA_DISABLED": "true", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _argv(command: str) -> tuple[dict[str, str], list[str], bool]:
    """(VAR=value prefixes, argv with `python` -> this interpreter, runs in the background)."""
    tokens = shlex.split(command, comments=True)
    background = tokens[-1] == "&"
    tokens = tokens[:-1] if background else tokens
    env = {}
    while "=" in tokens[0] and not tokens[0].startswith("-"):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    if tokens[0] == "python":
        tokens[0] = sys.executable
    return env, tokens, background


def _wait_for_ping(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "server did not start:\n" + log.read_text()[-3000:]
            time.sleep(0.5)


def _stop_jobs(tmp: Path) -> None:
    from training.launchers import LocalLauncher, read_jobs
    launcher = LocalLauncher(tmp / "workspace")
    for job in read_jobs(tmp / "workspace").values():
        launcher.stop(job, grace=20)


def _run(argv: list[str], env: dict, cwd: Path) -> str:
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    print(f"{time.perf_counter() - start:5.1f} s  {shlex.join(argv[1:])[:100]}")     # where the time goes (-s)
    out = result.stdout + result.stderr
    assert result.returncode == 0, f"`{shlex.join(argv)}` exited {result.returncode}:\n{out[-4000:]}"
    return out


@pytest.mark.integration
def test_the_readme_terminal_loop_runs_as_written(demo_model, tmp_path):
    check_tables(section_text())          # else an unscaled command could run for an hour
    port = free_port()
    # What the README's paths mean on a machine with the demo: its model under both names, the repo's assets.
    shutil.copytree(demo_model, tmp_path / "workspace" / "models" / "demo-llava")
    shutil.copytree(demo_model, tmp_path / "llava-hf" / "llava-1.5-7b-hf")
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    base_env = _env(tmp_path)
    servers, ran, outputs = [], [], {}
    try:
        for command in commands(section_text()):
            if "--preset llava-1.5-7b-qlora" in command:
                # Stand-in for the GPU run: the demo adapter where the 7B run would have put its own.
                shutil.copytree(tmp_path / "workspace" / "runs" / "demo", tmp_path / "workspace" / "runs" / "r1")
                continue
            scaled = command
            for old, new in SCALE.items():
                scaled = scaled.replace(old, new.format(port=port))
            extra_env, argv, background = _argv(scaled)
            env = {**base_env, **extra_env}
            if "python app.py" in command:
                # The studio's SageMaker client, with exactly the README's environment, reaches the local server.
                argv = [sys.executable, "-m", "eval", "side-by-side", "--image", "assets/examples/pie.png",
                        "--question", "Which mode of transport has the highest share?", "--model",
                        "sagemaker:chartqa-r1"]
                outputs["endpoint"] = _run(argv, env, tmp_path)
            elif any(key in command for key in SKIP):
                continue
            elif background:
                log = tmp_path / f"background-{len(servers)}.log"
                with open(log, "w") as f:
                    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True)
                servers.append(proc)
                _wait_for_ping(port, proc, log)       # a user waits for its "serving ..." line
            else:
                outputs[command] = _run(argv, env, tmp_path)
            ran.append(command)
    finally:
        for proc in servers:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        _stop_jobs(tmp_path)

    assert len(ran) >= 14, ran
    ws = tmp_path / "workspace"
    assert (ws / "datasets" / "charts2k" / "test.jsonl").stat().st_size > 0
    assert (tmp_path / "exports" / "charts2k-hf").is_dir()
    assert (ws / "runs" / "demo" / "adapter" / "adapter_config.json").is_file()
    from training.launchers import read_jobs
    assert any(job_id.startswith("r1") for job_id in read_jobs(ws)), "the launched job is not in jobs.jsonl"
    assert (ws / "evals" / "r1" / "report.html").is_file()
    assert (tmp_path / "model.tar.gz").is_file()
    endpoint = outputs["endpoint"]
    assert "chartqa-r1" in endpoint and "error ·" not in endpoint and "no AWS" not in endpoint, endpoint
