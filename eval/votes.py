"""The votes leaderboard: what people preferred in the Compare tab (workspace/votes.jsonl), per model.

    python -m eval votes --workspace workspace

Each vote between two models is one game: "A better" / "B better" a win and a loss, "tie" half a win
each, "both bad" no preference (counted apart). Per model: the win rate with a 95% Wilson interval
(few votes give a wide interval, and the table says so), and a Bradley-Terry strength fitted over all
games, so a model that beat strong opponents ranks above one that beat weak ones. Pure Python.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from charts.io import read_jsonl

Z95 = 1.959964


def games(rows) -> list[tuple[str, str, float]]:
    """(model A, model B, A's score: 1 win, 0.5 tie, 0 loss) for each preference vote; "both bad" and
    votes on one model against itself are left out."""
    out = []
    for row in rows:
        models = row.get("models") or [s.get("ref", "") for s in row.get("sides", [])]
        vote = row.get("vote")
        if len(models) != 2 or not all(models) or models[0] == models[1]:
            continue
        score = {"A better": 1.0, "B better": 0.0, "tie": 0.5}.get(vote)
        if score is not None:
            out.append((models[0], models[1], score))
    return out


def wilson(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (as fractions); (0, 1) with no data."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bradley_terry(played: list[tuple[str, str, float]], iterations: int = 200, prior: float = 0.5) -> dict[str, float]:
    """Bradley-Terry strengths by Hunter's MM iteration, normalized to sum to 1 (P(i beats j) = s_i/(s_i+s_j)).
    `prior` adds that many virtual tie games between each pair that met, so a model with no win keeps a
    finite strength instead of going to zero."""
    wins: dict[str, float] = defaultdict(float)
    meetings: dict[tuple[str, str], float] = defaultdict(float)
    for a, b, score in played:
        wins[a] += score
        wins[b] += 1 - score
        meetings[tuple(sorted((a, b)))] += 1
    for pair in meetings:
        meetings[pair] += prior
        for m in pair:
            wins[m] += prior / 2
    strength = {m: 1.0 for m in wins}
    for _ in range(iterations):
        new = {}
        for m in strength:
            denom = sum(n / (strength[a] + strength[b]) for (a, b), n in meetings.items() if m in (a, b))
            new[m] = wins[m] / denom if denom else strength[m]
        total = sum(new.values()) or 1.0
        strength = {m: v / total for m, v in new.items()}
    return strength


def leaderboard(rows) -> list[dict]:
    """One row per model, strongest first: games, wins, losses, ties, both_bad, win rate and its 95% interval
    (in percent), Bradley-Terry strength."""
    rows = list(rows)
    played = games(rows)
    tally: dict[str, dict] = defaultdict(lambda: {"games": 0, "wins": 0, "losses": 0, "ties": 0, "both_bad": 0})
    for a, b, score in played:
        for model, s in ((a, score), (b, 1 - score)):
            t = tally[model]
            t["games"] += 1
            t["wins" if s == 1 else "losses" if s == 0 else "ties"] += 1
    for row in rows:
        if row.get("vote") == "both bad":
            for model in set(row.get("models") or [s.get("ref", "") for s in row.get("sides", [])]):
                if model:
                    tally[model]["both_bad"] += 1
    strengths = bradley_terry(played)
    board = []
    for model, t in tally.items():
        score = t["wins"] + 0.5 * t["ties"]
        low, high = wilson(score, t["games"])
        board.append({"model": model, **t,
                      "win_rate": round(100 * score / t["games"], 1) if t["games"] else None,
                      "ci95_low": round(100 * low, 1), "ci95_high": round(100 * high, 1),
                      "bt_strength": round(strengths.get(model, 0.0), 3)})
    board.sort(key=lambda r: (-r["bt_strength"], -(r["win_rate"] or 0)))
    return board


def read_votes(workspace: str | Path) -> list[dict]:
    path = Path(workspace) / "votes.jsonl"
    return list(read_jsonl(path)) if path.is_file() else []


def format_board(board: list[dict]) -> str:
    """The leaderboard as terminal lines, short model names."""
    from eval.display import short_name

    if not board:
        return "no votes yet (vote in the Compare tab: workspace/votes.jsonl)"
    lines = [f"{'model':40s} {'win %':>6s} {'95% CI':>13s} {'BT':>6s} {'games':>5s} {'W-L-T':>9s} {'both bad':>8s}"]
    for r in board:
        rate = f"{r['win_rate']:.1f}" if r["win_rate"] is not None else "-"
        lines.append(f"{short_name(r['model'])[:40]:40s} {rate:>6s} {r['ci95_low']:5.1f}-{r['ci95_high']:5.1f}% "
                     f"{r['bt_strength']:6.3f} {r['games']:5d} {r['wins']:>3d}-{r['losses']}-{r['ties']:<3d} "
                     f"{r['both_bad']:8d}")
    return "\n".join(lines)
