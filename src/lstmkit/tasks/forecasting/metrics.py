"""Forecast errors and the baselines every forecast is compared with.

Shape key: N windows, Hz horizon, K targets. `history` is the full (T, K) series in original
units; window n forecasts history[origin_n : origin_n + Hz].
"""

import numpy as np

METRICS = ("mae", "rmse", "smape", "mase")


def naive(history: np.ndarray, origins, horizon: int) -> np.ndarray:
    """The last observed value, repeated: (N, Hz, K) with y_hat[t+j] = y[t-1]."""
    origins = np.asarray(origins)
    return np.repeat(history[origins - 1][:, None, :], horizon, axis=1)


def seasonal_naive(history: np.ndarray, origins, horizon: int, season: int) -> np.ndarray:
    """The last observed season, repeated: y_hat[t+j] = y[t + j - season * (j // season + 1)]."""
    origins = np.asarray(origins)
    if origins.min() < season:
        raise ValueError(f"seasonal naive needs {season} observations before each origin, the "
                         f"first origin has {origins.min()}")
    j = np.arange(horizon)
    lag = season * (j // season + 1)
    return history[origins[:, None] + j[None, :] - lag[None, :]]


def mase_scale(train: np.ndarray, season: int) -> np.ndarray:
    """In-sample mean |y_t - y_{t-m}| of the training part (Hyndman & Koehler 2006): (K,)."""
    if len(train) <= season:
        raise ValueError(f"MASE needs more than season={season} training rows, got {len(train)}")
    return np.abs(train[season:] - train[:-season]).mean(axis=0)


def errors(actual: np.ndarray, forecast: np.ndarray, scale: np.ndarray) -> dict:
    """MAE, RMSE, sMAPE (%), MASE per target over all windows and steps.

    actual, forecast: (N, Hz, K); scale: (K,) from `mase_scale`.
    sMAPE = 100 * mean(2|y - y_hat| / (|y| + |y_hat|)), with 0/0 counted as 0.
    Returns {metric: (K,) array}.
    """
    if actual.shape != forecast.shape:
        raise ValueError(f"actual {actual.shape} and forecast {forecast.shape} differ in shape")
    error = actual - forecast
    absolute = np.abs(error).reshape(-1, actual.shape[-1])
    denominator = (np.abs(actual) + np.abs(forecast)).reshape(-1, actual.shape[-1])
    ratio = np.divide(2 * absolute, denominator, out=np.zeros_like(absolute),
                      where=denominator > 0)
    mae = absolute.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mase = np.where(scale > 0, mae / np.where(scale > 0, scale, 1.0), np.inf)
    return {"mae": mae, "rmse": np.sqrt((absolute ** 2).mean(axis=0)),
            "smape": 100 * ratio.mean(axis=0), "mase": mase}


def compare(actual: np.ndarray, forecasts: dict, scale: np.ndarray, targets) -> dict:
    """Metrics of several forecasts of the same windows, overall (mean over targets) and per target.

    Returns {"overall": {name: {metric: float}}, "per_target": {target: {name: {...}}}}.
    """
    per_name = {name: errors(actual, forecast, scale) for name, forecast in forecasts.items()}
    overall = {name: {m: float(np.mean(v)) for m, v in values.items()}
               for name, values in per_name.items()}
    per_target = {str(target): {name: {m: float(v[k]) for m, v in values.items()}
                                for name, values in per_name.items()}
                  for k, target in enumerate(targets)}
    return {"overall": overall, "per_target": per_target}
