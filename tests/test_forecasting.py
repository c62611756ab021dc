"""Forecasting: windowing, scaling, metrics and baselines against hand-computed values; data
checks; the Forecaster end to end on small synthetic series (seconds)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import interrupt_forecaster_training
from lstmkit.tasks.forecasting import (
    ForecastConfig,
    Forecaster,
    Scaler,
    errors,
    mase_scale,
    naive,
    past_windows,
    prepare_series,
    season_of,
    seasonal_naive,
    windows,
)
from lstmkit.train import TrainConfig

# One thread: these tiny models are fastest on one core, and stay fast on a busy machine.
FAST = TrainConfig(max_epochs=3, batch_size=16, lr=1e-2, patience=None, threads=1)


def seasonal_series(rows=90, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    return 10 + 0.05 * t + np.sin(2 * np.pi * t / 12) + 0.05 * rng.standard_normal(rows)


def monthly_frame(rows=90, **extra):
    return pd.DataFrame({"month": pd.date_range("2000-01-01", periods=rows, freq="MS"),
                         "y": seasonal_series(rows), **extra})


# -- windowing, scaling, metrics: hand-computed -------------------------------------------------

def test_windows_by_hand():
    values = np.array([[0, 10], [1, 11], [2, 12], [3, 13], [4, 14], [5, 15]], dtype=float)
    x, y = windows(values, [2, 3], lookback=2, horizon=3, targets=1)
    assert x.tolist() == [[[0, 10], [1, 11]], [[1, 11], [2, 12]]]
    assert y.tolist() == [[[2], [3], [4]], [[3], [4], [5]]]
    assert past_windows(values, [6], lookback=2).tolist() == [[[4, 14], [5, 15]]]
    with pytest.raises(ValueError, match="runs past"):
        windows(values, [4], lookback=2, horizon=3, targets=1)
    with pytest.raises(ValueError, match="origins must lie in"):
        past_windows(values, [1], lookback=2)


def test_scaler_by_hand():
    scaler = Scaler.fit(np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]]))
    assert scaler.mean == (2.0, 5.0)
    assert scaler.scale == pytest.approx((math.sqrt(2 / 3), 1.0))     # constant column: 1
    z = scaler.transform(np.array([[4.0, 6.0]]))
    assert z[0].tolist() == pytest.approx([2 / math.sqrt(2 / 3), 1.0])
    assert scaler.inverse(z)[0].tolist() == pytest.approx([4.0, 6.0])
    assert Scaler.from_dict(scaler.to_dict()) == scaler


def test_baselines_by_hand():
    history = np.arange(10, dtype=float)[:, None] * 10                 # 0, 10, ..., 90
    assert naive(history, [5], 3)[0, :, 0].tolist() == [40, 40, 40]
    # season 2: y_hat[t+j] = y[t + j - 2 * (j // 2 + 1)] -> 30, 40, 30, 40, 30 from origin 5
    assert seasonal_naive(history, [5], 5, 2)[0, :, 0].tolist() == [30, 40, 30, 40, 30]
    with pytest.raises(ValueError, match="seasonal naive needs 4"):
        seasonal_naive(history, [3], 2, 4)


def test_metrics_by_hand():
    actual = np.array([[[1.0], [2.0], [4.0]]])
    forecast = np.array([[[2.0], [2.0], [1.0]]])
    scale = mase_scale(np.array([[1.0], [3.0], [2.0], [6.0]]), season=1)   # |2|,|1|,|4| -> 7/3
    assert scale.tolist() == pytest.approx([7 / 3])
    result = errors(actual, forecast, scale)
    assert result["mae"][0] == pytest.approx(4 / 3)                   # (1 + 0 + 3) / 3
    assert result["rmse"][0] == pytest.approx(math.sqrt(10 / 3))      # (1 + 0 + 9) / 3
    assert result["smape"][0] == pytest.approx(100 * (2 / 3 + 0 + 6 / 5) / 3)
    assert result["mase"][0] == pytest.approx((4 / 3) / (7 / 3))
    zero = errors(np.zeros((1, 1, 1)), np.zeros((1, 1, 1)), np.ones(1))
    assert zero["smape"][0] == 0.0                                     # 0/0 counts as 0


def test_season_of_frequency():
    assert [season_of(f) for f in ("MS", "ME", "QS", "W-SUN", "D", "h", None, "2D")] == \
        [12, 12, 4, 52, 7, 24, 1, 1]


@pytest.mark.parametrize("freq,season", [("D", 7), ("W-MON", 52), ("B", 5), ("h", 24),
                                         ("MS", 12)])
def test_a_gap_keeps_the_season(freq, season):
    index = pd.date_range("2020-01-06", periods=60, freq=freq).delete([20, 21])
    frame = pd.DataFrame({"t": index, "y": np.arange(58.0)})
    series = prepare_series(frame, ["y"], time_column="t", fill="interpolate")
    assert season_of(series.frequency) == season and len(series.values) == 60


# -- data checks -----------------------------------------------------------------------------

def test_time_column_sorted_and_gaps_reported_or_filled():
    frame = monthly_frame(12).iloc[[3, 0, 1, 2, 5, 6, 7, 8, 9, 10, 11]]   # shuffled, 1 gap
    series = prepare_series(frame, ["y"], time_column="month")
    assert series.index.is_monotonic_increasing and len(series.values) == 11
    assert series.frequency == "MS"
    assert any("1 gaps" in n and "2000-05-01" in n for n in series.notes)
    filled = prepare_series(frame, ["y"], time_column="month", fill="interpolate")
    assert len(filled.values) == 12
    y = monthly_frame(12)["y"].to_numpy()
    assert filled.values[4, 0] == pytest.approx((y[3] + y[5]) / 2)


@pytest.mark.parametrize("change,message", [
    (lambda f: f.assign(y=f["y"].astype(object).where(f.index != 6, "n/a")),
     r"column 'y' has a non-numeric value 'n/a' at row 7"),
    (lambda f: f.assign(y=f["y"].where(f.index != 4)),
     r"column 'y' has a missing value \(NaN\) at row 5 \(time 2000-05-01"),
    (lambda f: f.assign(month=f["month"].where(f.index != 3, f["month"][2])),
     r"duplicate timestamp 2000-03-01 \(rows 3 and 4\)"),
    (lambda f: f.assign(month=f["month"].astype(str).where(f.index != 2, "soon")),
     r"time column 'month' has a value that is not a date: 'soon' at row 3"),
])
def test_bad_data_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        prepare_series(change(monthly_frame(12)), ["y"], time_column="month")


def test_unknown_column_lists_the_columns():
    with pytest.raises(ValueError, match=r"unknown column 'sales'; the data has columns "
                                         r"\['month', 'y'\]"):
        prepare_series(monthly_frame(12), ["sales"], time_column="month")


@pytest.mark.parametrize("fill,expected", [("interpolate", 2.0), ("ffill", 1.0), ("zero", 0.0)])
def test_fill_policies(fill, expected):
    frame = pd.DataFrame({"y": [1.0, np.nan, 3.0]})
    assert prepare_series(frame, ["y"], fill=fill).values[1, 0] == expected


# -- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("options,message", [
    ({"horizon": 0}, "horizon must be a positive int, got 0"),
    ({"lookback": -3}, "lookback must be a positive int, got -3"),
    ({"fill": "mean"}, "fill must be one of"),
    ({"test_size": 3, "horizon": 6}, "test_size must be 0 or at least the horizon"),
    ({"lstm_options": {"peephole_typo": True}}, "lstm_options"),
    ({"lstm_options": {"hidden_size": 3}}, "cannot set"),
    ({"target": "y", "covariates": ["y"]}, "both target and covariate"),
])
def test_config_names_the_bad_value(options, message):
    with pytest.raises(ValueError, match=message):
        ForecastConfig(**options)


# -- the estimator ---------------------------------------------------------------------------

def test_fit_predict_evaluate_save_load(tmp_path):
    model = Forecaster(target="y", time_column="month", lookback=12, horizon=4, test_size=8,
                       val_size=8, hidden_size=8, training=FAST).fit(monthly_frame())
    assert model.config_.season == 12                                   # from the frequency
    evaluation = model.evaluation_
    assert evaluation["windows"] == 8 - 4 + 1
    assert set(evaluation["overall"]) == {"lstm", "naive", "seasonal_naive"}
    # The scaler saw the training rows only: 90 - 8 test - 8 validation.
    assert model.scaler_.mean[0] == pytest.approx(seasonal_series()[:74].mean())
    forecast = model.predict()
    assert list(forecast.index) == list(pd.date_range("2007-07-01", periods=4, freq="MS"))
    assert model.predict(2).shape == (2, 1)
    model.save(tmp_path)
    loaded = Forecaster.load(tmp_path)
    pd.testing.assert_frame_equal(loaded.predict(), forecast)
    newer = monthly_frame(100)
    pd.testing.assert_frame_equal(loaded.predict(data=newer), model.predict(data=newer))
    assert model.holdout_.columns.tolist() == ["time", "origin", "step", "y", "y_forecast"]
    assert len(model.holdout_) == 8                                     # 2 tiles of 4 steps


def test_the_test_tail_does_not_leak_into_training():
    frame = monthly_frame()
    changed = frame.copy()
    changed.loc[changed.index[-8:], "y"] += 100.0                       # only the held-out tail
    fits = [Forecaster(target="y", lookback=12, horizon=4, test_size=8, val_size=8,
                       hidden_size=8, training=FAST).fit(f[["y"]]) for f in (frame, changed)]
    assert fits[0].scaler_ == fits[1].scaler_
    for a, b in zip(fits[0].network.parameters(), fits[1].network.parameters(), strict=True):
        assert torch.equal(a, b)


def test_arrays_multivariate_and_covariates():
    values = np.stack([seasonal_series(60), seasonal_series(60, seed=1)], axis=1)
    model = Forecaster(lookback=6, horizon=3, season=12, hidden_size=8, training=FAST)
    assert model.fit(values).predict().columns.tolist() == ["y0", "y1"]
    assert model.predict().index.tolist() == [60, 61, 62]
    frame = pd.DataFrame({"y": values[:, 0], "x": values[:, 1]})
    with_covariate = Forecaster(target="y", covariates="x", lookback=6, horizon=3, season=12,
                                hidden_size=8, training=FAST).fit(frame)
    assert with_covariate.network.lstm.input_size == 2
    assert with_covariate.predict().shape == (3, 1)


def test_lstm_options_reach_the_lstm():
    model = Forecaster(lookback=6, horizon=3, season=12, hidden_size=8, num_layers=2,
                       lstm_options={"bidirectional": True, "proj_size": 4},
                       training=FAST).fit(seasonal_series(60))
    lstm = model.network.lstm
    assert lstm.bidirectional and lstm.proj_size == 4 and lstm.num_layers == 2
    assert model.network.head.in_features == 8                          # 2 directions x 4


def test_short_series_and_bad_horizon():
    with pytest.raises(ValueError, match=r"the series has 10 rows, fewer than lookback \+ "
                                         r"horizon = 12 \+ 4 = 16"):
        Forecaster(lookback=12, horizon=4, training=FAST).fit(seasonal_series(10))
    model = Forecaster(lookback=6, horizon=3, season=12, hidden_size=8,
                       training=FAST).fit(seasonal_series(60))
    for horizon in (0, -1, 4):
        with pytest.raises(ValueError, match=f"horizon must be between 1 and the model's "
                                             f"horizon 3, got {horizon}"):
            model.predict(horizon)


def test_training_rows_must_cover_a_season():
    with pytest.raises(ValueError, match=r"the training rows \(10\) must cover more than one "
                                         r"season \(12\)"):
        Forecaster(lookback=4, horizon=2, season=12, test_size=10, val_size=10,
                   training=FAST).fit(seasonal_series(30))


def test_backtest_refits_at_each_origin():
    model = Forecaster(lookback=6, horizon=3, season=12, hidden_size=8, training=FAST)
    result = model.backtest(seasonal_series(80), folds=2, step=5)
    assert [f["train_rows"] for f in result["folds"]] == [72, 77]
    assert set(result["mean"]) == {"lstm", "naive", "seasonal_naive"}
    assert result["mean"]["naive"]["mae"] == pytest.approx(
        np.mean([f["overall"]["naive"]["mae"] for f in result["folds"]]))


def test_relative_forecasting_beats_seasonal_naive_on_a_trended_season():
    """A learnable series: the LSTM must do better than repeating last season."""
    training = TrainConfig(max_epochs=60, batch_size=16, lr=1e-2, patience=10, threads=1)
    model = Forecaster(lookback=24, horizon=6, season=12, test_size=12, val_size=12,
                       hidden_size=16, training=training).fit(seasonal_series(150))
    overall = model.evaluation_["overall"]
    assert overall["lstm"]["mase"] < overall["seasonal_naive"]["mase"]


def test_interrupted_fit_resumes_to_the_uninterrupted_model(tmp_path, monkeypatch):
    def make():
        return Forecaster(lookback=12, horizon=4, test_size=8, val_size=8, season=12,
                          hidden_size=8, dropout=0.2, num_layers=2,
                          training=TrainConfig(max_epochs=5, batch_size=16, lr=1e-2,
                                              threads=1))

    frame = monthly_frame()[["y"]]
    reference = make().fit(frame, quiet=True)
    restore = interrupt_forecaster_training(monkeypatch, epoch=2)
    with pytest.raises(KeyboardInterrupt):
        make().fit(frame, checkpoint=tmp_path / "ckpt", quiet=True)
    restore()
    resumed = make().fit(frame, checkpoint=tmp_path / "ckpt", resume=True, quiet=True)
    assert resumed.training_.epochs == 5
    for a, b in zip(reference.network.parameters(), resumed.network.parameters(), strict=True):
        assert torch.equal(a, b)
    pd.testing.assert_frame_equal(resumed.predict(), reference.predict())
