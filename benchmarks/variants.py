"""What each LSTM variant costs: a training step of lstmkit.LSTM(variant=...) vs torch.nn.LSTM.

    python benchmarks/variants.py                       # B=32, T=50, I=64, H=128, all variants
    python benchmarks/variants.py --only layer_norm peepholes --hidden 256 --threads 1

torch.nn has none of the variants, so its plain LSTM is the peer: the ratio says how much a
variant costs over the cell every user already has. Each pair runs interleaved (A, B, A, B,
...) after a warm-up so drift in the machine's speed hits both alike; medians are reported.
Modules are in training mode, so the stochastic variants draw their masks.
"""

import argparse
import statistics
import time

import torch

import lstmkit
from lstmkit import LSTMVariant
from lstmkit.train import atomic_write_json

VARIANTS = {
    "plain": (LSTMVariant(), False),
    "plain+return_gates": (LSTMVariant(), True),
    "peepholes": (LSTMVariant(peepholes=True), False),
    "cifg": (LSTMVariant(cifg=True), False),
    "activations": (LSTMVariant(gate_activation="hard_sigmoid", cell_activation="softsign"),
                    False),
    "layer_norm": (LSTMVariant(layer_norm=True), False),
    "zoneout": (LSTMVariant(zoneout_h=0.1, zoneout_c=0.1), False),
    "recurrent_dropout": (LSTMVariant(recurrent_dropout=0.2), False),
    "weight_drop": (LSTMVariant(weight_drop=0.2), False),
    "full_gate_recurrence": (LSTMVariant(full_gate_recurrence=True), False),
}


def training_step(module, x, return_gates=False):
    module.zero_grad(set_to_none=True)
    output = module(x, return_gates=True)[0] if return_gates else module(x)[0]
    output.sum().backward()


def measure(name, args):
    variant, return_gates = VARIANTS[name]
    torch.manual_seed(0)
    ours = lstmkit.LSTM(args.input, args.hidden, variant=variant)
    theirs = torch.nn.LSTM(args.input, args.hidden)
    x = torch.randn(args.length, args.batch, args.input)
    times = {"lstmkit": [], "torch.nn": []}
    for repeat in range(args.warmup + args.repeats):
        for who, module, gates in (("lstmkit", ours, return_gates), ("torch.nn", theirs, False)):
            start = time.perf_counter()
            training_step(module, x, gates)
            if repeat >= args.warmup:
                times[who].append(time.perf_counter() - start)
    medians = {who: statistics.median(t) * 1e3 for who, t in times.items()}
    return {"median_ms": medians, "ratio": medians["lstmkit"] / medians["torch.nn"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="variants to time")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"LSTM training step, B={args.batch} T={args.length} I={args.input} H={args.hidden}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    results = {}
    for name in args.only or VARIANTS:
        results[name] = r = measure(name, args)
        print(f"  {name:22s} lstmkit {r['median_ms']['lstmkit']:8.2f} ms   torch.nn (plain) "
              f"{r['median_ms']['torch.nn']:8.2f} ms   {r['ratio']:.2f}x the time")
    if args.json:
        atomic_write_json(args.json, {"config": vars(args), "results": results})


if __name__ == "__main__":
    main()
