"""Charts for compliance reports: epsilon spent over time, per dataset (matplotlib, Agg).

Figures are built with the object API (``Figure`` + ``FigureCanvasAgg``), never
``pyplot``: no global state, safe in the server's worker threads, no display needed. A
chart is a PNG returned as bytes or as a ``data:`` URI, so the HTML page and the PDF carry
it inline (no second request, nothing for WeasyPrint to fetch).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
from matplotlib.figure import Figure

from consortium_server.reports.rows import DatasetBudget

__all__ = ["epsilon_chart_data_uri", "epsilon_chart_png"]

#: A colour-blind safe palette (Okabe-Ito).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")


def epsilon_chart_png(budgets: Sequence[DatasetBudget], *, dpi: int = 110) -> bytes | None:
    """A step chart of cumulative epsilon spent per dataset, with each cap dashed.

    One point per audited round that charged the dataset; None when there is no point
    to draw.
    """
    drawn = [b for b in budgets if b.series]
    if not drawn:
        return None
    figure = Figure(figsize=(7.5, 3.4), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for position, budget in enumerate(drawn):
        colour = PALETTE[position % len(PALETTE)]
        x = date2num([point.at for point in budget.series])
        values = [float(point.epsilon_spent) for point in budget.series]
        label = f"{budget.dataset_id} (cap {format(budget.epsilon_cap.normalize(), 'f')})"
        axes.step(x, values, where="post", color=colour, linewidth=2, label=label)
        axes.plot(x, values, "o", color=colour, markersize=3)
        axes.axhline(
            float(budget.epsilon_cap), color=colour, linestyle="--", linewidth=1, alpha=0.7
        )
    axes.xaxis_date()
    locator = AutoDateLocator()
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes.set_ylabel("ε spent (cumulative)")
    axes.set_ylim(bottom=0)
    axes.set_title("Privacy budget: epsilon spent over time (UTC)", fontsize=10)
    axes.grid(visible=True, alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def epsilon_chart_data_uri(budgets: Sequence[DatasetBudget]) -> str | None:
    """The chart as ``data:image/png;base64,...`` (None when there is nothing to draw)."""
    png = epsilon_chart_png(budgets)
    if png is None:
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
