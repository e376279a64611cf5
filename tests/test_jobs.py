"""Benchmark runs and chart generation as background jobs (the same launcher as fine-tunes): their config
dataclasses, progress read from the child, Stop, a restarted launcher finding them, short names."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from charts.config import ConfigError, GenerateConfig, add_flags, from_flags
from conftest import wait_until
from eval.config import EvalConfig
from training.launchers import LocalLauncher, all_jobs, find_job

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- config dataclasses
def test_generate_config_round_trips_through_yaml_and_dict(tmp_path):
    cfg = GenerateConfig(out=str(tmp_path / "d"), n=7, kinds=["bar", "pie"], multi_turn=True, instruct_share=0.25)
    assert GenerateConfig.from_yaml(cfg.to_yaml(tmp_path / "g.yaml") and tmp_path / "g.yaml") == cfg
    assert GenerateConfig.from_dict(cfg.to_dict()) == cfg
    assert GenerateConfig.from_dict({"out": "x", "kinds": "bar, line", "n": "3"}).kinds == ["bar", "line"]


@pytest.mark.parametrize("changes, message", [
    ({"out": ""}, "out is required"), ({"split": "0.5,0.5"}, "split"), ({"kinds": ["bar", "nope"]}, "'nope'"),
    ({"instruct_share": 2.0}, "instruct_share"), ({"families": []}, "question family"), ({"look": "x"}, "look")])
def test_generate_config_validate_names_the_bad_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        GenerateConfig(**{"out": "d", **changes}).validate()


def test_eval_config_round_trips_and_validates(tmp_path):
    cfg = EvalConfig(data="d", model=["local:m", "local:m+a"], out="o", split="test", limit=5, metrics=["exact"])
    assert EvalConfig.from_yaml(cfg.to_yaml(tmp_path / "e.yaml") and tmp_path / "e.yaml") == cfg.validate()
    for bad, message in (({"model": ["nope:x"]}, "unknown kind"), ({"limit": -1}, "limit"),
                         ({"metrics": ["nope"]}, "nope"), ({"data": ""}, "data is required")):
        with pytest.raises(ConfigError, match=message):
            cfg.replace(**bad).validate()
    with pytest.raises(ConfigError, match="unknown EvalConfig keys: modle"):
        EvalConfig.from_dict({"modle": "x"})
    with pytest.raises(ConfigError, match="limit: 'many' is not an integer"):
        EvalConfig.from_dict({"limit": "many"})


def test_job_configs_read_yaml_text_and_refuse_a_bool_they_cannot_read():
    cfg = EvalConfig.from_yaml("data: d\nmodel: [local:m]\nout: o\nlimit: 3")
    assert (cfg.data, cfg.model, cfg.limit) == ("d", ["local:m"], 3)
    with pytest.raises(ConfigError, match="multi_turn: 'sometimes' is not true or false"):
        GenerateConfig.from_dict({"out": "x", "multi_turn": "sometimes"})     # not silently false
    with pytest.raises(ConfigError, match=r"unknown EvalConfig keys: modle \(see `python -m eval run --help`\)"):
        EvalConfig.from_yaml("modle: x")


def test_flags_override_the_config_file_and_flags_left_out_do_not(tmp_path):
    import argparse

    EvalConfig(data="d", model=["local:m"], out="o", limit=5).to_yaml(tmp_path / "e.yaml")
    ap = argparse.ArgumentParser()
    add_flags(ap, EvalConfig)
    cfg = from_flags(EvalConfig, ap.parse_args(["--config", str(tmp_path / "e.yaml"), "--max-new-tokens", "8"]))
    assert (cfg.limit, cfg.max_new_tokens, cfg.model) == (5, 8, ["local:m"])


# ---------------------------------------------------------------- jobs
def _wait(predicate, timeout=120.0):
    return wait_until(predicate, timeout, every=0.3)


def _cli(workspace, *args):
    return subprocess.run([sys.executable, "-m", "training", "--workspace", str(workspace), *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_generation_and_benchmark_jobs_report_progress_stop_and_survive_a_restart(demo_model, tmp_path):
    ws = tmp_path / "ws"
    launcher = LocalLauncher(ws)
    gen = launcher.start(GenerateConfig(out=str(ws / "datasets" / "small"), n=6, workers=1, look="demo",
                                        split="0.5,0,0.5"))
    assert gen["short"] == "charts-1" and gen["task"] == "charts"
    done = _wait(lambda: (s := launcher.status(gen))["status"] != "running" and s)
    assert done["status"] == "completed", done.get("detail")
    assert done["progress"] == 100.0 and (ws / "datasets" / "small" / "dataset.json").is_file()

    bench = launcher.start(EvalConfig(data=str(ws / "datasets" / "small"), model=[f"local:{demo_model}"],
                                      out=str(ws / "evals" / "b1"), split="test", limit=4))
    assert bench["short"] == "bench-1"
    done = _wait(lambda: (s := launcher.status(bench))["status"] != "running" and s)
    assert done["status"] == "completed", done.get("detail")
    assert done["progress"] == 100.0 and list((ws / "evals" / "b1").glob("*/summary.json"))
    assert (Path(done["config"]).parent / "config.yaml").is_file()          # the saved job record's config
    saved = EvalConfig.from_yaml(ws / "evals" / "b1" / "eval_config.yaml")     # and the copy beside the results
    assert saved.limit == 4 and saved.model == [f"local:{demo_model}"]
    assert GenerateConfig.from_yaml(ws / "datasets" / "small" / "generate_config.yaml").n == 6

    # a long generation, stopped once it has drawn a few charts
    out = ws / "datasets" / "big"
    big = launcher.start(GenerateConfig(out=str(out), n=3000, workers=1))
    seen = _wait(lambda: (s := launcher.status(big)).get("done", 0) >= 2 and s)
    assert seen["status"] == "running" and 0 < seen["progress"] < 100
    stopped = launcher.stop(big, grace=20)
    assert stopped["status"] == "stopped"
    assert not (out / "dataset.json").exists() and not list(out.rglob("*.tmp"))      # nothing half-written
    for line in (out / ".progress.jsonl").read_text().splitlines():
        json.loads(line)
    assert json.loads(Path(big["job_file"]).read_text())["status"] == "stopped"

    # a restarted studio: a new launcher, nothing in memory, finds all three with their short names
    import training.launchers as launchers
    launchers._CHILDREN.clear()
    found = {j["short"]: j for j in all_jobs(ws)}
    assert {k: found[k]["status"] for k in ("charts-1", "bench-1", "charts-2")} == \
        {"charts-1": "completed", "bench-1": "completed", "charts-2": "stopped"}
    assert find_job(ws, "bench-1")["id"] == bench["id"] and find_job(ws, bench["id"])["short"] == "bench-1"

    # the CLI takes the short names
    listing = _cli(ws, "jobs")
    assert listing.returncode == 0 and "bench-1" in listing.stdout and "charts-2" in listing.stdout
    logs = _cli(ws, "logs", "bench-1")
    assert logs.returncode == 0 and "written to" in logs.stdout
    assert _cli(ws, "stop", "charts-2").stdout.strip() == "stopped"
    assert _cli(ws, "logs", "bench-9").returncode == 2


def test_the_cli_launches_a_generation_job_from_a_config_file(tmp_path):
    ws = tmp_path / "ws"
    GenerateConfig(out=str(ws / "datasets" / "cli"), n=2, workers=1).to_yaml(tmp_path / "gen.yaml")
    out = _cli(ws, "launch", "--task", "charts", "--config", str(tmp_path / "gen.yaml"))
    assert out.returncode == 0, out.stderr
    started = json.loads(out.stdout)
    assert started["short"] == "charts-1" and started["task"] == "charts"
    job = find_job(ws, "charts-1")
    done = _wait(lambda: (s := LocalLauncher(ws).status(job))["status"] != "running" and s)
    assert done["status"] == "completed", done.get("detail")
    bad = _cli(ws, "launch", "--task", "bench", "--config", str(tmp_path / "gen.yaml"))
    assert bad.returncode == 2 and "unknown EvalConfig keys" in bad.stderr


def test_a_stopped_benchmark_job_leaves_its_resumable_samples_and_no_summary(demo_model, tmp_path):
    from test_eval_run import make_chartqa

    ws = tmp_path / "ws"
    launcher = LocalLauncher(ws)
    data = make_chartqa(tmp_path / "q", n=400)
    job = launcher.start(EvalConfig(data=str(data), model=[f"local:{demo_model}"], out=str(ws / "evals" / "long"),
                                    max_new_tokens=48, batch_size=2))
    seen = _wait(lambda: (s := launcher.status(job)).get("done", 0) >= 4 and s)
    assert seen["status"] == "running" and seen["total"] == 400
    assert launcher.stop(job, grace=20)["status"] == "stopped"
    out = ws / "evals" / "long" / "demo-llava"
    assert not (out / "summary.json").exists() and not list((ws / "evals").rglob("*.tmp"))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert 4 <= len(rows) < 400                      # whole lines only: a rerun resumes from them
    assert json.loads(Path(job["job_file"]).read_text())["status"] == "stopped"


def test_a_benchmark_job_on_missing_data_is_failed_with_the_reason(tmp_path):
    from training.launchers import describe

    launcher = LocalLauncher(tmp_path)
    job = launcher.start(EvalConfig(data=str(tmp_path / "nowhere"), model=["local:m"], out=str(tmp_path / "e")))
    done = _wait(lambda: (s := launcher.status(job))["status"] != "running" and s)
    assert done["status"] == "failed" and "nowhere" in describe(done)
