"""Every family's answers are recomputed here from the spec's data, reading the question text
independently of charts.questions (which categories / series / direction it names)."""
import random
import re
from collections import Counter, defaultdict

import pytest

from charts import FAMILIES, KINDS, QA, ChartSpec, format_value, is_close, make_questions, parse_number, sample_spec
from charts.spec import sample_style

SPECS = [sample_spec(KINDS[i % len(KINDS)], random.Random(f"qtest:{i}")) for i in range(480)]


def _qas(family):
    for i, spec in enumerate(SPECS):
        for qa in make_questions(spec, random.Random(i)):
            if qa.family == family:
                yield spec, qa


def _mentioned(labels, text):
    """Labels named in `text`, in order of appearance (case-insensitive, whole words)."""
    hits = []
    for label in labels:
        for m in re.finditer(r"(?<![\w-])" + re.escape(label) + r"(?![\w-])", text, re.I):
            hits.append((m.start(), m.end(), label))
    # drop a hit that lies inside a longer hit ("2023" inside "Q1 2023")
    hits = [h for h in hits if not any(o != h and o[0] <= h[0] and h[1] <= o[1] for o in hits)]
    return [h[2] for h in sorted(hits)]


def _values(spec: ChartSpec, q: str):
    """The value list a question is about, and the question with the series clause removed."""
    names = list(spec.series)
    if spec.kind == "scatter":
        return spec.series[names[1]], q
    m = re.search(r" for the (.+?) series", q)
    if m:
        return spec.series[m.group(1)], q.replace(m.group(0), "")
    if spec.kind == "stacked_bar":
        return [sum(spec.series[s][i] for s in names) for i in range(len(spec.categories))], q
    return spec.series[names[0]], q


def _value_of(spec, q):
    vals, q = _values(spec, q)
    return vals, dict(zip(spec.categories, vals)), q


def _fmt(spec, x):
    return format_value(x, spec.fmt)


def _high(q):
    return bool(re.search(r"highest|largest|maximum|greater|higher|larger", q))


def expected(spec: ChartSpec, qa: QA) -> str:
    q, fam = qa.question, qa.family
    vals, by_cat, rest = _value_of(spec, q)
    cats = _mentioned(spec.categories, rest)
    if fam == "value":
        return _fmt(spec, by_cat[cats[0]])
    if fam == "share":
        if spec.kind in ("pie", "donut"):
            return format_value(by_cat[cats[0]], "percent")
        if spec.kind == "funnel":
            first, stage = cats
            return format_value(100 * by_cat[stage] / by_cat[first], "percent")
        if spec.kind == "stacked_bar":
            series = [s for s in spec.series if re.search(r"(?<![\w-])" + re.escape(s) + r"(?![\w-])", q)]
            cat = _mentioned(spec.categories, q.replace(series[0], ""))[0]
            i = spec.categories.index(cat)
            total = sum(spec.series[s][i] for s in spec.series)
            return format_value(100 * spec.series[series[0]][i] / total, "percent")
        return format_value(100 * by_cat[cats[0]] / sum(vals), "percent")
    if fam == "extreme":
        return _fmt(spec, max(vals) if _high(q) else min(vals))
    if fam == "argmax":
        pick = max if _high(q) else min
        return spec.categories[vals.index(pick(vals))]
    if fam == "compare":
        a, b = cats
        bigger = by_cat[a] > by_cat[b]
        return "Yes" if bigger == _high(q) else "No"
    if fam == "difference":
        a, b = cats
        return _fmt(spec, abs(by_cat[a] - by_cat[b]))
    if fam == "ratio":
        a, b = cats
        return f"{by_cat[a] / by_cat[b]:.2f}"
    if fam == "sum":
        if cats and spec.kind == "stacked_bar":
            return _fmt(spec, by_cat[cats[0]])
        return _fmt(spec, sum(vals))
    if fam == "average":
        return _fmt(spec, sum(vals) / len(vals))
    if fam == "count":
        return str(len(spec.series) if "series" in q else len(spec.categories))
    if fam == "rank":
        if q.startswith("List"):
            order = sorted(spec.categories, key=lambda c: -by_cat[c])
            return ", ".join(order if q.index("highest") < q.index("lowest") else order[::-1])
        k = {"second": 2, "third": 3}[re.search(r"second|third", q).group(0)]
        top = "highest" in q or "from the top" in q
        return sorted(spec.categories, key=lambda c: -by_cat[c] if top else by_cat[c])[k - 1]
    if fam == "trend":
        m = re.search(r"higher|lower", q)
        if q.startswith("Was"):
            t2, t1 = re.search(r" in (.+?) than in (.+?)\?$", rest).groups()
        else:
            t1, t2 = cats
        up = by_cat[t2] > by_cat[t1]
        if "increase or decrease" in q:
            return "Increase" if up else "Decrease"
        if "up or down" in q:
            return "Up" if up else "Down"
        asks_up = ("increase" in q) if m is None else (m.group(0) == "higher")
        return "Yes" if up == asks_up else "No"
    if fam == "reading":
        horizontal = spec.kind == "hbar"
        if "title" in q:
            return spec.title
        if "x-axis" in q:
            return spec.y_label if horizontal else spec.x_label
        if "y-axis" in q:
            return spec.x_label if horizontal else spec.y_label
        entries = list(spec.series) if spec.multi_series else spec.categories
        return entries[0] if "first" in q else ", ".join(entries)
    raise AssertionError(f"no checker for {fam}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_answer_of_the_family_matches_the_chart_data(family):
    checked = 0
    for spec, qa in _qas(family):
        assert qa.answer == expected(spec, qa), (spec.kind, qa)
        checked += 1
    assert checked >= 40, f"{family}: only {checked} questions generated"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_has_several_wordings(family):
    def wording(spec, q):
        words = [*spec.categories, *spec.series, spec.measure, *spec.noun, spec.whole]
        for w in sorted(words, key=len, reverse=True):
            q = re.sub(re.escape(w), "_", q, flags=re.I)
        return re.sub(r"highest|maximum|lowest|minimum|largest|smallest|greater|higher|larger|lower", "~", q)
    wordings = {wording(spec, qa.question) for spec, qa in _qas(family)}
    assert len(wordings) >= 3, wordings


def test_at_least_twelve_families_with_declared_answer_types():
    assert len(FAMILIES) >= 12
    seen = defaultdict(set)
    for spec in SPECS[:120]:
        for qa in make_questions(spec, random.Random(0)):
            assert qa.answer_type in ("number", "percent", "label", "yes/no", "text")
            seen[qa.family].add(qa.answer_type)
    assert set(seen) == set(FAMILIES)
    assert seen["compare"] == {"yes/no"} and seen["count"] == {"number"} and seen["argmax"] == {"label"}


def test_how_many_questions_are_answered_with_counts_only():
    for i, spec in enumerate(SPECS):
        for qa in make_questions(spec, random.Random(i)):
            if "how many" in qa.question.lower():
                assert qa.family == "count" and qa.answer.isdigit() and "%" not in qa.answer, qa


def test_numbers_read_off_an_axis_carry_a_fair_tolerance_and_printed_ones_none():
    with_tol = Counter()
    for i, spec in enumerate(SPECS):
        for qa in make_questions(spec, random.Random(i)):
            if spec.values_printed or qa.answer_type in ("label", "yes/no", "text") or qa.family == "count":
                assert qa.tolerance is None, (spec.kind, qa)
            else:
                assert qa.tolerance is not None and 0.05 <= qa.tolerance <= 0.25, (spec.kind, qa)
                with_tol[qa.family] += 1
    assert with_tol["value"] > 10 and with_tol["extreme"] > 10


def test_unlabelled_comparisons_are_only_asked_with_a_visible_gap():
    for i, spec in enumerate(SPECS):
        if spec.values_printed or spec.kind in ("pie", "donut", "scatter", "stacked_bar") or spec.multi_series:
            continue
        vals = spec.series[next(iter(spec.series))]
        err = 0.03 * max(vals)
        for qa in make_questions(spec, random.Random(i)):
            if qa.family in ("compare", "difference", "ratio"):
                a, b = _mentioned(spec.categories, qa.question)
                gap = abs(vals[spec.categories.index(a)] - vals[spec.categories.index(b)])
                assert gap > 2 * err, qa


def test_yes_and_no_answers_are_balanced():
    answers = Counter(qa.answer for _, qa in _qas("compare"))
    share = answers["Yes"] / (answers["Yes"] + answers["No"])
    assert 0.35 < share < 0.65, answers


def test_a_fixed_bar_chart_gets_the_answers_a_person_would_give():
    spec = ChartSpec("bar", "Units sold by region", {"Units sold": [120.0, 480.0, 300.0, 60.0]},
                     {**sample_style("bar", random.Random(0)), "value_labels": True},
                     ["North", "South", "East", "West"], x_label="Region", y_label="Units sold",
                     fmt="comma", measure="units sold", noun=("region", "regions"))
    answers = defaultdict(set)
    for seed in range(200):
        for qa in make_questions(spec, random.Random(seed)):
            answers[qa.family].add(qa.answer)
    assert answers["sum"] == {"960"}
    assert answers["average"] == {"240"}
    assert answers["count"] == {"4"}
    assert answers["extreme"] == {"480", "60"}
    assert answers["argmax"] == {"South", "West"}
    assert "420" in answers["difference"] and "8.00" in answers["ratio"]
    assert "50%" in answers["share"] and "6.3%" in answers["share"]


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown question families"):
        make_questions(SPECS[0], random.Random(0), families=["vibes"])


def test_family_filter_keeps_only_the_chosen_families():
    qas = make_questions(SPECS[2], random.Random(0), families=["count", "reading"])
    assert {qa.family for qa in qas} == {"count", "reading"}


@pytest.mark.parametrize("text,value", [("1,200", 1200), ("1.2k", 1200), ("$3.4M", 3.4e6), ("12%", 12),
                                        ("-4.5", -4.5), ("2B", 2e9), ("Yes", None), ("15 people", None)])
def test_parse_number_reads_chart_formats(text, value):
    assert parse_number(text) == value


def test_is_close_uses_the_relative_tolerance():
    assert is_close("105", "100", 0.05) and not is_close("106", "100", 0.05)
    assert is_close("$1.2M", "1,200,000", None)
    assert is_close("north", "North", None) and not is_close("South", "North", None)


# ---------------------------------------------------------------- grammar over many charts of every kind and look
from charts.spec import LOOKS, MEASURES, SCATTER_PAIRS  # noqa: E402

_MEASURE_WORDS = sorted({m[0] for m in MEASURES} | {p[4][1] for p in SCATTER_PAIRS} | {"share", "number of people"},
                        key=len, reverse=True)
_PLURALS = [m for m in _MEASURE_WORDS if m.endswith("s") or m.endswith(" sold") or m.endswith(" delivered")]
_ADJ = "average|mean|highest|lowest|maximum|minimum|largest|smallest|higher|lower|smaller|larger"
_MOD = rf"(?:(?:total|{_ADJ}) )?"
_PL = "|".join(map(re.escape, _PLURALS))
_M = "|".join(map(re.escape, _MEASURE_WORDS))
BAD_PATTERNS = {
    "s's possessive": r"s's\b",
    "'is the <plural>'": rf"\b(?:is|was) the {_MOD}(?:{_PL})\b",
    "'a higher <plural>'": rf"\ban? {_MOD}(?:{_PL})\b",
    "'the highest <plural>'": rf"\bthe (?:{_ADJ}) (?:total )?(?:{_PL})\b",
    "'What <measure> does'": rf"^What (?:total )?(?:{_M}) does\b",
    "'value of <measure>'": r"\bvalue of (?:number|amount) of\b",
    "'all number of'": r"\ball (?:number|amount) of\b",
    "doubled word": r"\b(\w+) \1\b",
    "space before punctuation": r"\s[?,.]",
}


def _many_questions(n=2000):
    looks = list(LOOKS)
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        spec = sample_spec(kind, random.Random(f"grammar:{i}"), look=looks[i % len(looks)])
        for qa in make_questions(spec, random.Random(i)):
            yield spec, qa


def test_generated_questions_avoid_known_bad_grammar():
    bad = defaultdict(list)
    n = 0
    for spec, qa in _many_questions():
        n += 1
        for name, pattern in BAD_PATTERNS.items():
            if re.search(pattern, qa.question):
                bad[name].append((spec.kind, qa.question))
    assert n > 15000
    assert not bad, {k: v[:3] for k, v in bad.items()}


def test_value_questions_name_the_measure_where_a_chart_shows_several_numbers_per_category():
    # a scatter point has an x and a y; a stacked bar has segments and a total: "what value is shown" is ambiguous
    for spec, qa in _many_questions(600):
        ambiguous = spec.kind == "scatter" or (spec.kind == "stacked_bar" and " series" not in qa.question)
        if qa.family == "value" and ambiguous:
            assert not qa.question.startswith("What value is shown"), (spec.kind, qa.question)


@pytest.mark.parametrize("pattern,text", [
    ("s's possessive", "Is Operations's budget larger than Sales'?"),
    ("'is the <plural>'", "For which year is the visitors the highest?"),
    ("'What <measure> does'", "What active users does the chart show for 2020?"),
    ("'a higher <plural>'", "Does Gas have a higher orders than Nuclear?"),
    ("'the highest <plural>'", "Which region has the highest visitors?"),
])
def test_the_grammar_patterns_catch_the_reported_questions(pattern, text):
    assert re.search(BAD_PATTERNS[pattern], text)
