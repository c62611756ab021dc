"""Does backend="auto" ever lose to backend="portable"? Both lstmkit backends, interleaved.

    python benchmarks/auto_vs_portable.py                  # the quick grid of `lstmkit bench`
    python benchmarks/auto_vs_portable.py --family LSTM --mode train --repeats 7
    python benchmarks/auto_vs_portable.py --dtype bfloat16

"auto" runs the native kernels on the CPU (the fused or the generic driver, as
`lstmkit.kernels.native` chooses; float16 and bfloat16 computed in float32, as every kernel
does); "portable" runs the torch-operations kernels. For each point
of `lstmkit.bench.grid("quick")` both modules get the same weights and input and run
alternately (A, B, A, B, ...) after a warm-up, so drift in the machine's speed hits both alike;
medians are reported, and the ratio portable / auto (above 1: auto is faster).
"""

import argparse
import statistics
import time

import torch

import lstmkit
from lstmkit import bench


def step(module, x, mode):
    if mode == "forward":
        with torch.no_grad():
            module(x)
        return
    module.zero_grad(set_to_none=True)
    x.grad = None
    module(x)[0].sum().backward()


def measure(point, repeats, warmup, dtype):
    torch.manual_seed(0)
    make = getattr(lstmkit, point.family)
    auto = make(point.input_size, point.hidden, backend="auto", dtype=dtype)
    portable = make(point.input_size, point.hidden, backend="portable", dtype=dtype)
    portable.load_state_dict(auto.state_dict())
    x = torch.randn(point.steps, point.batch, point.input_size, dtype=dtype,
                    requires_grad=point.mode == "train")
    times = {"auto": [], "portable": []}
    for repeat in range(warmup + repeats):
        for name, module in (("auto", auto), ("portable", portable)):
            start = time.perf_counter()
            step(module, x, point.mode)
            if repeat >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=bench.FAMILIES, action="append")
    parser.add_argument("--mode", choices=bench.MODES, action="append")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"),
                        default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    points = bench.grid("quick", tuple(args.family or bench.FAMILIES),
                        tuple(args.mode or bench.MODES))
    print(f"{args.dtype}, {args.threads} threads")
    print(f"{'family':6} {'mode':7} {'B':>4} {'H':>5} {'T':>4} {'auto ms':>9} "
          f"{'portable ms':>12} {'portable/auto':>14}")
    slower = []
    for point in points:
        ms = measure(point, args.repeats, args.warmup, getattr(torch, args.dtype))
        ratio = ms["portable"] / ms["auto"]
        if ratio < 1:
            slower.append(point)
        print(f"{point.family:6} {point.mode:7} {point.batch:>4} {point.hidden:>5} "
              f"{point.steps:>4} {ms['auto']:>9.2f} {ms['portable']:>12.2f} {ratio:>13.2f}x",
              flush=True)
    print(f"auto slower than portable at {len(slower)} of {len(points)} points")


if __name__ == "__main__":
    main()
