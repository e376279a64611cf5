"""Draw a ChartSpec to PNG bytes: marks with matplotlib's Agg canvas and object API (no pyplot),
every string with Pillow.

Speed is why this looks lower-level than usual matplotlib code. Profiled on 2 vCPUs, a chart drawn
the usual way spent most of its time building Axis/Tick/Legend objects and, above all, in
matplotlib's text machinery (Text artists, layout, glyph rasterizing: over half of what remained
after the axis machinery was gone). So each process keeps ONE figure and ONE axes with the axis
machinery off; marks go in as a few collections and lines; each string (title, ticks, value labels,
legend entries) is queued with its place in data or pixel coordinates and drawn by Pillow's
FreeType onto the finished pixels, in the same font files matplotlib would use. Labels are measured
with those fonts, so margins fit them, crowded labels get smaller type or another place, and
`text_boxes` lets tests check that every string fits the image and no two collide. The surface
itself (figure, fonts, queued text, PNG encoding) is charts/canvas.py. Figures: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import math

from .canvas import DPI, HA, INK, VA, Page, add_line, add_polygons, fresh_page, glyph_centres, palette, rect
from .spec import ChartSpec, format_value


# ---------------------------------------------------------------- layout, frame, legend
class _Layout:
    """Margins in pixels around the plot area, derived from the labels that go in them."""

    def __init__(self, page: Page, left_labels: list[str], bottom_labels: list[str], rotate: bool,
                 legend: str = ""):
        spec = page.spec
        self.w, self.h, self.line = page.w, page.h, page.line
        self.tick_w = max((page.width(t) for t in left_labels), default=0)
        widest = max((page.width(t) for t in bottom_labels), default=0)
        self.tick_h = widest * 0.5 + self.line * 0.9 if rotate else self.line * 1.3
        self.left = 14 + self.tick_w + (self.line * 2 if spec.y_label else 0)
        self.bottom = 12 + self.tick_h + (self.line * 1.8 if spec.x_label else 0)
        self.top = _title_band(page)
        self.right = spec.style.get("right_margin", 20)     # demo looks: room for half a large tick label
        if legend == "right":
            self.right += _legend_size(page, list(spec.series))[0] + 16
        if legend == "below":
            self.bottom += self.line * 2.2

    def box(self) -> tuple[float, float, float, float]:
        """Plot area (left, bottom, width, height) in pixels."""
        return (self.left, self.bottom, max(0.2 * self.w, self.w - self.left - self.right),
                max(0.2 * self.h, self.h - self.bottom - self.top))


def _crowded(page: Page, labels: list[str], lay: _Layout) -> bool:
    """Whether category labels side by side would overlap in the plot width: then they are rotated."""
    per_label = (lay.w - lay.left - lay.right) / max(1, len(labels))
    return max(page.width(c) for c in labels) + 8 > per_label


def _title_band(page: Page) -> float:
    """Pixels kept free above the plot for the title."""
    return 16 + page.spec.style["title_size"] * DPI / 72 * 1.9


def _title(page: Page, x_left: float | None = None):
    """The title, centred or starting at x_left pixels (default: 4% of the width); a title too long
    for the width is set smaller rather than cut off."""
    st = page.spec.style
    left = st["title_loc"] == "left"
    x = (0.04 * page.w if x_left is None else x_left) if left else page.w / 2
    room = page.w - x - 8 if left else page.w - 16
    size = _fitting_size(page, [page.spec.title], room, st["title_size"], floor=7, bold=st["title_bold"])
    page.text(x, page.h - 10 - st["title_size"] * DPI / 72 * 0.7, page.spec.title, "px",
              "left" if left else "center", "center", size=size, bold=st["title_bold"])


def _frame(page: Page, lay: _Layout, xlim, ylim, value_axis: str | None, x_labels=None, y_labels=None,
           rotate=False):
    """Plot area, limits, value ticks + grid, category labels, axis lines and titles.
    `value_axis` ('x'/'y'/'xy') gets numeric ticks; x_labels/y_labels are (position, text) pairs."""
    from matplotlib.collections import LineCollection
    from matplotlib.ticker import MaxNLocator
    spec, ax = page.spec, page.ax
    st = spec.style
    left, bottom, width, height = lay.box()
    page.set_plot_area(left, bottom, width, height)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    for axis in (value_axis or ""):
        lo, hi = sorted(xlim if axis == "x" else ylim)
        # demo looks set fewer ticks: their large type would run six tick labels together on a short axis
        ticks = [t for t in MaxNLocator(st.get("max_ticks", 6)).tick_values(lo, hi) if lo - 1e-9 <= t <= hi + 1e-9]
        fmt = spec.x_fmt if (axis == "x" and spec.kind == "scatter") else spec.fmt
        labels = [(t, format_value(t, fmt)) for t in ticks]
        if axis == "y":
            y_labels, segments, transform = labels, [[(0, t), (1, t)] for t in ticks], ax.get_yaxis_transform()
        else:
            x_labels, segments, transform = labels, [[(t, 0), (t, 1)] for t in ticks], ax.get_xaxis_transform()
        if st["grid"]:
            grid = LineCollection(segments, colors="#cccccc", linewidths=0.7, zorder=0)
            grid.set_transform(transform)
            ax.add_collection(grid, autolim=False)
    for pos, text in (y_labels or []):
        page.text(0, pos, text, "yaxis", "right", "center", offset=(-5, 0))
    for pos, text in (x_labels or []):
        page.text(pos, 0, text, "xaxis", "right" if rotate else "center", "top", rotation=30 if rotate else 0,
                  offset=(0, -5))
    xs, ys = ([0, 0, 1, 1, 0], [0, 1, 1, 0, 0]) if st["spines"] == "all" else ([0, 0, 1], [1, 0, 0])
    add_line(page, xs, ys, ax.transAxes, color="#333333", lw=0.8, clip_on=False, zorder=2.5)
    _title(page, left)
    xl, yl = (spec.y_label, spec.x_label) if spec.kind == "hbar" else (spec.x_label, spec.y_label)
    if xl:
        page.text(left + width / 2, lay.bottom - 10 - lay.tick_h - lay.line * 0.6, xl, "px", "center", "top")
    if yl:
        page.text(8, bottom + height / 2, yl, "px", "center", "top", rotation=90)


def _legend_size(page: Page, labels: list[str], row: bool = False) -> tuple[float, float]:
    """(width, height) in pixels of a legend's entries: a 2-em handle, a gap, the label."""
    entries = [page.line * 2.6 + page.width(s) for s in labels]
    if row:
        return sum(entries) + page.line * 1.2 * (len(labels) - 1), page.line * 1.5
    return max(entries), page.line * 1.5 * len(labels)


def _legend(page: Page, handles: list[tuple], labels: list[str], place: str, box):
    """Legend entries at `place`: 'upper right'/'upper left' (framed, inside the plot area `box`),
    'outside right' (right margin), 'below' (one row under the plot) or 'center right' (beside a pie).
    A handle is ('patch', color) or ('line', color, marker, width)."""
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import IdentityTransform
    pixels = IdentityTransform()
    row = place == "below"
    w, h = _legend_size(page, labels, row)
    pad = page.line * 0.5 if place.startswith("upper") else 0
    left, bottom, width, height = box
    if place == "upper right":
        x0, top = left + width - w - 2 * pad - 6, bottom + height - 6
    elif place == "upper left":
        x0, top = left + 6, bottom + height - 6
    elif place == "below":
        x0, top = (page.w - w) / 2, page.line * 2.0
    else:   # outside right / center right: to the right of the plot area, vertically centred
        x0, top = left + width + 14, bottom + height / 2 + h / 2 if place == "center right" else bottom + height
    if pad:
        page.fig.add_artist(Rectangle((x0, top - h - 2 * pad), w + 2 * pad, h + 2 * pad, transform=pixels,
                                      facecolor="white", edgecolor="#cccccc", linewidth=0.8, alpha=0.85, zorder=3))
    x, y = x0 + pad, top - pad - page.line * 0.75
    for handle, label in zip(handles, labels):
        hx, hw = x + page.line * 0.2, page.line * 1.8
        if handle[0] == "patch":
            page.fig.add_artist(Rectangle((hx, y - page.line * 0.35), hw, page.line * 0.7, transform=pixels,
                                          facecolor=handle[1], edgecolor="none", zorder=4))
        else:
            _, color, marker, lw = handle
            add_line(page, [hx, hx + hw / 2, hx + hw], [y, y, y], pixels, to_figure=True, color=color, lw=lw,
                     marker=marker or None, markevery=[1], markersize=5, zorder=4)
        page.text(x + page.line * 2.6, y, label, "px", "left", "center")
        if row:
            x += page.line * 3.8 + page.width(label)
        else:
            y -= page.line * 1.5


def _above_legend(page: Page, lay: _Layout, entries: int, lo: float, top: float, hi: float) -> float:
    """The upper limit `hi`, raised when a legend sits inside the plot area so that the data (up to
    `top`, with its value labels) stays below the legend box and every printed value stays readable."""
    if entries < 2 or not page.spec.style["legend"].startswith("upper"):
        return hi
    covered = page.line * (1.5 * entries + 1) + 10 + (page.line * 1.4 if page.spec.values_printed else 0)
    return max(hi, lo + (top - lo) / max(0.35, 1 - covered / lay.box()[3]))


def _legend_place(spec: ChartSpec) -> str:
    return {"outside right": "right", "below": "below"}.get(spec.style["legend"], "")


def _tick_texts(spec: ChartSpec, hi: float) -> list[str]:
    """Stand-ins for the value-axis labels, to size the margin before the ticks are chosen."""
    return [format_value(v, spec.fmt) for v in (hi, hi * 0.83, -abs(hi) * 0.1)]


def _fitting_size(page: Page, texts: list[str], room: float, size: float, floor: float | None = None,
                  bold: bool = False) -> float:
    """The largest font size, from `size` down to `floor` (default: 3 points less, 6 at least), at which
    every text is at most `room` pixels wide; `floor` when none fits."""
    floor = max(6.0, size - 3) if floor is None else floor
    while size > floor and max(page.width(t, size, bold) for t in texts) > room:
        size -= 0.5
    return size


def _inside(box, within) -> bool:
    """Whether `box` (left, top, right, bottom) lies inside `within` (same form)."""
    return within[0] <= box[0] and within[1] <= box[1] and box[2] <= within[2] and box[3] <= within[3]


def _overlap(box, boxes) -> float:
    """Area of `box` covered by `boxes` (pixels squared, overlaps counted once per box)."""
    return sum(max(0.0, min(box[2], b[2]) - max(box[0], b[0])) * max(0.0, min(box[3], b[3]) - max(box[1], b[1]))
               for b in boxes)


# ---------------------------------------------------------------- chart kinds
def _draw_pie(page: Page):
    spec, st = page.spec, page.spec.style
    values, cats = spec.series["Share"], spec.categories
    legend_right = not st["value_labels"] or st["legend"] == "outside right"
    avail_h = page.h - _title_band(page) - 12
    if legend_right:
        room = _legend_size(page, cats)[0] + 34
        r = max(40.0, min(avail_h / 2, (page.w - room - 24) / 2))
        cx = 12 + r + max(0.0, (page.w - room - 24 - 2 * r) / 2)
    else:   # category names outside the wedges, at 1.1 r
        label_w = max(page.width(c) for c in cats)
        r = max(40.0, min((avail_h - 2 * page.line) / 2.2, (page.w / 2 - label_w - 10) / 1.1))
        cx = page.w / 2
    cy = 12 + avail_h / 2
    page.set_plot_area(cx - r, cy - r, 2 * r, 2 * r)
    page.ax.set_xlim(-1, 1)
    page.ax.set_ylim(-1, 1)
    _title(page)
    inner = 0.58 if spec.kind == "donut" else 0.0
    polygons, mids, start = [], [], float(st["start_angle"])
    for v in values:                      # clockwise from start_angle, like matplotlib's counterclock=False
        end = start - 360 * v / 100
        steps = max(2, int(abs(end - start) / 2))
        arc = [math.radians(start + (end - start) * k / steps) for k in range(steps + 1)]
        outer = [(math.cos(a), math.sin(a)) for a in arc]
        polygons.append(outer + ([(inner * math.cos(a), inner * math.sin(a)) for a in reversed(arc)] if inner
                                 else [(0.0, 0.0)]))
        mids.append(math.radians((start + end) / 2))
        start = end
    colors = palette(spec, len(values))
    add_polygons(page, polygons, colors, "white" if st["edge"] else None)
    if st["value_labels"]:
        radius = 0.79 if inner else 0.64
        for a, v in zip(mids, values):
            page.text(radius * math.cos(a), radius * math.sin(a), format_value(v, "percent"),
                      color="white" if v >= 8 else INK)
    if legend_right:
        _legend(page, [("patch", c) for c in colors], cats, "center right", (cx - r, cy - r, 2 * r, 2 * r))
    else:
        for a, c in zip(mids, cats):
            page.text(1.1 * math.cos(a), 1.1 * math.sin(a), c, ha="left" if math.cos(a) >= 0 else "right")


def _draw_bar(page: Page):
    spec, st = page.spec, page.spec.style
    cats, names = spec.categories, list(spec.series)
    n = len(names)
    horizontal, stacked = spec.kind == "hbar", spec.kind == "stacked_bar"
    tops = ([sum(spec.series[s][i] for s in names) for i in range(len(cats))] if stacked
            else [v for s in names for v in spec.series[s]])
    hi = max(tops) * (1.15 if horizontal else 1.12)
    legend = _legend_place(spec) if n > 1 else ""
    rotate = False
    if horizontal:
        lay = _Layout(page, cats, _tick_texts(spec, hi), False, legend)
    else:
        lay = _Layout(page, _tick_texts(spec, hi), cats, False, legend)
        rotate = _crowded(page, cats, lay)
        if rotate:
            lay = _Layout(page, _tick_texts(spec, hi), cats, True, legend)
    colors = palette(spec, n if n > 1 else len(cats))
    width = st["bar_width"]
    wk = width if stacked else width / n
    label_size, upright = st["font_size"] - (1 if n > 2 else 0), True
    if st["value_labels"] and not (stacked or horizontal):
        # labels above neighbouring bars must not run into each other: smaller type, else turned upright
        texts = [format_value(v, spec.fmt) for v in tops]
        room = (wk if n > 1 else 1) * lay.box()[2] / len(cats) - 3
        label_size = _fitting_size(page, texts, room, label_size)
        upright = max(page.width(t, label_size) for t in texts) <= room
        if not upright:     # vertical labels: leave them room under the top of the plot
            plot_h = lay.box()[3]
            hi = max([hi] + [v * plot_h / max(plot_h * 0.3, plot_h - 10 - page.width(t, label_size))
                             for v, t in zip(tops, texts)])
    if horizontal and st["value_labels"] and st.get("fit_value_labels"):
        # the demo looks' large labels beside the bars: raise the limit until the widest one fits
        plot_w = lay.box()[2]
        hi = max([hi] + [v * plot_w / max(plot_w * 0.3, plot_w - 8 - page.width(format_value(v, spec.fmt), label_size))
                         for v in tops])
    if not horizontal:
        hi = _above_legend(page, lay, n, 0, max(tops), hi)
    polygons, fills = [], []
    bottoms = [0.0] * len(cats)
    for k, s in enumerate(names):
        for i, v in enumerate(spec.series[s]):
            mid = i if stacked else i - width / 2 + wk * (k + 0.5)
            a, b = bottoms[i], bottoms[i] + v
            polygons.append(rect(a, mid - wk / 2, b, mid + wk / 2) if horizontal else rect(mid - wk / 2, a, mid + wk / 2, b))
            fills.append(colors[k] if n > 1 else colors[i] if st["palette_shift"] % 2 else colors[0])
            if st["value_labels"]:
                text = format_value(v, spec.fmt)
                if stacked:
                    page.text(mid, (a + b) / 2, text, size=label_size)
                elif horizontal:
                    page.text(b, mid, text, ha="left", size=label_size, offset=(3, 0))
                elif upright:
                    page.text(mid, b, text, va="bottom", size=label_size, offset=(0, 2))
                else:
                    page.text(mid, b, text, ha="left", size=label_size, rotation=90, offset=(0, 3))
            if stacked:
                bottoms[i] = b
    add_polygons(page, polygons, fills, "#333333" if st["edge"] else None)
    span = (-0.6, len(cats) - 0.4)
    pos = list(range(len(cats)))
    if horizontal:
        _frame(page, lay, (0, hi), span[::-1], "x", y_labels=list(zip(pos, cats)))
    else:
        _frame(page, lay, span, (0, hi), "y", x_labels=list(zip(pos, cats)), rotate=rotate)
    if n > 1:
        _legend(page, [("patch", c) for c in colors], names, spec.style["legend"], lay.box())


def _draw_line(page: Page):
    spec, st = page.spec, page.spec.style
    cats, names = spec.categories, list(spec.series)
    allv = [v for s in names for v in spec.series[s]]
    lo, hi = min(allv), max(allv)
    if spec.kind == "area" or lo < 0.5 * hi:
        ylim = (min(0.0, lo), hi + 0.15 * (hi - min(0.0, lo)))
    else:
        ylim = (lo - 0.15 * (hi - lo), hi + 0.18 * (hi - lo))
    legend = _legend_place(spec) if len(names) > 1 else ""
    lay = _Layout(page, _tick_texts(spec, ylim[1]), cats, False, legend)
    rotate = _crowded(page, cats, lay)
    if rotate:
        lay = _Layout(page, _tick_texts(spec, ylim[1]), cats, True, legend)
    ylim = (ylim[0], _above_legend(page, lay, len(names), ylim[0], hi, ylim[1]))
    colors = palette(spec, len(names))
    xs = list(range(len(cats)))
    marker = st["marker"] or None
    size = st["font_size"] - 1
    if spec.values_printed:   # neighbouring labels must not run into each other
        size = _fitting_size(page, [format_value(v, spec.fmt) for v in allv], lay.box()[2] / len(cats) - 3, size)
    for k, s in enumerate(names):
        vals = spec.series[s]
        add_line(page, xs, vals, color=colors[k], lw=st["line_width"], marker=marker, markersize=5, zorder=3)
        if spec.kind == "area":
            add_polygons(page, [[(xs[0], ylim[0]), *zip(xs, vals), (xs[-1], ylim[0])]], [colors[k]],
                         alpha=0.25 if len(names) > 1 else 0.35)
        if spec.values_printed:
            # of two lines, the lower point's label goes under it (the second series' on a tie)
            other = spec.series[names[1 - k]] if len(names) == 2 else vals
            for x, v, w in zip(xs, vals, other):
                below = v < w or (v == w and k == 1)
                page.text(x, v, format_value(v, spec.fmt), va="top" if below else "bottom", size=size,
                          offset=(0, -6 if below else 5))
    _frame(page, lay, (-0.4, len(cats) - 0.6), ylim, "y", x_labels=list(zip(xs, cats)), rotate=rotate)
    if len(names) > 1:
        _legend(page, [("line", c, marker, st["line_width"]) for c in colors], names, st["legend"], lay.box())


def _draw_scatter(page: Page):
    spec, st = page.spec, page.spec.style
    (_, xs), (_, ys) = list(spec.series.items())
    ylo, yhi = min(ys), max(ys)
    xlo, xhi = min(xs), max(xs)
    xlim = (xlo - 0.08 * (xhi - xlo), xhi + 0.3 * (xhi - xlo))
    ylim = (ylo - 0.12 * (yhi - ylo), yhi + 0.15 * (yhi - ylo))
    lay = _Layout(page, _tick_texts(spec, yhi), ["0"], False)
    left, bottom, width, height = lay.box()
    add_line(page, xs, ys, ls="", marker="o", markersize=6.8, color=palette(spec, 1)[0],
             markeredgecolor="#333333" if st["edge"] else "none", zorder=3)
    font, size = page.font(st["font_size"] - 1), st["font_size"] - 1
    points = [(left + (x - xlim[0]) / (xlim[1] - xlim[0]) * width,
               page.h - bottom - (y - ylim[0]) / (ylim[1] - ylim[0]) * height) for x, y in zip(xs, ys)]
    taken = [(px - 5, py - 5, px + 5, py + 5) for px, py in points]      # labels keep off every point
    plot = (left, page.h - bottom - height, left + width, page.h - bottom)
    for name, (x, y), (px, py) in zip(spec.categories, zip(xs, ys), points):
        text = f"{name} ({format_value(y, spec.fmt)})" if st["value_labels"] else name
        spots = []                     # right-above, left-above, right-below, left-below
        for (dx, dy), ha, va in (((5, 4), "left", "baseline"), ((-5, 4), "right", "baseline"),
                                 ((5, -5), "left", "top"), ((-5, -5), "right", "top")):
            l, t, r, b = font.getbbox(text, anchor=HA[ha] + VA[va])
            spots.append(((px + dx + l, py - dy + t, px + dx + r, py - dy + b), (dx, dy), ha, va))
        inside = ([spot for spot in spots if _inside(spot[0], plot)]
                  or [spot for spot in spots if _inside(spot[0], (0, 0, page.w, page.h))] or spots)
        box, offset, ha, va = min(inside, key=lambda spot: _overlap(spot[0], taken))   # first free, else least covered
        taken.append(box)
        page.text(x, y, text, ha=ha, va=va, size=size, offset=offset)
    _frame(page, lay, xlim, ylim, "xy")


def funnel_rate(spec: ChartSpec, i: int) -> float:
    """Stage i as a percentage of the first stage (printed with format_value, like every number)."""
    vals = spec.series[next(iter(spec.series))]
    return 100 * vals[i] / vals[0]


def _draw_funnel(page: Page):
    spec, st = page.spec, page.spec.style
    vals = spec.series[next(iter(spec.series))]
    top = vals[0]
    lay = _Layout(page, spec.categories, [], False)
    lay.bottom = 16
    left, bottom, width, height = lay.box()
    page.set_plot_area(left, bottom, width, height)
    page.ax.set_xlim(0, top * 1.02)
    page.ax.set_ylim(len(vals) - 0.5, -0.5)
    add_polygons(page, [rect((top - v) / 2, i - 0.4, (top + v) / 2, i + 0.4) for i, v in enumerate(vals)],
                 palette(spec, len(vals)), "white" if st["edge"] else None)
    for i, v in enumerate(vals):
        text = format_value(v, spec.fmt)
        if st["show_rate"] and i > 0:
            text += f" ({format_value(funnel_rate(spec, i), 'percent')})"
        inside = page.width(text) < 0.9 * v / top * width
        page.text(top / 2 if inside else (top + v) / 2 + top * 0.02, i, text, ha="center" if inside else "left",
                  color="white" if inside else INK)
    for i, c in enumerate(spec.categories):
        page.text(0, i, c, "yaxis", "right", "center", offset=(-6, 0))
    _title(page, left)


def _draw_infographic(page: Page):
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import FancyBboxPatch
    spec, st = page.spec, page.spec.style
    vals = spec.series[next(iter(spec.series))]
    cats, n = spec.categories, len(vals)
    _title(page)
    page.set_plot_area(0.03 * page.w, 0.04 * page.h, 0.94 * page.w, 0.8 * page.h)
    page.ax.set_xlim(0, 1)
    page.ax.set_ylim(0, 1)
    colors = palette(spec, n)
    fs = st["font_size"]
    if st["variant"] == "panels":
        cols = n if n <= 3 else math.ceil(n / 2)
        rows = math.ceil(n / cols)
        cw, rh = 1 / cols, 1 / rows
        panels = []
        for i, (c, v) in enumerate(zip(cats, vals)):
            r, k = divmod(i, cols)
            x0, y0, bw, bh = k * cw + 0.015, 1 - (r + 1) * rh + 0.02, cw - 0.03, rh - 0.04
            panels.append(FancyBboxPatch((x0, y0), bw, bh, boxstyle="round,pad=0,rounding_size=0.03"))
            page.text(x0 + bw / 2, y0 + bh * 0.6, format_value(v, spec.fmt), size=fs + 10, bold=True, color="white")
            page.text(x0 + bw / 2, y0 + bh * 0.25, c, size=fs + 1, color="white")
        page.ax.add_collection(PatchCollection(panels, facecolors=colors, edgecolors="none", zorder=2),
                               autolim=False)
    else:   # a table: label | value, under a header naming the measure
        rh = 1 / (n + 1)
        page.text(0.05, 1 - rh / 2, spec.x_label, ha="left", size=fs + 1, bold=True)
        page.text(0.95, 1 - rh / 2, spec.y_label, ha="right", size=fs + 1, bold=True)
        stripes = [rect(0.02, 1 - (i + 2) * rh, 0.98, 1 - (i + 1) * rh) for i in range(0, n, 2)]
        add_polygons(page, stripes, [colors[0]], alpha=0.15)
        for i, (c, v) in enumerate(zip(cats, vals)):
            y = 1 - (i + 1.5) * rh
            page.text(0.05, y, c, ha="left", size=fs + 1)
            page.text(0.95, y, format_value(v, spec.fmt), ha="right", size=fs + 2, bold=True)


RENDERERS = {
    "pie": _draw_pie,
    "donut": _draw_pie,
    "bar": _draw_bar,
    "hbar": _draw_bar,
    "grouped_bar": _draw_bar,
    "stacked_bar": _draw_bar,
    "line": _draw_line,
    "multi_line": _draw_line,
    "area": _draw_line,
    "scatter": _draw_scatter,
    "funnel": _draw_funnel,
    "infographic": _draw_infographic,
}


def _page(spec: ChartSpec) -> Page:
    page = fresh_page(spec)
    RENDERERS[spec.kind](page)
    return page


def render(spec: ChartSpec) -> bytes:
    """PNG bytes (RGB) of the chart, `style['width'] x style['height']` pixels."""
    return _page(spec).png()


def render_glyphs(spec: ChartSpec) -> tuple[bytes, list[tuple[str, float, float]]]:
    """render(spec) and where each character of its upright text lies (canvas.glyph_centres)."""
    page = _page(spec)
    placed = page.place()
    return page.png(placed), glyph_centres(placed)


def text_boxes(spec: ChartSpec) -> list[tuple[str, tuple[float, float, float, float], float]]:
    """Every string `render(spec)` prints: (text, box in image pixels as (left, top, right, bottom),
    rotation in degrees). How tests check that labels fit the image and stay clear of each other."""
    out = []
    for s, (x, y), anchor, font, _, degrees in _page(spec).place():
        left, top, right, bottom = font.getbbox(s, anchor=anchor)
        a = math.radians(degrees)
        corners = [(px * math.cos(a) + py * math.sin(a), -px * math.sin(a) + py * math.cos(a))
                   for px in (left, right) for py in (top, bottom)]
        out.append((s, (x + min(c[0] for c in corners), y + min(c[1] for c in corners),
                        x + max(c[0] for c in corners), y + max(c[1] for c in corners)), degrees))
    return out
