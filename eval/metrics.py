"""Per-sample scores for chart/document QA. Pure functions of (prediction, gold answers); no heavy imports.

Two relaxed-accuracy rules, named plainly (see docs in METRICS.md):
- `relaxed_reference`: ChartQA's rule bit-for-bit, as lmms-eval and VLMEvalKit run it, so numbers
  compare with published ones -- traps included (`Yes.` is wrong, `1,000` != `1000`, `45` != `45%`).
- `relaxed_normalized`: the same 5% rule after documented clean-ups; it also returns what it changed,
  so a report can show why a sample flipped.

Every metric takes `(prediction, golds)` and returns a score in [0, 1], the max over the golds.
"""
from __future__ import annotations

import re
from functools import lru_cache


# ---------------------------------------------------------------- ChartQA relaxed accuracy, reference
def _to_float(text):
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0   # percent sign divides by 100
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    """The reference rule, unchanged: do not 'fix' it, published numbers depend on its quirks."""
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:                      # a target of 0 falls through to string compare
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_reference(prediction: str, golds: list[str]) -> float:
    """Max over gold answers of the reference rule. The prediction is not stripped (lmms-eval)."""
    return float(max(relaxed_correctness(str(g), prediction) for g in golds)) if golds else 0.0


# ---------------------------------------------------------------- relaxed accuracy, normalized
_CURRENCY = "$€£¥₹"
# Scale words: "12.5 million" matches both 12.5 (axis "in millions") and 12,500,000.
_SCALES = {"k": 1e3, "thousand": 1e3, "thousands": 1e3, "m": 1e6, "mn": 1e6, "million": 1e6, "millions": 1e6,
           "b": 1e9, "bn": 1e9, "billion": 1e9, "billions": 1e9, "t": 1e12, "trillion": 1e12}
_NUMBER = re.compile(r"^(?P<sign>[-+]?)(?P<num>(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*(?P<unit>[a-z][a-z ./]*)?$")
_THOUSANDS = re.compile(r"^[-+]?[$€£¥₹]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# Gold answers that read as years are compared exactly: 2008 is not "within 5%" of 2010.
_YEAR = re.compile(r"^(1[89]\d\d|20\d\d)$")


def _clean_text(text: str, changes: list[str], side: str) -> str:
    s = str(text)
    stripped = s.strip()
    if stripped != s:
        changes.append(f"{side}: stripped whitespace")
    s = " ".join(stripped.split()).lower()
    if s.endswith(".") and not s.endswith(".."):   # "Yes." -> "yes"; an ellipsis stays as it is
        s = s[:-1].rstrip()
        changes.append(f"{side}: removed trailing period")
    return s


def _parse_number(s: str, changes: list[str], side: str):
    """(value, has_percent, scale) for a cleaned string, or None if it is not a number with extras."""
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
        changes.append(f"{side}: removed thousands separators")
    sign = ""
    if s[:1] in "-+" and s[1:2] in _CURRENCY and s[1:2]:
        sign, s = s[0], s[1:]
    if s[:1] and s[:1] in _CURRENCY:
        changes.append(f"{side}: removed currency {s[0]}")
        s = s[1:].lstrip()
    elif s[-1:] and s[-1:] in _CURRENCY:
        changes.append(f"{side}: removed currency {s[-1]}")
        s = s[:-1].rstrip()
    s = sign + s
    percent = False
    for mark in ("%", " percent", "percent", " per cent"):
        if s.endswith(mark):
            s, percent = s[: -len(mark)].rstrip(), True
            break
    m = _NUMBER.match(s)
    if not m:
        return None
    value = float(m["sign"] + m["num"])
    unit = (m["unit"] or "").strip().rstrip(".")
    if unit == "%" or unit.endswith(" %"):
        percent = True
    scale = _SCALES.get(unit, 1.0)
    if unit and not percent:
        changes.append(f"{side}: removed unit {unit!r}")
    return value, percent, scale


def _close(p: float, t: float, tol: float) -> bool:
    return p == t if t == 0 else abs(p - t) / abs(t) <= tol


def _normalized_one(prediction: str, gold: str, tol: float) -> tuple[bool, list[str]]:
    changes: list[str] = []
    p_text, t_text = _clean_text(prediction, changes, "pred"), _clean_text(gold, changes, "gold")
    p_num = _parse_number(p_text, changes, "pred") if p_text else None
    t_num = _parse_number(t_text, changes, "gold") if t_text else None
    if p_num is None or t_num is None:
        # keep only the changes that touched the text we compare
        changes = [c for c in changes if "whitespace" in c or "trailing period" in c]
        return p_text == t_text, changes
    (p, p_pct, p_scale), (t, t_pct, t_scale) = p_num, t_num
    if _YEAR.match(t_text):
        changes.append("gold is a year: exact match")
        return p == t and p_scale == 1.0 and not p_pct, changes
    if p_pct or t_pct:
        changes.append("compared without % sign" if p_pct and t_pct else "% on one side only")
    pred_values = {p, p * p_scale}
    gold_values = {t, t * t_scale}
    if p_pct and not t_pct:      # "45%" vs gold "0.45": the fraction reading the reference rule uses
        pred_values |= {v / 100 for v in pred_values}
    if t_pct and not p_pct:
        gold_values |= {v / 100 for v in gold_values}
    return any(_close(a, b, tol) for a in pred_values for b in gold_values), changes


def relaxed_normalized(prediction: str, golds: list[str], max_relative_change: float = 0.05
                       ) -> tuple[float, list[str]]:
    """Relaxed accuracy after clean-ups, and the list of what was changed (for the best gold).

    Rules: strip whitespace and case; drop one trailing period; `1,000` -> 1000; drop a leading or
    trailing currency symbol; drop a unit after a number (`12.5 million` also counts as 12.5e6);
    `%` is dropped on both sides (`45%` == `45`, and `45%` still equals a gold `0.45`); a target of 0
    compares numerically (`0.0` == `0`); a gold that is a 4-digit year (1800-2099) needs an exact
    match. Non-numbers compare as cleaned strings.
    """
    best, best_changes = 0.0, []
    for i, gold in enumerate(golds):
        ok, changes = _normalized_one(str(prediction), str(gold), max_relative_change)
        if i == 0 or (ok and not best):
            best_changes = changes
        if ok and not best:
            best = 1.0
    return best, best_changes


# ---------------------------------------------------------------- exact match, ANLS, text overlap
def exact_match(prediction: str, golds: list[str]) -> float:
    """Case-insensitive, stripped string equality, max over golds."""
    p = str(prediction).strip().lower()
    return float(any(p == str(g).strip().lower() for g in golds))


def _levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, golds: list[str], threshold: float = 0.5) -> float:
    """ANLS as lmms-eval and VLMEvalKit compute it: lowercase and collapse whitespace for the edit
    distance, but divide by the RAW lengths (of the upper-cased strings, as their code does); a
    score below `threshold` becomes 0, so a normalized distance of exactly 0.5 still scores 0.5."""
    prediction = str(prediction)
    distances = []
    for gold in map(str, golds):
        g = " ".join(gold.strip().lower().split())
        p = " ".join(prediction.strip().lower().split())
        length = max(len(gold.upper()), len(prediction.upper()))
        distances.append(0.0 if length == 0 else _levenshtein(g, p) / length)
    if not distances:
        return 0.0
    score = 1 - min(distances)
    return 0.0 if score < threshold else score


def bleu(prediction: str, golds: list[str]) -> float:
    """Sentence BLEU (sacrebleu defaults, 13a tokenizer, exp smoothing) over all golds, in [0, 1]."""
    import sacrebleu
    if not golds:
        return 0.0
    return min(1.0, sacrebleu.sentence_bleu(str(prediction), [str(g) for g in golds]).score / 100.0)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, golds: list[str]) -> float:
    """ROUGE-L F-measure (rouge-score, Porter stemmer), max over golds."""
    scorer = _rouge_scorer()
    return max((scorer.score(str(g), str(prediction))["rougeL"].fmeasure for g in golds), default=0.0)


# ---------------------------------------------------------------- registry
METRICS = {
    "relaxed_ref": relaxed_reference,
    "relaxed_norm": lambda prediction, golds: relaxed_normalized(prediction, golds)[0],
    "exact": exact_match,
    "anls": anls,
    "bleu": bleu,
    "rougeL": rouge_l,
}
DESCRIPTIONS = {
    "relaxed_ref": "ChartQA relaxed accuracy, reference rule bit-for-bit (5% relative, no clean-up)",
    "relaxed_norm": "relaxed accuracy after strip / trailing period / 1,000 / currency / units / % / exact years",
    "exact": "exact match, case-insensitive, stripped",
    "anls": "ANLS, threshold 0.5, lmms-eval/VLMEvalKit lengths",
    "bleu": "sentence BLEU (sacrebleu), for free-text answers",
    "rougeL": "ROUGE-L F (rouge-score, stemmed), for free-text answers",
}
DEFAULT_METRICS = ("relaxed_ref", "relaxed_norm", "exact", "anls")


def score_sample(prediction: str, golds: list[str], names=DEFAULT_METRICS) -> dict:
    """All requested scores of one sample; with `relaxed_norm` also `norm_changes`."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    out = {}
    for name in names:
        if name == "relaxed_norm":
            out[name], out["norm_changes"] = relaxed_normalized(prediction, golds)
        else:
            out[name] = float(METRICS[name](prediction, golds))
    return out
