"""Compare settings of the native kernels' tunables at one shape, each call after torch.nn's.

    python benchmarks/tunables.py --batch 64 --hidden 128 --mode forward \\
        --config "" --config "OWN_FORWARD_MAX_WEIGHT_BYTES=0" --config "MAX_ROW_PARTS=4"

A configuration sets tunables of `lstmkit.kernels.native` (`TUNABLE_NAMES`, the thresholds
that choose drivers and products: FUSED_MAX_BATCH, MAX_ROW_PARTS, OWN_FORWARD_MAX_ROWS, ...):
"NAME=VALUE,NAME=VALUE", VALUE a Python number (`1 << 20` and `2 ** 62` allowed) or None; ""
is the defaults. The plans are cached by the tunables' values, so each configuration gets its
own.

Every timed lstmkit call comes right after a torch.nn call on the same input, as in `lstmkit
bench`. Timed back to back instead, the second of two configurations finds the first's weights,
states and memory blocks still in the caches and reads a few percent faster (LSTM training at
batch 32 / hidden 128: four row parts instead of two, 4% faster back to back, 0.1% slower after
torch.nn's call; see "Stop 26" in docs/performance.md). Prints each configuration's median, its
time relative to the first configuration's, and torch.nn's time over it.
"""

import ast
import math
import operator
import statistics
import time

import torch

import lstmkit
from lstmkit import bench
from lstmkit.cli import _Parser as OneLineParser  # a usage error: one line on stderr, exit 2
from lstmkit.kernels import native

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.LShift: operator.lshift, ast.Pow: operator.pow, ast.USub: operator.neg}


def _number(text: str):
    """A number from a small arithmetic expression (1 << 20, 2 ** 62, 0.5, -1) or None."""
    def value(node):
        if isinstance(node, ast.Constant) and (node.value is None or
                                               isinstance(node.value, (int, float))):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, (ast.Pow, ast.LShift)) and abs(right) > 64:
                raise ValueError
            return _OPERATORS[type(node.op)](left, right)
        raise ValueError
    try:
        number = value(ast.parse(text.strip(), mode="eval").body)
        if number is not None and not (math.isfinite(number) and abs(number) <= 2 ** 64):
            raise ValueError
        return number
    except (SyntaxError, ValueError, TypeError, OverflowError):
        raise ValueError(f"expected a number such as 8, 0.5, 1 << 20 or None (at most 2 ** 64), "
                         f"got {text!r}") from None


def parse_config(text: str) -> dict:
    """"NAME=VALUE,..." as {NAME: value}, each NAME one of kernels.native.TUNABLE_NAMES, its
    value of the default's kind: an int where the default is one, None only where it is None."""
    settings = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in native.TUNABLE_NAMES:
            raise ValueError(f"expected NAME=VALUE with NAME one of {', '.join(native.TUNABLE_NAMES)}"
                             f", got {item!r}")
        value, default = _number(raw), getattr(native, name)
        if value is None and default is not None:
            raise ValueError(f"{name} takes a number (its default is {default!r}), got None")
        if isinstance(value, float) and (default is None or isinstance(default, int)):
            raise ValueError(f"{name} takes an int (its default is {default!r}), got {value!r}")
        settings[name] = value
    return settings


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["LSTM", "GRU"], default="LSTM")
    parser.add_argument("--mode", choices=["forward", "train"], default="forward")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", action="append", default=None,
                        help='tunables to set, "NAME=VALUE,..." ("" for the defaults); '
                             "repeat for each configuration (default: the defaults alone)")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="time to spend measuring, about (default 20)")
    args = parser.parse_args(argv)
    for name in ("batch", "hidden", "input_size", "steps", "layers", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int, "
                         f"got {getattr(args, name)}")
    if not (math.isfinite(args.seconds) and args.seconds > 0):
        parser.error(f"--seconds must be a positive number, got {args.seconds}")
    texts = args.config if args.config is not None else [""]
    try:
        configs = [parse_config(text) for text in texts]
    except ValueError as error:
        parser.error(str(error))
    if not native.available():
        parser.error(f"the native kernels are unavailable: {native.unavailable_reason()}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = dict(num_layers=args.layers, bidirectional=args.bidirectional)
    ours = getattr(lstmkit, args.family)(args.input_size, args.hidden, **shape)
    theirs = getattr(torch.nn, args.family)(args.input_size, args.hidden, **shape)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(args.steps, args.batch, args.input_size,
                    requires_grad=args.mode == "train")
    defaults = {name: getattr(native, name) for config in configs for name in config}

    # The harness's own calls: inference under no_grad, or a training step from fresh gradients.
    run_ours, run_theirs = bench._runner(ours, x, args.mode), bench._runner(theirs, x, args.mode)

    def timed(run):
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    def use(config):
        for name, value in defaults.items():
            setattr(native, name, config.get(name, value))

    try:
        for config in configs:                   # warm-up: each plan made and cached once
            use(config)
            run_ours()
            run_theirs()
        one = timed(run_ours) + timed(run_theirs)
        rounds = max(7, min(300, int(args.seconds / (one * len(configs)))))
        ours_times = [[] for _ in configs]
        theirs_times = []
        for _ in range(rounds):
            for k, config in enumerate(configs):
                theirs_times.append(timed(run_theirs))
                use(config)
                ours_times[k].append(timed(run_ours))
    finally:
        use({})
    torch_ms = statistics.median(theirs_times) * 1e3
    layers = (f", {args.layers} layers" if args.layers > 1 else "") + (
        ", bidirectional" if args.bidirectional else "")
    print(f"{args.family} {args.mode} batch {args.batch} hidden {args.hidden} input "
          f"{args.input_size} steps {args.steps}{layers}, {args.threads} threads, {rounds} "
          f"rounds: torch.nn {torch_ms:.3f} ms")
    first = statistics.median(ours_times[0]) * 1e3
    for text, times in zip(texts, ours_times, strict=True):
        ms = statistics.median(times) * 1e3
        print(f"  {text or '(defaults)':50s} {ms:9.3f} ms  {ms / first:6.3f} of the first  "
              f"torch.nn / this {torch_ms / ms:5.2f}x")


if __name__ == "__main__":
    main()
