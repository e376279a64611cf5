"""Blind comparisons map votes back to the real models; the votes leaderboard: win rates with Wilson
intervals and Bradley-Terry strengths; `python -m eval votes`."""
import json
import random
import subprocess
import sys

import pytest

from eval import compare
from eval.votes import bradley_terry, format_board, games, leaderboard, read_votes, wilson


def test_blind_order_is_a_permutation_and_shuffles_over_draws():
    rng = random.Random(0)
    orders = {tuple(compare.blind_order(rng)) for _ in range(50)}
    assert orders == {(0, 1), (1, 0)}


@pytest.mark.parametrize("order,vote,real_vote,winner", [
    ([0, 1], "A better", "A better", "local:base"),
    ([1, 0], "A better", "B better", "local:base+r1"),     # A on screen was the real B
    ([1, 0], "B better", "A better", "local:base"),
    ([1, 0], "tie", "tie", None),
])
def test_unblind_maps_the_shown_sides_back_to_the_real_refs(order, vote, real_vote, winner):
    real = ["local:base", "local:base+r1"]
    shown = [real[i] for i in order]                        # what each shown side ran
    out = compare.unblind(vote, order, shown)
    assert out["vote"] == real_vote and out["winner"] == winner and out["models"] == real


def test_a_blind_vote_records_the_winner_and_what_was_clicked(tmp_path):
    real = ["local:base", "local:base+r1"]
    order = [1, 0]
    sides = [compare.Side(ref=real[i], text=t) for i, t in zip(order, ("12", "10"))]
    result = compare.CompareResult("q?", sides, settings={"max_new_tokens": 8, "blind_order": order})
    row = compare.record_vote(tmp_path, "A better", "", result)
    assert row["blind"] and row["shown_vote"] == "A better"
    assert row["vote"] == "B better" and row["winner"] == "local:base+r1" and row["loser"] == "local:base"
    assert row["models"] == real and read_votes(tmp_path)[0]["winner"] == "local:base+r1"


def test_an_open_vote_is_recorded_as_cast():
    sides = [compare.Side(ref="local:a"), compare.Side(ref="local:b")]
    row = compare.unblind("B better", None, [s.ref for s in sides])
    assert row == {"vote": "B better", "winner": "local:b", "loser": "local:a", "models": ["local:a", "local:b"]}


def test_wilson_interval_is_wide_for_few_votes_and_narrow_for_many():
    low, high = wilson(3, 4)
    assert 0.2 < low < 0.35 and 0.9 < high <= 1.0
    low, high = wilson(750, 1000)
    assert high - low < 0.06 and low < 0.75 < high
    assert wilson(0, 0) == (0.0, 1.0)


def test_bradley_terry_ranks_by_who_beat_whom():
    played = [("a", "b", 1.0)] * 8 + [("a", "b", 0.0)] * 2 + [("b", "c", 1.0)] * 8 + [("b", "c", 0.0)] * 2
    s = bradley_terry(played)
    assert s["a"] > s["b"] > s["c"] > 0 and sum(s.values()) == pytest.approx(1.0)
    assert s["a"] / (s["a"] + s["b"]) == pytest.approx(0.8, abs=0.05)    # P(a beats b) near its record


def _vote(a, b, vote):
    return {"vote": vote, "models": [a, b], "sides": [{"ref": a}, {"ref": b}]}


def test_leaderboard_counts_wins_ties_and_both_bad(tmp_path):
    rows = [_vote("local:base", "local:base+r1", "B better")] * 6 + [_vote("local:base", "local:base+r1", "A better")] \
        + [_vote("local:base", "local:base+r1", "tie")] * 2 + [_vote("local:base", "local:base+r1", "both bad")]
    board = leaderboard(rows)
    assert [r["model"] for r in board] == ["local:base+r1", "local:base"]
    top = board[0]
    assert (top["games"], top["wins"], top["losses"], top["ties"], top["both_bad"]) == (9, 6, 1, 2, 1)
    assert top["win_rate"] == pytest.approx(100 * 7 / 9, abs=0.1)
    assert top["ci95_low"] < top["win_rate"] < top["ci95_high"]
    assert len(games(rows)) == 9


def test_old_votes_without_models_use_their_sides():
    old = {"vote": "A better", "sides": [{"ref": "local:x"}, {"ref": "local:y"}]}
    assert games([old]) == [("local:x", "local:y", 1.0)]


def test_votes_cli_prints_the_leaderboard(tmp_path):
    with open(tmp_path / "votes.jsonl", "w") as f:
        for row in [_vote("local:/m/demo-llava", "local:/m/demo-llava+/runs/r1/adapter", "B better")] * 3:
            f.write(json.dumps(row) + "\n")
    out = subprocess.run([sys.executable, "-m", "eval", "votes", "--workspace", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].startswith("demo-llava + r1") and "100.0" in lines[1] and "/m/" not in out.stdout
    assert format_board([]).startswith("no votes yet")
