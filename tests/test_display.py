"""eval.display: short names for models and paths, one accuracy unit, readable status lines; and the tables
and plots of the tabs that use them."""
import pytest

from eval.display import pct, rounded, short_name, status_line


@pytest.mark.parametrize("text,short", [
    ("local:/w/models/demo-llava", "demo-llava"),
    ("local:llava-hf/llava-1.5-7b-hf", "llava-1.5-7b-hf"),
    ("local:/w/models/demo-llava+/w/runs/r1-20261201-1030/adapter", "demo-llava + r1-20261201-1030"),
    ("local:/w/models/demo-llava+/w/runs/r2/checkpoint-40", "demo-llava + r2/checkpoint-40"),
    ("sagemaker:chart-ep", "chart-ep (SageMaker)"),
    ("openai:http://127.0.0.1:8000/v1#llava-hf/llava-1.5-7b-hf", "llava-1.5-7b-hf (OpenAI API)"),
    ("/w/evals/demo-test-20261201/", "demo-test-20261201"),
    ("/w/runs/r1/adapter", "r1"),
    ("", ""),
])
def test_short_name_keeps_what_tells_models_apart(text, short):
    assert short_name(text) == short


def test_two_adapters_of_one_base_get_different_short_names():
    a = short_name("local:/w/models/demo-llava+/w/runs/r1/adapter")
    b = short_name("local:/w/models/demo-llava+/w/runs/r2/adapter")
    assert a != b and "/w/" not in a + b


def test_pct_turns_fractions_into_rounded_percentages():
    assert pct(0.45678) == 45.7 and pct(1) == 100.0 and pct(None) is None
    assert rounded(12.3456) == 12.3 and rounded(3) == 3 and rounded(None) is None and rounded("x") == "x"


def test_status_line_is_words_not_a_dict():
    line = status_line({"step": 40, "loss": 0.412345, "eval_relaxed_accuracy": None, "tokens": 1234.5})
    assert line == "step 40 · loss 0.412 · tokens 1,234.5"
    assert "{" not in line


def test_finetune_jobs_table_shows_accuracy_in_percent_and_rounded_losses(tmp_path):
    from training.launchers import record
    from studio.finetune_tab import _jobs_table

    out = tmp_path / "runs" / "r1"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 5, "loss": 1.234567}\n'
                                       '{"step": 10, "eval_loss": 0.98765, "eval_relaxed_accuracy": 0.4567}\n')
    record(tmp_path, {"id": "r1", "kind": "local", "name": "r1", "status": "completed", "pid": 0, "config": "",
                      "output_dir": str(out), "log": "", "created": 0, "model": "m", "data": "", "mode": "lora"})
    table = _jobs_table(tmp_path)
    row = table.iloc[0]
    assert list(table.columns[:7]) == ["job", "status", "progress (%)", "step", "loss", "eval_loss",
                                       "eval accuracy (%)"]
    assert row["job"] == "train-1" and row["progress (%)"] == 100.0 and row["id"] == "r1"
    assert row["eval accuracy (%)"] == 45.7 and row["loss"] == 1.235 and row["eval_loss"] == 0.988


def test_training_chart_marks_every_point_and_shows_accuracy_in_percent():
    from eval.report import training_chart

    fig = training_chart([{"step": s, "loss": 1 / s} for s in range(1, 9)]
                         + [{"step": 8, "eval_loss": 0.5, "eval_relaxed_accuracy": 0.25}])
    loss_ax, acc_ax = fig.axes
    assert all(line.get_marker() not in (None, "", "None") for ax in fig.axes for line in ax.lines)
    [acc] = acc_ax.lines
    assert list(acc.get_ydata()) == [25.0]           # one eval point, visible, in percent
    assert {line.get_label() for line in loss_ax.lines} == {"loss", "eval loss"}


def test_per_kind_bars_stay_legible_at_half_width():
    from charts import KINDS
    from eval.report import bar_chart

    summaries = [{"slug": s, "by_chart_type": {k: {"relaxed_ref": 50.0} for k in KINDS}} for s in ("a", "b")]
    fig = bar_chart(summaries, "by_chart_type")
    width, height = fig.get_size_inches()
    assert width <= 6.5                                # fits half a page without shrinking the labels
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()][-1] == "area"     # names horizontal, A on top
    assert all(t.get_rotation() == 0 for t in ax.get_yticklabels())


def test_benchmark_leaderboard_leads_with_scores_and_short_model_names(tmp_path):
    import json

    from studio.benchmark_tab import leaderboard
    from studio.context import Studio

    run = tmp_path / "evals" / "e1" / "demo-llava+r1-adapter"
    run.mkdir(parents=True)
    ref = f"local:{tmp_path}/models/demo-llava+{tmp_path}/runs/r1/adapter"
    run.joinpath("summary.json").write_text(json.dumps({
        "model": ref, "n": 6, "n_errors": 0, "dataset": {"path": str(tmp_path / "datasets" / "d"), "split": "test"},
        "overall": {"relaxed_ref": 33.33333, "relaxed_norm": 50.0, "exact": 16.666, "anls": 40.12345},
        "timing": {"finished": "2026-12-01T10:00:00"}}))
    board = leaderboard(Studio(tmp_path, "base"))
    assert list(board.columns[:2]) == ["model", "relaxed_ref"] and board.columns[-1] == "model ref"
    row = board.iloc[0]
    assert row["model"] == "demo-llava + r1" and row["relaxed_ref"] == 33.3 and row["model ref"] == ref


def test_benchmark_opens_on_fixed_samples_when_there_are_any(tmp_path):
    from test_eval_run import FakeBackend, make_chartqa
    from test_report import BetterFake

    from eval.run import run_eval
    from studio.benchmark_tab import opening_outcome

    data = make_chartqa(tmp_path / "data", n=12)
    backends = {"local:/m/base": FakeBackend(), "local:/m/base+/runs/r1/adapter": BetterFake()}
    run_eval(data, list(backends), tmp_path / "evals" / "e", open_backend=lambda ref, **o: backends[ref])
    assert opening_outcome(str(tmp_path / "evals" / "e"), "base+r1-adapter") == "fixed"
    same = {"local:/m/base": FakeBackend(), "local:/m/copy": FakeBackend()}      # nothing fixed: regressed view
    run_eval(data, list(same), tmp_path / "evals" / "s", open_backend=lambda ref, **o: same[ref])
    assert opening_outcome(str(tmp_path / "evals" / "s"), "copy") == "regressed"
    assert opening_outcome(None, None) == "regressed"
