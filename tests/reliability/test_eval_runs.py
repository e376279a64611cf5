"""Benchmark runs never report a score over failed samples without saying so, and never die of one
bad sample, model or argument; eval folders stay inside the workspace, dataset images inside their
dataset; a SIGKILLed `python -m eval run` resumes to the result of an uninterrupted run."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import charts
from charts.io import read_jsonl
from eval.__main__ import main as eval_main
from eval.run import MAX_QUESTION_CHARS, DatasetError, RunMismatch, load_questions, run_eval
from test_eval_run import opener, samples

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def make_chartqa(root: Path, n: int = 6, name: str = "test_human.json") -> Path:
    """ChartQA layout (png/ beside the file); the gold of question i is str(i)."""
    (root / "png").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (40, 30), (i * 20 % 255, 100, 200)).save(root / "png" / f"chart{i}.png")
        rows.append({"imgname": f"chart{i}.png", "query": f"What is value {i}?", "label": str(i)})
    path = root / name
    path.write_text(json.dumps(rows))
    return path


class Fake:
    """Answers "What is value i?" with i; raises for the questions in `fail` (like an endpoint's 500)."""

    def __init__(self, fail=(), max_batch=4):
        self.name, self.max_batch, self.fail = "fake", max_batch, set(fail)
        self.calls: list[list[str]] = []

    def generate(self, requests):
        self.calls.append([r.question for r in requests])
        out = []
        for r in requests:
            found = re.search(r"value (\d+)\?", r.question)
            i = int(found.group(1)) if found else -1
            if i in self.fail:
                raise RuntimeError(f"HTTP 500 for value {i}")
            out.append(str(i))
        return out

    def stream(self, request):
        yield from self.generate([request])


def never_open(ref, **options):
    raise AssertionError("a model was opened before the arguments were checked")


# ---------------------------------------------------------------- errors are counted and shown
def test_cli_shows_n_errors_and_exits_non_zero_unless_allow_errors(tmp_path, demo_model, capsys):
    data = make_chartqa(tmp_path / "d", n=3)
    (tmp_path / "d" / "png" / "chart1.png").unlink()
    args = ["run", "--data", str(data), "--model", f"local:{demo_model}", "--out", str(tmp_path / "o"), "--quiet"]
    assert eval_main(args) == 1
    out, err = capsys.readouterr()
    header, row = out.splitlines()[:2]
    assert "n_errors" in header.split() and row.split()[header.split().index("n_errors")] == "1"
    assert "1 of 3 samples failed" in err and "chart1.png" in err and "Traceback" not in err
    assert eval_main(args + ["--allow-errors"]) == 0


def test_reports_and_leaderboard_show_the_error_count(tmp_path):
    from eval.report import leaderboard_rows, write_reports
    data = make_chartqa(tmp_path / "d", n=4)
    (tmp_path / "d" / "png" / "chart2.png").write_bytes(b"not a png")
    run_eval(data, ["local:m"], tmp_path / "evals" / "e1", open_backend=opener(Fake()))
    paths = write_reports(tmp_path / "evals" / "e1")
    assert json.loads(paths["json"].read_text())["summaries"][0]["n_errors"] == 1
    assert "not an image" in paths["csv"].read_text()
    html = paths["html"].read_text()
    assert html.count("<th>errors</th>") >= 3          # the overall table and each per-group table
    [row] = leaderboard_rows(tmp_path / "evals")
    assert row["n_errors"] == 1
    from studio.benchmark_tab import BOARD_COLUMNS
    assert "n_errors" in BOARD_COLUMNS


# ---------------------------------------------------------------- one failure never ends the run
def test_a_backend_exception_fails_only_its_samples_and_the_run_goes_on(tmp_path):
    data = make_chartqa(tmp_path / "d", n=8)
    fake = Fake(fail={5})
    [s] = run_eval(data, ["local:m"], tmp_path / "o", open_backend=opener(fake))
    rows = samples(tmp_path / "o" / "m")
    assert "HTTP 500 for value 5" in rows[5]["error"] and rows[5]["relaxed_ref"] == 0.0
    assert [r.get("error") for k, r in enumerate(rows) if k != 5] == [None] * 7     # its batch was retried one by one
    assert s["n"] == 8 and s["n_errors"] == 1 and s["overall"]["relaxed_ref"] == pytest.approx(700 / 8)


def test_a_rerun_asks_failed_samples_again_and_keeps_the_scored_ones(tmp_path):
    data = make_chartqa(tmp_path / "d", n=6)
    [s] = run_eval(data, ["local:m"], tmp_path / "o", open_backend=opener(Fake(fail={1, 4})))
    assert s["n_errors"] == 2
    again = Fake(fail={4})                         # the endpoint is back for one of them
    [s] = run_eval(data, ["local:m"], tmp_path / "o", open_backend=opener(again))
    assert [q for call in again.calls for q in call] == [f"What is value {i}?" + s["prompt"]["prompt_suffix"]
                                                          for i in (1, 4, 1, 4)]   # batch, then one by one
    rows = samples(tmp_path / "o" / "m")
    assert s["n_errors"] == 1 and rows[1]["prediction"] == "1" and "value 4" in rows[4]["error"] and len(rows) == 6


class _Endpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible server answering 500 for the question about value 3."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = body["messages"][0]["content"][-1]["text"]
        status, reply = (500, {"error": {"message": "internal error"}}) if "value 3" in question else \
            (200, {"choices": [{"message": {"content": question.split("value ")[1].split("?")[0]}}]})
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_an_endpoint_500_is_one_error_row(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        data = make_chartqa(tmp_path / "d", n=5)
        [s] = run_eval(data, [f"openai:http://127.0.0.1:{server.server_port}/v1#m"], tmp_path / "o")
    finally:
        server.shutdown()
    rows = samples(tmp_path / "o" / "m")
    assert "HTTP 500" in rows[3]["error"] and s["n_errors"] == 1 and s["overall"]["relaxed_ref"] == 80.0


def test_a_model_that_cannot_be_opened_fails_alone_with_one_line(tmp_path, demo_model, capsys):
    import shutil
    corrupt = tmp_path / "corrupt-llava"
    shutil.copytree(demo_model, corrupt)
    for f in corrupt.glob("*.safetensors"):
        f.write_bytes(b"\x00garbage" * 10)
    data = make_chartqa(tmp_path / "d", n=2)
    code = eval_main(["run", "--data", str(data), "--model", f"local:{corrupt}", "--model",
                      "local:no-such-org/no-such-model", "--model", f"local:{demo_model}", "--out",
                      str(tmp_path / "o"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    failed = [line for line in err.splitlines() if "could not be opened" in line]
    assert len(failed) == 2 and "corrupt-llava" in failed[0] and "no-such-model" in failed[1]
    assert len(samples(tmp_path / "o" / "demo-llava")) == 2            # the good model still ran
    assert "failed" in out and json.loads((tmp_path / "o" / "corrupt-llava" / "failed.json").read_text())["error"]


def test_an_oversized_question_is_an_error_row_and_never_reaches_the_model(tmp_path):
    data = make_chartqa(tmp_path / "d", n=3)
    rows = json.loads(data.read_text())
    rows[1]["query"] = "What is value 1?" + "x" * (MAX_QUESTION_CHARS + 1)
    data.write_text(json.dumps(rows))
    fake = Fake()
    start = time.perf_counter()
    [s] = run_eval(data, ["local:m"], tmp_path / "o", open_backend=opener(fake))
    assert time.perf_counter() - start < 5
    out = samples(tmp_path / "o" / "m")
    assert "too long" in out[1]["error"] and len(out[1]["question"]) < 1000
    assert all(len(q) < 1000 for call in fake.calls for q in call) and s["n_errors"] == 1


# ---------------------------------------------------------------- arguments checked before any load
# (--limit 0 means "all questions" on the command line and in EvalConfig, as 0 means "all" for max_train_samples.)
@pytest.mark.parametrize("flag,value,word", [("--limit", "-100", "limit"),
                                             ("--max-new-tokens", "0", "max_new_tokens"),
                                             ("--batch-size", "-1", "batch_size"),
                                             ("--concurrency", "-1", "concurrency")])
def test_bad_numbers_are_refused_before_any_model_loads(tmp_path, capsys, flag, value, word):
    data = make_chartqa(tmp_path / "d", n=2)
    with pytest.raises(ValueError, match=word):
        run_eval(data, ["local:m"], tmp_path / "o", open_backend=never_open, **{word: int(value)})
    code = eval_main(["run", "--data", str(data), "--model", "local:/no/such/model", "--out", str(tmp_path / "o"),
                      flag, value])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and word in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("ref,message", [("nonsense", "KIND:TARGET"), ("hub:llava", "unknown kind"),
                                         ("openai:http://127.0.0.1:1/v1", "URL#MODEL")])
def test_a_malformed_model_ref_is_refused_before_any_model_loads(tmp_path, ref, message):
    data = make_chartqa(tmp_path / "d", n=2)
    with pytest.raises(ValueError, match=message):
        run_eval(data, ["local:m", ref], tmp_path / "o", open_backend=never_open)


# ---------------------------------------------------------------- output folders
def test_reusing_out_with_other_models_is_refused_but_extending_the_list_works(tmp_path):
    data = make_chartqa(tmp_path / "d", n=2)
    out = tmp_path / "o"
    run_eval(data, ["local:a"], out, open_backend=opener(Fake()))
    run_eval(data, ["local:a", "local:b"], out, open_backend=opener(Fake()))     # adds a model: same baseline
    run_eval(data, ["local:a"], out, open_backend=opener(Fake()))                # resumes the first ones
    for models in (["local:b"], ["local:b", "local:a"], ["local:a", "local:c"]):
        with pytest.raises(RunMismatch, match="local:a, local:b"):
            run_eval(data, models, out, open_backend=never_open)
    assert [m["ref"] for m in json.loads((out / "eval.json").read_text())["models"]] == ["local:a", "local:b"]


class Launcher:
    """Stands in for training.launchers.LocalLauncher in the Benchmark tab: records each job's config."""
    started: list = []

    def __init__(self, workspace):
        pass

    def start(self, cfg):
        Launcher.started.append(cfg)
        return {"id": "j", "short": "bench-1", "status": "running", "task": "bench", "output_dir": cfg.out}


def test_two_benchmarks_started_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    from datetime import datetime

    from studio import benchmark_tab
    from studio.context import Studio

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(benchmark_tab, "datetime", Frozen)
    monkeypatch.setattr(benchmark_tab, "LocalLauncher", Launcher)
    monkeypatch.setattr(benchmark_tab, "describe", lambda job: job["short"])
    Launcher.started = []
    studio = Studio(tmp_path / "ws", "base")
    data = studio.path("datasets") / "ds"
    data.mkdir(parents=True)
    for _ in range(2):
        benchmark_tab._start(studio, str(data), "test", 0, "", ["local:m"], "", 16)
    outs = [Path(cfg.out) for cfg in Launcher.started]
    assert len(set(outs)) == 2 and all(o.parent == studio.path("evals") for o in outs)


@pytest.mark.parametrize("name", ["../outside", "/tmp/absolute-eval", "a/../../outside", "..", "a/b"])
def test_a_benchmark_name_cannot_leave_workspace_evals(tmp_path, monkeypatch, name):
    import gradio as gr

    from studio import benchmark_tab
    from studio.context import Studio
    monkeypatch.setattr(benchmark_tab, "LocalLauncher", lambda *a, **k: pytest.fail("job started"))
    studio = Studio(tmp_path / "ws", "base")
    data = studio.path("datasets") / "ds"
    data.mkdir(parents=True)
    with pytest.raises(gr.Error, match="name"):
        benchmark_tab._start(studio, str(data), "test", 0, name, ["local:m"], "", 16)
    assert not (tmp_path / "outside").exists()


# ---------------------------------------------------------------- dataset images
def test_a_chartqa_file_whose_images_are_all_missing_gives_one_clear_message(tmp_path):
    data = make_chartqa(tmp_path / "d", n=5)
    for p in (tmp_path / "d" / "png").iterdir():
        p.unlink()
    with pytest.raises(DatasetError) as e:
        load_questions(data)
    message = str(e.value)
    assert "5 of 5 images" in message and "chart0.png" in message and str(tmp_path / "d" / "png") in message
    assert "--images" in message and "\n" not in message


def test_chartqa_image_names_outside_the_image_folder_are_error_rows_never_read(tmp_path):
    data = make_chartqa(tmp_path / "d", n=3)
    Image.new("RGB", (9, 9)).save(tmp_path / "secret.png")
    rows = json.loads(data.read_text())
    rows[0]["imgname"], rows[1]["imgname"] = "../../secret.png", str(tmp_path / "secret.png")
    data.write_text(json.dumps(rows))
    fake = Fake()
    [s] = run_eval(data, ["local:m"], tmp_path / "o", open_backend=opener(fake))
    out = samples(tmp_path / "o" / "m")
    assert "refused" in out[0]["error"] and "refused" in out[1]["error"] and s["n_errors"] == 2
    assert [len(c) for c in fake.calls] == [1]


def test_llava_records_with_images_outside_their_dataset_are_refused(tmp_path):
    ds = tmp_path / "ds"
    charts.generate(2, ["bar"], seed=0, out_dir=ds, split=(0, 0, 1))
    Image.new("RGB", (9, 9)).save(tmp_path / "secret.png")
    (tmp_path / "notes.txt").write_text("private")
    recs = list(read_jsonl(ds / "test.jsonl"))
    recs[0]["image"], recs[1]["image"] = "../secret.png", str(tmp_path / "notes.txt")
    (ds / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    items = charts.load_qa(ds)
    bad = [i for i in items if i["id"] in (recs[0]["id"], recs[1]["id"])]
    assert bad and all(i["image_error"] and "secret" not in i["image"] and "notes" not in i["image"] for i in bad)
    assert all(i["id"] not in (recs[0]["id"], recs[1]["id"]) for i in [charts.random_example(ds, s) for s in range(20)])
    assert "image_outside_dataset" in charts.validate(ds).codes()
    fake = Fake()
    [s] = run_eval(ds, ["local:m"], tmp_path / "o", open_backend=opener(fake))
    assert s["n_errors"] == len(bad)
    assert all("refused" in r["error"] for r in samples(tmp_path / "o" / "m") if r.get("error"))


# ---------------------------------------------------------------- kill and resume the real CLI
def test_killed_eval_run_resumes_to_the_result_of_an_uninterrupted_run(tmp_path, demo_model):
    n = 8
    data = make_chartqa(tmp_path / "d", n=n)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "latency_s"} for r in rows]  # noqa: E731
    run_eval(data, [f"local:{demo_model}"], tmp_path / "whole", batch_size=1, max_new_tokens=4)
    cmd = [sys.executable, "-m", "eval", "run", "--data", str(data), "--model", f"local:{demo_model}", "--out",
           str(tmp_path / "o"), "--batch-size", "1", "--max-new-tokens", "4", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path, deadline = tmp_path / "o" / "demo-llava" / "samples.jsonl", time.time() + 120
    try:
        while not (path.exists() and path.read_bytes().count(b"\n") >= 2):
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert 2 <= path.read_bytes().count(b"\n") < n, "the kill came after the end"
    assert subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True).returncode == 0
    assert strip(samples(tmp_path / "o" / "demo-llava")) == strip(samples(tmp_path / "whole" / "demo-llava"))
