"""`python -m eval side-by-side`: the Compare tab's terminal twin streams both sides of one question."""
import subprocess
import sys
from pathlib import Path

from eval.compare import Side

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "assets" / "examples" / "pie.png"


def test_side_by_side_prints_both_answers_with_short_names_and_verdicts(demo_model, tmp_path):
    from test_local_backend import make_adapter

    adapter = make_adapter(demo_model, tmp_path / "runs" / "r1" / "adapter")
    out = subprocess.run([sys.executable, "-m", "eval", "side-by-side", "--image", str(CHART), "--question",
                          "Which mode of transport has the highest share?", "--gold", "Car",
                          "--model", f"local:{demo_model}", "--model", f"local:{demo_model}+{adapter}",
                          "--max-new-tokens", "6"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert f"A  {Path(demo_model).name}  (local:{demo_model})" in text
    assert f"B  {Path(demo_model).name} + r1  (local:{demo_model}+{adapter})" in text
    assert text.count("(relaxed accuracy)") == 2 and text.count("tok/s") == 2


def test_live_lines_are_labelled_and_fit_the_terminal():
    from eval.__main__ import side_by_side_lines

    sides = [Side(ref="local:/m/demo-llava", text="a " * 200), Side(ref="local:/m/demo-llava+/r/r1/adapter",
                                                                   error="adapter folder not found", done=True)]
    a, b = side_by_side_lines(sides, width=60)
    assert a.startswith("A  demo-llava      │ a a") and len(a) <= 60 and a.endswith("…")
    assert b.startswith("B  demo-llava + r1 │ adapter folder not found")


def test_compare_help_says_it_is_the_paired_statistics():
    out = subprocess.run([sys.executable, "-m", "eval", "compare", "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert "Paired statistics" in out.stdout and "side-by-side" in out.stdout
