"""The forecast plot: history, held-out truth, the held-out forecasts and the future forecast."""

import io

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def forecast_figure(history: pd.DataFrame, *, truth: pd.DataFrame | None = None,
                    holdout: pd.DataFrame | None = None, future: pd.DataFrame | None = None,
                    title: str = "", context: int | None = None) -> Figure:
    """One panel per target column.

    Args:
        history: observed series used before the held-out tail, indexed by time (or position),
            one column per target.
        truth: the held-out tail's observed values, same columns.
        holdout: forecasts of the tail: columns `time`, `origin` and one per target; drawn
            as one segment per origin.
        future: the forecast after the end of the data, indexed by time, one column per target.
        title: figure title.
        context: draw only the last `context` rows of history (all when None).
    """
    targets = list(history.columns)
    shown = history if context is None else history.iloc[-context:]
    figure = Figure(figsize=(10, 3.2 * len(targets)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(targets), 1, squeeze=False)[:, 0]
    for axis, target in zip(axes, targets, strict=True):
        axis.plot(shown.index, shown[target], color="0.45", lw=1.2, label="history")
        if truth is not None and len(truth):
            axis.plot(truth.index, truth[target], color="black", lw=1.4, label="held-out truth")
            axis.axvline(truth.index[0], color="0.6", ls=":", lw=1)
        if holdout is not None and len(holdout):
            for n, (_, segment) in enumerate(holdout.groupby("origin", sort=True)):
                axis.plot(segment["time"], segment[target], color="tab:orange", lw=1.6,
                          label="forecast of held-out tail" if n == 0 else None)
        if future is not None and len(future):
            axis.plot(future.index, future[target], color="tab:red", lw=1.6, ls="--",
                      label="forecast")
        axis.set_ylabel(str(target))
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize=8, frameon=False)
    if title:
        figure.suptitle(title)
    return figure


def figure_png(figure: Figure, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
