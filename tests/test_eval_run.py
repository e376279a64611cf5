"""Benchmark runner: resume after a kill, determinism, --limit, grouping, bad inputs, ChartQA files,
and one run of the real tiny LLaVA."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from charts.io import read_jsonl
from eval.run import DatasetError, RunMismatch, load_questions, model_slug, run_eval

KINDS = ["bar", "line", "pie"]
FAMILIES = ["retrieval", "compare"]


def make_chartqa(root: Path, n: int = 12, name: str = "test_human.json") -> Path:
    """A ChartQA-style file in ChartQA's layout (png/ beside it); the gold of question i is str(i)."""
    (root / "png").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = f"chart{i}.png"
        Image.new("RGB", (40, 30), (i * 20 % 255, 100, 200)).save(root / "png" / img)
        rows.append({"imgname": img, "query": f"What is value {i}?", "label": str(i),
                     "chart_type": KINDS[i % 3], "family": FAMILIES[i % 2]})
    path = root / name
    path.write_text(json.dumps(rows))
    return path


class FakeBackend:
    """Answers "What is value i?" with i when i is even, else "wrong" -- so half is right, known ids.
    `fail_after` generate calls it raises, like a killed process."""

    def __init__(self, name="fake", max_batch=4, fail_after=None):
        self.name, self.max_batch, self.fail_after = name, max_batch, fail_after
        self.calls: list[int] = []
        self.questions: list[str] = []

    def generate(self, requests):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(len(requests))
        out = []
        for r in requests:
            assert r.image.mode == "RGB" and r.max_new_tokens == 16 and r.temperature == 0.0
            self.questions.append(r.question)
            i = int(r.question.split("value ")[1].split("?")[0])
            out.append(str(i) if i % 2 == 0 else "wrong")
        return out

    def stream(self, request):
        yield from self.generate([request])


def opener(backend):
    return lambda ref, **options: backend


def samples(run_dir):
    return list(read_jsonl(Path(run_dir) / "samples.jsonl", strict=True))


def test_run_writes_samples_and_grouped_summary(tmp_path):
    data = make_chartqa(tmp_path / "data")
    fake = FakeBackend()
    seen = []
    [summary] = run_eval(data, ["local:/models/demo-llava"], tmp_path / "out", open_backend=opener(fake),
                         on_progress=lambda done, total, info: seen.append((done, total, info["model"])))
    rows = samples(tmp_path / "out" / "demo-llava")
    assert [r["id"] for r in rows] == [f"human/chart{i}.png/{i}" for i in range(12)]
    assert fake.calls == [4, 4, 4]                               # batched by max_batch
    assert fake.questions[0] == "What is value 0?\nAnswer the question using a single word or phrase."
    assert rows[2]["prediction"] == "2" and rows[2]["relaxed_ref"] == 1.0 and rows[3]["relaxed_ref"] == 0.0
    assert {"golds", "relaxed_norm", "norm_changes", "exact", "anls", "latency_s", "chart_type", "family"} <= set(rows[0])
    assert summary["overall"]["relaxed_ref"] == 50.0 and summary["n"] == 12
    assert summary["by_family"] == {"compare": {"n": 6, "n_errors": 0, "relaxed_ref": 0.0, "relaxed_norm": 0.0,
                                                "exact": 0.0, "anls": 0.0},
                                    "retrieval": {"n": 6, "n_errors": 0, "relaxed_ref": 100.0, "relaxed_norm": 100.0,
                                                  "exact": 100.0, "anls": 100.0}}
    assert set(summary["by_chart_type"]) == {"bar", "line", "pie"} and summary["by_split"]["human"]["n"] == 12
    assert summary["prompt"]["template"] == "{question}\nAnswer the question using a single word or phrase."
    assert summary["generation"]["max_new_tokens"] == 16 and summary["model"] == "local:/models/demo-llava"
    assert len(summary["dataset"]["questions_sha256"]) == 16 and summary["timing"]["samples_per_s"] > 0
    assert json.loads((tmp_path / "out" / "demo-llava" / "summary.json").read_text())["n"] == 12
    assert seen[-1] == (12, 12, "demo-llava") and [d for d, _, _ in seen] == [0, 4, 8, 12]


def test_resume_after_kill_completes_without_duplicates_or_losses(tmp_path):
    data = make_chartqa(tmp_path / "data", n=10)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_eval(data, ["local:m"], out, batch_size=3, open_backend=opener(FakeBackend(fail_after=2)))
    path = out / "m" / "samples.jsonl"
    assert len(samples(out / "m")) == 6
    with open(path, "ab") as f:                                   # the kill tore the next line in half
        f.write(b'{"id": "human/chart6.png/6", "predic')
    fake = FakeBackend()
    [summary] = run_eval(data, ["local:m"], out, batch_size=3, open_backend=opener(fake))
    rows = samples(out / "m")
    assert [r["id"] for r in rows] == [f"human/chart{i}.png/{i}" for i in range(10)]
    assert fake.calls == [3, 1]                                   # only the 4 missing samples were asked
    assert summary["timing"]["resumed_samples"] == 6 and summary["overall"]["relaxed_ref"] == 50.0


def test_rerun_is_identical_and_skips_everything(tmp_path):
    data = make_chartqa(tmp_path / "data", n=8)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "latency_s"} for r in rows]  # noqa: E731
    run_eval(data, ["local:m"], tmp_path / "a", open_backend=opener(FakeBackend()))
    run_eval(data, ["local:m"], tmp_path / "b", open_backend=opener(FakeBackend(max_batch=3)))
    assert strip(samples(tmp_path / "a" / "m")) == strip(samples(tmp_path / "b" / "m"))
    again = FakeBackend()
    run_eval(data, ["local:m"], tmp_path / "a", open_backend=opener(again))
    assert again.calls == [] and len(samples(tmp_path / "a" / "m")) == 8


def test_limit_takes_the_first_questions_and_can_grow(tmp_path):
    data = make_chartqa(tmp_path / "data", n=10)
    [s] = run_eval(data, ["local:m"], tmp_path / "out", limit=3, open_backend=opener(FakeBackend()))
    assert s["n"] == 3 and [r["id"].split("/")[1] for r in samples(tmp_path / "out" / "m")] == \
        ["chart0.png", "chart1.png", "chart2.png"]
    fake = FakeBackend()
    [s] = run_eval(data, ["local:m"], tmp_path / "out", limit=5, open_backend=opener(fake))
    assert s["n"] == 5 and fake.calls == [2]


def test_changed_settings_refuse_to_resume(tmp_path):
    data = make_chartqa(tmp_path / "data", n=4)
    run_eval(data, ["local:m"], tmp_path / "out", open_backend=opener(FakeBackend()))
    with pytest.raises(RunMismatch, match="prompt"):
        run_eval(data, ["local:m"], tmp_path / "out", prompt_suffix="", open_backend=opener(FakeBackend()))


def test_unreadable_image_is_recorded_wrong_and_the_run_goes_on(tmp_path):
    data = make_chartqa(tmp_path / "data", n=6)
    (tmp_path / "data" / "png" / "chart2.png").write_bytes(b"not a png")
    (tmp_path / "data" / "png" / "chart4.png").unlink()
    [s] = run_eval(data, ["local:m"], tmp_path / "out", open_backend=opener(FakeBackend()))
    rows = samples(tmp_path / "out" / "m")
    assert "not an image" in rows[2]["error"] and "not found" in rows[4]["error"]
    assert rows[2]["relaxed_ref"] == rows[4]["relaxed_norm"] == 0.0 and rows[0]["relaxed_ref"] == 1.0
    assert s["n"] == 6 and s["n_errors"] == 2 and s["overall"]["relaxed_ref"] == pytest.approx(100 / 6, abs=0.01)


def test_endpoints_get_concurrent_requests(tmp_path):
    data = make_chartqa(tmp_path / "data", n=9)
    fake = FakeBackend()
    [s] = run_eval(data, ["openai:http://host:8000/v1#llava"], tmp_path / "out", concurrency=3,
                   open_backend=opener(fake))
    assert fake.calls == [1] * 9 and s["execution"] == {"batch_size": 1, "concurrency": 3}
    rows = samples(tmp_path / "out" / "llava")
    assert [r["id"] for r in rows] == [f"human/chart{i}.png/{i}" for i in range(9)]   # dataset order again


def test_chartqa_folder_reports_human_and_augmented_splits(tmp_path):
    make_chartqa(tmp_path / "test", n=4, name="test_human.json")
    make_chartqa(tmp_path / "test", n=3, name="test_augmented.json")
    questions = load_questions(tmp_path / "test")
    assert [q["split"] for q in questions] == ["human"] * 4 + ["augmented"] * 3
    assert Path(questions[0]["image"]).is_file() and questions[0]["answers"] == ["0"]
    assert len(load_questions(tmp_path / "test", split="augmented")) == 3
    [s] = run_eval(tmp_path / "test", ["local:m"], tmp_path / "out", open_backend=opener(FakeBackend()))
    assert set(s["by_split"]) == {"human", "augmented"}


def test_chartqa_jsonl_with_images_flag(tmp_path):
    make_chartqa(tmp_path / "d", n=2)
    rows = json.loads((tmp_path / "d" / "test_human.json").read_text())
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = load_questions(tmp_path / "q.jsonl", images=tmp_path / "d" / "png")
    assert questions[1]["image"] == str((tmp_path / "d" / "png" / "chart1.png").resolve())


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ('{"a": 1}', "expected a list"),
    ('[{"imgname": "x.png", "query": "q"}]', "lacks \\['label'\\]"),
])
def test_malformed_dataset_gives_a_clear_message(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_questions(path)
    with pytest.raises(DatasetError, match="no such file"):
        load_questions(tmp_path / "missing.json")


def test_model_slugs_are_readable():
    assert model_slug("local:/ws/models/demo-llava") == "demo-llava"
    assert model_slug("local:/ws/models/demo-llava+/ws/runs/r1/adapter") == "demo-llava+r1-adapter"
    assert model_slug("openai:http://host:8000/v1#llava-1.5") == "llava-1.5"
    assert model_slug("sagemaker:my-endpoint") == "my-endpoint"


def test_cli_reports_a_malformed_dataset_without_a_traceback(tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2]")
    out = subprocess.run([sys.executable, "-m", "eval", "run", "--data", str(tmp_path / "bad.json"), "--model",
                          "local:x", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, env={**os.environ, "PYTHONPATH": "."})
    assert out.returncode == 2 and out.stderr.startswith("error:") and "Traceback" not in out.stderr


def test_real_tiny_llava_runs_batched_and_deterministic(tmp_path, demo_model):
    data = make_chartqa(tmp_path / "data", n=6)
    ref = f"local:{demo_model}"
    [a] = run_eval(data, [ref], tmp_path / "a", batch_size=4)
    [b] = run_eval(data, [ref], tmp_path / "b", batch_size=1)
    rows_a, rows_b = samples(tmp_path / "a" / "demo-llava"), samples(tmp_path / "b" / "demo-llava")
    assert a["n"] == 6 and all(isinstance(r["prediction"], str) for r in rows_a)
    assert [r["prediction"] for r in rows_a] == [r["prediction"] for r in rows_b]


def test_three_local_bases_in_one_run_all_answer(tmp_path, demo_model):
    """More bases than the pool's default two: none is unloaded while the run still asks it (it hung)."""
    import shutil
    import threading
    data = make_chartqa(tmp_path / "data", n=2)
    copies = [shutil.copytree(demo_model, tmp_path / name) for name in ("second", "third")]
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        out=run_eval(data, [f"local:{demo_model}", *(f"local:{c}" for c in copies)], tmp_path / "ev")), daemon=True)
    worker.start()
    worker.join(240)
    assert "out" in result, "the run did not finish"
    assert [s["n"] for s in result["out"]] == [2, 2, 2] and not any(s["n_errors"] for s in result["out"])


class EchoFirstWord(FakeBackend):
    def generate(self, requests):
        self.calls.append(len(requests))
        return [r.question.split()[0] for r in requests]


def test_our_dataset_folder_split_is_scored_per_kind_and_family(tmp_path):
    from charts import generate
    generate(6, seed=1, out_dir=tmp_path / "ds", split=(0.5, 0, 0.5))
    [s] = run_eval(tmp_path / "ds", ["local:m"], tmp_path / "out", split="test", open_backend=opener(EchoFirstWord()))
    rows = samples(tmp_path / "out" / "m")
    assert rows and {r["split"] for r in rows} == {"test"} and s["dataset"]["split"] == "test"
    assert set(s["by_chart_type"]) == {r["chart_type"] for r in rows}
    assert sum(g["n"] for g in s["by_family"].values()) == s["n"] == len(rows)
