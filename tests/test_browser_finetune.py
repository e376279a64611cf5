"""Fine-tune tab in a real browser: launch a local job on the demo model, watch it appear, stop it."""
import json

import pytest

from conftest import wait_for_cell_text

pytestmark = pytest.mark.browser


def job_statuses(workspace):
    latest = {}
    for line in (workspace / "jobs.jsonl").read_text().splitlines():
        row = json.loads(line)
        latest[row["id"]] = row["status"]
    return latest


def test_launch_a_local_job_then_stop_it(studio_page):
    page, workspace = studio_page
    page.get_by_role("tab", name="Fine-tune").click()
    page.get_by_label("Run name (runs/NAME-timestamp)").fill("browser-run")
    page.get_by_role("button", name="Launch", exact=True).click()
    page.get_by_text("launched browser-run").wait_for()
    wait_for_cell_text(page, "browser-run")          # cells on screen: the table lists other tabs' jobs too
    assert "running" in job_statuses(workspace).values()
    page.get_by_role("button", name="Stop", exact=True).click()
    for _ in range(120):                             # the Stop event returns once the process group ended
        if "running" not in job_statuses(workspace).values():
            break
        page.wait_for_timeout(500)
    wait_for_cell_text(page, "stopped")
    assert set(job_statuses(workspace).values()) <= {"stopped", "completed"}


def test_compare_this_checkpoint_opens_compare_on_the_jobs_base_and_adapter(studio_page):
    from training.launchers import record

    page, workspace = studio_page
    import shutil
    # a copy of the demo adapter as another finished run, so side B's default cannot pass for it
    adapter = workspace / "runs" / "finished-run" / "adapter"
    shutil.copytree(workspace / "runs" / "demo-adapter" / "adapter", adapter, dirs_exist_ok=True)
    base = workspace / "models" / "demo-llava"
    record(workspace, {"id": "finished-run", "kind": "local", "name": "finished-run", "status": "completed",
                       "pid": 0, "config": "", "output_dir": str(adapter.parent), "log": "", "created": 0,
                       "model": str(base), "data": "", "mode": "lora"})
    page.reload()
    page.get_by_role("tab", name="Fine-tune").click()
    page.get_by_label("Job", exact=True).fill("finished-run")
    page.keyboard.press("Enter")
    page.get_by_role("button", name="Compare this checkpoint").click()
    page.get_by_label("Side B model").wait_for()
    # the dropdown shows the short name of base + this run's adapter (its value is the full ref)
    page.wait_for_function("v => [...document.querySelectorAll('input')].some(i => i.value === v)",
                           arg="demo-llava + finished-run")


def test_a_job_recorded_elsewhere_appears_on_reload_in_the_table_and_the_picker(studio_page):
    from training.launchers import record

    page, workspace = studio_page
    record(workspace, {"id": "cli-job", "kind": "local", "name": "cli-job", "status": "completed", "pid": 0,
                       "config": "", "output_dir": str(workspace / "runs" / "cli-job"), "log": "", "created": 0,
                       "model": "m", "data": "", "mode": "lora"})
    page.reload()
    page.get_by_role("tab", name="Fine-tune").click()
    wait_for_cell_text(page, "cli-job")
    page.get_by_label("Job", exact=True).click()
    page.get_by_role("option", name="cli-job").wait_for()
