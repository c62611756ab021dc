"""`lstmkit forecast` and `lstmkit demo` end to end on tiny data, and every bad input."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import interrupt_forecaster_training
from lstmkit.cli import main

TINY = ["--lookback", "6", "--horizon", "3", "--hidden-size", "8", "--epochs", "3",
        "--test-size", "6", "--val-size", "6", "--threads", "1", "--quiet"]


def write_csv(path, rows=60, **changes):
    t = np.arange(rows)
    frame = pd.DataFrame({"month": pd.date_range("2001-01-01", periods=rows, freq="MS"),
                          "sales": 100 + t + 5 * np.sin(2 * np.pi * t / 12),
                          "price": 3 + 0.01 * t})
    for column, (row, value) in changes.items():
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
    frame.to_csv(path, index=False)
    return path


def test_train_predict_evaluate(tmp_path, capsys):
    data = write_csv(tmp_path / "sales.csv")
    out = tmp_path / "run"
    assert main(["forecast", "train", str(data), "--time", "month", "--target", "sales",
                 "--covariate", "price", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "seasonal_naive" in printed and "Wrote to" in printed
    for name in ("model.safetensors", "model.json", "metrics.json", "forecast.csv",
                 "holdout.csv", "forecast.png", "config.json", "train-checkpoint.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["holdout"]["overall"]) == {"lstm", "naive", "seasonal_naive"}
    assert metrics["holdout"]["windows"] == 4
    assert json.loads((out / "config.json").read_text())["forecast_config"]["season"] == 12
    forecast = pd.read_csv(out / "forecast.csv")
    assert forecast["month"].tolist() == ["2006-01-01", "2006-02-01", "2006-03-01"]
    assert (out / "forecast.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["forecast", "predict", "--model", str(out), "--horizon", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "month,sales" and len(lines) == 3
    assert lines[1:] == forecast.to_csv(index=False).splitlines()[1:3]
    assert main(["forecast", "predict", "--model", str(out), str(data),
                 "--out", str(tmp_path / "f.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "f.csv")) == 3

    assert main(["forecast", "predict", "--model", str(out), "--out", str(out)]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
    assert main(["forecast", "evaluate", str(data), "--time", "month", "--target", "sales",
                 "--folds", "2", "--out", str(data / "bt.json"), *TINY]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["forecast", "evaluate", str(data), "--time", "month", "--target", "sales",
                 "--folds", "2", "--out", str(tmp_path / "bt.json"), *TINY]) == 0
    assert "Mean over folds" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "bt.json").read_text())["folds"]) == 2


def test_rerun_and_resume_of_a_finished_run(tmp_path, capsys):
    data = write_csv(tmp_path / "sales.csv")
    out = tmp_path / "run"
    args = ["forecast", "train", str(data), "--time", "month", "--target", "sales", "--out",
            str(out), *TINY]
    assert main(args) == 0
    first = json.loads((out / "metrics.json").read_text())["holdout"]
    assert main(args + ["--resume"]) == 0                 # nothing left to train: same model
    assert json.loads((out / "metrics.json").read_text())["holdout"] == first
    capsys.readouterr()
    assert main(args + ["--resume", "--lr", "0.5"]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_interrupted_cli_run_resumes_to_the_uninterrupted_one(tmp_path, capsys, monkeypatch):
    data = write_csv(tmp_path / "sales.csv")
    args = ["forecast", "train", str(data), "--time", "month", "--target", "sales", *TINY]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    restore = interrupt_forecaster_training(monkeypatch, epoch=2)
    out = tmp_path / "run"
    assert main(args + ["--out", str(out)]) == 130
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["train-checkpoint.json",
                                                    "train-checkpoint.safetensors"]
    restore()
    assert main(args + ["--out", str(out), "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["holdout"] == \
        json.loads((tmp_path / "whole" / "metrics.json").read_text())["holdout"]


def test_lstm_variant_from_the_command_line_survives_save_and_load(tmp_path, capsys):
    data = write_csv(tmp_path / "sales.csv")
    out = tmp_path / "run"
    assert main(["forecast", "train", str(data), "--time", "month", "--target", "sales",
                 "--out", str(out), *TINY, "--lstm-option",
                 'variant={"peepholes": true, "forget_bias": 1.0}']) == 0
    saved = json.loads((out / "config.json").read_text())["forecast_config"]["lstm_options"]
    assert saved["variant"]["peepholes"] is True and saved["variant"]["forget_bias"] == 1.0
    capsys.readouterr()
    assert main(["forecast", "predict", "--model", str(out)]) == 0
    assert capsys.readouterr().out.startswith("month,sales")
    one_line_error(capsys, ["forecast", "train", str(data), "--time", "month", "--target",
                            "sales", "--out", str(tmp_path / "bad"), *TINY, "--lstm-option",
                            'variant={"peep": true}'], "variant")


def test_metrics_file_is_standard_json_on_a_constant_series(tmp_path, capsys):
    data = write_csv(tmp_path / "flat.csv")
    frame = pd.read_csv(data).assign(sales=5.0)
    frame.to_csv(data, index=False)
    out = tmp_path / "run"
    assert main(["forecast", "train", str(data), "--time", "month", "--target", "sales",
                 "--out", str(out), *TINY]) == 0
    text = (out / "metrics.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))


def one_line_error(capsys, argv, expected):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lstmkit: error:"), captured.err
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("setup,extra,expected", [
    (None, [], "data file"),
    ({}, ["--target", "revenue"], "unknown column 'revenue'"),
    ({"sales": (7, "twelve")}, [], "column 'sales' has a non-numeric value 'twelve' at row 8"),
    ({"sales": (4, "")}, [], "column 'sales' has a missing value (NaN) at row 5 "
                             "(time 2001-05-01)"),
    ({"month": (9, "2001-09-01")}, [], "duplicate timestamp 2001-09-01"),
    ({"_rows": 8}, [], "the series has 8 rows, fewer than lookback + horizon"),
    ({}, ["--horizon", "0"], "horizon must be a positive int, got 0"),
    ({}, ["--horizon", "-2"], "horizon must be a positive int, got -2"),
    ({}, ["--lstm-option", "bidirectional"], "--lstm-option must look like KEY=VALUE"),
    ({}, ["--epochs", "0"], "max_epochs must be an int >= 1, got 0"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, setup, extra,
                                                            expected):
    data = tmp_path / "sales.csv"
    if setup is not None:
        setup = dict(setup)
        write_csv(data, rows=setup.pop("_rows", 60), **setup)
    out = tmp_path / "run"
    argv = ["forecast", "train", str(data), "--time", "month", "--target", "sales",
            "--out", str(out), *TINY, *extra]
    one_line_error(capsys, argv, expected)
    assert not out.exists()


def test_fill_policy_accepts_missing_values(tmp_path, capsys):
    data = write_csv(tmp_path / "sales.csv", sales=(4, ""))
    assert main(["forecast", "train", str(data), "--time", "month", "--target", "sales",
                 "--fill", "interpolate", "--out", str(tmp_path / "run"), *TINY]) == 0
    assert "1 missing values filled (interpolate)" in capsys.readouterr().out


def test_refuses_a_folder_of_user_files(tmp_path, capsys):
    data = write_csv(tmp_path / "sales.csv")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "forecast.csv").write_text("my precious results\n")
    one_line_error(capsys, ["forecast", "train", str(data), "--time", "month", "-t", "sales",
                            "--out", str(folder), *TINY], "holds files that lstmkit did not write")
    assert (folder / "forecast.csv").read_text() == "my precious results\n"
    assert sorted(p.name for p in folder.iterdir()) == ["forecast.csv"]


def test_predict_bad_inputs(tmp_path, capsys):
    one_line_error(capsys, ["forecast", "predict", "--model", str(tmp_path / "none")],
                   "model directory")
    data = write_csv(tmp_path / "sales.csv")
    out = tmp_path / "run"
    assert main(["forecast", "train", str(data), "--time", "month", "--target", "sales",
                 "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    one_line_error(capsys, ["forecast", "predict", "--model", str(out), "--horizon", "0"],
                   "horizon must be between 1 and the model's horizon 3, got 0")
    one_line_error(capsys, ["forecast", "predict", "--model", str(out), "--horizon", "4"],
                   "got 4")
    one_line_error(capsys, ["forecast", "predict", "--model", str(out),
                            str(write_csv(tmp_path / "short.csv", rows=4))],
                   "fewer than the lookback 6")


def test_parquet_input(tmp_path, capsys):
    csv = write_csv(tmp_path / "sales.csv")
    pd.read_csv(csv, parse_dates=["month"]).to_parquet(tmp_path / "sales.parquet")
    assert main(["forecast", "train", str(tmp_path / "sales.parquet"), "--time", "month",
                 "--target", "sales", "--out", str(tmp_path / "run"), *TINY]) == 0


def test_demo_runs_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--folds", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Mauna Loa CO2" in printed and "Try next" in printed
    assert (out / "co2_monthly.csv").is_file() and (out / "forecast.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_demo_beats_seasonal_naive(tmp_path, capsys, seed):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seed", str(seed), "--folds", "0",
                 "--quiet"]) == 0
    overall = json.loads((out / "metrics.json").read_text())["holdout"]["overall"]
    assert overall["lstm"]["mase"] < overall["seasonal_naive"]["mase"]
