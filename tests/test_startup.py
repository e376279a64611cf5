"""What a studio start costs on a CPU (docs/BENCHMARKS.md, "Compare on CPU"): the demo dataset is drawn
by a low-priority background job, not before serving; gradio's stub writer is off; a new adapter on a
CPU engine is attached without throwaway warm-up generations."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import app
from conftest import ROOT, start_studio, stop_studio, wait_for_file


def test_importing_the_studio_turns_off_gradio_stub_writing_only():
    code = ("import studio, gradio as gr, gradio.component_meta as m; "
            "print(m.create_or_modify_pyi is studio._no_stub, type(gr.Textbox('x')).__name__)")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["True", "Textbox"], out.stderr[-2000:]
    kept = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**env, "STUDIO_GRADIO_STUBS": "1"})
    assert kept.stdout.split() == ["False", "Textbox"], kept.stderr[-2000:]


def test_a_new_adapter_on_a_cpu_engine_is_attached_without_warm_up_generations(demo_model, tmp_path):
    from eval.pool import ModelPool
    from test_local_backend import make_adapter

    adapter = make_adapter(demo_model, tmp_path / "adapter")
    pool = ModelPool()
    engine = pool.backend(f"local:{demo_model}").engine
    before = engine.batches
    tuned = pool.backend(f"local:{demo_model}+{adapter}")
    assert engine.batches == before and tuned.slot == 1         # attached; nothing run
    from PIL import Image

    from eval.protocol import Request
    chart = Image.open(ROOT / "assets" / "examples" / "bar.png").convert("RGB")
    assert tuned.generate([Request(chart, "What is the title?", max_new_tokens=6)])[0]


def test_the_demo_dataset_is_drawn_by_a_low_priority_background_job(tmp_path):
    from training.demo import DEMO_CHARTS, DEMO_KIND, DEMO_LOOK
    from training.launchers import read_jobs

    app.prepare_models(tmp_path, app.DEMO, None)
    dataset = tmp_path / "datasets" / "demo"
    assert not (dataset / "dataset.json").exists()               # the models are ready; the dataset is not
    job = app.draw_demo_dataset(tmp_path)
    assert job["task"] == "charts" and job["status"] == "running"
    assert os.getpriority(os.PRIO_PROCESS, job["pid"]) == app.BACKGROUND_NICE
    if Path("/proc/self/autogroup").exists():
        assert f"nice {app.BACKGROUND_NICE}" in Path(f"/proc/{job['pid']}/autogroup").read_text()
    assert app.draw_demo_dataset(tmp_path) is None               # being drawn: not started twice
    wait_for_file(dataset / "dataset.json")
    manifest = json.loads((dataset / "dataset.json").read_text())
    assert manifest["counts"]["charts"] == DEMO_CHARTS and manifest["settings"]["kinds"] == [DEMO_KIND]
    assert manifest["settings"]["look"] == DEMO_LOOK and (dataset / "test.jsonl").stat().st_size > 0
    assert app.draw_demo_dataset(tmp_path) is None               # drawn: nothing to do
    assert [j["task"] for j in read_jobs(tmp_path).values()] == ["charts"]


def test_a_studio_answers_compare_while_its_demo_dataset_is_still_being_drawn(tmp_path):
    from gradio_client import Client, handle_file

    from training.launchers import record
    # a drawing job that never finishes (its process lives, and names its config as a job's does)
    ws = tmp_path / "ws"
    config = ws / "jobs" / "charts-demo" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("{}")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(config)])
    try:
        record(ws, {"id": "charts-demo", "task": "charts", "kind": "local", "status": "running", "pid": sleeper.pid,
                    "config": str(config), "output_dir": str((ws / "datasets" / "demo").resolve()),
                    "log": str(config.parent / "job.log"), "job_file": str(config.parent / "progress.json"),
                    "created": time.time()})
        proc, url = start_studio(ws)
        try:
            base, adapter = ws / "models" / "demo-llava", ws / "runs" / "demo-adapter" / "adapter"
            out = Client(url, verbose=False).predict(
                handle_file(str(ROOT / "assets" / "examples" / "pie.png")), "Which mode of transport has the highest share?",
                f"local:{base}", f"local:{base}+{adapter}", "local", "local", 8, 0.0, api_name="/run_compare")
            assert out[0] and out[3] and "tok/s" in out[2] and "tok/s" in out[5]
            assert not (ws / "datasets" / "demo" / "dataset.json").exists()
        finally:
            stop_studio(proc)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_studio_makes_openmp_threads_sleep_before_torch_is_imported(tmp_path):
    code = ("import os, sys, app\n"
            "def stop(*_):\n"
            "    print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))\n"
            "    sys.exit(0)\n"
            "app.prepare_models = stop\n"
            f"app.main(['--workspace', {str(tmp_path)!r}])\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["False", "PASSIVE"], out.stderr[-2000:]
    mine = {"OMP_WAIT_POLICY": "ACTIVE"}
    app.tune_cpu(mine)
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE"}                 # a user's choice is kept
