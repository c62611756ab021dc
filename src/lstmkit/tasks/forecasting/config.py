"""`ForecastConfig`: what to forecast, from which columns, how far, and the network's shape."""

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Literal

from ...nn import LSTM, LSTMVariant, _checks
from .data import FILL_POLICIES


def _optional_size(name: str, value, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _names(name: str, value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a column name (a str) or a sequence of them, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} lists a column twice: {list(value)}")
    return tuple(value)


@dataclass(frozen=True)
class ForecastConfig:
    """Forecasting task and network.

    Args:
        target: target column name(s); None: the only numeric column (or every column of
            an array).
        covariates: extra input columns, used over the lookback window only (their future
            values are not needed).
        time_column: column of timestamps (parsed, sorted, checked for duplicates and gaps);
            None: rows are in time order, equally spaced.
        lookback: L, past steps the network reads.
        horizon: Hz, future steps it forecasts at once.
        season: seasonal period m for the seasonal-naive baseline and MASE; None: from the
            time column's frequency (monthly 12, quarterly 4, weekly 52, daily 7, hourly 24),
            else 1.
        test_size: rows held out at the end for evaluation (0: none); None: the horizon.
        val_size: rows before the test tail for early stopping; None: max(horizon, T // 10).
        fill: missing values and time-grid gaps: "none" (an error names the first missing
            value; gaps are reported), "interpolate" (linear), "ffill" or "zero".
        hidden_size, num_layers, dropout: of the lstmkit.LSTM.
        lstm_options: any other lstmkit.LSTM keyword argument (bidirectional, proj_size, ...).
        relative: forecast the change from the last observed value (see `ForecastNet`).
    """

    target: tuple | str | None = None
    covariates: tuple | str = ()
    time_column: str | None = None
    lookback: int = 24
    horizon: int = 12
    season: int | None = None
    test_size: int | None = None
    val_size: int | None = None
    fill: Literal["none", "interpolate", "ffill", "zero"] = "none"
    hidden_size: int = 64
    num_layers: int = 1
    dropout: float = 0.0
    lstm_options: dict = field(default_factory=dict)
    relative: bool = True

    def __post_init__(self):
        object.__setattr__(self, "target", _names("target", self.target) or None)
        object.__setattr__(self, "covariates", _names("covariates", self.covariates))
        overlap = set(self.target or ()) & set(self.covariates)
        if overlap:
            raise ValueError(f"columns {sorted(overlap)} cannot be both target and covariate")
        if self.time_column is not None and not isinstance(self.time_column, str):
            raise TypeError(f"time_column must be a column name (a str), got {self.time_column!r}")
        _checks.positive_int("lookback", self.lookback)
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int):
            raise TypeError(f"horizon must be an int, got {type(self.horizon).__name__} "
                            f"{self.horizon!r}")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be a positive int, got {self.horizon}")
        _optional_size("season", self.season, 1)
        _optional_size("test_size", self.test_size, 0)
        _optional_size("val_size", self.val_size, 1)
        if self.test_size and self.test_size < self.horizon:
            raise ValueError(f"test_size must be 0 or at least the horizon ({self.horizon}), "
                             f"got {self.test_size}")
        if self.val_size is not None and self.val_size < self.horizon:
            raise ValueError(f"val_size must be at least the horizon ({self.horizon}), got "
                             f"{self.val_size}")
        _checks.choice("fill", self.fill, FILL_POLICIES)
        _checks.positive_int("hidden_size", self.hidden_size)
        _checks.positive_int("num_layers", self.num_layers)
        _checks.probability("dropout", self.dropout)
        _checks.flag("relative", self.relative)
        if not isinstance(self.lstm_options, dict):
            raise TypeError(f"lstm_options must be a dict, got {type(self.lstm_options).__name__}")
        variant = self.lstm_options.get("variant")
        if isinstance(variant, dict):               # from JSON: a saved model or the CLI
            try:
                variant = LSTMVariant(**variant)
            except TypeError as exc:
                raise ValueError(f"lstm_options variant {variant}: {exc}") from None
            object.__setattr__(self, "lstm_options", {**self.lstm_options, "variant": variant})
        reserved = {"input_size", "hidden_size", "num_layers", "dropout", "batch_first",
                    "device", "dtype"} & set(self.lstm_options)
        if reserved:
            raise ValueError(f"lstm_options cannot set {sorted(reserved)}: they are fields of "
                             "ForecastConfig or fixed by the forecaster")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:                                    # let the LSTM itself judge its options
                LSTM(1, self.hidden_size, self.num_layers, dropout=self.dropout,
                     **self.lstm_options)
            except TypeError as exc:
                raise ValueError(f"lstm_options {self.lstm_options}: {exc}") from None

    @property
    def targets(self) -> tuple:
        return self.target or ()

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["target"] = list(self.targets) or None
        values["covariates"] = list(self.covariates)
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "ForecastConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ForecastConfig fields {unknown}")
        values = dict(values)
        for key in ("target", "covariates"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)
