"""Question families: each turns a ChartSpec into one QA whose answer is computed from the data.

Answers are written the way the chart writes numbers ("$3.4M", "12%"). When values are printed on
the chart, numeric answers are exact. When they must be read off an axis, a question is asked only
if a careful reader can answer it: label answers (argmax, compare, rank, trend) need a visible gap,
and numeric answers carry a relative `tolerance` sized to the reading error (about 3% of the axis
span, 4 points of a pie); a question whose fair tolerance would exceed 25% is not asked.
"how many" appears only in the count family, answered with a count.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass

from .render import funnel_rate
from .spec import ChartSpec, format_value

ANSWER_TYPES = ("number", "percent", "label", "yes/no", "text")
MAX_TOLERANCE = 0.25


@dataclass
class QA:
    question: str
    answer: str
    family: str
    answer_type: str                  # one of ANSWER_TYPES
    tolerance: float | None = None    # relative; None = exact (values printed or answer is a label)
    keep: tuple[str, ...] = ()        # chart labels in the question; a paraphrase must keep them

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- helpers
_SKIP = object()


def _tol(answer: float, err: float):
    """Relative tolerance for a numeric answer read with absolute error `err`; _SKIP if unfair."""
    if err == 0:
        return None
    if answer == 0:
        return _SKIP
    tol = max(0.05, err / abs(answer))
    return round(tol, 3) if tol <= MAX_TOLERANCE else _SKIP


def _num_type(spec: ChartSpec) -> str:
    return "percent" if spec.fmt == "percent" else "number"


def _read_err(spec: ChartSpec, values: list[float]) -> float:
    if spec.values_printed:
        return 0.0
    if spec.kind in ("pie", "donut"):
        return 4.0
    if spec.kind == "scatter":
        ys = spec.series[list(spec.series)[1]]
        return 0.04 * (max(ys) - min(ys))
    return 0.03 * max(abs(v) for v in values)


@dataclass
class _View:
    """One list of values to ask about, with how to name it in a question."""
    values: list[float]
    err: float            # absolute reading error of one value (0 when printed)
    measure: str
    part: str             # " for the 2024 series" on multi-series charts, else ""
    series: str | None


def _view(spec: ChartSpec, rng: random.Random, totals_ok: bool = True) -> _View:
    names = list(spec.series)
    if spec.kind == "scatter":
        ys = spec.series[names[1]]
        return _View(ys, _read_err(spec, ys), _quantity(spec.measure), "", None)
    if spec.kind == "stacked_bar":
        totals = [sum(spec.series[s][i] for s in names) for i in range(len(spec.categories))]
        if totals_ok and rng.random() < 0.5:
            # a stack's top is read against the axis once; its total is exact if segments are printed
            return _View(totals, _read_err(spec, totals), f"total {_quantity(spec.measure)}", "", None)
        s = rng.choice(names)
        # a segment is the difference of two readings (its top and its bottom)
        return _View(spec.series[s], 2 * _read_err(spec, totals), _quantity(spec.measure), f" for the {s} series", s)
    if len(names) > 1:
        s = rng.choice(names)
        allv = [v for n in names for v in spec.series[n]]
        return _View(spec.series[s], _read_err(spec, allv), _quantity(spec.measure), f" for the {s} series", s)
    vals = spec.series[names[0]]
    return _View(vals, _read_err(spec, vals), _quantity(spec.measure), "", None)


def _keep(*labels) -> tuple[str, ...]:
    return tuple(x for x in labels if x)


def _pair(view: _View, rng: random.Random, n_cats: int):
    """Two category indices whose values differ by more than the reading error, or None."""
    pairs = [(i, j) for i in range(n_cats) for j in range(n_cats)
             if i != j and abs(view.values[i] - view.values[j]) > 2 * view.err]
    return rng.choice(pairs) if pairs else None


# Plural measures read as a singular quantity, so that "is the ... the highest" and "a higher ..." stay
# grammatical ("the number of visitors", not "the visitors").
_QUANTITY = {"visitors": "number of visitors", "units sold": "number of units sold",
             "active users": "number of active users", "orders": "number of orders",
             "emissions": "amount of emissions", "sales": "number of units sold",
             "projects delivered": "number of projects delivered"}


def _quantity(measure: str) -> str:
    """The measure as a singular noun phrase: 'visitors' -> 'number of visitors', 'revenue' stays."""
    return _QUANTITY.get(measure, measure)


def _poss(label: str) -> str:
    """English possessive of a label: "Operations'" (not "Operations's"), "North's"."""
    return label + ("'" if label.endswith("s") else "'s")


def _at(spec: ChartSpec, cat: str) -> str:
    """How a category is named after a measure: 'in 2020', 'at the Trials stage', 'for Electronics'."""
    if spec.time_axis:
        return f"in {cat}"
    if spec.kind == "funnel":
        return f"at the {cat} stage"
    return f"for {cat}"


def _fill(template: str, spec: ChartSpec, **kw) -> str:
    q = template.format(noun=spec.noun[0], nouns=spec.noun[1], whole=spec.whole, **kw)
    return q[0].upper() + q[1:]


def _pie(spec: ChartSpec) -> bool:
    return spec.kind in ("pie", "donut")


# ---------------------------------------------------------------- families
def value_q(spec, rng):
    if _pie(spec):
        return None                       # a slice's value is its share: the share family asks it
    v = _view(spec, rng)
    i = rng.randrange(len(v.values))
    tol = _tol(v.values[i], v.err)
    if tol is _SKIP:
        return None
    cat = spec.categories[i]
    templates = ["What is the {measure} {at}{part}?",
                 "What does the chart show as the {measure} {at}{part}?",
                 "According to the chart, what is the {measure} {at}{part}?"]
    if spec.kind != "scatter" and v.measure == _quantity(spec.measure):
        # only where one number is drawn per category: a scatter point has two, a stack has segments
        templates.append("What value is shown {at}{part}?")
    q = _fill(rng.choice(templates), spec, measure=v.measure, at=_at(spec, cat), part=v.part)
    return QA(q, format_value(v.values[i], spec.fmt), "value", _num_type(spec), tol, _keep(cat, v.series))


def share_q(spec, rng):
    cats = spec.categories
    if _pie(spec):
        shares = spec.series["Share"]
        i = rng.randrange(len(shares))
        tol = _tol(shares[i], _read_err(spec, shares))
        if tol is _SKIP:
            return None
        q = _fill(rng.choice([
            "What percentage of {whole} does {cat} account for?",
            "What share of {whole} is {cat}?",
            "What percent of {whole} falls under {cat}?",
            "How large is the {cat} slice, in percent?",
        ]), spec, cat=cats[i])
        return QA(q, format_value(shares[i], "percent"), "share", "percent", tol, _keep(cats[i]))
    if spec.kind == "funnel":
        i = rng.randrange(1, len(cats))
        q = _fill(rng.choice([
            "What percentage of the people at the {first} stage reached the {stage} stage?",
            "What share of the {first} stage made it to the {stage} stage?",
            "What is the conversion rate from the {first} stage to the {stage} stage, in percent?",
        ]), spec, first=cats[0], stage=cats[i])
        return QA(q, format_value(funnel_rate(spec, i), "percent"), "share", "percent", None,
                  _keep(cats[0], cats[i]))
    if not spec.additive or spec.kind == "scatter":
        return None
    if spec.kind == "stacked_bar":
        names = list(spec.series)
        i, s = rng.randrange(len(cats)), rng.choice(names)
        total = sum(spec.series[n][i] for n in names)
        val = spec.series[s][i]
        err = _read_err(spec, [sum(spec.series[n][k] for n in names) for k in range(len(cats))])
        tol = _tol(1, 2 * err / val + err / total) if err else None
        if tol is _SKIP:
            return None
        q = _fill(rng.choice([
            "What percentage of the total {at} comes from {s}?",
            "What share of the total {measure} {at} comes from {s}, in percent?",
        ]), spec, at=_at(spec, cats[i]), s=s, measure=_quantity(spec.measure))
        return QA(q, format_value(100 * val / total, "percent"), "share", "percent", tol, _keep(cats[i], s))
    v = _view(spec, rng)
    i = rng.randrange(len(cats))
    total = sum(v.values)
    tol = _tol(1, v.err / v.values[i] + len(cats) * v.err / total) if v.err else None
    if tol is _SKIP:
        return None
    q = _fill(rng.choice([
        "What percentage of the total {measure}{part} comes from {cat}?",
        "What share of the total {measure}{part} does {cat} account for, in percent?",
    ]), spec, measure=v.measure, part=v.part, cat=cats[i])
    return QA(q, format_value(100 * v.values[i] / total, "percent"), "share", "percent", tol, _keep(cats[i], v.series))


def extreme_q(spec, rng):
    v = _view(spec, rng)
    high = rng.random() < 0.5
    x = max(v.values) if high else min(v.values)
    tol = _tol(x, v.err)
    if tol is _SKIP:
        return None
    q = _fill(rng.choice([
        "What is the {word} {measure}{part} shown in the chart?",
        "What is the {word} {measure}{part}?",
        "Across all {nouns}, what is the {word} {measure}{part}?",
    ]), spec, word=rng.choice(("highest", "maximum")) if high else rng.choice(("lowest", "minimum")),
        measure=v.measure, part=v.part)
    return QA(q, format_value(x, spec.fmt), "extreme", _num_type(spec), tol, _keep(v.series))


def argmax_q(spec, rng):
    v = _view(spec, rng)
    high = rng.random() < 0.5
    order = sorted(range(len(v.values)), key=lambda k: v.values[k], reverse=high)
    if abs(v.values[order[0]] - v.values[order[1]]) <= 2 * v.err or v.values[order[0]] == v.values[order[1]]:
        return None
    q = _fill(rng.choice([
        "Which {noun} has the {word} {measure}{part}?",
        "Which {noun} shows the {word} {measure}{part}?",
        "For which {noun} is the {measure}{part} the {word}?",
    ]), spec, word=rng.choice(("highest", "largest")) if high else rng.choice(("lowest", "smallest")),
        measure=v.measure, part=v.part)
    return QA(q, spec.categories[order[0]], "argmax", "label", None, _keep(v.series))


def compare_q(spec, rng):
    v = _view(spec, rng)
    pair = _pair(v, rng, len(spec.categories))
    if pair is None:
        return None
    i, j = pair
    a, b = spec.categories[i], spec.categories[j]
    greater = rng.random() < 0.5
    templates = ([
        "Is the {measure} of {a} greater than that of {b}{part}?",
        "Does {a} have a higher {measure} than {b}{part}?",
        "Is {pa} {measure} larger than {pb}{part}?",
    ] if greater else [
        "Is the {measure} of {a} lower than that of {b}{part}?",
        "Does {a} have a smaller {measure} than {b}{part}?",
    ])
    q = _fill(rng.choice(templates), spec, measure=v.measure, a=a, b=b, pa=_poss(a), pb=_poss(b), part=v.part)
    yes = (v.values[i] > v.values[j]) == greater
    return QA(q, "Yes" if yes else "No", "compare", "yes/no", None, _keep(a, b, v.series))


def difference_q(spec, rng):
    v = _view(spec, rng)
    pair = _pair(v, rng, len(spec.categories))
    if pair is None:
        return None
    i, j = sorted(pair, key=lambda k: -v.values[k])
    diff = v.values[i] - v.values[j]
    tol = _tol(diff, 2 * v.err)
    if tol is _SKIP:
        return None
    a, b = spec.categories[i], spec.categories[j]
    q = _fill(rng.choice([
        "What is the difference in {measure} between {a} and {b}{part}?",
        "How much higher is the {measure} of {a} than that of {b}{part}?",
        "By how much does {a} exceed {b} in {measure}{part}?",
    ]), spec, measure=v.measure, a=a, b=b, part=v.part)
    return QA(q, format_value(diff, spec.fmt), "difference", _num_type(spec), tol, _keep(a, b, v.series))


def ratio_q(spec, rng):
    if spec.measure == "average temperature":
        return None                       # degrees Celsius are not a ratio scale
    v = _view(spec, rng)
    pair = _pair(v, rng, len(spec.categories))
    if pair is None:
        return None
    i, j = sorted(pair, key=lambda k: -v.values[k])
    if v.values[j] <= 0:
        return None
    ratio = v.values[i] / v.values[j]
    tol = _tol(1, v.err / v.values[i] + v.err / v.values[j]) if v.err else None
    if tol is _SKIP:
        return None
    a, b = spec.categories[i], spec.categories[j]
    q = _fill(rng.choice([
        "What is the ratio of the {measure} of {a} to that of {b}{part}?",
        "By what factor does {pa} {measure} exceed {pb}{part}?",
        "What is the ratio between {a} and {b} in {measure}{part}?",
    ]), spec, measure=v.measure, a=a, b=b, pa=_poss(a), pb=_poss(b), part=v.part)
    return QA(q, f"{ratio:.2f}", "ratio", "number", tol, _keep(a, b, v.series))


def sum_q(spec, rng):
    if _pie(spec) or spec.kind == "scatter" or not spec.additive:
        return None
    if spec.kind == "stacked_bar" and rng.random() < 0.5:
        names = list(spec.series)
        totals = [sum(spec.series[s][i] for s in names) for i in range(len(spec.categories))]
        i = rng.randrange(len(totals))
        tol = _tol(totals[i], _read_err(spec, totals))
        if tol is _SKIP:
            return None
        q = _fill(rng.choice(["What is the total {measure} {at}?",
                              "What do all series add up to {at}?"]),
                  spec, measure=_quantity(spec.measure), at=_at(spec, spec.categories[i]))
        return QA(q, format_value(totals[i], spec.fmt), "sum", _num_type(spec), tol, _keep(spec.categories[i]))
    v = _view(spec, rng, totals_ok=False)
    total = sum(v.values)
    tol = _tol(total, len(v.values) * v.err)
    if tol is _SKIP:
        return None
    q = _fill(rng.choice([
        "What is the total {measure}{part} across all {nouns}?",
        "What is the sum of the {measure}{part} over all {nouns} shown?",
        "Adding up all {nouns}, what is the total {measure}{part}?",
    ]), spec, measure=v.measure, part=v.part)
    return QA(q, format_value(total, spec.fmt), "sum", _num_type(spec), tol, _keep(v.series))


def average_q(spec, rng):
    if _pie(spec):
        return None                       # always 100 / slices: nothing to read
    v = _view(spec, rng)
    avg = sum(v.values) / len(v.values)
    measure = v.measure.removeprefix("average ")   # not "the average average temperature"
    tol = _tol(avg, v.err)
    if tol is _SKIP:
        return None
    q = _fill(rng.choice([
        "What is the average {measure}{part} across the {nouns}?",
        "What is the mean {measure}{part} of the {nouns} shown?",
        "On average, what is the {measure}{part} per {noun}?",
    ]), spec, measure=measure, part=v.part)
    return QA(q, format_value(avg, spec.fmt), "average", _num_type(spec), tol, _keep(v.series))


def count_q(spec, rng):
    n = len(spec.categories)
    if spec.multi_series and rng.random() < 0.4:
        q = rng.choice(["How many series are shown in the legend?", "How many data series does the chart compare?"])
        return QA(q, str(len(spec.series)), "count", "number")
    templates = {
        "pie": ["How many slices does the pie chart have?"],
        "donut": ["How many segments does the donut chart have?"],
        "funnel": ["How many stages does the funnel have?"],
        "scatter": ["How many {nouns} are plotted?"],
        "infographic": ["How many {nouns} are listed?"],
    }.get(spec.kind, []) + ["How many {nouns} are shown in the chart?", "How many {nouns} does the chart include?"]
    return QA(_fill(rng.choice(templates), spec), str(n), "count", "number")


_ORDINALS = {2: "second", 3: "third"}


def rank_q(spec, rng):
    v = _view(spec, rng)
    n = len(v.values)
    order = sorted(range(n), key=lambda k: -v.values[k])
    gaps_ok = all(v.values[order[k]] - v.values[order[k + 1]] > max(2 * v.err, 0) for k in range(n - 1))
    if gaps_ok and n <= 5 and rng.random() < 0.35:
        high = rng.random() < 0.5
        names = [spec.categories[k] for k in (order if high else order[::-1])]
        q = _fill("List the {nouns} from {a} to {b} {measure}{part}, separated by commas.", spec,
                  a="highest" if high else "lowest", b="lowest" if high else "highest", measure=v.measure, part=v.part)
        return QA(q, ", ".join(names), "rank", "text", None, _keep(v.series))
    if n < 3:
        return None
    k = rng.choice([r for r in _ORDINALS if r < n])
    high = rng.random() < 0.5
    seq = order if high else order[::-1]
    idx = seq[k - 1]
    neighbours = [seq[m] for m in (k - 2, k) if 0 <= m < n]
    if any(abs(v.values[idx] - v.values[m]) <= 2 * v.err for m in neighbours):
        return None
    word = "highest" if high else "lowest"
    q = _fill(rng.choice([
        "Which {noun} has the {ord} {word} {measure}{part}?",
        "Which {noun} ranks {ord} {by} in {measure}{part}?",
    ]), spec, ord=_ORDINALS[k], word=word, by="from the top" if high else "from the bottom",
        measure=v.measure, part=v.part)
    return QA(q, spec.categories[idx], "rank", "label", None, _keep(v.series))


def trend_q(spec, rng):
    if not spec.time_axis:
        return None
    v = _view(spec, rng, totals_ok=False)
    n = len(v.values)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if abs(v.values[j] - v.values[i]) > 2 * v.err]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    t1, t2 = spec.categories[i], spec.categories[j]
    up = v.values[j] > v.values[i]
    if rng.random() < 0.5:
        q = _fill(rng.choice([
            "Did the {measure}{part} increase or decrease from {t1} to {t2}?",
            "Between {t1} and {t2}, did the {measure}{part} go up or down?",
        ]), spec, measure=v.measure, part=v.part, t1=t1, t2=t2)
        word = ("Increase" if up else "Decrease") if "increase" in q else ("Up" if up else "Down")
        return QA(q, word, "trend", "text", None, _keep(t1, t2, v.series))
    rise = rng.random() < 0.5
    q = _fill(rng.choice([
        "Did the {measure}{part} {verb} between {t1} and {t2}?",
        "Was the {measure}{part} {cmp} in {t2} than in {t1}?",
    ]), spec, measure=v.measure, part=v.part, t1=t1, t2=t2,
        verb="increase" if rise else "decrease", cmp="higher" if rise else "lower")
    return QA(q, "Yes" if up == rise else "No", "trend", "yes/no", None, _keep(t1, t2, v.series))


def reading_q(spec, rng):
    options = [("title", spec.title)]
    drawn_x, drawn_y = (spec.y_label, spec.x_label) if spec.kind == "hbar" else (spec.x_label, spec.y_label)
    if spec.kind not in ("pie", "donut", "funnel", "infographic"):
        options += [("x", drawn_x), ("y", drawn_y)]
    legend = None
    if spec.multi_series:
        legend = list(spec.series)
    elif _pie(spec) and (not spec.style["value_labels"] or spec.style["legend"] == "outside right"):
        legend = spec.categories
    if legend:
        options += [("legend", legend), ("legend_first", legend[0])]
    what, answer = rng.choice([o for o in options if o[1]])
    q = rng.choice({
        "title": ["What is the title of the chart?", "What is the chart's title?",
                  "What title is shown at the top of the chart?"],
        "x": ["What is the label of the x-axis?", "What does the x-axis show?"],
        "y": ["What is the label of the y-axis?", "What does the y-axis show?"],
        "legend": ["Which entries are shown in the legend, in order?", "List the legend entries, separated by commas."],
        "legend_first": ["What is the first entry in the legend?", "Which item is listed first in the legend?"],
    }[what])
    if what == "legend":
        return QA(q, ", ".join(answer), "reading", "text")
    return QA(q, answer, "reading", "label" if what == "legend_first" else "text")


FAMILIES = {
    "value": value_q,            # value retrieval
    "share": share_q,            # percentage / share of a whole, funnel conversion
    "extreme": extreme_q,        # max / min value
    "argmax": argmax_q,          # label of the max / min
    "compare": compare_q,        # yes/no: is A greater / lower than B
    "difference": difference_q,
    "ratio": ratio_q,
    "sum": sum_q,
    "average": average_q,
    "count": count_q,            # number of categories / slices / series
    "rank": rank_q,              # nth highest / lowest, or full order
    "trend": trend_q,            # increase / decrease between two time points
    "reading": reading_q,        # title, axis labels, legend
}


def make_questions(spec: ChartSpec, rng: random.Random, families=None) -> list[QA]:
    """One QA per family that fits this chart (in FAMILIES order); `families` filters by name."""
    unknown = set(families or ()) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown question families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    out = []
    for name, fn in FAMILIES.items():
        if families and name not in families:
            continue
        qa = fn(spec, rng)
        if qa is not None:
            out.append(qa)
    return out


# ---------------------------------------------------------------- answer parsing (shared with validate/eval)
_NUMBER = re.compile(r"^\s*([-+])?\s*\$?\s*(\d[\d,]*(?:\.\d+)?|\.\d+)\s*([kKmMbB])?\s*(%)?\s*$")
_SCALE = {"k": 1e3, "m": 1e6, "b": 1e9}


def parse_number(text: str) -> float | None:
    """'1,200' -> 1200, '1.2k' -> 1200, '$3.4M' -> 3400000, '12%' -> 12; None if not a number."""
    m = _NUMBER.match(str(text))
    if not m:
        return None
    sign, digits, scale, _pct = m.groups()
    x = float(digits.replace(",", "")) * (_SCALE[scale.lower()] if scale else 1)
    return -x if sign == "-" else x


def is_close(answer: str, gold: str, tolerance: float | None) -> bool:
    """Whether `answer` matches `gold` within a relative tolerance (exact text when not numeric)."""
    a, g = parse_number(answer), parse_number(gold)
    if a is None or g is None:
        return answer.strip().lower() == gold.strip().lower()
    if tolerance is None:
        return math.isclose(a, g, rel_tol=1e-9, abs_tol=1e-9)
    return abs(a - g) <= tolerance * abs(g) + 1e-9
