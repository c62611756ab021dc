"""From a table to model-ready arrays: reading, checking, filling, scaling and windowing.

Shape key: T rows (time steps), C columns used (targets first, then covariates), K targets,
L lookback, Hz horizon, N windows.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

FILL_POLICIES = ("none", "interpolate", "ffill", "zero")
_SEASON_OF_FREQUENCY = {"h": 24, "D": 7, "B": 5, "W": 52, "M": 12, "Q": 4}


def read_table(path) -> pd.DataFrame:
    """Read a CSV (.csv, .txt, .tsv) or Parquet (.parquet, .pq) file into a DataFrame."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".txt", ".tsv"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc}") from None
    raise ValueError(f"data file {str(path)!r} must be .csv, .tsv, .txt, .parquet or .pq, "
                     f"got {suffix or 'no suffix'!r}")


@dataclass(frozen=True)
class Series:
    """A checked, gap-filled multivariate series.

    values: (T, C) float64, targets first then covariates; index: DatetimeIndex (with a
    time column) or RangeIndex; frequency: pandas offset alias or None; notes: what the checks
    found and did (gaps, fills), in words, for the user.
    """

    values: np.ndarray
    columns: tuple
    index: pd.Index
    frequency: str | None
    notes: tuple


def time_label(value) -> str:
    """A timestamp (its date alone at midnight) or a row position, as text."""
    if isinstance(value, pd.Timestamp) and value == value.normalize():
        return value.date().isoformat()
    return str(value)


def infer_frequency(index: pd.DatetimeIndex) -> str | None:
    """The regular step of a sorted DatetimeIndex that may have gaps, as an offset alias."""
    if len(index) < 3:
        return None
    exact = pd.DatetimeIndex(index, freq="infer").freq
    if exact is not None:
        return exact.freqstr
    steps = pd.Series(index[1:] - index[:-1])
    step = steps.mode().iloc[0]
    days = step / pd.Timedelta(days=1)
    if 28 <= days <= 31:
        if (index.day == 1).all():
            return "MS"
        if index.is_month_end.all():
            return "ME"
        return None
    if 365 <= days <= 366:
        return "YS" if (index.day_of_year == 1).all() else None
    # Whole days and weeks by name: to_offset(1 day) is "24h", which names no season.
    if days == 1:
        return "B" if (index.day_of_week < 5).all() else "D"
    if days == 7:
        return f"W-{index[0].day_name()[:3].upper()}"
    return pd.tseries.frequencies.to_offset(step).freqstr


def season_of(frequency: str | None) -> int:
    """Seasonal period implied by a frequency: monthly 12, quarterly 4, weekly 52, daily 7,
    business-daily 5, hourly 24; 1 (no season) otherwise."""
    if not frequency:
        return 1
    offset = pd.tseries.frequencies.to_offset(frequency)
    if offset.n != 1:
        return 1
    name = offset.rule_code.split("-")[0]
    for prefix, season in _SEASON_OF_FREQUENCY.items():
        if name.rstrip("SE") == prefix or name == prefix:
            return season
    return 1


def _numeric_column(frame: pd.DataFrame, name: str, rows: np.ndarray) -> pd.Series:
    column = frame[name]
    if pd.api.types.is_bool_dtype(column) or not pd.api.types.is_numeric_dtype(column):
        converted = pd.to_numeric(column, errors="coerce")
        bad = converted.isna() & column.notna()
        if bad.any():
            where = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"column {name!r} has a non-numeric value {column.iloc[where]!r} "
                             f"at row {rows[where]}")
        column = converted
    return column.astype("float64")


def prepare_series(frame: pd.DataFrame, targets, covariates=(), time_column=None,
                   fill: str = "none") -> Series:
    """Check and convert a table: columns exist and are numeric, time parsed, sorted, unique;
    gaps reported (and filled with `fill`); missing values filled with `fill` or reported.

    Rows in messages are 1-based data rows in the order of the input (a CSV's header is not
    counted).
    """
    if fill not in FILL_POLICIES:
        raise ValueError(f"fill must be one of {FILL_POLICIES}, got {fill!r}")
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, got {type(frame).__name__}")
    columns = tuple(targets) + tuple(covariates)
    for name in columns + ((time_column,) if time_column is not None else ()):
        if name not in frame.columns:
            raise ValueError(f"unknown column {name!r}; the data has columns "
                             f"{[str(c) for c in frame.columns]}")
    if time_column in columns:
        raise ValueError(f"column {time_column!r} cannot be both the time column and a "
                         "target or covariate")
    if len(frame) == 0:
        raise ValueError("the data has no rows")
    rows = np.arange(1, len(frame) + 1)
    notes = []
    data = pd.DataFrame({name: _numeric_column(frame, name, rows) for name in columns})
    data["__row__"] = rows
    frequency = None
    if time_column is not None:
        raw = frame[time_column]
        times = pd.to_datetime(raw, errors="coerce")
        if (times.isna() & raw.notna()).any():   # pandas infers one format from the first row
            times = pd.to_datetime(raw, errors="coerce", format="mixed")
        bad = times.isna()
        if bad.any():
            where = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"time column {time_column!r} has a value that is not a date: "
                             f"{raw.iloc[where]!r} at row {rows[where]}")
        data.index = pd.DatetimeIndex(times, name=time_column)
        if not data.index.is_monotonic_increasing:
            data = data.sort_index(kind="stable")
            notes.append(f"rows sorted by {time_column!r}")
        duplicated = data.index.duplicated()
        if duplicated.any():
            where = int(np.flatnonzero(duplicated)[0])
            first = int(data["__row__"].iloc[where - 1])
            raise ValueError(f"time column {time_column!r} has duplicate timestamp "
                             f"{time_label(data.index[where])} (rows {first} and "
                             f"{int(data['__row__'].iloc[where])})")
        frequency = infer_frequency(data.index)
        if frequency is None:
            notes.append(f"time column {time_column!r} has no regular frequency; the rows are "
                         "used in order")
        else:
            grid = pd.date_range(data.index[0], data.index[-1], freq=frequency)
            off_grid = data.index.difference(grid)
            missing = grid.difference(data.index)
            if len(off_grid):
                notes.append(f"{len(off_grid)} timestamps are off the {frequency} grid (first "
                             f"{time_label(off_grid[0])}); the rows are used in order")
            elif len(missing):
                where = f"first {time_label(missing[0])}"
                if fill == "none":
                    notes.append(f"{len(missing)} gaps in the {frequency} time grid ({where}); "
                                 "rows used in order, choose a fill policy to fill them")
                else:
                    data = data.reindex(grid)
                    data.index.name = time_column
                    notes.append(f"{len(missing)} gaps in the {frequency} time grid ({where}) "
                                 f"added and filled ({fill})")
    else:
        data.index = pd.RangeIndex(len(data))
    values = data[list(columns)]
    missing = values.isna().to_numpy()
    if missing.any():
        count = int(missing.sum())
        if fill == "none":
            where, col = (int(i) for i in np.argwhere(missing)[0])
            row = data["__row__"].iloc[where]
            when = f" (time {time_label(data.index[where])})" if time_column is not None else ""
            raise ValueError(f"column {columns[col]!r} has a missing value (NaN) at row "
                             f"{int(row)}{when}; choose a fill policy (interpolate, ffill, zero) "
                             "to fill missing values")
        if fill == "interpolate":
            values = values.interpolate(method="linear", limit_direction="both")
        elif fill == "ffill":
            values = values.ffill().bfill()
        else:
            values = values.fillna(0.0)
        notes.append(f"{count} missing values filled ({fill})")
    array = values.to_numpy(dtype=np.float64, copy=True)
    if not np.isfinite(array).all():
        where, col = (int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise ValueError(f"column {columns[col]!r} has a non-finite value {array[where, col]} "
                         f"at row {int(data['__row__'].iloc[where])}")
    return Series(array, columns, data.index, frequency, tuple(notes))


@dataclass(frozen=True)
class Scaler:
    """Per-column standardisation, fitted on the training rows only: z = (x - mean) / scale."""

    mean: tuple
    scale: tuple

    @classmethod
    def fit(cls, values: np.ndarray) -> "Scaler":
        """values: (T_train, C). A constant column gets scale 1 (it is only centred)."""
        mean = values.mean(axis=0)
        scale = values.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        return cls(tuple(float(m) for m in mean), tuple(float(s) for s in scale))

    def transform(self, values: np.ndarray, columns: slice = slice(None)) -> np.ndarray:
        return (values - np.asarray(self.mean)[columns]) / np.asarray(self.scale)[columns]

    def inverse(self, values: np.ndarray, columns: slice = slice(None)) -> np.ndarray:
        return values * np.asarray(self.scale)[columns] + np.asarray(self.mean)[columns]

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, values: dict) -> "Scaler":
        return cls(tuple(values["mean"]), tuple(values["scale"]))


def past_windows(values: np.ndarray, origins, lookback: int) -> np.ndarray:
    """values (T, C) -> inputs (N, L, C) = values[t-L:t] for each origin t (first forecast
    step; t may be T, the step after the data)."""
    origins = np.asarray(origins, dtype=np.int64)
    if len(origins) and (origins.min() < lookback or origins.max() > len(values)):
        raise ValueError(f"origins must lie in [{lookback}, {len(values)}] (lookback "
                         f"{lookback}, {len(values)} rows), got {origins.min()}..{origins.max()}")
    return values[origins[:, None] + np.arange(-lookback, 0)[None, :]]


def windows(values: np.ndarray, origins, lookback: int, horizon: int,
            targets: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut windows around each origin t (the first forecast step).

    values (T, C) -> inputs (N, L, C) = values[t-L:t], outputs (N, Hz, K) = values[t:t+Hz, :K].
    """
    origins = np.asarray(origins, dtype=np.int64)
    if len(origins) and origins.max() + horizon > len(values):
        raise ValueError(f"the last origin {origins.max()} + horizon {horizon} runs past the "
                         f"{len(values)} rows")
    future = origins[:, None] + np.arange(horizon)[None, :]                # (N, Hz)
    return past_windows(values, origins, lookback), values[future][:, :, :targets]
