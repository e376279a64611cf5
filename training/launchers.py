"""Where a fine-tune runs. Every launcher has the same five calls:

    job = launcher.start(cfg)        # -> a job dict, also appended to WORKSPACE/jobs.jsonl
    launcher.status(job)             # -> the job dict with a fresh "status" (+ metrics)
    launcher.logs(job, tail=50)      # -> the last log lines
    launcher.stop(job)
    launcher.list()                  # -> this launcher's jobs, newest first
    LocalLauncher(ws).resume(job_id) # a stopped or killed local job continues in its run folder

Jobs are recorded in WORKSPACE/jobs.jsonl (append-only; the latest line per job id wins), so a restarted
studio finds running and finished jobs again. A local job is a subprocess of the real CLI
(`python -m training.train --config runs/NAME/run.yaml`, no shell, its own process group); SageMaker jobs
live in training/sagemaker.py.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from charts.io import append_jsonl, read_jsonl
from training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
JOBS_FILE = "jobs.jsonl"
FINAL = ("completed", "failed", "interrupted", "killed", "stopped")


# ---------------------------------------------------------------- the job record
def record(workspace: Path, job: dict) -> dict:
    append_jsonl(Path(workspace) / JOBS_FILE, {**job, "updated": time.time()})
    return job


def read_jobs(workspace: Path) -> dict[str, dict]:
    """Job id -> its latest state (later lines update earlier ones)."""
    jobs: dict[str, dict] = {}
    for row in read_jsonl(Path(workspace) / JOBS_FILE):
        jobs[row["id"]] = {**jobs.get(row["id"], {}), **row}
    return jobs


def run_name(cfg: TrainConfig, name: str | None = None) -> str:
    base = name or f"{Path(cfg.model.rstrip('/')).name}-{cfg.mode}"
    base = re.sub(r"[^A-Za-z0-9-]+", "-", base).strip("-")[:40] or "run"
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def read_metrics(output_dir: str | Path) -> list[dict]:
    return list(read_jsonl(Path(output_dir) / "metrics.jsonl"))


def last_metrics(rows: list[dict]) -> dict:
    out = {}
    for key in ("loss", "eval_loss", "eval_relaxed_accuracy", "learning_rate", "epoch", "step"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = values[-1]
    return out


def tail(path: Path, lines: int = 50) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 200 * lines - 4096))
        return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])


# ---------------------------------------------------------------- local processes
# Secrets of the studio that a local training job never needs: the studio's login, the OpenAI-style
# endpoint key, and AWS credentials (a local job reads local files; SageMaker jobs get their own role).
SECRET_ENV = ("STUDIO_AUTH", "OPENAI_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AWS_SECURITY_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE")


def child_env(env=None) -> dict[str, str]:
    """The environment for a job's process: the studio's, less the secrets in SECRET_ENV."""
    return {k: v for k, v in (os.environ if env is None else env).items() if k not in SECRET_ENV}


def _alive(pid: int, marker: str) -> bool:
    """True if `pid` runs and is still our job (pid reuse: its command line names the run's config)."""
    proc = Path(f"/proc/{pid}")
    try:
        if proc.exists():
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            return state != "Z" and marker in (proc / "cmdline").read_bytes().decode("utf-8", "replace")
        os.kill(pid, 0)           # no /proc (macOS): liveness only
        return True
    except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
        return False


# Jobs this process started, by run config path (unique per run, unlike pids), whichever LocalLauncher
# instance started them (the studio makes one per request): their handles say reliably whether they
# run, and polling them reaps exited children.
_CHILDREN: dict[str, subprocess.Popen] = {}


class LocalLauncher:
    """Runs `python -m training.train` as a subprocess (torchrun when gpus > 1)."""

    kind = "local"

    def __init__(self, workspace: str | Path, python: str = sys.executable):
        self.workspace = Path(workspace)
        self.python = python

    def start(self, cfg: TrainConfig, name: str | None = None, gpus: int = 1, run_dir: Path | None = None) -> dict:
        """A new job in runs/NAME-timestamp, or (`run_dir`, what `resume` passes) in an existing run folder."""
        cfg.validate()              # before a process or a folder exists
        name = run_name(cfg, name) if run_dir is None else Path(run_dir).name
        run_dir = (self.workspace / "runs" / name).resolve() if run_dir is None else Path(run_dir).resolve()
        data = cfg.data if not cfg.data or cfg.data.startswith("s3://") else str(Path(cfg.data).resolve())
        model = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
        cfg = cfg.replace(output_dir=str(run_dir), data=data, model=model)
        config_path = cfg.to_yaml(run_dir / "run.yaml") and run_dir / "run.yaml"
        cmd = [self.python, "-m", "training.train", "--config", str(config_path)]
        if gpus > 1:
            cmd = [self.python, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus)] + cmd[1:]
        log = run_dir / "train.log"
        env = {**child_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        _CHILDREN[str(config_path)] = proc
        return record(self.workspace, {"id": name, "kind": self.kind, "name": name, "status": "running",
                                       "pid": proc.pid, "cmd": cmd, "config": str(config_path),
                                       "output_dir": str(run_dir), "log": str(log), "created": time.time(),
                                       "model": cfg.model, "data": cfg.data, "mode": cfg.mode, "gpus": gpus})

    def resume(self, job_id: str) -> dict:
        """Relaunch a stopped, killed, interrupted or failed job in its own run folder with its own config:
        training continues from the newest complete checkpoint (`--resume auto`), under the same job id."""
        job = read_jobs(self.workspace).get(job_id)
        if job is None:
            raise ValueError(f"no job {job_id!r} in {self.workspace / JOBS_FILE}")
        if job.get("kind") != self.kind:
            raise ValueError(f"job {job_id} runs on {job.get('kind')}: only local jobs are relaunched here "
                             "(SageMaker restarts spot jobs from their checkpoints itself)")
        status = self.status(job)["status"]
        if status == "running":
            raise ValueError(f"job {job_id} is still running")
        if status == "completed" or (Path(job["output_dir"]) / "adapter" / "adapter_config.json").exists():
            raise ValueError(f"job {job_id} completed: nothing to resume (launch a new run instead)")
        # overwrite would restart from step 0 and delete the checkpoints this relaunch is for.
        cfg = TrainConfig.from_yaml(Path(job["config"])).replace(overwrite=False, resume="auto")
        new = self.start(cfg, gpus=int(job.get("gpus") or 1), run_dir=Path(job["output_dir"]))
        return record(self.workspace, {**new, "created": job.get("created", new["created"]), "detail": "",
                                       "ended": None, "resumed": time.time(), "resumes": job.get("resumes", 0) + 1})

    def _running(self, job: dict) -> bool:
        """Whether the job's process runs. For a job this process started, its handle decides: just after
        launch, /proc/PID/cmdline can still show the studio's own command line (the fork has not
        exec'd yet), and the command-line check would take a starting job for a dead one."""
        proc = _CHILDREN.get(job.get("config"))
        if proc is not None:
            return proc.poll() is None
        return _alive(job["pid"], job["config"])

    def status(self, job: dict) -> dict:
        job = {**read_jobs(self.workspace).get(job["id"], {}), **job}
        proc = _CHILDREN.get(job.get("config"))
        running = self._running(job)
        metrics = last_metrics(read_metrics(job["output_dir"]))
        if job.get("status") in FINAL:
            return {**job, **metrics}
        if running:
            return {**job, "status": "running", **metrics}
        result = _read_result(Path(job["output_dir"]))
        if result:
            status, detail = result["status"], result.get("error", "")
        else:   # no result.json: the process died without finishing (SIGKILL, OOM killer, crash)
            status, detail = ("killed", tail(Path(job["log"]), 20))
            if (proc is not None and (proc.returncode or 0) > 0) or "Traceback" in detail:   # < 0: a signal
                status = "failed"
        job = record(self.workspace, {**job, "status": status, "detail": detail, "ended": time.time()})
        return {**job, **metrics}

    def logs(self, job: dict, tail_lines: int = 50) -> str:
        return tail(Path(job["log"]), tail_lines)

    def stop(self, job: dict, grace: float = 30.0) -> dict:
        """SIGTERM the job's process group (the trainer checkpoints and exits), SIGKILL after `grace` s."""
        pid = job["pid"]
        if self._running(job):
            _signal_group(pid, signal.SIGTERM)
            deadline = time.time() + grace
            while time.time() < deadline and self._group_alive(pid, job):
                time.sleep(0.2)
            if self._group_alive(pid, job):
                _signal_group(pid, signal.SIGKILL)
                while self._group_alive(pid, job) and time.time() < deadline + 5:
                    time.sleep(0.1)
        status = self.status(job)
        if status["status"] in ("running", "killed", "interrupted"):
            status = record(self.workspace, {**status, "status": "stopped", "ended": time.time()})
        return status

    def _group_alive(self, pid: int, job: dict) -> bool:
        running = self._running(job)
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return running or _group_has_live(pid)

    def list(self) -> list[dict]:
        jobs = [j for j in read_jobs(self.workspace).values() if j.get("kind") == self.kind]
        return sorted((self.status(j) for j in jobs), key=lambda j: -j.get("created", 0))


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_has_live(pgid: int) -> bool:
    """Any non-zombie process left in the group (torchrun workers outlive their parent briefly)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _read_result(output_dir: Path) -> dict | None:
    import json
    try:
        return json.loads((output_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- registry
def launchers(workspace: str | Path, **sagemaker_settings) -> dict:
    """Kind -> launcher for `workspace`. SageMaker settings (role, bucket, region, ...) are optional
    until a job is started there."""
    from training.sagemaker import SageMakerLauncher, SageMakerSettings

    return {"local": LocalLauncher(workspace),
            "sagemaker": SageMakerLauncher(workspace, SageMakerSettings(**sagemaker_settings))}


def all_jobs(workspace: str | Path, refresh: bool = True, **sagemaker_settings) -> list[dict]:
    """Every recorded job, newest first; `refresh` asks each launcher for a fresh status."""
    table = launchers(workspace, **sagemaker_settings)
    jobs = sorted(read_jobs(Path(workspace)).values(), key=lambda j: -j.get("created", 0))
    if not refresh:
        return jobs
    out = []
    for j in jobs:
        try:
            out.append(table[j["kind"]].status(j))
        except Exception as e:        # e.g. AWS unreachable: show the recorded state and why
            out.append({**j, "detail": f"status unavailable: {e}"})
    return out
