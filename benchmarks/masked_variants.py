"""What zoneout, recurrent dropout, layer norm and (LSTM) full gate recurrence cost: training
steps, native against portable.

    python benchmarks/masked_variants.py                          # LSTM and GRU, 3 sizes
    python benchmarks/masked_variants.py --family GRU --batch 8 --hidden 256

For each (batch, hidden), the modules of one family in training mode: the plain cell (native),
zoneout, recurrent dropout and layer norm (and for the LSTM full gate recurrence, and zoneout
with a projection to hidden / 2) on the native kernels and on the portable variant kernel, and
torch.nn's plain module. Every repetition runs them in a freshly shuffled order: a
module that runs right after torch.nn's finds the caches evicted, so a fixed (or rotated) order
would bias the comparison against whichever module follows it. Medians of the repetitions, in
ms.
"""

import argparse
import random
import statistics
import time

import torch

import lstmkit
from lstmkit.train import atomic_write_json


def modules(family: str, input_size: int, hidden: int) -> dict:
    lstm = family == "LSTM"
    variant = lstmkit.LSTMVariant if lstm else lstmkit.GRUVariant
    zoneout = variant(zoneout_h=0.1, zoneout_c=0.1) if lstm else variant(zoneout_h=0.1)
    dropout = variant(recurrent_dropout=0.2)
    variants = {"zoneout": (zoneout, {}), "recurrent_dropout": (dropout, {}),
                "layer_norm": (variant(layer_norm=True), {})}
    if lstm:
        variants["full_gate_recurrence"] = (variant(full_gate_recurrence=True), {})
        variants["zoneout_projection"] = (zoneout, {"proj_size": hidden // 2})
    ours = getattr(lstmkit, family)
    mods = {"plain": ours(input_size, hidden)}
    for name, (v, options) in variants.items():
        mods[name] = ours(input_size, hidden, variant=v, **options)
        mods[f"{name} (portable)"] = ours(input_size, hidden, variant=v, backend="portable",
                                          **options)
    mods["torch.nn (plain)"] = getattr(torch.nn, family)(input_size, hidden)
    return mods


def measure(family: str, batch: int, hidden: int, args) -> dict:
    torch.manual_seed(0)
    mods = modules(family, args.input, hidden)
    x = torch.randn(args.length, batch, args.input)
    times = {name: [] for name in mods}
    order = list(mods)
    shuffle = random.Random(0).shuffle
    for repeat in range(args.warmup + args.repeats):
        shuffle(order)
        for name in order:
            xi = x.clone().requires_grad_()
            start = time.perf_counter()
            output, _ = mods[name](xi)
            output.sum().backward()
            if repeat >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["LSTM", "GRU"], action="append",
                        help="LSTM or GRU (repeatable; default both)")
    parser.add_argument("--batch", type=sizes, default=[1, 8, 64], help="e.g. 1,8,64")
    parser.add_argument("--hidden", type=sizes, default=[64, 256, 512],
                        help="one per batch size, e.g. 64,256,512")
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if len(args.batch) != len(args.hidden):
        parser.error(f"--batch and --hidden pair up: got {len(args.batch)} batch sizes and "
                     f"{len(args.hidden)} hidden sizes")
    torch.set_num_threads(args.threads)
    print(f"training step, T={args.length} I={args.input}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; medians in ms, order shuffled at every repetition")
    results = []
    for family in args.family or ["LSTM", "GRU"]:
        for batch, hidden in zip(args.batch, args.hidden, strict=True):
            medians = measure(family, batch, hidden, args)
            results.append({"family": family, "batch": batch, "hidden": hidden,
                            "median_ms": medians})
            print(f"{family} B={batch} H={hidden}: " + ", ".join(
                f"{name} {ms:.2f}" for name, ms in medians.items()))
    if args.json:
        atomic_write_json(args.json, {"config": vars(args), "results": results})


if __name__ == "__main__":
    main()
