"""What a chart shows, sampled from a seed: `ChartSpec` and `sample_spec(kind, rng)`.

A spec holds the data (categories x series), the words (title, axis labels, nouns used in
questions) and the look (style dict). The renderer draws only what is here and the questions are
computed only from what is here, so the two can never disagree. Values are quantized to what the
chart's number format prints ("$3.4M" is exactly 3,400,000), so an answer read off a value label
is exact.
"""
from __future__ import annotations

import math
import random
from decimal import ROUND_HALF_UP, Decimal
from dataclasses import asdict, dataclass, field

KINDS = ("pie", "donut", "bar", "hbar", "grouped_bar", "stacked_bar", "line", "multi_line",
         "area", "scatter", "funnel", "infographic")


@dataclass
class ChartSpec:
    kind: str
    title: str
    series: dict[str, list[float]]   # series name -> one value per category (scatter: x and y)
    style: dict                      # look only: sizes, fonts, palette, labels on/off, legend...
    categories: list[str] = field(default_factory=list)
    x_label: str = ""
    y_label: str = ""
    fmt: str = "comma"               # how values are printed: see format_value
    measure: str = "value"           # the quantity in words, for questions ("revenue")
    noun: tuple[str, str] = ("category", "categories")  # what a category is, singular/plural
    whole: str = "the total"         # what a pie's 100% is ("respondents")
    time_axis: bool = False          # categories are ordered in time: trend questions make sense
    x_fmt: str = "comma"             # scatter only: the x measure's format

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ChartSpec":
        d = dict(d)
        d["noun"] = tuple(d.get("noun", ("category", "categories")))
        return cls(**d)

    @property
    def multi_series(self) -> bool:
        return self.kind != "scatter" and len(self.series) > 1

    @property
    def values_printed(self) -> bool:
        """Whether every value is written on the chart (else it must be read off an axis)."""
        if self.kind in ("funnel", "infographic"):
            return True
        if self.kind in ("line", "multi_line", "area") and len(self.series) > 2:
            return False      # labels of 3+ crossing lines would collide: the renderer omits them
        return bool(self.style.get("value_labels"))

    @property
    def additive(self) -> bool:
        """Whether summing values means something (revenue yes; temperatures, scores, rates no)."""
        return self.fmt in ("comma", "short", "dollar") or self.measure == "emissions"


# ---------------------------------------------------------------- number formats
def _half_up(x: float, decimals: int) -> str:
    """Rounded as people round (6.25 -> 6.3), not as binary floats do (6.2)."""
    s = str(Decimal(repr(float(x))).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))
    return s[1:] if s.startswith("-") and float(s) == 0 else s


def _trim(x: float, decimals: int) -> str:
    s = _half_up(x, decimals)
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def format_value(x: float, fmt: str) -> str:
    """Print a number the way charts of this format label it: 1,200 / 1.2k / 12% / $3.4M / 4.5."""
    if fmt == "percent":
        return _trim(x, 1) + "%"
    if fmt == "decimal":
        return _half_up(x, 1)
    if fmt == "comma":
        return f"{round(x):,}" if abs(x - round(x)) < 1e-6 else format(Decimal(_half_up(x, 1)), ",")
    prefix = "$" if fmt == "dollar" else ""
    sign = "-" if x < 0 else ""
    a = abs(x)
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if a >= div * 0.9995:      # 999 stays "999"; 999.7 prints "1k" as it would round there
            return f"{sign}{prefix}{_trim(a / div, 1)}{suffix}"
    return f"{sign}{prefix}{_trim(a, 1)}"


def quantize(x: float, fmt: str) -> float:
    """Round `x` to what format_value prints, so a printed label is the exact value."""
    if fmt in ("percent", "comma"):
        return float(round(x))
    if fmt == "decimal":
        return round(x, 1)
    for div in (1e9, 1e6, 1e3):
        if abs(x) >= div:
            return round(x / div, 1) * div
    return float(round(x))


# ---------------------------------------------------------------- vocabulary
# name: (singular, plural, what the whole is for a pie, categories). Ordinal sets keep their order.
CATEGORY_SETS = {
    "region": ("region", "regions", "total sales", ["North", "South", "East", "West", "Central", "Northeast", "Southwest"]),
    "channel": ("channel", "channels", "website traffic", ["Email", "Social media", "Search", "Direct", "Referral", "Display ads"]),
    "device": ("device", "devices", "sessions", ["Smartphone", "Laptop", "Tablet", "Desktop", "Smart TV", "Console"]),
    "department": ("department", "departments", "the budget", ["Sales", "Marketing", "Engineering", "Support", "Finance", "Legal", "Operations"]),
    "country": ("country", "countries", "exports", ["Brazil", "Canada", "France", "Germany", "India", "Japan", "Mexico", "Spain", "Kenya", "Norway"]),
    "transport": ("mode of transport", "modes of transport", "commuters", ["Car", "Bus", "Train", "Bicycle", "Walking", "Scooter"]),
    "energy": ("energy source", "energy sources", "electricity generation", ["Solar", "Wind", "Hydro", "Nuclear", "Gas", "Coal"]),
    "screen_time": ("screen-time group", "screen-time groups", "respondents", ["Under 2 hours", "2-4 hours", "4-6 hours", "6-8 hours", "Over 8 hours"]),
    "age": ("age group", "age groups", "customers", ["18-24", "25-34", "35-44", "45-54", "55-64", "65+"]),
    "product": ("product category", "product categories", "revenue", ["Electronics", "Clothing", "Groceries", "Toys", "Books", "Furniture", "Garden"]),
    "genre": ("genre", "genres", "streaming hours", ["Drama", "Comedy", "Action", "Documentary", "Horror", "Animation"]),
}
ORDINAL_SETS = {"screen_time", "age"}

# measure in words, axis label, format, low, high (typical magnitudes)
MEASURES = [
    ("revenue", "Revenue (USD)", "dollar", 2e5, 9e6),
    ("units sold", "Units sold", "comma", 120, 9000),
    ("active users", "Active users", "short", 2e3, 9e5),
    ("visitors", "Visitors", "comma", 500, 60000),
    ("satisfaction score", "Satisfaction (1-10)", "decimal", 3, 9.8),
    ("average temperature", "Temperature (°C)", "decimal", 4, 34),
    ("market share", "Market share (%)", "percent", 2, 60),
    ("emissions", "Emissions (Mt CO2)", "decimal", 5, 400),
    ("orders", "Orders", "short", 1e3, 5e5),
    ("budget", "Budget (USD)", "dollar", 5e4, 2e6),
    ("response rate", "Response rate (%)", "percent", 5, 95),
]

# axis label, singular, plural, labels
TIME_AXES = [
    ("Month", "month", "months", ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]),
    ("Year", "year", "years", [str(y) for y in range(2012, 2026)]),
    ("Quarter", "quarter", "quarters", [f"Q{q} {y}" for y in (2022, 2023, 2024, 2025) for q in (1, 2, 3, 4)]),
]

SERIES_SETS = [
    ["2023", "2024", "2025"],
    ["Online", "In store", "Wholesale"],
    ["Product A", "Product B", "Product C", "Product D"],
    ["North", "South", "East", "West"],
    ["Men", "Women"],
    ["Plan", "Actual"],
    ["Basic plan", "Pro plan", "Team plan"],
]

FUNNELS = [
    ("Online store funnel", ["Visited site", "Viewed product", "Added to cart", "Started checkout", "Purchased"]),
    ("Hiring funnel", ["Applications", "Screened", "Interviewed", "Offers", "Hires"]),
    ("Marketing funnel", ["Impressions", "Clicks", "Sign-ups", "Trials", "Customers"]),
    ("App onboarding funnel", ["Downloads", "Installs", "Registrations", "First action", "Week-1 active"]),
]

SCATTER_PAIRS = [  # point set, (x label, x words), x format, x range, (y label, y words), y format, y range
    ("country", ("GDP per capita (USD)", "gdp per capita"), "dollar", (2e3, 8e4), ("Life expectancy (years)", "life expectancy"), "decimal", (55, 85)),
    ("channel", ("Ad spend (USD)", "ad spend"), "dollar", (1e4, 5e5), ("Sales (units)", "sales"), "comma", (200, 9000)),
    ("product", ("Average price (USD)", "price"), "decimal", (5, 120), ("Rating (1-5)", "rating"), "decimal", (2, 5)),
    ("department", ("Team size", "team size"), "comma", (3, 60), ("Projects delivered", "projects delivered"), "comma", (2, 80)),
]

PALETTES = [
    ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"],
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"],
    ["#264653", "#2a9d8f", "#e9c46a", "#f4a261", "#e76f51", "#8ab17d", "#6d597a", "#b56576", "#355070", "#eaac8b"],
    ["#003f5c", "#2f4b7c", "#665191", "#a05195", "#d45087", "#f95d6a", "#ff7c43", "#ffa600", "#488f31", "#de425b"],
    ["#0b84a5", "#f6c85f", "#6f4e7c", "#9dd866", "#ca472f", "#ffa056", "#8dddd0", "#3c6e71", "#d9a5b3", "#5b8e7d"],
    ["#5778a4", "#e49444", "#d1615d", "#85b6b2", "#6a9f58", "#e7ca60", "#a87c9f", "#f1a2a9", "#967662", "#b8b0ac"],
]
FONTS = ["DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono", "Liberation Sans", "Liberation Serif"]
BACKGROUNDS = ["#ffffff", "#ffffff", "#f7f7f7", "#fbf8f1", "#f4f6fb"]
SIZES = [(640, 480), (640, 400), (512, 512), (600, 450), (576, 432), (560, 420)]  # pixels; modest: PNG time grows with area
LEGEND_PLACES = ["upper right", "upper left", "outside right", "below"]

# Looks: how a chart is drawn beyond the sampled style. "default" is the full style range above. The demo
# looks are for the small LLaVA that training/pretrain.py trains from scratch: it sees a chart as 24x24
# patches of 16 px at 384x384, so the chart is drawn square at that size (nothing is shrunk or padded
# away) with type of 12-14 pt (17-19 px: a capital spans about one patch; at the default 8-11 pt shrunk
# from 640 px a letter is a third of a patch) and fewer categories and series, so labels have room to
# stay upright (14 pt and more ran labels of pies and tables together at 384 px). "demo-easy" is the
# first stage of its curriculum: the largest type, values always printed, the fewest categories.
# None of this changes the default look's random draws.
LOOKS = {
    "default": None,
    "demo": {"size": 384, "fonts": ("DejaVu Sans", "Liberation Sans", "DejaVu Serif"), "font_size": (12, 13),
             "title_size": (13, 14), "max_categories": 6, "max_series": 3, "value_labels": 0.8},
    "demo-easy": {"size": 384, "fonts": ("DejaVu Sans",), "font_size": (13,), "title_size": (14,),
                  "max_categories": 4, "max_series": 2, "value_labels": 1.0},
}


# ---------------------------------------------------------------- sampling
def _distinct(values: list[float], fmt: str, rng: random.Random) -> list[float]:
    """Nudge ties apart (after quantizing) so max/min/rank questions have one answer."""
    out: list[float] = []
    for v in values:
        q = quantize(v, fmt)
        tries = 0
        while q in out and tries < 50:
            v *= rng.choice((0.93, 1.07))
            q = quantize(v, fmt)
            tries += 1
        out.append(q)
    return out


def _center(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high / 2.5)))


def _values(rng: random.Random, n: int, fmt: str, low: float, high: float, center: float | None = None) -> list[float]:
    # series of one chart share a center, so no stacked segment is too thin to carry its label
    center = center or _center(rng, low, high)
    raw = [min(high, max(low, center * rng.uniform(0.35, 2.5))) for _ in range(n)]
    return _distinct(raw, fmt, rng)


def _walk(rng: random.Random, n: int, fmt: str, low: float, high: float) -> list[float]:
    v = math.exp(rng.uniform(math.log(low * 1.5), math.log(high / 2)))
    drift = rng.uniform(-0.06, 0.1)
    raw = []
    for _ in range(n):
        raw.append(min(high, max(low, v)))
        v *= 1 + drift + rng.gauss(0, 0.12)
    return _distinct(raw, fmt, rng)


def _shares(rng: random.Random, n: int) -> list[float]:
    """Integer percentages, at least 2 each, distinct, summing to exactly 100."""
    for _ in range(100):
        weights = [rng.uniform(0.3, 3.0) for _ in range(n)]
        shares = [max(2, round(100 * w / sum(weights))) for w in weights]
        shares[shares.index(max(shares))] += 100 - sum(shares)
        if len(set(shares)) == n and min(shares) >= 2:
            return [float(s) for s in shares]
    return [float(s) for s in [100 - 3 * (n - 1) - sum(range(n - 1))] + [3 + i for i in range(n - 1)]]


def _cap(lo: int, hi: int, cap: int | None) -> int:
    """`hi` lowered to a look's cap (never below `lo`); the default look has none."""
    return hi if cap is None else max(lo, min(hi, cap))


def _pick_categories(rng: random.Random, lo: int, hi: int) -> tuple[str, list[str]]:
    name = rng.choice(list(CATEGORY_SETS))
    pool = CATEGORY_SETS[name][3]
    k = rng.randint(lo, min(hi, len(pool)))
    if name in ORDINAL_SETS:
        start = rng.randint(0, len(pool) - k)
        return name, pool[start:start + k]
    return name, rng.sample(pool, k)


def _pick_time(rng: random.Random, lo: int, hi: int) -> tuple[tuple, list[str]]:
    axis = rng.choice(TIME_AXES)
    k = rng.randint(lo, min(hi, len(axis[3])))
    start = rng.randint(0, len(axis[3]) - k)
    return axis, axis[3][start:start + k]


def sample_style(kind: str, rng: random.Random) -> dict:
    w, h = rng.choice(SIZES)
    return {
        "width": w, "height": h, "dpi": 100,
        "font": rng.choice(FONTS),
        "font_size": rng.choice((8, 9, 10, 11)),
        "title_size": rng.choice((11, 12, 13, 14)),
        "title_loc": rng.choice(("center", "center", "left")),
        "title_bold": rng.random() < 0.6,
        "palette": rng.choice(PALETTES),
        "palette_shift": rng.randrange(4),
        "background": rng.choice(BACKGROUNDS),
        "grid": rng.random() < 0.6,
        "value_labels": rng.random() < 0.65,
        "legend": rng.choice(LEGEND_PLACES),
        "bar_width": rng.choice((0.55, 0.65, 0.75, 0.85)),
        "edge": rng.random() < 0.3,
        "marker": rng.choice(("o", "s", "^", "D", "")),
        "line_width": rng.choice((1.5, 2.0, 2.5)),
        "spines": rng.choice(("all", "minimal")),
        "start_angle": rng.choice((0, 90, 140)),
        "variant": rng.choice(("panels", "table")),    # infographic layout
        "show_rate": rng.random() < 0.5,                # funnel: print % of first stage
    }


def _apply_look(style: dict, look: dict, rng: random.Random) -> dict:
    return {**style, "width": look["size"], "height": look["size"], "font": rng.choice(look["fonts"]),
            "font_size": rng.choice(look["font_size"]), "title_size": rng.choice(look["title_size"]),
            "value_labels": rng.random() < look["value_labels"], "max_ticks": 4,
            # a legend row below, or a column beside, would not fit 384 px of large type: inside only;
            # likewise a funnel's "93.2k (60.9%)" beside a narrow stage
            "legend": rng.choice(("upper right", "upper left")), "show_rate": False, "fit_value_labels": True,
            "right_margin": 36}


def sample_spec(kind: str, rng: random.Random, look: str = "default") -> ChartSpec:
    """A random but realistic chart of `kind`; the same rng state gives the same spec. `look` is a
    key of LOOKS."""
    if kind not in KINDS:
        raise ValueError(f"unknown chart kind {kind!r}; choose from {', '.join(KINDS)}")
    if look not in LOOKS:
        raise ValueError(f"unknown look {look!r}; choose from {', '.join(LOOKS)}")
    style = sample_style(kind, rng)
    lk = LOOKS[look]
    cats_cap, series_cap = (lk["max_categories"], lk["max_series"]) if lk else (None, None)
    if lk:
        style = _apply_look(style, lk, rng)

    if kind in ("pie", "donut"):
        name, cats = _pick_categories(rng, 3, _cap(3, 6, cats_cap))
        sing, plural, whole, _ = CATEGORY_SETS[name]
        title = rng.choice([f"{whole[0].upper() + whole[1:]} by {sing}", f"Share of {whole} by {sing}",
                            f"Distribution of {whole} across {plural}"])
        return ChartSpec(kind, title, {"Share": _shares(rng, len(cats))}, style, cats, fmt="percent",
                         measure="share", noun=(sing, plural), whole=whole)

    if kind == "funnel":
        title, stages = rng.choice(FUNNELS)
        k = rng.randint(4, _cap(4, len(stages), cats_cap))
        v = rng.uniform(2e3, 2e5)
        vals = []
        for _ in range(k):
            vals.append(v)
            v *= rng.uniform(0.35, 0.85)
        fmt = rng.choice(("comma", "short"))
        return ChartSpec(kind, title, {"People": _distinct(vals, fmt, rng)}, style, stages[:k],
                         fmt=fmt, measure="number of people", noun=("stage", "stages"))

    if kind == "scatter":
        name, (xl, _xm), xfmt, (xlo, xhi), (yl, ym), yfmt, (ylo, yhi) = rng.choice(SCATTER_PAIRS)
        sing, plural, _, pool = CATEGORY_SETS[name]
        cats = rng.sample(pool, rng.randint(5, _cap(5, min(8, len(pool)), cats_cap)))
        xs = [quantize(math.exp(rng.uniform(math.log(xlo), math.log(xhi))), xfmt) for _ in cats]
        ys = _distinct([rng.uniform(ylo, yhi) for _ in cats], yfmt, rng)
        title = f"{yl.split(' (')[0]} vs {xl.split(' (')[0].lower()} by {sing}"
        return ChartSpec(kind, title, {xl: xs, yl: ys}, style, cats, x_label=xl, y_label=yl,
                         fmt=yfmt, measure=ym, noun=(sing, plural), x_fmt=xfmt)

    measure, axis_label, fmt, low, high = rng.choice(MEASURES)
    while kind == "stacked_bar" and not (fmt in ("comma", "short", "dollar") or measure == "emissions"):
        # stacking only makes sense for quantities that add up (not temperatures or rates)
        measure, axis_label, fmt, low, high = rng.choice(MEASURES)

    if kind in ("line", "multi_line", "area"):
        (tlabel, sing, plural, _), cats = _pick_time(rng, 5, _cap(5, 12, cats_cap and cats_cap + 1))
        n_series = {"line": 1, "multi_line": rng.randint(2, _cap(2, 4, series_cap)),
                    "area": rng.randint(1, 2)}[kind]
        names = rng.choice(SERIES_SETS)[:n_series] if n_series > 1 else [axis_label.split(" (")[0]]
        series = {s: _walk(rng, len(cats), fmt, low, high) for s in names}
        title = rng.choice([f"{measure[0].upper() + measure[1:]} by {sing}", f"{axis_label.split(' (')[0]} over time",
                            f"{measure[0].upper() + measure[1:]}, {cats[0]}-{cats[-1]}"])
        return ChartSpec(kind, title, series, style, cats, x_label=tlabel, y_label=axis_label, fmt=fmt,
                         measure=measure, noun=(sing, plural), time_axis=True)

    # bars and infographic panels: categories or (sometimes) time on the category axis
    use_time = kind in ("bar", "grouped_bar", "stacked_bar") and rng.random() < 0.3
    if use_time:
        (xlabel, sing, plural, _), cats = _pick_time(rng, 4, _cap(4, 8, cats_cap))
    else:
        name, cats = _pick_categories(rng, 3, _cap(3, 7 if kind != "infographic" else 6, cats_cap))
        sing, plural = CATEGORY_SETS[name][:2]
        xlabel = sing[0].upper() + sing[1:]
    if kind in ("grouped_bar", "stacked_bar"):
        names = rng.choice(SERIES_SETS)
        names = names[:rng.randint(2, _cap(2, min(4, len(names)), series_cap))]
        cats = cats[:5]
    else:
        names = [axis_label.split(" (")[0]]
    if use_time:
        series = {s: _walk(rng, len(cats), fmt, low, high) for s in names}
    else:
        center = _center(rng, low, high)
        series = {s: _values(rng, len(cats), fmt, low, high, center) for s in names}
    title = rng.choice([f"{measure[0].upper() + measure[1:]} by {sing}", f"{axis_label.split(' (')[0]} per {sing}",
                        f"{measure[0].upper() + measure[1:]} across {plural}"])
    if kind == "infographic":
        title = rng.choice([f"Key figures: {measure} by {sing}", f"{measure[0].upper() + measure[1:]} at a glance"])
    return ChartSpec(kind, title, series, style, cats, x_label=xlabel, y_label=axis_label, fmt=fmt,
                     measure=measure, noun=(sing, plural), time_axis=use_time)
