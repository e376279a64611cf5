"""Where jobs run. Every launcher has the same five calls:

    job = launcher.start(cfg)        # -> a job dict, also appended to WORKSPACE/jobs.jsonl
    launcher.status(job)             # -> the job dict with a fresh "status" (+ metrics)
    launcher.logs(job, tail=50)      # -> the last log lines
    launcher.stop(job)
    launcher.list()                  # -> this launcher's jobs, newest first
    LocalLauncher(ws).resume(job_id) # a stopped or killed local job continues in its run folder

A job is one of three tasks, told by the config it is started from: a fine-tune (TrainConfig), a benchmark
run (eval.config.EvalConfig) or a chart-QA generation (charts.config.GenerateConfig). Each is a subprocess of
its real CLI, no shell, in its own process group, through one code path (`_spawn`):

    train   python -m training.train --config runs/NAME/run.yaml            (SageMaker: training/sagemaker.py)
    bench   python -m eval run --config jobs/ID/config.yaml --job-file jobs/ID/progress.json
    charts  python -m charts generate --config jobs/ID/config.yaml --job-file jobs/ID/progress.json

Jobs are recorded in WORKSPACE/jobs.jsonl (append-only; the latest line per job id wins), so a restarted
studio finds running and finished jobs again. Each job also has a short name, its task and its number
among that task's jobs (`train-2`, `bench-3`, `charts-1`), which `find_job` accepts wherever an id is.
Progress: a fine-tune's from its metrics.jsonl, the others' from their --job-file (charts.jobfile).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from charts.config import GenerateConfig
from charts.io import append_jsonl, read_jsonl
from eval.config import EvalConfig
from training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
JOBS_FILE = "jobs.jsonl"
FINAL = ("completed", "failed", "interrupted", "killed", "stopped")
# task -> (CLI module and command, config class) of the jobs that are not fine-tunes
CLI_TASKS = {"bench": (["eval", "run", "--quiet"], EvalConfig), "charts": (["charts", "generate"], GenerateConfig)}


# ---------------------------------------------------------------- the job record
def record(workspace: Path, job: dict) -> dict:
    # the short name is derived on reading (read_jobs), never stored, so it cannot disagree with the file
    append_jsonl(Path(workspace) / JOBS_FILE, {**{k: v for k, v in job.items() if k != "short"},
                                              "updated": time.time()})
    return job


def read_jobs(workspace: Path) -> dict[str, dict]:
    """Job id -> its latest state (later lines update earlier ones), each with its `task` and `short` name."""
    jobs: dict[str, dict] = {}
    for row in read_jsonl(Path(workspace) / JOBS_FILE):
        jobs[row["id"]] = {**jobs.get(row["id"], {}), **row}
    counts: dict[str, int] = {}
    for job in jobs.values():           # dict order is first-record order: numbers never change
        task = job.setdefault("task", "train")
        counts[task] = counts.get(task, 0) + 1
        job["short"] = f"{task}-{counts[task]}"
    return jobs


def find_job(workspace: Path, name: str) -> dict | None:
    """The job with this id or short name (`bench-3`), else None."""
    jobs = read_jobs(workspace)
    return jobs.get(name) or next((j for j in jobs.values() if j["short"] == name), None)


def progress(job: dict) -> float | None:
    """How far a job is, 0..100 (None when it cannot tell)."""
    if job.get("total"):
        return round(100 * min(1.0, job.get("done", 0) / job["total"]), 1)
    if job.get("max_steps", -1) > 0 and job.get("step") is not None:
        return round(100 * min(1.0, job["step"] / job["max_steps"]), 1)
    if job.get("epochs") and job.get("epoch") is not None:
        return round(100 * min(1.0, job["epoch"] / job["epochs"]), 1)
    return 100.0 if job.get("status") == "completed" else None


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

    def start(self, cfg, name: str | None = None, gpus: int = 1, run_dir: Path | None = None) -> dict:
        """A fine-tune (TrainConfig) in runs/NAME-timestamp, or (`run_dir`, what `resume` passes) in an existing
        run folder; a benchmark run (EvalConfig) or a generation (GenerateConfig) in its config's `out`."""
        if not isinstance(cfg, TrainConfig):
            return self._start_cli(cfg, name)
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
        return self._spawn({"id": name, "task": "train", "cmd": cmd, "config": str(config_path),
                            "output_dir": str(run_dir), "log": str(run_dir / "train.log"), "model": cfg.model,
                            "data": cfg.data, "mode": cfg.mode, "gpus": gpus, "max_steps": cfg.max_steps,
                            "epochs": cfg.epochs})

    def _start_cli(self, cfg, name: str | None = None) -> dict:
        """A benchmark run or a generation: its config saved in jobs/ID/config.yaml, its CLI started on it."""
        task = next((t for t, (_, cls) in CLI_TASKS.items() if isinstance(cfg, cls)), None)
        if task is None:
            raise ValueError(f"no job task for a {type(cfg).__name__}")
        cfg.validate()
        # the child runs in the repository: paths given relative to this process's folder are made absolute
        paths = {k: str(Path(getattr(cfg, k)).resolve()) for k in ("data", "out", "images", "workspace")
                 if getattr(cfg, k, "")}
        cfg = cfg.replace(**paths)
        stem = re.sub(r"[^A-Za-z0-9-]+", "-", name or Path(cfg.out).name).strip("-")[:40] or task
        job_dir = _new_dir(self.workspace / "jobs", f"{task}-{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.to_yaml(job_dir / "config.yaml")
        args, _ = CLI_TASKS[task]
        cmd = [self.python, "-m", *args, "--config", str(job_dir / "config.yaml"),
               "--job-file", str(job_dir / "progress.json")]
        return self._spawn({"id": job_dir.name, "task": task, "cmd": cmd, "config": str(job_dir / "config.yaml"),
                            "output_dir": cfg.out, "job_file": str(job_dir / "progress.json"),
                            "log": str(job_dir / "job.log"), "data": getattr(cfg, "data", ""),
                            "model": " , ".join(getattr(cfg, "model", []))})

    def _spawn(self, job: dict) -> dict:
        """Start `job["cmd"]` (its log in job["log"]) and record the job. The one launch path of every task."""
        Path(job["log"]).parent.mkdir(parents=True, exist_ok=True)
        env = {**child_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        with open(job["log"], "ab") as out:
            proc = subprocess.Popen(job["cmd"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        _CHILDREN[job["config"]] = proc
        job = record(self.workspace, {**job, "kind": self.kind, "name": job["id"], "status": "running",
                                      "pid": proc.pid, "created": time.time()})
        return {**job, "short": read_jobs(self.workspace)[job["id"]]["short"]}

    def resume(self, job_id: str) -> dict:
        """Relaunch a stopped, killed, interrupted or failed job in its own run folder with its own config:
        training continues from the newest complete checkpoint (`--resume auto`), under the same job id."""
        job = read_jobs(self.workspace).get(job_id)
        if job is None:
            raise ValueError(f"no job {job_id!r} in {self.workspace / JOBS_FILE}")
        if job.get("task", "train") != "train":
            raise ValueError(f"job {job_id} is a {job['task']} job: start it again instead (it resumes in its "
                             "output folder)")
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
        extra = _progress_of(job)
        if job.get("status") in FINAL:
            return {**job, **extra}
        if running:
            return {**job, "status": "running", **extra}
        result = _read_result(Path(job["output_dir"]) / "result.json") if job.get("task", "train") == "train" \
            else _read_result(Path(job["job_file"]))
        if result and result.get("status"):
            status, detail = result["status"], result.get("error", "")
            if status == "failed" and not detail:
                detail = tail(Path(job["log"]), 20)
        else:   # no outcome written: the process died without finishing (SIGKILL, OOM killer, crash)
            status, detail = ("killed", tail(Path(job["log"]), 20))
            if (proc is not None and (proc.returncode or 0) > 0) or "Traceback" in detail:   # < 0: a signal
                status = "failed"
        job = record(self.workspace, {**job, "status": status, "detail": detail, "ended": time.time()})
        return {**job, **_progress_of(job)}

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


def _read_result(path: Path) -> dict | None:
    import json
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _progress_of(job: dict) -> dict:
    """A fine-tune's last metrics, or the done / total / desc a CLI job last wrote; with `progress` in %."""
    if job.get("task", "train") == "train":
        extra = last_metrics(read_metrics(job["output_dir"])) if job.get("output_dir") else {}
    else:
        state = _read_result(Path(job["job_file"])) or {}
        extra = {k: state[k] for k in ("done", "total", "desc") if k in state}
    return {**extra, "progress": progress({**job, **extra})}


def job_adapter(job: dict) -> str:
    """Where a fine-tune's adapter is (or will be): runs/NAME/adapter locally, the S3 output for SageMaker;
    "" for jobs that make no adapter (benchmarks, generations)."""
    if job.get("task", "train") != "train":
        return ""
    return str(Path(job["output_dir"]) / "adapter") if job.get("output_dir") else job.get("output", "")


def compare_refs(workspace: Path, job_id: str | None) -> tuple[str, str]:
    """Side A = the job's base, side B = that base + the job's adapter, as Compare-tab model refs."""
    job = find_job(workspace, job_id or "")
    adapter = Path(job_adapter(job)) if job and job_adapter(job) else None
    if adapter is None or not (adapter / "adapter_config.json").is_file():
        raise ValueError("pick a finished local fine-tune: its adapter folder is not there yet")
    return f"local:{job['model']}", f"local:{job['model']}+{adapter}"


def describe(job: dict) -> str:
    """One line a person reads: `bench-3 · running · 40% · demo-llava 4/10` (plus why, when it failed)."""
    parts = [job.get("short") or job["id"], job.get("status", "?")]
    if job.get("progress") is not None and job.get("status") != "completed":
        parts.append(f"{job['progress']:.0f}%")
    if job.get("desc"):
        parts.append(job["desc"])
    if job.get("status") == "failed" and job.get("detail"):
        parts.append(job["detail"].strip().splitlines()[-1][:200])
    return " · ".join(parts)


def newest(workspace: Path, task: str) -> dict | None:
    """The most recent job of one task with a fresh status (what a tab shows after a reload), else None."""
    jobs = [j for j in read_jobs(workspace).values() if j["task"] == task]
    if not jobs:
        return None
    job = max(jobs, key=lambda j: j.get("created", 0))
    return LocalLauncher(workspace).status(job) if job.get("kind") == "local" else job


def stop_newest(workspace: Path, task: str) -> dict | None:
    """Stop the most recent job of one task if it is running (a tab's Stop button); returns it as it now is."""
    job = newest(workspace, task)
    if job and job["status"] == "running":
        job = LocalLauncher(workspace).stop(job)
    return job


def _new_dir(root: Path, stem: str) -> Path:
    """A new folder root/stem (or stem-2, ...): mkdir creates or fails, so two jobs never share one."""
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = root / (stem if n == 1 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path.resolve()
        except FileExistsError:
            continue
    raise RuntimeError(f"{root}: no free folder name for {stem}")


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
