"""A chart's data table as text: the dense target of chart-to-table pretraining (as DePlot / MatCha).

    data_table(spec)  ->  "TITLE | Revenue by region\\nRegion | Revenue (USD)\\nNorth | $3.4M\\nSouth | $1.2M"

One row per category, one column per series, every value written as the chart writes it
(`format_value`), header words as the chart prints them (axis labels, legend entries). A model that
learns to produce this has to read every label, value and word on the chart, not just answer a
question about one of them; and the generator knows every chart's data, so the target costs nothing.
"""
from __future__ import annotations

from .spec import ChartSpec, format_value

TABLE_PROMPTS = ("Generate the underlying data table of the chart.",
                 "Write the data table of this chart.",
                 "Convert the chart to a table.")


def _first_column(spec: ChartSpec) -> str:
    return spec.x_label or spec.noun[0].capitalize()      # the category axis (drawn on the left for hbar)


def data_table(spec: ChartSpec) -> str:
    """The chart's title, header and rows, one line each, cells separated by ' | '."""
    names = list(spec.series)
    if spec.kind == "scatter":
        xs, ys = spec.series[names[0]], spec.series[names[1]]
        rows = [f"{c} | {format_value(x, spec.x_fmt)} | {format_value(y, spec.fmt)}"
                for c, x, y in zip(spec.categories, xs, ys)]
        header = f"{spec.noun[0].capitalize()} | {spec.x_label} | {spec.y_label}"
    else:
        fmt = "percent" if spec.kind in ("pie", "donut") else spec.fmt
        if len(names) > 1:
            columns = names
        elif spec.kind in ("pie", "donut", "funnel"):
            columns = [names[0]]
        else:
            columns = [spec.y_label or names[0]]
        header = " | ".join([_first_column(spec)] + columns)
        rows = [" | ".join([c] + [format_value(spec.series[s][i], fmt) for s in names])
                for i, c in enumerate(spec.categories)]
    return "\n".join([f"TITLE | {spec.title}", header, *rows])
