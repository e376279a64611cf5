"""Paired comparison: outcome counts and ids, McNemar by hand, bootstrap coverage, mismatched sets."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from charts.io import write_jsonl
from eval.paired import QuestionSetMismatch, bootstrap_ci, compare_runs, compare_samples, mcnemar_exact


def rows(scores, families=None):
    return [{"id": f"q{i}", "family": (families or ["f"] * len(scores))[i], "chart_type": "bar" if i % 2 else "pie",
             "split": "test", "relaxed_ref": float(s)} for i, s in enumerate(scores)]


@pytest.mark.parametrize("fixed,regressed,expected", [
    (1, 6, 2 * (1 + 7) / 2 ** 7),        # 0.125
    (0, 5, 2 / 32),
    (6, 1, 0.125),                       # symmetric
    (3, 3, 1.0),                         # capped at 1
    (0, 0, 1.0),
    (10, 30, 2 * sum(math.comb(40, k) for k in range(11)) / 2 ** 40),
])
def test_mcnemar_exact_matches_hand_computation(fixed, regressed, expected):
    assert mcnemar_exact(fixed, regressed) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_does_not_overflow_on_large_runs():
    assert 0 < mcnemar_exact(2000, 2200) < 0.01


def test_outcomes_ids_and_group_deltas():
    a = rows([1, 1, 0, 0, 1, 0], families=["x", "x", "x", "y", "y", "y"])
    b = rows([1, 0, 1, 1, 1, 0], families=["x", "x", "x", "y", "y", "y"])
    r = compare_samples(a, list(reversed(b)), n_boot=200)      # matched by id, not by position
    assert r["ids"] == {"fixed": ["q2", "q3"], "regressed": ["q1"], "both_right": ["q0", "q4"], "both_wrong": ["q5"]}
    assert (r["fixed"], r["regressed"], r["both_right"], r["both_wrong"]) == (2, 1, 2, 1)
    assert r["a"] == 50.0 and r["b"] == pytest.approx(66.67) and r["delta"] == pytest.approx(16.67)
    assert r["by_family"]["x"] == {"n": 3, "a": pytest.approx(66.67), "b": pytest.approx(66.67), "delta": 0.0,
                                   "fixed": 1, "regressed": 1}
    assert r["by_family"]["y"]["delta"] == pytest.approx(33.33) and set(r["by_chart_type"]) == {"bar", "pie"}
    assert r["mcnemar_p"] == 1.0


def test_different_question_sets_are_refused_with_counts():
    with pytest.raises(QuestionSetMismatch, match=r"3 only in A .* 1 only in B"):
        compare_samples(rows([1, 1, 1, 0]), rows([1]) + [{"id": "extra", "relaxed_ref": 1.0}])


def test_bootstrap_is_seeded_and_covers_the_true_difference():
    rng = np.random.default_rng(1)
    true_diff = 0.10
    covered = 0
    for trial in range(60):
        a = rng.random(300) < 0.5
        b = np.where(rng.random(300) < 0.8, a, rng.random(300) < 0.5 + true_diff)  # correlated pairs
        low, high = bootstrap_ci(a.astype(float), b.astype(float), n_boot=400, seed=trial)
        covered += low <= (0.5 + 0.2 * true_diff) - 0.5 <= high
    # b's accuracy is 0.8 * 0.5 + 0.2 * 0.6 = 0.52, so the true paired difference is 0.02
    assert 0.85 <= covered / 60 <= 1.0
    assert bootstrap_ci([0, 1, 1], [1, 1, 0], seed=3) == bootstrap_ci([0, 1, 1], [1, 1, 0], seed=3)
    low, high = bootstrap_ci([0.0] * 100, [1.0] * 50 + [0.0] * 50)
    assert low <= 0.5 <= high and low > 0.35


def test_compare_cli_writes_paired_json(tmp_path):
    write_jsonl(tmp_path / "a" / "samples.jsonl", rows([0, 0, 0, 1]))
    write_jsonl(tmp_path / "b" / "samples.jsonl", rows([1, 1, 1, 1]))
    r = compare_runs(tmp_path / "a", tmp_path / "b", n_boot=100)
    assert r["fixed"] == 3 and r["ci95"][0] > 0
    out = subprocess.run([sys.executable, "-m", "eval", "compare", str(tmp_path / "a"), str(tmp_path / "b"),
                          "--out", str(tmp_path / "p.json")], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, env={**os.environ, "PYTHONPATH": "."})
    assert out.returncode == 0, out.stderr
    assert "fixed 3, regressed 0" in out.stdout
    assert json.loads((tmp_path / "p.json").read_text())["mcnemar_p"] == 0.25
