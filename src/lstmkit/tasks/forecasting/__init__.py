"""Time-series forecasting with an LSTM: checked data, honest baselines, saved models.

Usage::

    model = Forecaster(target="sales", time_column="date", lookback=24, horizon=12)
    model.fit(pandas.read_csv("sales.csv"))     # trains, then scores the held-out tail
    model.evaluation_["overall"]                # MAE, RMSE, sMAPE, MASE: lstm, naive, seasonal
    model.predict()                             # the next 12 steps, a DataFrame
    model.save("runs/sales"); Forecaster.load("runs/sales").predict()
"""

from .config import ForecastConfig
from .data import (
    FILL_POLICIES,
    Scaler,
    Series,
    past_windows,
    prepare_series,
    read_table,
    season_of,
    windows,
)
from .estimator import Forecaster, as_frame
from .metrics import METRICS, compare, errors, mase_scale, naive, seasonal_naive
from .model import ForecastNet

__all__ = [
    "FILL_POLICIES", "METRICS", "ForecastConfig", "ForecastNet", "Forecaster", "Scaler",
    "Series", "as_frame", "compare", "errors", "mase_scale", "naive", "past_windows",
    "prepare_series", "read_table", "season_of", "seasonal_naive", "windows",
]
