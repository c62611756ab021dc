"""`lstmkit forecast`: train an LSTM forecaster on a CSV/Parquet series, predict, evaluate.

    lstmkit forecast train DATA --target COL [--time COL] --out DIR
    lstmkit forecast predict --model DIR [DATA] [--horizon N] [--out FILE.csv]
    lstmkit forecast evaluate DATA --target COL [--time COL] --folds K
"""

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from .. import __version__
from ..tasks.forecasting import FILL_POLICIES, ForecastConfig, Forecaster, read_table
from ..train import (
    OPTIMIZERS,
    SCHEDULES,
    TrainConfig,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from ..viz import figure_png, forecast_figure
from ._errors import UsageError
from ._output import check_output_dir, check_output_file, strict_json

CHECKPOINT = "train-checkpoint"
_DESCRIPTION = """\
Train an LSTM forecaster on a time series (CSV or Parquet), forecast from a
saved model, or evaluate the setup by rolling-origin backtest. Every evaluation
shows the LSTM next to the naive (last value) and seasonal-naive (last season)
forecasts on the same windows."""
_EPILOG = """examples:
  lstmkit forecast train sales.csv --time date --target sales --horizon 12 --out runs/sales
  lstmkit forecast predict --model runs/sales new_sales.csv
  lstmkit forecast evaluate sales.csv --time date --target sales --folds 4"""


def register(subparsers):
    parser = subparsers.add_parser(
        "forecast", help="train, apply or evaluate an LSTM forecaster on a CSV/Parquet series",
        description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="<action>",
                                    parser_class=type(parser))
    actions.required = True

    train = actions.add_parser(
        "train", help="train on all but the held-out tail, score the tail, save everything",
        description="Train an LSTM forecaster, score it on the held-out tail next to the "
        "baselines, and write into --out: model.safetensors + model.json, metrics.json, "
        "forecast.csv (the horizon after the data), holdout.csv (the tail's forecasts), "
        "forecast.png and config.json. A checkpoint is written after every epoch; --resume "
        "continues an interrupted run.")
    _add_task_arguments(train)
    train.add_argument("--out", default="runs/forecast", metavar="DIR",
                       help="output directory (default runs/forecast); refused if it holds "
                       "files lstmkit did not write")
    train.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from DIR/train-checkpoint.*")
    train.set_defaults(run=run_train)

    predict = actions.add_parser(
        "predict", help="forecast with a saved model",
        description="Forecast the steps after the end of DATA (default: after the data the "
        "model was trained on) with a model saved by `lstmkit forecast train`.")
    predict.add_argument("data", nargs="?", metavar="DATA",
                         help="CSV/Parquet with the model's columns (its last lookback rows "
                         "are the input)")
    predict.add_argument("--model", required=True, metavar="DIR",
                         help="directory written by `lstmkit forecast train`")
    predict.add_argument("--horizon", type=int, metavar="N",
                         help="steps to forecast, 1..the model's horizon (default: all)")
    predict.add_argument("--out", metavar="FILE",
                         help="write the forecast CSV here (default: print it)")
    predict.set_defaults(run=run_predict)

    evaluate = actions.add_parser(
        "evaluate", help="rolling-origin backtest: refit at each origin, compare with baselines",
        description="Rolling-origin backtest: for each of --folds origins, --step rows apart "
        "(the last one a horizon before the end), train a fresh forecaster on the rows before "
        "the origin and forecast the horizon after it; report MAE, RMSE, sMAPE and MASE for "
        "the LSTM, naive and seasonal naive, per fold and on average.")
    _add_task_arguments(evaluate)
    evaluate.add_argument("--folds", type=int, default=3, metavar="K",
                          help="number of origins (default 3)")
    evaluate.add_argument("--step", type=int, metavar="S",
                          help="rows between origins (default: the horizon)")
    evaluate.add_argument("--out", metavar="FILE", help="also write the metrics as JSON here")
    evaluate.set_defaults(run=run_evaluate)


def _add_task_arguments(parser):
    parser.add_argument("data", metavar="DATA", help="CSV (.csv/.tsv) or Parquet file")
    data = parser.add_argument_group("data")
    data.add_argument("--target", "-t", action="append", metavar="COL",
                      help="column to forecast; repeat or comma-separate for several "
                      "(default: the only numeric column)")
    data.add_argument("--covariate", "-c", action="append", metavar="COL",
                      help="extra input column (its past only); repeat or comma-separate")
    data.add_argument("--time", metavar="COL",
                      help="timestamp column: parsed, sorted, checked for duplicates and gaps")
    data.add_argument("--fill", choices=FILL_POLICIES, default="none",
                      help="fill missing values and time gaps (default none: a missing value "
                      "is an error naming its row and column)")
    data.add_argument("--lookback", type=int, default=24, metavar="L",
                      help="past steps the model reads (default 24)")
    data.add_argument("--horizon", type=int, default=12, metavar="H",
                      help="steps forecast at once (default 12)")
    data.add_argument("--season", type=int, metavar="M",
                      help="seasonal period for seasonal naive and MASE (default: from the "
                      "time column's frequency, e.g. 12 for monthly; else 1)")
    data.add_argument("--test-size", type=int, metavar="N",
                      help="rows held out at the end for evaluation (default: the horizon)")
    data.add_argument("--val-size", type=int, metavar="N",
                      help="rows before the tail used for early stopping (default: "
                      "max(horizon, rows/10))")
    model = parser.add_argument_group("model")
    model.add_argument("--hidden-size", type=int, default=64, metavar="N",
                       help="LSTM hidden size (default 64)")
    model.add_argument("--num-layers", type=int, default=1, metavar="N",
                       help="stacked LSTM layers (default 1)")
    model.add_argument("--dropout", type=float, default=0.0, metavar="P",
                       help="dropout between LSTM layers (default 0)")
    model.add_argument("--lstm-option", action="append", default=[], metavar="KEY=VALUE",
                       help="any other lstmkit.LSTM argument, e.g. bidirectional=true, "
                       "proj_size=16, variant='{\"peepholes\": true, \"forget_bias\": 1.0}' "
                       "(an lstmkit.LSTMVariant as a JSON object)")
    model.add_argument("--absolute", action="store_true",
                       help="forecast levels, not the change from the last value")
    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=200, metavar="N",
                          help="maximum epochs (default 200)")
    training.add_argument("--batch-size", type=int, default=32, metavar="N",
                          help="(default 32)")
    training.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    training.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    training.add_argument("--weight-decay", type=float, default=0.0, metavar="W")
    training.add_argument("--clip", type=float, default=1.0, metavar="NORM",
                          help="gradient-norm clipping (default 1; 0 disables)")
    training.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                          help="learning-rate schedule (default cosine)")
    training.add_argument("--patience", type=int, default=20, metavar="N",
                          help="early stopping: epochs without validation improvement "
                          "(default 20; 0 disables)")
    training.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    training.add_argument("--device", default="auto",
                          help="auto (cuda if available), cpu, cuda or cuda:N (default auto)")
    training.add_argument("--threads", type=int, metavar="N",
                          help="CPU threads for training (default: torch's); 1 is often "
                          "fastest for small models")
    training.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _columns(values) -> tuple:
    return tuple(c.strip() for v in (values or []) for c in v.split(",") if c.strip())


def _lstm_options(pairs) -> dict:
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--lstm-option must look like KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(raw.strip().lower() if raw.strip().lower()
                                              in ("true", "false") else raw.strip())
        except json.JSONDecodeError:
            options[key.strip()] = raw.strip()
    return options


def configs_from_args(args) -> tuple[ForecastConfig, TrainConfig]:
    """The ForecastConfig and TrainConfig that the command-line options describe."""
    forecast = ForecastConfig(
        target=_columns(args.target) or None, covariates=_columns(args.covariate),
        time_column=args.time, lookback=args.lookback, horizon=args.horizon, season=args.season,
        test_size=args.test_size, val_size=args.val_size, fill=args.fill,
        hidden_size=args.hidden_size, num_layers=args.num_layers, dropout=args.dropout,
        lstm_options=_lstm_options(args.lstm_option), relative=not args.absolute)
    training = TrainConfig(
        max_epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, clip_norm=args.clip or None, schedule=args.schedule,
        patience=args.patience or None, seed=args.seed, device=args.device,
        threads=args.threads)
    return forecast, training


# -- reporting --------------------------------------------------------------------------------

def metrics_table(overall: dict) -> str:
    """Rows: lstm, naive, seasonal_naive; columns: MAE, RMSE, sMAPE %, MASE."""
    lines = [f"  {'model':<16}{'MAE':>11}{'RMSE':>11}{'sMAPE %':>10}{'MASE':>8}"]
    for name, values in overall.items():
        lines.append(f"  {name:<16}{values['mae']:>11.3f}{values['rmse']:>11.3f}"
                     f"{values['smape']:>10.3f}{values['mase']:>8.3f}")
    return "\n".join(lines)


def verdict(overall: dict) -> str:
    """One line: does the LSTM beat the best baseline on MASE?"""
    baselines = {n: v["mase"] for n, v in overall.items() if n != "lstm"}
    best = min(baselines, key=baselines.get)
    lstm = overall["lstm"]["mase"]
    if lstm < baselines[best]:
        return (f"The LSTM beats every baseline: MASE {lstm:.3f} vs {baselines[best]:.3f} "
                f"({best}), {100 * (1 - lstm / baselines[best]):.0f}% lower error.")
    return (f"The LSTM does NOT beat {best} (MASE {lstm:.3f} vs {baselines[best]:.3f}): try a "
            "longer --lookback, more --epochs, or check that the series is forecastable.")


def describe_holdout(evaluation: dict, horizon: int) -> str:
    count = evaluation["windows"]
    return (f"Held-out tail: {count} window{'s' if count != 1 else ''} of {horizon} steps, origins "
            f"{evaluation['first_origin']} .. {evaluation['last_origin']}, season "
            f"{evaluation['season']}.")


def train_and_save(frame: pd.DataFrame, forecast: ForecastConfig, training: TrainConfig,
                   out: Path, *, resume: bool, quiet: bool, source: str,
                   extra_files: dict | None = None,
                   backtest_folds: int = 0) -> tuple[Forecaster, dict]:
    """Fit, evaluate and write a run directory. Everything is computed before the first
    output file is written (only the per-epoch training checkpoint is written during
    training, so that --resume can continue an interrupted run)."""
    started = time.perf_counter()
    model = Forecaster(forecast, training)
    model.fit(frame, checkpoint=out / CHECKPOINT, resume=resume, quiet=quiet)
    seconds = time.perf_counter() - started
    config = model.config_
    k = len(config.targets)
    index, values = model.index_, model.history_
    tail = config.test_size
    targets = list(config.targets)
    history = pd.DataFrame(values[:len(values) - tail, :k], index=index[:len(values) - tail],
                           columns=targets)
    truth = pd.DataFrame(values[len(values) - tail:, :k], index=index[len(values) - tail:],
                         columns=targets) if tail else None
    future = model.predict()
    holdout = None
    if model.holdout_ is not None:
        holdout = model.holdout_.rename(columns={t: f"{t}_actual" for t in targets})
        holdout = holdout.rename(columns={f"{t}_forecast": t for t in targets})
    figure = forecast_figure(history, truth=truth, holdout=holdout, future=future,
                             title=f"{', '.join(targets)}: LSTM forecast",
                             context=max(10 * config.horizon, 3 * (tail or config.horizon)))
    backtest = model.backtest(frame, folds=backtest_folds, quiet=quiet) if backtest_folds else None
    result = model.training_
    metrics = {
        "holdout": model.evaluation_,
        "backtest": backtest,
        "training": {"epochs": result.epochs, "best_epoch": result.best_epoch,
                     "best_val_loss": result.best_metric, "stopped_early": result.stopped_early,
                     "seconds": round(seconds, 2), "device": result.device},
    }
    run_config = {"lstmkit": __version__, "data": source, "forecast_config": config.to_dict(),
                  "train_config": training.to_dict(), "data_notes": list(model.notes_)}
    future_csv = future.to_csv(index_label=future.index.name or "step")
    png = figure_png(figure)
    # All outputs exist in memory: write them, each atomically.
    out.mkdir(parents=True, exist_ok=True)
    for name, content in (extra_files or {}).items():
        atomic_write_text(out / name, content)
    atomic_write_json(out / "config.json", run_config)
    model.save(out)
    atomic_write_json(out / "metrics.json", strict_json(metrics))
    atomic_write_text(out / "forecast.csv", future_csv)
    if model.holdout_ is not None:
        atomic_write_text(out / "holdout.csv", model.holdout_.to_csv(index=False))
    atomic_write_bytes(out / "forecast.png", png)
    return model, metrics


def print_report(model: Forecaster, metrics: dict, out: Path) -> None:
    result, config = model.training_, model.config_
    for note in model.notes_:
        print(f"Data: {note}.")
    training = metrics["training"]
    print(f"Trained {result.epochs} epochs in {training['seconds']:.0f} s on {result.device} "
          f"(best validation loss {result.best_metric:.4g} at epoch {result.best_epoch}"
          f"{', stopped early' if result.stopped_early else ''}).")
    if model.evaluation_ is not None:
        print(describe_holdout(model.evaluation_, config.horizon))
        print(metrics_table(model.evaluation_["overall"]))
        print(verdict(model.evaluation_["overall"]))
    backtest = metrics["backtest"]
    if backtest:
        print(f"Rolling-origin backtest, {len(backtest['folds'])} refits (mean over folds):")
        print(metrics_table(backtest["mean"]))
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    print(f"Wrote to {out}/: {', '.join(files)}")


# -- commands ---------------------------------------------------------------------------------

def run_train(args) -> int:
    forecast, training = configs_from_args(args)
    out = check_output_dir(args.out)
    frame = read_table(args.data)
    try:
        model, metrics = train_and_save(frame, forecast, training, out, resume=args.resume,
                                        quiet=args.quiet, source=str(args.data))
    except KeyboardInterrupt:
        print(f"\nlstmkit: interrupted; continue with the same command and --resume "
              f"(checkpoint in {out}/)", file=sys.stderr)
        return 130
    except FloatingPointError as exc:
        print(f"lstmkit: error: {exc}", file=sys.stderr)
        return 1
    print_report(model, metrics, out)
    print(f"Next: lstmkit forecast predict --model {out}   (forecast from the saved model)")
    return 0


def run_predict(args) -> int:
    if args.out:
        check_output_file(args.out)
    model = Forecaster.load(args.model)
    data = None if args.data is None else read_table(args.data)
    forecast = model.predict(args.horizon, data)
    text = forecast.to_csv(index_label=forecast.index.name or "step")
    if args.out:
        atomic_write_text(args.out, text)
        print(f"Wrote {len(forecast)} steps to {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def run_evaluate(args) -> int:
    forecast, training = configs_from_args(args)
    if args.out:
        check_output_file(args.out)
    frame = read_table(args.data)
    model = Forecaster(forecast, training)
    result = model.backtest(frame, folds=args.folds, step=args.step, quiet=args.quiet)
    print(f"Rolling-origin backtest: {args.folds} folds, horizon {result['horizon']}, step "
          f"{result['step']}, season {result['season']}.")
    for fold in result["folds"]:
        print(f"Fold with origin {fold['origin']} (trained on {fold['train_rows']} rows):")
        print(metrics_table(fold["overall"]))
    print("Mean over folds:")
    print(metrics_table(result["mean"]))
    print(verdict(result["mean"]))
    if args.out:
        atomic_write_json(args.out, strict_json(result))
        print(f"Wrote {args.out}")
    return 0
