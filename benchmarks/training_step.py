"""Training step (forward + backward) of an lstmkit module vs torch.nn, same weights, same process.

    python benchmarks/training_step.py                 # LSTM, B=64, T=100, I=128, H=256, portable
    python benchmarks/training_step.py --family gru --batch 8 --backend portable

The two modules run interleaved (A, B, A, B, ...) after a warm-up, so drift in the machine's
speed hits both alike; the script reports the median time of each and the ratio.
"""

import argparse
import platform
import statistics
import time

import torch

import lstmkit
from lstmkit.train.checkpoint import atomic_write_json


def training_step(module, x):
    module.zero_grad(set_to_none=True)
    output, _ = module(x)
    output.sum().backward()


def measure(args):
    torch.manual_seed(0)
    ours = getattr(lstmkit, args.family.upper())(args.input, args.hidden, args.layers,
                                                 backend=args.backend)
    theirs = getattr(torch.nn, args.family.upper())(args.input, args.hidden, args.layers)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(args.length, args.batch, args.input)
    times = {"lstmkit": [], "torch.nn": []}
    for repeat in range(args.warmup + args.repeats):
        for name, module in (("lstmkit", ours), ("torch.nn", theirs)):
            start = time.perf_counter()
            training_step(module, x)
            if repeat >= args.warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {"config": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "median_ms": medians,
            "lstmkit_over_torch": medians["lstmkit"] / medians["torch.nn"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["lstm", "gru", "rnn"], default="lstm")
    parser.add_argument("--backend", default="portable")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--input", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = measure(args)
    m = result["median_ms"]
    print(f"{args.family.upper()} training step, B={args.batch} T={args.length} I={args.input} "
          f"H={args.hidden} L={args.layers}, {result['threads']} threads, backend={args.backend}")
    print(f"  lstmkit  {m['lstmkit']:8.2f} ms   torch.nn {m['torch.nn']:8.2f} ms   "
          f"lstmkit/torch.nn = {result['lstmkit_over_torch']:.2f}x the time")
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
