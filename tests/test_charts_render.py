import io
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from charts import KINDS, ChartSpec, format_value, parse_number, render, sample_spec
from charts.render import text_boxes
from charts.spec import quantize

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_renders_a_png_of_the_requested_size(kind):
    spec = sample_spec(kind, random.Random(f"render:{kind}"))
    png = render(spec)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    assert image.size == (spec.style["width"], spec.style["height"])
    assert image.mode == "RGB"
    # not a blank canvas: a chart has many colours
    assert len(image.getcolors(maxcolors=1_000_000)) > 20


def test_at_least_ten_kinds_including_the_required_ones():
    required = {"pie", "donut", "bar", "hbar", "grouped_bar", "stacked_bar", "line", "multi_line", "area",
                "scatter", "funnel", "infographic"}
    assert required <= set(KINDS) and len(KINDS) >= 10


def test_the_same_seed_gives_the_same_spec_and_the_same_pixels():
    a = sample_spec("grouped_bar", random.Random(7))
    b = sample_spec("grouped_bar", random.Random(7))
    assert a == b
    assert render(a) == render(b)
    assert sample_spec("grouped_bar", random.Random(8)) != a


def test_rendering_one_chart_does_not_leak_into_the_next():
    """The per-process figure is reused: a chart rendered after another must equal a fresh render."""
    bar = sample_spec("bar", random.Random(1))
    pie = sample_spec("pie", random.Random(2))
    first = render(bar)
    render(pie)
    render(sample_spec("multi_line", random.Random(3)))
    assert render(bar) == first


def test_style_varies_across_seeds():
    specs = [sample_spec(k, random.Random(f"style:{i}")) for i in range(40) for k in ("bar", "line", "pie")]
    for key in ("font", "font_size", "legend", "value_labels", "grid", "background", "title_loc"):
        assert len({str(s.style[key]) for s in specs}) > 1, key
    assert len({(s.style["width"], s.style["height"]) for s in specs}) > 3
    assert len({tuple(s.style["palette"]) for s in specs}) > 3
    assert len({s.fmt for s in specs}) >= 4


def test_value_labels_change_the_image():
    spec = sample_spec("bar", random.Random(5))
    on = ChartSpec.from_dict({**spec.to_dict(), "style": {**spec.style, "value_labels": True}})
    off = ChartSpec.from_dict({**spec.to_dict(), "style": {**spec.style, "value_labels": False}})
    assert render(on) != render(off)


@pytest.mark.parametrize("x,fmt,text", [
    (1200, "comma", "1,200"), (1200, "short", "1.2k"), (12, "percent", "12%"), (3_400_000, "dollar", "$3.4M"),
    (850_000, "dollar", "$850k"), (4.5, "decimal", "4.5"), (999, "short", "999"), (2_000_000_000, "short", "2B"),
])
def test_number_formats_print_like_charts_do(x, fmt, text):
    assert format_value(x, fmt) == text


def test_every_plotted_value_is_exactly_what_its_label_prints():
    for i in range(60):
        spec = sample_spec(KINDS[i % len(KINDS)], random.Random(f"q:{i}"))
        fmt_of = {0: spec.x_fmt} if spec.kind == "scatter" else {}
        for k, values in enumerate(spec.series.values()):
            for v in values:
                fmt = fmt_of.get(k, spec.fmt)
                assert quantize(v, fmt) == v
                assert parse_number(format_value(v, fmt)) == pytest.approx(v)


def test_pie_shares_are_whole_percentages_that_sum_to_100():
    for i in range(50):
        spec = sample_spec("pie", random.Random(i))
        shares = spec.series["Share"]
        assert sum(shares) == 100
        assert all(s == int(s) and s >= 2 for s in shares)
        assert len(set(shares)) == len(shares)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown chart kind"):
        sample_spec("radar", random.Random(0))


def test_rendering_never_imports_pyplot_and_import_charts_stays_light():
    code = ("import sys, random, charts\n"
            "heavy = [m for m in ('matplotlib', 'torch', 'gradio', 'boto3') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "charts.render(charts.sample_spec('bar', random.Random(0)))\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    uses_pyplot = re.compile(r"import\s+matplotlib\.pyplot|from\s+matplotlib\s+import\s+pyplot|\bplt\.")
    for path in (ROOT / "charts").glob("*.py"):
        assert not uses_pyplot.search(path.read_text()), path


def _specs(kinds, per_kind: int):
    return [sample_spec(k, random.Random(f"fit:{k}:{i}")) for k in kinds for i in range(per_kind)]


def test_every_label_title_and_legend_entry_lies_inside_the_image():
    """Long titles are set smaller and scatter labels turn left near the edge instead of being cut off."""
    long_title = sample_spec("pie", random.Random(0))
    long_title.title = "Distribution of electricity generation across energy sources in the region"
    for spec in [long_title, *_specs(KINDS, 12)]:
        w, h = spec.style["width"], spec.style["height"]
        for text, (left, top, right, bottom), _ in text_boxes(spec):
            assert left >= -0.5 and top >= -0.5 and right <= w + 0.5 and bottom <= h + 0.5, (spec.kind, spec.title, text)


def test_value_labels_ticks_and_legend_entries_do_not_overlap():
    """Crowded bar labels get smaller type or turn upright, two lines' labels go above and below, and
    inside legends get headroom, so every printed value stays readable. (Scatter points and areas
    can crowd too closely for any placement, so they are left out.)"""
    kinds = [k for k in KINDS if k not in ("scatter", "area")]
    for spec in _specs(kinds, 12):
        boxes = [(text, box) for text, box, degrees in text_boxes(spec) if not degrees]
        for i, (a, (l1, t1, r1, b1)) in enumerate(boxes):
            for b, (l2, t2, r2, b2) in boxes[i + 1:]:
                overlap = min(r1, r2) - max(l1, l2) > 1 and min(b1, b2) - max(t1, t2) > 1
                assert not overlap, (spec.kind, spec.title, a, b)


def test_text_is_drawn_where_text_boxes_says():
    """text_boxes and render agree: pixels inside the title's box differ from the background."""
    spec = sample_spec("bar", random.Random(11))
    image = Image.open(io.BytesIO(render(spec))).convert("RGB")
    title = next(box for text, box, _ in text_boxes(spec) if text == spec.title)
    crop = image.crop(tuple(round(v) for v in title))
    assert len(crop.getcolors(maxcolors=100_000)) > 5
    outside = image.crop((0, 0, 6, 6))
    assert len(outside.getcolors()) == 1
