"""Fine-tune tab in a real browser: launch a local job on the demo model, watch it appear, stop it."""
import json

import pytest

from conftest import wait_for_table_text

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
    wait_for_table_text(page, "browser-run")
    assert "running" in job_statuses(workspace).values()
    page.get_by_role("button", name="Stop", exact=True).click()
    wait_for_table_text(page, "stopped")
    assert set(job_statuses(workspace).values()) <= {"stopped", "completed"}
