"""Charts tab in a real browser: generate a small dataset, see it, read a chart's questions, validate, export."""
import json
import re

import pytest

pytestmark = pytest.mark.browser


def test_generate_browse_validate_and_export(studio_page):
    page, workspace = studio_page
    page.get_by_role("tab", name="Charts").click()
    page.get_by_label("Dataset name").fill("browser-charts")
    page.get_by_label("Charts", exact=True).fill("12")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.get_by_text("browser-charts: 12 charts").wait_for(timeout=120_000)
    manifest = json.loads((workspace / "datasets/browser-charts/dataset.json").read_text())
    assert manifest["counts"]["charts"] == 12
    report = page.get_by_label("Validation report")
    page.wait_for_function("el => el.value.includes('OK')", arg=report.element_handle())

    page.locator(".gallery-item, button.thumbnail-item").first.click()
    page.get_by_text(re.compile(r"Q \(\w+, \w+\)")).first.wait_for()   # the chart's own questions and answers

    page.get_by_role("button", name="Random example").click()
    page.get_by_text(re.compile(r"· id \S+")).first.wait_for()

    page.get_by_role("button", name="Export selected dataset").click()
    page.get_by_text(".zip", exact=False).first.wait_for()


def test_a_dataset_generated_from_the_command_line_appears_on_reload(studio_page):
    import charts

    page, workspace = studio_page
    charts.generate(2, seed=1, out_dir=workspace / "datasets" / "cli-charts", workers=1)
    page.reload()
    page.get_by_role("tab", name="Charts").click()
    page.get_by_label("Dataset", exact=True).click()
    page.get_by_role("option", name="cli-charts").wait_for()
