"""Benchmark tab in a real browser: score base vs adapter on the demo test split, read the leaderboard,
browse the per-sample diff and build the reports."""
import re

import pytest

from conftest import wait_for_cell_text, wait_for_table_text

pytestmark = pytest.mark.browser


def start_benchmark(page, limit: str, name: str) -> None:
    """Open the Benchmark tab and run the default models on the demo dataset under `name`."""
    page.get_by_role("tab", name="Benchmark").click()
    page.get_by_label("Limit (0 = all)").fill(limit)
    page.get_by_label("Eval name").fill(name)
    page.get_by_role("button", name="Run benchmark").click()


def test_run_base_vs_adapter_then_browse_and_export(studio_page):
    page, workspace = studio_page
    start_benchmark(page, "6", "browser-eval")
    page.get_by_text("Finished browser-eval").wait_for(timeout=120_000)
    summaries = sorted(workspace.glob("evals/browser-eval/*/summary.json"))
    assert len(summaries) == 2                          # base and base + demo adapter
    wait_for_table_text(page, "browser-eval")
    page.get_by_text("McNemar").wait_for()              # the paired line of the per-sample browser
    page.get_by_role("button", name="Build reports").click()
    page.wait_for_timeout(3000)                          # the reports are written, then offered
    with page.expect_download() as download:
        page.get_by_role("button", name="HTML", exact=True).click()
    html = download.value.path().read_text()
    assert download.value.suggested_filename == "report.html" and "<html" in html and "http://" not in html


def test_an_eval_run_from_the_command_line_appears_on_reload_with_its_samples(studio_page):
    from eval.run import run_eval

    page, workspace = studio_page
    base = workspace / "models" / "demo-llava"
    adapter = workspace / "runs" / "demo-adapter" / "adapter"
    run_eval(str(workspace / "datasets" / "demo"), [f"local:{base}", f"local:{base}+{adapter}"],
             workspace / "evals" / "cli-eval", split="test", limit=4)
    page.reload()                                        # no Refresh click: the page load reads the workspace
    page.get_by_role("tab", name="Benchmark").click()
    wait_for_cell_text(page, "cli-eval")
    wait_for_cell_text(page, "demo-llava + demo-adapter")   # short model names in the leaderboard
    page.get_by_text("McNemar").wait_for()               # the newest eval is opened, its per-sample diff shown


def test_a_running_benchmark_stops_and_is_still_stopped_after_a_reload(studio_page):
    from training.launchers import read_jobs

    page, workspace = studio_page
    start_benchmark(page, "0", "browser-stop")
    running = page.get_by_text(re.compile(r"Benchmark job bench-\d+ · running"))
    running.wait_for()
    short = re.search(r"bench-\d+", running.text_content()).group(0)
    page.get_by_role("button", name="Stop benchmark").click()
    page.get_by_text(f"Benchmark job {short} · stopped").wait_for()
    job = next(j for j in read_jobs(workspace).values() if j["short"] == short)
    assert job["status"] == "stopped" and not list((workspace / "evals" / "browser-stop").glob("*/summary.json"))
    page.reload()                                        # a new page: the job is read back from the workspace
    page.get_by_role("tab", name="Benchmark").click()
    page.get_by_text(f"Benchmark job {short} · stopped").wait_for()
