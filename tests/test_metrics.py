"""Scores against hand-checked tables: every trap of the reference rule (METRICS.md), in both modes."""
import sys

import pytest

from eval import metrics
from eval.metrics import (anls, bleu, exact_match, relaxed_correctness, relaxed_normalized, relaxed_reference,
                          rouge_l, score_sample)

# (gold, prediction, reference verdict, normalized verdict)
TRAPS = [
    ("45", "45%", 0, 1),              # % divides by 100 in the reference rule
    ("45%", "45", 0, 1),
    ("0.45", "45%", 1, 1),            # ...which makes the fraction right; normalized keeps that
    ("2010", "2008", 1, 0),           # years treated as numbers (0.1% off) vs exact for years
    ("2010", "2010.", 1, 1),          # float() accepts "2010." -- only words suffer from the period
    ("0", "0.0", 0, 1),               # a target of 0 falls through to string compare
    ("0.0", "0", 0, 1),
    ("1000", "1,000", 0, 1),          # thousands separators
    ("12.5", "$12.5", 0, 1),          # currency
    ("12.5", "12.5 million", 0, 1),   # units
    ("12500000", "12.5 million", 0, 1),
    ("yes", "Yes", 1, 1),             # case-insensitive in both
    ("Yes", "Yes.", 0, 1),            # trailing period
    ("Yes", " Yes\n", 0, 1),          # the reference does not strip (lmms-eval)
    ("100", "104.9", 1, 1),           # 5% relative tolerance
    ("100", "105.1", 0, 0),
    ("100", "95", 1, 1),
    ("100", "94.9", 0, 0),
    ("North", "north.", 0, 1),
    ("North", "south", 0, 0),
    ("-3", "-$3", 0, 1),
]


@pytest.mark.parametrize("gold,prediction,ref,norm", TRAPS)
def test_relaxed_traps_in_both_modes(gold, prediction, ref, norm):
    assert relaxed_reference(prediction, [gold]) == ref
    assert relaxed_normalized(prediction, [gold])[0] == norm


def test_reference_rule_is_the_published_function_verbatim():
    assert relaxed_correctness("1_000", "1000")          # Python's float() accepts underscores
    assert not relaxed_correctness("45", "45%")
    assert relaxed_correctness("50%", "0.5")
    assert relaxed_correctness("100", "105", max_relative_change=0.05)
    assert not relaxed_correctness("", "0")


def test_normalization_reports_what_it_changed():
    score, changes = relaxed_normalized("$1,200.", ["1200"])
    assert score == 1
    assert changes == ["pred: removed trailing period", "pred: removed thousands separators",
                       "pred: removed currency $"]
    assert relaxed_normalized("2008", ["2010"])[1] == ["gold is a year: exact match"]
    assert relaxed_normalized("Yes", ["yes"]) == (1.0, [])


def test_relaxed_takes_the_max_over_golds():
    assert relaxed_reference("7", ["3", "7"]) == 1
    assert relaxed_normalized("7.", ["3", "7"])[0] == 1
    assert relaxed_reference("7", []) == 0


@pytest.mark.parametrize("prediction,golds,expected", [
    ("Blue", ["blue"], 1.0),
    (" blue ", ["Blue"], 1.0),
    ("blue.", ["blue"], 0.0),
    ("red", ["blue", "red"], 1.0),
])
def test_exact_match(prediction, golds, expected):
    assert exact_match(prediction, golds) == expected


@pytest.mark.parametrize("prediction,golds,expected", [
    ("abc", ["abc"], 1.0),
    ("ABC", ["abc"], 1.0),                     # lowercased
    ("abd", ["abc"], 1 - 1 / 3),
    ("abxy", ["abcd"], 0.5),                   # NL exactly 0.5 is kept, as in the harness code
    ("axyz", ["abcd"], 0.0),                   # NL 0.75 -> 0
    ("a  b", ["a b"], 1 - 0 / 4),              # collapsed whitespace: distance 0
    ("a b  ", ["a b x"], 1 - 2 / 5),           # distance on cleaned text, divided by RAW lengths
    ("xyz", ["abc", "xyc"], 1 - 1 / 3),        # max over golds
    ("", [""], 1.0),
    ("ß", ["ss"], 0.0),                        # upper() makes ß two letters: raw length 2, distance 2
])
def test_anls_like_lmms_eval(prediction, golds, expected):
    assert anls(prediction, golds) == pytest.approx(expected)


def test_bleu_and_rouge_for_free_text():
    text = "sales rose steadily from 2010 to 2015"
    assert bleu(text, [text]) == pytest.approx(1.0)
    assert bleu("completely different words here", [text]) < 0.1
    assert rouge_l(text, ["nothing", text]) == pytest.approx(1.0)
    assert 0 < rouge_l("sales rose in 2015", [text]) < 1


def test_registry_and_score_sample():
    assert set(metrics.DEFAULT_METRICS) <= set(metrics.METRICS) == set(metrics.DESCRIPTIONS)
    out = score_sample("Yes.", ["yes"])
    assert out == {"relaxed_ref": 0.0, "relaxed_norm": 1.0, "norm_changes": ["pred: removed trailing period"],
                   "exact": 0.0, "anls": pytest.approx(0.75)}
    with pytest.raises(ValueError, match="unknown metric"):
        score_sample("a", ["a"], names=("accuracy",))


def test_importing_metrics_stays_light():
    import subprocess
    code = "import sys, eval.metrics; print(any(m in sys.modules for m in ('torch', 'sacrebleu', 'rouge_score')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
