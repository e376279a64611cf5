"""The local launcher runs the real CLI on the shipped demo model: jobs survive a studio restart, stop ends the
whole process group after a checkpoint, and a job killed from outside is reported as killed."""
import os
import signal

import pytest

from conftest import wait_until
from training.config import preset
from training.launchers import LocalLauncher, _group_has_live, all_jobs, read_jobs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from test_train import make_dataset
    return make_dataset(tmp_path_factory.mktemp("ds"), n_train=16)


def _cfg(demo_model, dataset, **kw):
    return preset("demo-cpu", model=str(demo_model), data=str(dataset), per_device_batch_size=2, eval_limit=2,
                  save_steps=1000, logging_steps=1, **kw)


def _wait(predicate, timeout=150.0):
    return wait_until(predicate, timeout, every=0.5)


def test_a_local_job_finishes_and_a_restarted_launcher_finds_it(demo_model, dataset, tmp_path):
    launcher = LocalLauncher(tmp_path)
    job = launcher.start(_cfg(demo_model, dataset, max_steps=3), name="short")
    assert launcher.status(job)["status"] == "running"
    done = _wait(lambda: (s := launcher.status(job))["status"] != "running" and s)
    assert done["status"] == "completed", launcher.logs(job)
    found = LocalLauncher(tmp_path).list()          # a fresh instance, as after a studio restart
    assert [j["id"] for j in found] == [job["id"]] and found[0]["status"] == "completed"
    assert found[0]["step"] == 3 and "loss" in found[0]
    assert (tmp_path / "runs" / job["id"] / "adapter" / "adapter_config.json").exists()
    assert "{'loss':" in launcher.logs(job) and all_jobs(tmp_path)[0]["status"] == "completed"


def _started(launcher, job):
    return _wait(lambda: (os.path.exists(os.path.join(job["output_dir"], "metrics.jsonl"))
                          and launcher.status(job)["status"] == "running"))


def test_stop_checkpoints_and_ends_the_process_group(demo_model, dataset, tmp_path):
    launcher = LocalLauncher(tmp_path)
    job = launcher.start(_cfg(demo_model, dataset, max_steps=100000), name="long")
    _started(launcher, job)
    stopped = launcher.stop(job, grace=60)
    assert stopped["status"] == "stopped"
    # Nothing of the group still runs. (An orphaned grandchild may linger as a zombie where PID 1 does not
    # reap, as in some containers: it is ended, only not yet collected, so killpg(pid, 0) can still succeed.)
    assert not _group_has_live(job["pid"])
    assert list((tmp_path / "runs" / job["id"] / "checkpoints").glob("checkpoint-*"))   # SIGTERM -> checkpoint
    assert read_jobs(tmp_path)[job["id"]]["status"] == "stopped"


def test_a_job_killed_from_outside_is_reported_killed_with_its_last_log_lines(demo_model, dataset, tmp_path):
    launcher = LocalLauncher(tmp_path)
    job = launcher.start(_cfg(demo_model, dataset, max_steps=100000), name="victim")
    _started(launcher, job)
    os.killpg(job["pid"], signal.SIGKILL)
    status = _wait(lambda: (s := LocalLauncher(tmp_path).status(job))["status"] != "running" and s, timeout=20)
    assert status["status"] == "killed" and "loss" in status["detail"]


def test_a_job_checked_before_its_process_has_exec_d_is_running_not_killed(demo_model, dataset, tmp_path, monkeypatch):
    """Just after launch, /proc/PID/cmdline can still show the studio's own command line (the fork has
    not exec'd yet), so the command-line check fails. The child's handle in the launching process must
    decide, or the job is recorded 'killed' while it trains on where Stop cannot reach it."""
    import training.launchers as launchers
    launcher = LocalLauncher(tmp_path)
    job = launcher.start(_cfg(demo_model, dataset, max_steps=100000), name="early")
    try:
        monkeypatch.setattr(launchers, "_alive", lambda pid, marker: False)   # what /proc shows before exec
        # a new instance, as the studio makes for each request, in the process that started the job
        assert LocalLauncher(tmp_path).status(job)["status"] == "running"
        assert read_jobs(tmp_path)[job["id"]]["status"] == "running"
    finally:
        os.killpg(job["pid"], signal.SIGKILL)
    assert _wait(lambda: launcher.status(job)["status"] == "killed", timeout=20)


def test_a_job_stopped_while_it_is_still_starting_is_recorded_stopped(demo_model, dataset, tmp_path):
    """SIGTERM before the trainer has installed its handler ends the process by the signal (exit -15):
    that is a stop, not a failure."""
    launcher = LocalLauncher(tmp_path)
    job = launcher.start(_cfg(demo_model, dataset, max_steps=100000), name="impatient")
    stopped = LocalLauncher(tmp_path).stop(job, grace=30)
    assert stopped["status"] == "stopped", stopped.get("detail")
    assert read_jobs(tmp_path)[job["id"]]["status"] == "stopped"
