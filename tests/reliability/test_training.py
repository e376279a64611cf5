"""Training reliability: configs are refused before any model loads, with one line; checkpoints are complete
or absent; a run killed (SIGKILL) or stopped (SIGTERM) and run again ends with exactly the adapter of an
uninterrupted run; a stopped job relaunched from the launcher continues its run.

The kill tests run the real CLI (`python -m training.train`) on the tiny demo model with one torch thread:
the same samples in the same order through the same float operations give bit-identical weights, so the
adapters are compared with torch.equal, not a tolerance."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.config import PRESETS, ConfigError, TrainConfig, parse_args, preset

ROOT = Path(__file__).resolve().parents[2]
# 12 samples in batches of 4: 3 steps an epoch, so checkpoints (every 4 steps) fall mid-epoch in epochs
# 1 and 2, where a resumed epoch's shuffle must equal the original's. LoRA dropout makes the forward pass
# draw from the RNG, whose state a resume must restore too.
RUN = {"max_steps": 16, "per_device_batch_size": 2, "max_train_samples": 12, "save_steps": 4, "save_total_limit": 2,
       "logging_steps": 1, "eval_limit": 0, "lora_dropout": 0.1, "warmup_ratio": 0.1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    import charts
    out = tmp_path_factory.mktemp("ds") / "charts"
    charts.generate(6, seed=3, out_dir=str(out), workers=1, qa_per_chart=3, split=(0.8, 0.1, 0.1))
    return out


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _argv(model, data, out, **kw) -> list[str]:
    argv = ["--preset", "demo-cpu", "--model", str(model), "--data", str(data), "--output_dir", str(out)]
    for k, v in {**RUN, **kw}.items():
        argv += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return argv


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "training.train", *argv], cwd=ROOT, env=_env(), stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _run(argv: list[str], log: Path, timeout: float = 120) -> int:
    proc = _start(argv, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the point to kill it:\n"
                                 + log.read_text()[-3000:])
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("timed out waiting for a checkpoint:\n" + log.read_text()[-3000:])


def _checkpoint_done(out: Path, step: int):
    from training.checkpoints import COMPLETE_MARKER
    return lambda: (out / "checkpoints" / f"checkpoint-{step}" / COMPLETE_MARKER).exists()


def _killed_after_checkpoint(argv: list[str], out: Path, log: Path, step: int) -> subprocess.Popen:
    """A run SIGKILLed once checkpoint-STEP is complete (no chance to save anything more)."""
    proc = _start(argv, log)
    _wait_for(_checkpoint_done(out, step), proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return proc


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_same_adapter(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)}/{len(want)} tensors differ, e.g. {different[:3]}"


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def reference(demo_model, data, tmp_path_factory):
    """The uninterrupted run: (adapter tensors, steps of its loss rows)."""
    out = tmp_path_factory.mktemp("reference")
    rc = _run(_argv(demo_model, data, out), out / "log.txt")
    assert rc == 0, (out / "log.txt").read_text()[-3000:]
    return _adapter(out), _steps(out)


# ---------------------------------------------------------------- configs: refused before the model loads
@pytest.mark.parametrize("flags, field", [
    (["--epochs", "0"], "epochs"), (["--learning_rate", "-1"], "learning_rate"),
    (["--per_device_batch_size", "0"], "per_device_batch_size"), (["--optim", "adamw_nonsense"], "optim"),
    (["--save_steps", "0"], "save_steps"), (["--lora_dropout", "1.5"], "lora_dropout"),
    (["--lora_target", "(unclosed"], "lora_target"), (["--max_steps", "0"], "max_steps"),
])
def test_out_of_range_values_are_refused_in_one_line_before_any_model_loads(flags, field, monkeypatch, capsys,
                                                                             tmp_path):
    import training.train as train_mod

    def no_model(*a, **kw):
        raise AssertionError("the model was loaded for an invalid config")

    monkeypatch.setattr(train_mod, "load_model", no_model)
    monkeypatch.setattr(train_mod, "check_data", lambda data: None)
    monkeypatch.setattr(train_mod, "resolve_model", lambda model: model)
    rc = train_mod.main(["--mode", "lora", "--output_dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and field in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_config_set_after_construction_is_checked_again_by_train_and_the_launcher(tmp_path):
    from training.launchers import LocalLauncher
    from training.train import train

    cfg = preset("demo-cpu", output_dir=str(tmp_path / "out"))
    cfg.epochs, cfg.max_steps = 0, -1          # a field set by hand skips __post_init__
    with pytest.raises(ConfigError, match="epochs"):
        train(cfg)
    with pytest.raises(ConfigError, match="epochs"):
        LocalLauncher(tmp_path).start(cfg, name="bad")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "jobs.jsonl").exists()


def test_yaml_with_unknown_keys_is_one_line_naming_them(tmp_path, capsys):
    from training.train import main

    path = tmp_path / "run.yaml"
    path.write_text("lora_rank: 8\nlearning_rat: 0.1\nlora_r: 8\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown TrainConfig keys: learning_rat, lora_rank (see `python -m training.train --help`)"


def test_a_missing_config_file_says_so_instead_of_parsing_its_name(tmp_path, capsys, monkeypatch):
    import training.__main__ as cli
    from training.train import main

    monkeypatch.chdir(tmp_path)
    assert main(["--config", "run.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: no such config file: run.yaml"
    assert cli.main(["--workspace", str(tmp_path), "launch", "--config", "run.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: no such config file: run.yaml"
    with pytest.raises(ConfigError, match="no such config file"):
        TrainConfig.from_yaml("run.yaml")
    assert TrainConfig.from_yaml("lora_r: 8").lora_r == 8          # YAML text still parses as text


@pytest.mark.parametrize("text, says", [
    ("- lora_r\n- 8\n", "a config is a mapping of TrainConfig fields, got list"),
    ("lora_r: [8\n", "run.yaml is not valid YAML"),
    ("lora_r: eight\n", "lora_r: 'eight' is not an integer"),
    ("gradient_checkpointing: maybe\n", "gradient_checkpointing: 'maybe' is not true or false"),
])
def test_a_malformed_yaml_config_is_one_line_saying_what_is_wrong(text, says, tmp_path, capsys):
    from training.train import main

    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err and len(err.splitlines()) == 1


def test_the_form_refuses_a_bad_value_before_launching(tmp_path):
    from studio.finetune_tab import _config

    names = ["model", "data", "epochs", "max_steps", "learning_rate"]
    with pytest.raises(ConfigError, match="learning_rate"):
        _config(names, ["m", "d", 1.0, -1, -1.0])


# ---------------------------------------------------------------- presets checkpoint
def test_every_preset_checkpoints_at_least_twice_within_its_run():
    for name in PRESETS:
        cfg = preset(name)
        if cfg.max_steps > 0:
            assert cfg.save_steps * 2 <= cfg.max_steps, name


# ---------------------------------------------------------------- kill, resume, equal adapters
@pytest.mark.parametrize("lengths", [None, [5, 9, 3, 7, 7, 2, 8, 4, 6, 1, 9, 3]])
def test_the_training_order_depends_on_seed_and_epoch_only_also_when_a_resume_skips_batches(lengths):
    from accelerate import Accelerator, skip_first_batches
    from torch.utils.data import DataLoader

    from training.data import EpochSampler

    def epoch_order(epoch, skip=0, draws=0):
        torch.randn(draws)                      # whatever the global RNG went through before
        loader = Accelerator(cpu=True).prepare(DataLoader(list(range(12)), batch_size=4,
                                                          sampler=EpochSampler(12, seed=42, batch_size=4,
                                                                               lengths=lengths)))
        loader = skip_first_batches(loader, skip) if skip else loader
        loader.set_epoch(epoch)                 # what the Trainer calls before each epoch
        return [b.tolist() for b in loader]

    first = epoch_order(2)
    assert epoch_order(2, draws=7) == first and epoch_order(2, skip=1, draws=3) == first[1:]
    assert epoch_order(1) != first and sorted(sum(first, [])) == list(range(12))


def test_sigkill_after_a_checkpoint_then_rerun_ends_with_the_uninterrupted_adapter(demo_model, data, reference,
                                                                                   tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    argv = _argv(demo_model, data, out)
    proc = _killed_after_checkpoint(argv, out, log, 8)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter").exists()
    assert _run(argv, log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "resuming from" in text and "checkpoint-" in text
    want, want_steps = reference
    _assert_same_adapter(_adapter(out), want)
    # one curve: the rows the killed attempt logged past its checkpoint were dropped, then redone once
    assert _steps(out) == want_steps


def test_sigterm_then_rerun_ends_with_the_uninterrupted_adapter(demo_model, data, reference, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    argv = _argv(demo_model, data, out)
    proc = _start(argv, log)
    _wait_for(_checkpoint_done(out, 4), proc, log)
    proc.send_signal(signal.SIGTERM)            # the trainer checkpoints at the end of the current step
    assert proc.wait(timeout=60) == 143, log.read_text()[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "interrupted" and result["checkpoint"]
    assert _run(argv, log) == 0, log.read_text()[-3000:]
    assert f"resuming from {result['checkpoint']}" in log.read_text()
    want, want_steps = reference
    _assert_same_adapter(_adapter(out), want)
    assert _steps(out) == want_steps


def test_a_half_written_newest_checkpoint_is_set_aside_and_the_newest_complete_one_is_resumed(
        demo_model, data, reference, tmp_path):
    from training.checkpoints import COMPLETE_MARKER
    out, log = tmp_path / "run", tmp_path / "log.txt"
    argv = _argv(demo_model, data, out)
    _killed_after_checkpoint(argv, out, log, 8)
    ckpts = out / "checkpoints"
    # What a kill in the middle of saving leaves: the weights cut short, no optimizer, no marker.
    torn = ckpts / "checkpoint-12"
    if torn.exists():
        import shutil
        shutil.rmtree(torn)
    torn.mkdir()
    weights = (ckpts / "checkpoint-8" / "adapter_model.safetensors").read_bytes()
    (torn / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 3])
    (torn / "trainer_state.json").write_text('{"global_step": 12')
    assert not (torn / COMPLETE_MARKER).exists()
    assert _run(argv, log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "checkpoint-12 is incomplete" in text and "resuming from" in text and "checkpoint-8" in text
    _assert_same_adapter(_adapter(out), reference[0])


def test_a_restart_without_a_checkpoint_says_so_and_starts_a_fresh_curve(demo_model, data, tmp_path, capsys):
    import contextlib
    import io

    from training.train import train

    out = tmp_path / "run"
    out.mkdir()
    stale = [{"step": s, "loss": 9.0, "epoch": 0, "time": 0} for s in (1, 2, 3)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale) + '{"step": 4, "lo')
    cfg = preset("demo-cpu", model=str(demo_model), data=str(data), output_dir=str(out),
                 **{**RUN, "max_steps": 2, "save_steps": 1})
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert train(cfg)["status"] == "completed"
    assert "starting at step 0" in buf.getvalue()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all(r.get("loss") != 9.0 for r in rows)


# ---------------------------------------------------------------- relaunch continues the job
def _tab_resume(workspace: Path, demo_model):
    """The Fine-tune tab's Resume button handler, as the browser triggers it."""
    import gradio as gr

    from studio.context import Studio
    from studio.finetune_tab import build

    with gr.Blocks() as demo:
        parts = build(Studio(workspace, str(demo_model)))
    button = parts["resume"]._id
    return next(f.fn for f in demo.fns.values() if (button, "click") in f.targets)


def test_a_stopped_job_resumed_from_the_tab_continues_its_run(demo_model, data, tmp_path, monkeypatch):
    from training.launchers import LocalLauncher, read_jobs

    for k, v in _env().items():
        monkeypatch.setenv(k, v)
    workspace = tmp_path / "ws"
    cfg = preset("demo-cpu", model=str(demo_model), data=str(data), **{**RUN, "max_steps": 12})
    launcher = LocalLauncher(workspace)
    job = launcher.start(cfg, name="resumable")
    run = Path(job["output_dir"])
    deadline = time.time() + 90
    while not _checkpoint_done(run, 4)() and time.time() < deadline:
        assert launcher.status(job)["status"] == "running", launcher.logs(job)
        time.sleep(0.02)
    assert launcher.stop(job, grace=60)["status"] == "stopped"
    message, _table = _tab_resume(workspace, demo_model)(job["id"])
    assert message == f"# resumed {job['id']}"
    again = read_jobs(workspace)[job["id"]]
    assert again["output_dir"] == job["output_dir"] and again["status"] == "running" and again["resumes"] == 1
    deadline = time.time() + 120
    while (status := launcher.status(again))["status"] == "running" and time.time() < deadline:
        time.sleep(0.3)
    assert status["status"] == "completed", launcher.logs(again)
    assert "resuming from" in launcher.logs(again, 400)
    assert _steps(run) == list(range(1, 13))          # one curve from step 1 to 12, nothing restarted
    assert len(read_jobs(workspace)) == 1
    with pytest.raises(ValueError, match="completed: nothing to resume"):
        launcher.resume(job["id"])


def test_resume_from_the_shell_refuses_an_unknown_or_running_job_in_one_line(tmp_path, capsys, monkeypatch):
    import training.__main__ as cli
    import training.launchers as launchers
    from training.launchers import record

    assert cli.main(["--workspace", str(tmp_path), "resume", "nope"]) == 2
    assert "no job 'nope'" in capsys.readouterr().err
    record(tmp_path, {"id": "live", "kind": "local", "status": "running", "pid": os.getpid(), "config": "x",
                      "output_dir": str(tmp_path / "runs" / "live"), "log": str(tmp_path / "log"), "created": 1})
    monkeypatch.setattr(launchers, "_alive", lambda pid, marker: True)
    assert cli.main(["--workspace", str(tmp_path), "resume", "live"]) == 2
    assert capsys.readouterr().err.strip() == "error: job live is still running"


def test_parse_args_lets_flags_fix_a_yaml_value_the_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 0\n")
    assert parse_args(["--config", str(path), "--max_steps", "5"]).max_steps == 5
