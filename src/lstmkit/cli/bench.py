"""`lstmkit bench`: lstmkit against torch.nn on a grid of shapes, same weights, interleaved.

Prints one line per point (milliseconds, GFLOP/s of the matrix products, the fractions of this
machine's matrix-multiply rate reached by lstmkit and by torch.nn, the speedup over torch.nn,
the bound on any speedup there (torch.nn's time over the products' time at 100% of the
matrix-multiply rate), the bound with the same products at MKL's speed ("MKL") and the fraction
of the rate those reach ("MKL mm"), and the issue's target for the point's size class: met,
missed, out of reach when the target is above the first bound, beyond MKL when above the
second), then the batch-1 streaming comparison of the single-step API (each family's cell
against torch.nn's), and writes everything to a JSON file. Each point runs in a fresh process
unless --same-process is given."""

import argparse

import torch

from ..train import atomic_write_json
from ._errors import UsageError
from ._output import check_output_file

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def register(subparsers):
    parser = subparsers.add_parser(
        "bench", help="time lstmkit against torch.nn (LSTM, GRU) on a grid of shapes",
        description=__doc__.splitlines()[0],
        epilog="Shape options (--batch, --hidden, ...) replace the named grid by their product. "
               "Example: lstmkit bench --family LSTM --mode train --batch 8 --hidden 256")
    parser.add_argument("--grid", choices=("quick", "full"), default="quick",
                        help="named grid: quick (about a minute on 2 cores) or full (default quick)")
    parser.add_argument("--family", choices=("LSTM", "GRU"), action="append",
                        help="only this family (repeatable; default both)")
    parser.add_argument("--mode", choices=("forward", "train"), action="append",
                        help="forward (no_grad inference) or train (forward + backward); "
                             "repeatable, default both")
    parser.add_argument("--batch", type=_int_list, help="batch sizes, e.g. 1,8,32")
    parser.add_argument("--hidden", type=_int_list, help="hidden sizes, e.g. 64,256,1024")
    parser.add_argument("--input-size", type=_int_list, help="input sizes (default 64)")
    parser.add_argument("--steps", type=_int_list, help="sequence lengths (default 100)")
    parser.add_argument("--layers", type=_int_list, help="numbers of layers (default 1)")
    parser.add_argument("--bidirectional", action="store_true", help="bidirectional modules")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="element type (default float32)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch.set_num_threads for both sides (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per point first")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="time each point for at least this long, with more runs than "
                             "--repeats where they are short (default 0.5)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the whole grid this many times over, one round after the "
                             "other, and report each point's medians and the range of its "
                             "speedups (default 1)")
    parser.add_argument("--streaming-steps", type=int, default=2000,
                        help="steps of the batch-1 single-step comparison; 0 skips it")
    parser.add_argument("--streaming-hidden", type=int, default=256,
                        help="hidden (and input) size of the streaming comparison (default 256)")
    parser.add_argument("--same-process", action="store_true",
                        help="time every point in this process instead of one fresh process per "
                             "point (faster to start, but what earlier points allocated changes "
                             "how many page faults later points pay, on both sides)")
    parser.add_argument("--json", default="bench.json", help="results file (default bench.json)")
    parser.add_argument("--markdown", action="store_true",
                        help="also print the results as a Markdown table")
    parser.set_defaults(run=run)


def _points(args):
    from .. import bench

    families = tuple(args.family or bench.FAMILIES)
    modes = tuple(args.mode or bench.MODES)
    shape_options = (args.batch, args.hidden, args.input_size, args.steps, args.layers)
    if not any(shape_options) and not args.bidirectional:
        return bench.grid(args.grid, families, modes)
    points = []
    for family in families:
        for mode in modes:
            for batch in args.batch or [8]:
                for hidden in args.hidden or [256]:
                    for input_size in args.input_size or [64]:
                        for steps in args.steps or [100]:
                            for layers in args.layers or [1]:
                                points.append(bench.Point(family, mode, batch, hidden, input_size,
                                                          steps, layers, args.bidirectional))
    return points


def run(args) -> int:
    from .. import bench

    for name in ("threads", "repeats", "warmup", "rounds"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise UsageError(f"--{name} must be positive, got {getattr(args, name)}")
    min_seconds = bench.MIN_SECONDS if args.min_seconds is None else args.min_seconds
    if not min_seconds >= 0:                       # also rejects nan
        raise UsageError(f"--min-seconds must be >= 0, got {args.min_seconds}")
    if args.streaming_steps < 0 or args.streaming_hidden < 1:
        raise UsageError("--streaming-steps must be >= 0 and --streaming-hidden >= 1")
    check_output_file(args.json)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device!r}: expected cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine")
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    points = _points(args)
    info = bench.machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
          f"({args.threads} threads), {args.dtype} on {device}; "
          f"products on {info['products']}; load average {info['load_average_1min']}")
    print(bench.HEADER, flush=True)

    printed = []

    def progress(row):
        if args.rounds > 1 and len(printed) % len(points) == 0:
            print(f"round {row['round']} of {args.rounds}", flush=True)
        printed.append(row)
        print(bench.format_row(row), flush=True)

    results = bench.run(points, dtype, device, args.repeats, args.warmup, progress=progress,
                        isolate=not args.same_process, min_seconds=min_seconds,
                        rounds=args.rounds)
    if args.rounds > 1:
        print(f"each point's median over the {args.rounds} rounds (its speedup the median of "
              f"the rounds' speedups; the slowest and fastest round's in brackets):")
        print(bench.HEADER)
        for row in results["points"]:
            print(bench.format_row(row))
    if args.streaming_steps:
        results["streaming"] = {}
        for family in args.family or bench.FAMILIES:
            stream = bench.streaming(args.streaming_hidden, args.streaming_hidden,
                                     args.streaming_steps, args.repeats, dtype, device, family)
            results["streaming"][family] = stream
            verdict = ("" if stream["target_met"] is None else
                       f" (target 2x: {'met' if stream['target_met'] else 'MISSED'})")
            print(f"streaming batch 1, hidden {stream['hidden']}: lstmkit.{family}Cell "
                  f"{stream['lstmkit_us_per_step']:.1f} us/step, torch.nn.{family}Cell "
                  f"{stream['torch_us_per_step']:.1f} us/step, speedup "
                  f"{stream['speedup']:.2f}x{verdict}")
    rate_dtype = ("" if results["matmul_dtype"] == args.dtype else
                  f" in {results['matmul_dtype']}, the dtype lstmkit computes {args.dtype} in "
                  f"on the {device.type}")
    print(f"matmul rate (best sample of the run){rate_dtype}: "
          f"{results['matmul_gflops']:.1f} GFLOP/s")
    if results["matmul_gflops"] != results["matmul_gflops_start"]:
        users = "the JSON file and the Markdown table use" if args.markdown else "the JSON file uses"
        if args.rounds > 1:
            lines, users = "each round's lines", "the medians, " + users
        else:
            lines = "the lines above"
        print(f"({lines} used the best rate sampled before each of them, from "
              f"{results['matmul_gflops_start']:.1f} GFLOP/s at the start; {users} the best one)")
    if args.markdown:
        print(bench.markdown(results))
    atomic_write_json(args.json, results)
    print(f"wrote {args.json}")
    return 0
