"""Paired comparison of two runs on the same questions (base vs fine-tuned), and the per-sample browser of an
eval folder that the Benchmark tab shows (`sample_pairs`, `opening_outcome`).

Two averages hide which questions moved. Matching by id gives per-sample fixed / regressed lists, a
paired bootstrap CI of the accuracy difference and McNemar's exact test on the discordant pairs.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

from charts.io import read_jsonl
from eval.run import read_runs

GROUPS = {"by_family": "family", "by_chart_type": "chart_type", "by_split": "split"}


class QuestionSetMismatch(ValueError):
    """The two runs did not answer the same questions."""


def read_samples(run: str | Path) -> list[dict]:
    """Rows of a model folder (its samples.jsonl) or of a samples.jsonl file."""
    path = Path(run)
    path = path / "samples.jsonl" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no samples.jsonl (is this a model folder of an eval run?)")
    return list(read_jsonl(path))


def mcnemar_exact(fixed: int, regressed: int) -> float:
    """Two-sided exact McNemar p-value: binomial(n = discordant pairs, 1/2) tail, doubled, capped at 1.
    Exact rational arithmetic, so large counts neither overflow nor underflow."""
    n = fixed + regressed
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(fixed, regressed) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


def bootstrap_ci(a: list[float], b: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
                 ) -> tuple[float, float]:
    """Percentile CI of mean(b) - mean(a), resampling questions (pairs stay together)."""
    import numpy as np

    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n = len(diff)
    if n == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)            # bound memory to ~16 MB of indices at a time
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = diff[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def _counts(pairs: list[tuple[dict, dict]], metric: str) -> dict:
    right = [(ra[metric] >= 0.5, rb[metric] >= 0.5) for ra, rb in pairs]
    n = len(pairs)
    mean_a = sum(ra[metric] for ra, _ in pairs) / n if n else 0.0
    mean_b = sum(rb[metric] for _, rb in pairs) / n if n else 0.0
    return {"n": n, "a": round(100 * mean_a, 2), "b": round(100 * mean_b, 2), "delta": round(100 * (mean_b - mean_a), 2),
            "fixed": sum(1 for x, y in right if not x and y), "regressed": sum(1 for x, y in right if x and not y)}


def compare_samples(rows_a: list[dict], rows_b: list[dict], metric: str = "relaxed_ref", n_boot: int = 2000,
                    seed: int = 0) -> dict:
    """Paired statistics of run B against baseline A. A sample counts as right when its score >= 0.5
    (the binary metrics are 0/1; for ANLS that means it passed the threshold with at least 0.5)."""
    by_a, by_b = {r["id"]: r for r in rows_a}, {r["id"]: r for r in rows_b}
    only_a, only_b = sorted(set(by_a) - set(by_b)), sorted(set(by_b) - set(by_a))
    if only_a or only_b:
        raise QuestionSetMismatch(f"the runs answered different questions: {len(only_a)} only in A "
                                  f"(e.g. {only_a[:3]}), {len(only_b)} only in B (e.g. {only_b[:3]})")
    if rows_a and metric not in rows_a[0]:
        raise ValueError(f"metric {metric!r} not in the samples; have {sorted(k for k, v in rows_a[0].items() if isinstance(v, float))}")
    ids = [r["id"] for r in rows_a]            # A's order: the dataset order
    pairs = [(by_a[i], by_b[i]) for i in ids]
    outcome = {"fixed": [], "regressed": [], "both_right": [], "both_wrong": []}
    for i, (ra, rb) in zip(ids, pairs):
        a_ok, b_ok = ra[metric] >= 0.5, rb[metric] >= 0.5
        key = "both_right" if a_ok and b_ok else "fixed" if b_ok else "regressed" if a_ok else "both_wrong"
        outcome[key].append(i)
    overall = _counts(pairs, metric)
    low, high = bootstrap_ci([a[metric] for a, _ in pairs], [b[metric] for _, b in pairs], n_boot, seed)
    result = {
        "metric": metric, **overall,
        "both_right": len(outcome["both_right"]), "both_wrong": len(outcome["both_wrong"]),
        "ci95": [round(100 * low, 2), round(100 * high, 2)],
        "bootstrap": {"resamples": n_boot, "seed": seed},
        "mcnemar_p": mcnemar_exact(overall["fixed"], overall["regressed"]),
        "ids": outcome,
    }
    for key, field in GROUPS.items():
        groups: dict[str, list] = {}
        for ra, rb in pairs:
            groups.setdefault(str(ra.get(field) or "unknown"), []).append((ra, rb))
        result[key] = {k: _counts(v, metric) for k, v in sorted(groups.items())}
    return result


def compare_runs(run_a: str | Path, run_b: str | Path, metric: str = "relaxed_ref", n_boot: int = 2000,
                 seed: int = 0) -> dict:
    """`compare_samples` on two model folders (or samples.jsonl files); records which runs they were."""
    result = compare_samples(read_samples(run_a), read_samples(run_b), metric, n_boot, seed)
    return {"run_a": str(run_a), "run_b": str(run_b), **result}


def format_paired(result: dict) -> str:
    """A few lines for a terminal."""
    lines = [f"{result['metric']}: A {result['a']:.2f}  B {result['b']:.2f}  delta {result['delta']:+.2f} "
             f"(95% CI {result['ci95'][0]:+.2f} .. {result['ci95'][1]:+.2f}), McNemar p = {result['mcnemar_p']:.4g}",
             f"n {result['n']}: fixed {result['fixed']}, regressed {result['regressed']}, "
             f"both right {result['both_right']}, both wrong {result['both_wrong']}"]
    for key in ("by_family", "by_chart_type"):
        lines.append(key[3:].replace("_", " ") + ": " + ", ".join(
            f"{k} {v['delta']:+.1f} (+{v['fixed']}/-{v['regressed']})" for k, v in result[key].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- the per-sample browser of an eval folder
# outcome as a person picks it -> the key of compare_runs()["ids"] (None: every sample)
OUTCOMES = {"regressed": "regressed", "fixed": "fixed", "both wrong": "both_wrong", "both right": "both_right",
            "all": None}


def sample_pairs(eval_dir: str, slug_b: str | None, outcome: str) -> tuple[list[tuple[dict, dict | None]], str]:
    """(baseline row, other row) pairs of one outcome, and a paired-statistics line."""
    runs = read_runs(eval_dir)
    if not runs:
        return [], "no finished runs in this eval"
    base_dir = runs[0][0]
    rows_a = list(read_jsonl(base_dir / "samples.jsonl"))
    other = next((d for d, s in runs[1:] if s["slug"] == slug_b), None)
    if other is None:
        keep = [r for r in rows_a if outcome == "all" or (outcome == "both wrong" and r["relaxed_ref"] < 0.5)
                or (outcome == "both right" and r["relaxed_ref"] >= 0.5)]
        return [(r, None) for r in keep], f"one model only ({runs[0][1]['slug']}): no paired diff"
    pair = compare_runs(base_dir, other, n_boot=1000)
    rows_b = {r["id"]: r for r in read_jsonl(other / "samples.jsonl")}
    ids = set(pair["ids"][OUTCOMES[outcome]]) if OUTCOMES[outcome] else None
    pairs = [(r, rows_b[r["id"]]) for r in rows_a if ids is None or r["id"] in ids]
    line = (f"**{pair['metric']}**: {runs[0][1]['slug']} {pair['a']:.1f} → {slug_b} {pair['b']:.1f} "
            f"(**{pair['delta']:+.1f}**, 95% CI {pair['ci95'][0]:+.1f}..{pair['ci95'][1]:+.1f}, McNemar p "
            f"{pair['mcnemar_p']:.3g}) · fixed {pair['fixed']} · regressed {pair['regressed']} · "
            f"both right {pair['both_right']} · both wrong {pair['both_wrong']}")
    return pairs, line


def opening_outcome(eval_dir: str | None, slug_b: str | None) -> str:
    """"fixed" when the compared model fixed any sample (what a fine-tune demo is about), else "regressed"."""
    runs = read_runs(eval_dir) if eval_dir else []
    other = next((d for d, s in runs[1:] if s["slug"] == slug_b), None)
    if other is None:
        return "regressed"
    wrong_a = {r["id"] for r in read_jsonl(runs[0][0] / "samples.jsonl") if r["relaxed_ref"] < 0.5}
    fixed = any(r["id"] in wrong_a and r["relaxed_ref"] >= 0.5 for r in read_jsonl(other / "samples.jsonl"))
    return "fixed" if fixed else "regressed"
