"""Reports: the HTML opens offline (nothing fetched), CSV has every sample, JSON carries the paired stats."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eval.report import write_reports
from eval.run import run_eval
from test_eval_run import FakeBackend, make_chartqa


class BetterFake(FakeBackend):
    """Right on every multiple of 3 (and on 0), so against FakeBackend some samples are fixed, some regressed."""

    def generate(self, requests):
        out = []
        for r in requests:
            i = int(r.question.split("value ")[1].split("?")[0])
            out.append(str(i) if i % 3 == 0 else "<b>nope</b>")
        return out


@pytest.fixture
def eval_dir(tmp_path):
    data = make_chartqa(tmp_path / "data", n=12)
    backends = {"local:/m/base": FakeBackend(), "local:/m/base+/runs/r1/adapter": BetterFake()}
    run_eval(data, list(backends), tmp_path / "evals" / "demo", open_backend=lambda ref, **o: backends[ref])
    return tmp_path / "evals" / "demo"


def test_html_report_is_self_contained(eval_dir):
    paths = write_reports(eval_dir)
    page = paths["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page and "<link" not in page
    assert page.count('src="data:image/png;base64,') >= 2 + 4          # 2 charts + thumbnails
    assert "&lt;b&gt;nope&lt;/b&gt;" in page and "<b>nope</b>" not in page  # predictions are escaped
    assert "Regressed examples (4)" in page


def test_html_report_shows_fixed_and_regressed_examples_with_their_images(eval_dir):
    page = write_reports(eval_dir)["html"].read_text()
    pair = json.loads((eval_dir / "report.json").read_text())["paired"][0]
    assert pair["fixed"] > 0 and pair["regressed"] > 0
    fixed = page.index(f"Fixed examples ({pair['fixed']})")
    regressed = page.index(f"Regressed examples ({pair['regressed']})")
    assert fixed < regressed                                # the fixes come first
    assert page[fixed:regressed].count('<div class="ex"><img src="data:image/png;base64,') == pair["fixed"]
    assert page[regressed:].count('<div class="ex"><img src="data:image/png;base64,') == pair["regressed"]
    assert "&#10003;" in page and "&#10007;" in page        # right / wrong marks any font draws


def test_csv_has_every_sample_of_every_model(eval_dir):
    paths = write_reports(eval_dir)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and {r["model"] for r in rows} == {"base", "base+r1-adapter"}
    assert rows[0]["golds"] == "0" and rows[0]["relaxed_ref"] == "1.0"


def test_json_report_holds_summaries_and_paired(eval_dir):
    report = json.loads(write_reports(eval_dir)["json"].read_text())
    [pair] = report["paired"]
    # base right on even i; better right on multiples of 3: fixed 3, 9; regressed 2, 4, 8, 10
    assert pair["ids"]["fixed"] == ["human/chart3.png/3", "human/chart9.png/9"]
    assert pair["regressed"] == 4 and pair["both_right"] == 2 and pair["both_wrong"] == 4
    assert [s["slug"] for s in report["summaries"]] == ["base", "base+r1-adapter"]


def test_report_cli(eval_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "eval", "report", str(eval_dir), "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent,
                         env={**os.environ, "PYTHONPATH": "."})
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["report.csv", "report.html", "report.json"]
