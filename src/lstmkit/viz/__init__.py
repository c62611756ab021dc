"""Pictures: forecasts next to their history and truth. Figures are built with matplotlib's
object API on the Agg canvas (no display, no global pyplot state) and returned as PNG bytes, so
callers decide where and how (atomically) to write them."""

from .forecast import figure_png, forecast_figure

__all__ = ["figure_png", "forecast_figure"]
