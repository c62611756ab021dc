"""`Forecaster`: fit on a table, forecast a horizon, evaluate against baselines, save and load.

    >>> import numpy as np
    >>> from lstmkit.tasks.forecasting import Forecaster
    >>> from lstmkit.train import TrainConfig
    >>> series = np.sin(np.arange(200) * 2 * np.pi / 12) + 0.01 * np.arange(200)
    >>> model = Forecaster(lookback=24, horizon=6, season=12, hidden_size=16,
    ...                    training=TrainConfig(max_epochs=3)).fit(series)
    >>> model.predict().shape
    (6, 1)

Splits, in time order: train | validation (early stopping) | test (the held-out tail).
The scaler is fitted on the train rows only. Window origins t (first forecast step):
    train: targets in train;  validation: targets in validation;  test: targets in the tail.
Inputs may reach back into earlier parts: that history is known at forecast time.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

from ... import __version__
from ...train import TrainConfig, TrainResult, load_checkpoint, save_checkpoint, seed_everything
from ...train import train as train_loop
from . import metrics
from .config import ForecastConfig
from .data import Scaler, Series, past_windows, prepare_series, season_of, time_label, windows
from .model import ForecastNet

MODEL_FORMAT = "lstmkit.forecaster/1"


def as_frame(data) -> pd.DataFrame:
    """A DataFrame from a DataFrame, a Series, or an array (T,) / (T, C) (columns y or y0..)."""
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, pd.Series):
        return data.to_frame(name=data.name if data.name is not None else "y")
    if isinstance(data, (np.ndarray, list, tuple, torch.Tensor)):
        array = np.asarray(data.detach().cpu() if isinstance(data, torch.Tensor) else data)
        if array.ndim == 1:
            return pd.DataFrame({"y": array})
        if array.ndim == 2:
            return pd.DataFrame(array, columns=[f"y{i}" for i in range(array.shape[1])])
        raise ValueError(f"an array series must be 1-D (T,) or 2-D (T, C), got shape "
                         f"{array.shape}")
    raise TypeError(f"data must be a DataFrame, Series or array, got {type(data).__name__}")


def _default_targets(frame: pd.DataFrame, config: ForecastConfig) -> tuple:
    if config.targets:
        return config.targets
    excluded = set(config.covariates) | {config.time_column}
    candidates = [c for c in frame.columns if c not in excluded
                  and pd.api.types.is_numeric_dtype(frame[c])]
    if frame.columns.tolist() == [f"y{i}" for i in range(frame.shape[1])] or \
            frame.columns.tolist() == ["y"]:
        return tuple(candidates)                     # an array: every column is a target
    if len(candidates) != 1:
        raise ValueError(f"choose the target column(s) (target=, CLI --target): the data has "
                         f"numeric columns {[str(c) for c in candidates]}")
    return (candidates[0],)


class Forecaster:
    """An LSTM forecaster with the estimator interface: fit, predict, evaluate, save, load.

    Args:
        config: the task and network (ForecastConfig); or give its fields as keywords.
        training: the training loop's settings (TrainConfig).

    After `fit`: `evaluation_` (held-out tail metrics next to the naive and seasonal-naive
    baselines, or None with test_size=0), `holdout_` (the tail's forecasts, one per
    non-overlapping window, next to the truth), `training_` (TrainResult), `config_` (the
    resolved ForecastConfig: targets, season and split sizes filled in), `notes_` (what
    the data checks found).
    """

    def __init__(self, config: ForecastConfig | None = None, training: TrainConfig | None = None,
                 **options):
        if config is not None and options:
            raise TypeError("give a ForecastConfig or its fields as keywords, not both")
        self.config = config if config is not None else ForecastConfig(**options)
        if not isinstance(self.config, ForecastConfig):
            raise TypeError(f"config must be a ForecastConfig, got {type(config).__name__}")
        self.training = training if training is not None else TrainConfig()
        if not isinstance(self.training, TrainConfig):
            raise TypeError(f"training must be a TrainConfig, got {type(training).__name__}")
        self.network: ForecastNet | None = None

    # -- data -------------------------------------------------------------------------------

    def _prepare(self, data) -> tuple[ForecastConfig, Series]:
        frame = as_frame(data)
        targets = _default_targets(frame, self.config)
        series = prepare_series(frame, targets, self.config.covariates, self.config.time_column,
                                self.config.fill)
        rows, need = len(series.values), self.config.lookback + self.config.horizon
        if rows < need:
            raise ValueError(f"the series has {rows} rows, fewer than lookback + horizon = "
                             f"{self.config.lookback} + {self.config.horizon} = {need}")
        config = self.config
        test = config.horizon if config.test_size is None else config.test_size
        val = max(config.horizon, rows // 10) if config.val_size is None else config.val_size
        season = config.season or season_of(series.frequency)
        config = dataclasses.replace(config, target=targets, season=season, test_size=test,
                                     val_size=val)
        train_windows = rows - test - val - config.lookback - config.horizon + 1
        if train_windows < 1:
            raise ValueError(
                f"the series has {rows} rows: too short for test_size {test} + val_size {val} "
                f"+ lookback {config.lookback} + horizon {config.horizon} (at least "
                f"{test + val + config.lookback + config.horizon} rows); lower them")
        if rows - test - val <= season:
            raise ValueError(f"the training rows ({rows - test - val}) must cover more than one "
                             f"season ({season}) for MASE; lower test_size/val_size or season")
        return config, series

    def _network(self, config: ForecastConfig, inputs: int) -> ForecastNet:
        return ForecastNet(inputs, len(config.targets), config.horizon, config.hidden_size,
                           config.num_layers, config.dropout, config.relative,
                           config.lstm_options)

    def _forecast(self, values: np.ndarray, origins) -> np.ndarray:
        """values (T, C), original units -> forecasts (N, Hz, K) at each origin, original units."""
        k = len(self.config_.targets)
        x = past_windows(self.scaler_.transform(values), origins, self.config_.lookback)
        parameter = next(self.network.parameters())
        self.network.eval()
        with torch.no_grad():
            y = self.network(torch.as_tensor(x, dtype=parameter.dtype, device=parameter.device))
        return self.scaler_.inverse(y.double().cpu().numpy(), slice(0, k))

    # -- fit ------------------------------------------------------------------------------

    def fit(self, data, *, checkpoint=None, resume: bool = False,
            quiet: bool = False) -> "Forecaster":
        """Check the data, train on all but the held-out tail, evaluate on the tail.

        Args:
            data: DataFrame (with the configured columns), Series, or array (T,) / (T, C).
            checkpoint: path stem of the training checkpoint (see `lstmkit.train.train`).
            resume: continue an interrupted fit from `checkpoint`.
            quiet: no progress bar (there is none either when stderr is not a terminal).
        """
        config, series = self._prepare(data)
        rows, k = len(series.values), len(config.targets)
        val_end = rows - config.test_size
        train_end = val_end - config.val_size
        scaler = Scaler.fit(series.values[:train_end])
        scaled = scaler.transform(series.values)
        h, lookback = config.horizon, config.lookback

        def dataset(first, last):               # origins first..last inclusive
            origins = np.arange(max(first, lookback), last + 1)
            if len(origins) == 0:
                return None
            x, y = windows(scaled, origins, lookback, h, k)
            return TensorDataset(torch.as_tensor(x, dtype=torch.float32),
                                 torch.as_tensor(y, dtype=torch.float32))

        train_set = dataset(lookback, train_end - h)
        val_set = dataset(train_end, val_end - h)
        seed_everything(self.training.seed)
        network = self._network(config, len(series.columns))
        meta = {"forecast_config": config.to_dict(), "scaler": scaler.to_dict(),
                "columns": list(series.columns), "rows": rows}
        self.training_: TrainResult = train_loop(
            network, torch.nn.functional.mse_loss, train_set, self.training, val_data=val_set,
            checkpoint=checkpoint, resume=resume, meta=meta, quiet=quiet)
        self.network, self.scaler_, self.config_ = network, scaler, config
        self.columns_, self.notes_ = series.columns, series.notes
        self.frequency_ = series.frequency
        self.index_ = series.index
        self.history_ = series.values
        self.mase_scale_ = metrics.mase_scale(series.values[:train_end, :k], config.season)
        self.evaluation_, self.holdout_ = None, None
        if config.test_size:
            self.evaluation_, self.holdout_ = self._evaluate_tail(series, val_end)
        return self

    def _evaluate_tail(self, series: Series, start: int) -> tuple[dict, pd.DataFrame]:
        """Every window whose horizon lies in the tail (origin stride 1), against baselines."""
        config, values = self.config_, series.values
        k, h = len(config.targets), config.horizon
        origins = np.arange(start, len(values) - h + 1)
        forecast = self._forecast(values, origins)
        _, actual = windows(values, origins, config.lookback, h, k)
        result = metrics.compare(actual, self.baselines(values[:, :k], origins, forecast),
                                 self.mase_scale_, config.targets)
        result.update(windows=len(origins), season=config.season,
                      first_origin=time_label(series.index[origins[0]]),
                      last_origin=time_label(series.index[origins[-1]]))
        tiles = np.arange(0, len(origins), h)           # non-overlapping windows, for people
        rows = []
        for n in tiles:
            for j in range(h):
                t = origins[n] + j
                row = {"time": series.index[t], "origin": series.index[origins[n]], "step": j + 1}
                for c, name in enumerate(config.targets):
                    row[name] = values[t, c]
                    row[f"{name}_forecast"] = forecast[n, j, c]
                rows.append(row)
        return result, pd.DataFrame(rows)

    def baselines(self, history: np.ndarray, origins, forecast: np.ndarray) -> dict:
        """The model's forecast next to the naive and seasonal-naive ones: {name: (N, Hz, K)}."""
        h = self.config_.horizon
        result = {"lstm": forecast, "naive": metrics.naive(history, origins, h)}
        if self.config_.season > 1:
            result["seasonal_naive"] = metrics.seasonal_naive(history, origins, h,
                                                              self.config_.season)
        return result

    # -- predict ----------------------------------------------------------------------------

    def _check_fitted(self):
        if self.network is None:
            raise ValueError("this Forecaster is not fitted: call fit(data) or Forecaster.load")

    def predict(self, horizon: int | None = None, data=None) -> pd.DataFrame:
        """Forecast `horizon` steps (default: the trained horizon) after the end of `data`
        (default: the series seen by `fit`), in original units.

        Returns a DataFrame (horizon, K) indexed by the future timestamps (with a time column
        of regular frequency) or by the next row positions.
        """
        self._check_fitted()
        h = self.config_.horizon if horizon is None else horizon
        if isinstance(h, bool) or not isinstance(h, (int, np.integer)):
            raise TypeError(f"horizon must be an int, got {type(h).__name__} {h!r}")
        if not 1 <= h <= self.config_.horizon:
            raise ValueError(f"horizon must be between 1 and the model's horizon "
                             f"{self.config_.horizon}, got {h}")
        if data is None:
            values, index = self.history_, self.index_
        else:
            series = prepare_series(as_frame(data), self.config_.targets,
                                    self.config_.covariates, self.config_.time_column,
                                    self.config_.fill)
            values, index = series.values, series.index
            if len(values) < self.config_.lookback:
                raise ValueError(f"the data has {len(values)} rows, fewer than the lookback "
                                 f"{self.config_.lookback}")
        forecast = self._forecast(values, [len(values)])[0, :h]
        return pd.DataFrame(forecast, columns=list(self.config_.targets),
                            index=self.future_index(index, h))

    def future_index(self, index: pd.Index, steps: int) -> pd.Index:
        if isinstance(index, pd.DatetimeIndex) and self.frequency_:
            future = pd.date_range(index[-1], periods=steps + 1, freq=self.frequency_)[1:]
            return pd.DatetimeIndex(future, name=index.name)
        start = len(index)
        return pd.RangeIndex(start, start + steps, name="step")

    # -- backtest ---------------------------------------------------------------------------

    def backtest(self, data, folds: int = 3, step: int | None = None,
                 quiet: bool = False) -> dict:
        """Rolling-origin evaluation: for each of `folds` origins (`step` rows apart, default
        the horizon, the last one ending at the end of the data), fit a fresh forecaster on
        the rows before the origin and forecast the horizon after it, next to the baselines.

        Returns {"folds": [per-fold metrics], "mean": {model: {metric: mean over folds}}}.
        """
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
            raise ValueError(f"folds must be a positive int, got {folds!r}")
        config, series = self._prepare(data)
        h = config.horizon
        step = h if step is None else step
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be a positive int, got {step!r}")
        rows = len(series.values)
        origins = [rows - h - step * (folds - 1 - f) for f in range(folds)]
        frame = pd.DataFrame(series.values, columns=list(series.columns))
        if isinstance(series.index, pd.DatetimeIndex):
            frame.insert(0, "__time__", series.index)
        fold_config = dataclasses.replace(config, test_size=0, val_size=self.config.val_size,
                                          time_column="__time__" if "__time__" in frame else None,
                                          fill="none")
        results = []
        for origin in origins:
            model = Forecaster(fold_config, self.training)
            try:
                model.fit(frame.iloc[:origin], quiet=quiet)
            except ValueError as exc:
                raise ValueError(f"backtest fold with origin at row {origin} cannot be fitted "
                                 f"({exc}); use fewer folds or a smaller step") from None
            k = len(config.targets)
            forecast = model._forecast(series.values[:origin], [origin])
            actual = series.values[origin:origin + h, :k][None]
            scale = model.mase_scale_
            fold = metrics.compare(actual, model.baselines(series.values[:, :k], [origin],
                                                           forecast), scale, config.targets)
            fold.update(origin=time_label(series.index[origin]), train_rows=origin)
            results.append(fold)
        names = results[0]["overall"].keys()
        mean = {name: {m: float(np.mean([f["overall"][name][m] for f in results]))
                       for m in metrics.METRICS} for name in names}
        return {"folds": results, "mean": mean, "horizon": h, "step": step,
                "season": config.season}

    # -- save / load ------------------------------------------------------------------------

    def save(self, directory) -> Path:
        """Write DIRECTORY/model.safetensors (weights) and model.json (configuration, scaling,
        the last lookback rows for `predict`), each atomically. Returns the JSON's path."""
        self._check_fitted()
        lookback = self.config_.lookback
        index = self.index_[-lookback:]
        return save_checkpoint(Path(directory) / "model", self.network.state_dict(), {
            "format": MODEL_FORMAT, "lstmkit_version": __version__,
            "forecast_config": self.config_.to_dict(), "train_config": self.training.to_dict(),
            "scaler": self.scaler_.to_dict(), "columns": list(self.columns_),
            "frequency": self.frequency_, "mase_scale": self.mase_scale_.tolist(),
            "history": {"index": [time_label(i) for i in index],
                        "datetime": isinstance(index, pd.DatetimeIndex),
                        "rows": len(self.index_),
                        "values": self.history_[-lookback:].tolist()},
            "evaluation": self.evaluation_,
        })

    @classmethod
    def load(cls, directory) -> "Forecaster":
        """Read a forecaster written by `save` (no code is executed: safetensors + JSON)."""
        path = Path(directory)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
        tensors, meta = load_checkpoint(path / "model")
        if meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"{str(path)!r} does not hold an lstmkit forecaster "
                             f"(format {meta.get('format')!r}, expected {MODEL_FORMAT!r})")
        config = ForecastConfig.from_dict(meta["forecast_config"])
        model = cls(config, TrainConfig.from_dict(meta["train_config"]))
        model.config_, model.scaler_ = config, Scaler.from_dict(meta["scaler"])
        model.columns_ = tuple(meta["columns"])
        model.frequency_ = meta["frequency"]
        model.mase_scale_ = np.asarray(meta["mase_scale"])
        history = meta["history"]
        model.history_ = np.asarray(history["values"], dtype=np.float64)
        if history["datetime"]:
            model.index_ = pd.DatetimeIndex(pd.to_datetime(history["index"]),
                                            name=config.time_column)
        else:
            rows = history["rows"]
            model.index_ = pd.RangeIndex(rows - len(history["index"]), rows)
        model.evaluation_, model.holdout_, model.notes_ = meta["evaluation"], None, ()
        network = model._network(config, len(model.columns_))
        network.load_state_dict(tensors)
        network.eval()
        model.network = network
        return model
