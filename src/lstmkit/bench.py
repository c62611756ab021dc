"""Speed of lstmkit against torch.nn, same weights, same process, interleaved.

Each point builds an lstmkit module and the torch.nn module of the same family with the same
weights, then alternates between them: warm-up calls, then `repeats` timed calls of each (more
for short points, until MIN_SECONDS have passed), and reports the median
(`run(..., isolate=True)`, as `lstmkit bench` does, runs each point in a fresh process).
"forward" is inference under `torch.no_grad()`; "train" is one forward and
backward pass (the gradients of the input and every parameter). Throughput is given as GFLOP/s
of the matrix products (the gate math is not counted) and as a fraction of this machine's own
matrix-multiply rate, measured here on square matrices (`matmul_rate`). Each point also gets the
largest speedup physically possible there (`speedup_bound`: torch.nn's time over the time of the
matrix products at 100% of that rate; a missed target above it is "out of reach"), and, where
the library runs the steps (MKL, or oneDNN off Intel CPUs: `kernels.native.product_library`), the
largest speedup with the same products at that library's speed (`products_bound`, see
`products_seconds`; a missed target above it is "beyond lib").

    >>> from lstmkit import bench
    >>> results = bench.run(bench.grid("quick"), repeats=3, isolate=True)    # doctest: +SKIP

`streaming()` times the single-step API called from Python once per step (batch 1), against
torch.nn's cell (LSTMCell, GRUCell or RNNCell) called the same way."""

import json
import operator
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

FAMILIES = ("LSTM", "GRU")
STREAMING_FAMILIES = ("LSTM", "GRU", "RNN")
STREAMING_TARGET = 2.0      # the target for the LSTM: 2x torch.nn.LSTMCell
MODES = ("forward", "train")
GATES = {"LSTM": 4, "GRU": 3}


@dataclass(frozen=True)
class Point:
    """One benchmark configuration. Shapes: input (steps, batch, input_size)."""

    family: str = "LSTM"
    mode: str = "forward"
    batch: int = 8
    hidden: int = 256
    input_size: int = 64
    steps: int = 100
    layers: int = 1
    bidirectional: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("batch", "hidden", "input_size", "steps", "layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @property
    def target_class(self) -> str:
        """The issue's target classes: small, medium, large, or "-" for points between them."""
        if self.batch <= 8 and self.hidden <= 256:
            return "small"
        if 32 <= self.batch <= 64 and 128 <= self.hidden <= 512:
            return "medium"
        if self.batch >= 128 and self.hidden >= 1024:
            return "large"
        return "-"

    def flops(self) -> float:
        """Multiply-adds x 2 of the matrix products; training counts forward + 2x backward."""
        G, H, D = GATES[self.family], self.hidden, 2 if self.bidirectional else 1
        total = 0.0
        for layer in range(self.layers):
            inputs = self.input_size if layer == 0 else D * H
            total += D * 2.0 * self.steps * self.batch * G * H * (inputs + H)
        return total * (3 if self.mode == "train" else 1)


TARGET_RATIO = {"small": 2.0, "medium": 1.3, "large": 1.0}
LARGE_MATMUL_FRACTION = 0.85


def grid(name: str = "quick", families=FAMILIES, modes=MODES) -> list[Point]:
    """Named grids. "quick" (about a minute on 2 cores): one or two points per target class.

    "full": batch 1-128 x hidden 64-1024 at length 100, plus length 1000, two layers and
    bidirectional points."""
    if name == "quick":
        shapes = [(1, 64, 100), (1, 256, 100), (8, 256, 100), (32, 256, 100), (64, 512, 100),
                  (128, 1024, 20)]
        extra = []
    elif name == "full":
        shapes = [(b, h, 100) for b in (1, 8, 32, 64, 128) for h in (64, 128, 256, 512, 1024)]
        extra = [dict(batch=8, hidden=256, steps=1000), dict(batch=1, hidden=128, steps=1000),
                 dict(batch=32, hidden=256, steps=100, layers=2),
                 dict(batch=32, hidden=256, steps=100, bidirectional=True),
                 dict(batch=8, hidden=128, steps=100, layers=2, bidirectional=True)]
    else:
        raise ValueError(f"grid must be 'quick' or 'full', got {name!r}")
    points = []
    for family in families:
        for mode in modes:
            points += [Point(family, mode, b, h, 64, t) for b, h, t in shapes]
            points += [Point(family, mode, input_size=64, **e) for e in extra]
    return points


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1min": round(load[0], 2), "products": _product_library()}


def _product_library() -> str:
    """The native kernels' product library ("onednn" or "mkl"), or "none" without them."""
    from .kernels import native

    return native.product_library() if native.available() else "none"


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, repeats):
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """The dtype whose matrix-multiply rate bounds a point run in `dtype` on `device`.

    On the CPU, the dtype the kernels compute in (`compute_dtype`: float16 and bfloat16 run in
    float32, see kernels/_precision.py): there torch.mm in float16 is no fast path to measure
    against (2048 x 2048 took 37 s on the 2-core benchmark machine, against 0.05 s in float32),
    and lstmkit's products run in float32 anyway. On a GPU, the dtype itself (tensor cores)."""
    from .kernels._precision import compute_dtype

    return compute_dtype(dtype) if torch.device(device).type == "cpu" else dtype


def _onednn_mm():
    """a, b -> a @ b^T through oneDNN's matmul (torch's own op, the library torch.nn.LSTM's CPU
    primitive is built on), or None where torch has no such op."""
    try:
        linear = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return lambda a, b: linear(a, b, None, "none", [], "")


def matmul_rate(dtype=torch.float32, device="cpu", size=2048, repeats=5) -> float:
    """This machine's matrix-multiply rate in GFLOP/s: the fastest of `repeats` calls of torch.mm
    on size x size matrices and, on the CPU in float32, of oneDNN's matmul as well.

    The fastest, not the median: other processes and frequency changes only ever slow a call
    down, and the rate bounds every speedup (`speedup_bound`), so it must not be underestimated.
    For the same reason both libraries: torch.mm runs on MKL, whose fastest kernels run on Intel
    CPUs only (on an AMD EPYC, Zen 5, it reached 192 GFLOP/s where oneDNN reached 430).
    """
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    calls = [torch.mm]
    onednn = _onednn_mm() if device.type == "cpu" and dtype == torch.float32 else None
    if onednn is not None:
        try:
            onednn(a[:16, :16], b[:16, :16])
            calls.append(onednn)
        except RuntimeError:      # torch without oneDNN, or a CPU it does not take
            pass
    best = float("inf")
    for call in calls:
        call(a, b)
        best = min(best, min(_median_time(lambda call=call: call(a, b), device, 1) for _ in range(repeats)))
    return 2.0 * size ** 3 / best / 1e9


def _modules(point: Point, dtype, device):
    import lstmkit

    options = dict(num_layers=point.layers, bidirectional=point.bidirectional, dtype=dtype,
                   device=device)
    ours = getattr(lstmkit, point.family)(point.input_size, point.hidden, **options)
    theirs = getattr(torch.nn, point.family)(point.input_size, point.hidden, **options)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _runner(module, x, mode):
    if mode == "forward":
        def forward():
            with torch.no_grad():
                module(x)
        return forward

    def train():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        out, _ = module(x)
        out.sum().backward()
    return train


# Each point is timed for at least this long (both sides together, after the warm-up), with
# more than `repeats` calls where they are short: the median of 5 calls of 0.2 ms moved by
# 15-25% between runs on the shared benchmark machine (batch 1 / hidden 64).
MIN_SECONDS = 0.5


def time_point(point: Point, dtype=torch.float32, device="cpu", repeats=5, warmup=1,
               min_seconds=MIN_SECONDS) -> dict:
    """Median seconds of lstmkit and torch.nn at one point, measured alternately: at least
    `repeats` calls of each, and more until `min_seconds` have passed."""
    device = torch.device(device)
    torch.manual_seed(0)
    ours, theirs = _modules(point, dtype, device)
    x = torch.randn(point.steps, point.batch, point.input_size, dtype=dtype, device=device,
                    requires_grad=point.mode == "train")
    run_ours, run_theirs = _runner(ours, x, point.mode), _runner(theirs, x, point.mode)
    for _ in range(warmup):
        run_ours()
        run_theirs()
    ours_times, theirs_times = [], []
    while len(ours_times) < repeats or sum(ours_times) + sum(theirs_times) < min_seconds:
        # Interleaved: drift and other processes hit both alike.
        ours_times.append(_median_time(run_ours, device, 1))
        theirs_times.append(_median_time(run_theirs, device, 1))
    return {"lstmkit_s": statistics.median(ours_times), "torch_s": statistics.median(theirs_times),
            "calls": len(ours_times)}


def products_seconds(point: Point, dtype=torch.float32, repeats=5):
    """Seconds the point's matrix products take alone, each at the speed the native kernels'
    product library (MKL, or oneDNN off Intel CPUs: `kernels.native.product_library`) runs it at
    its exact shape on this machine (None without the native kernels, which hold the loop).

    Per layer and direction: the input projection (N, I) x (I, G) and the T step products
    (B, H) x (H, G), as the generic driver runs them (MKL's packed GEMM with W_hh packed once,
    or oneDNN's matmul; the faster of the whole batch
    split across the threads and the batch rows split into one part per thread; operands and
    results in the same buffers at every step, as in the loop), or for the LSTM, if faster, the
    T step products (B, I + H) x (I + H, G) with the input; training adds
    the T backward steps (B, G) x (G, H), dX (N, G) x (G, I) and the weight and bias gradients
    (G, N) x (N, I + H + 1). No gate math, no state, no allocation: torch.nn's time over this
    (`products_bound`) is the largest speedup for any implementation whose products run at
    the library's speed. None where lstmkit's own step products run instead (the fused driver at
    small batches, or the LSTM's own row parts with oneDNN: faster than the library at those
    shapes, so its speed bounds nothing there). In the dtype the
    kernels compute in (float32 for float16 and bfloat16, see `matmul_dtype`)."""
    from .kernels import StepLayout, native

    if not native.available():
        return None
    dtype = matmul_dtype(dtype, "cpu")
    module = native.module()
    G, H, B, T = GATES[point.family] * point.hidden, point.hidden, point.batch, point.steps
    D, N = (2 if point.bidirectional else 1), point.batch * point.steps
    threads = torch.get_num_threads()

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype)

    w_hh = randn(G, H)
    if native._driver(StepLayout.padded(T, B), w_hh) == 0:
        return None       # lstmkit's own step product runs here, faster than MKL's at the shape
    if point.family == "LSTM" and native._own_row_parts(StepLayout.padded(T, B),
                                                        randn(G, point.input_size), w_hh, None):
        return None       # likewise, the own row parts that oneDNN's products leave to us

    def timed(fn):
        fn()
        return _median_time(fn, torch.device("cpu"), repeats)

    h, d_gates = randn(B, H), randn(N, G)

    def steps(a, b):          # T step products a @ b, the faster row split
        return min(timed(lambda parts=parts: module.step_products(a, b, T, parts))
                   for parts in sorted({1, threads}))

    def products(outs, lefts, rights):   # one product per (out, left, right), at once
        return timed(lambda: module.products(outs, lefts, rights))

    recurrent = steps(h, w_hh.t())
    backward = steps(d_gates[:B], w_hh) if point.mode == "train" else 0.0
    total = 0.0
    for layer in range(point.layers):
        inputs = point.input_size if layer == 0 else D * H
        x, w_ih, flat_gates = randn(N, inputs), randn(G, inputs), d_gates
        projection = torch.empty(N, G, dtype=dtype)
        forward = recurrent + products([projection], [x], [w_ih.t()])
        if point.family == "LSTM":     # or the input inside each step's product, if faster
            forward = min(forward, steps(randn(B, inputs + H), randn(G, inputs + H).t()))
        sequence = 0.0
        if point.mode == "train":
            dx, stacked = torch.empty(N, inputs, dtype=dtype), randn(N, inputs + H + 1)
            weights = torch.empty(G, inputs + H + 1, dtype=dtype)
            sequence = products([dx, weights], [flat_gates, flat_gates.t()], [w_ih, stacked])
        total += D * (forward + backward + sequence)
    return total


def _measure(point: Point, dtype, device, repeats, warmup, min_seconds=MIN_SECONDS) -> dict:
    """time_point, and products_seconds on the CPU: one point's raw measurements (seconds)."""
    timing = time_point(point, dtype, device, repeats, warmup, min_seconds)
    products = products_seconds(point, dtype, repeats) if device.type == "cpu" else None
    return {**timing, "products_s": products}


def _measure_in_subprocess(point: Point, dtype, device, repeats, warmup,
                          min_seconds=MIN_SECONDS) -> dict:
    """_measure in a fresh Python process with this one's thread count (see `run`)."""
    request = {"point": asdict(point), "dtype": str(dtype).replace("torch.", ""),
               "device": str(device), "repeats": repeats, "warmup": warmup,
               "min_seconds": min_seconds, "threads": torch.get_num_threads()}
    done = subprocess.run([sys.executable, "-m", "lstmkit.bench", json.dumps(request)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark subprocess for {point} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main(request: str) -> None:
    """`python -m lstmkit.bench REQUEST`: one point measured, its JSON on the last stdout line."""
    request = json.loads(request)
    torch.set_num_threads(request["threads"])
    result = _measure(Point(**request["point"]), getattr(torch, request["dtype"]),
                      torch.device(request["device"]), request["repeats"], request["warmup"],
                      request.get("min_seconds", MIN_SECONDS))
    print(json.dumps(result))


def run(points, dtype=torch.float32, device="cpu", repeats=5, warmup=1, rate=None,
        progress=None, isolate=False, min_seconds=MIN_SECONDS, rounds=1) -> dict:
    """Time every point; returns {"machine", "matmul_gflops", "matmul_dtype", "points": [...]}
    (the rate measured in `matmul_dtype(dtype, device)`).

    Each point: `warmup` untimed calls of each side, then at least `repeats` timed calls of
    each, more until `min_seconds` have passed (see time_point); its row says how many ("calls").

    rounds: the whole list of points measured this many times over, one round after the other,
    so that a slow spell of the machine falls on one round of many points rather than on every
    round of one (on the shared benchmark machine a point's speedup moved by up to 15% between
    two runs of the quick grid). With more than one, each point's row holds the medians: of its
    rounds' times, and `speedup` the median of its rounds' speedups (each measured on both sides
    in the same moments); `speedup_range` the slowest and fastest round's, `rounds` every
    round's times. `progress(row)` is called for each round's row of each point as it is
    measured (with its "round", from 1, when there are several).

    isolate: each point in a fresh Python process (`lstmkit bench` does this by default). In
    one process, what earlier points allocated and freed decides how many of a later point's
    allocations fault fresh pages in, for both sides (torch.nn's LSTM training step at batch
    32 / hidden 256: 31 ms in a fresh process, 24.7 ms after the other points of the quick
    grid), so the same point measures differently depending on what ran before it."""
    try:
        whole = None if isinstance(rounds, bool) else operator.index(rounds)
    except TypeError:
        whole = None
    if whole is None or whole < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    rounds = whole
    device = torch.device(device)
    machine_before = machine()
    measured_rate = rate is None
    rate_dtype = matmul_dtype(dtype, device)
    rate = rate or matmul_rate(rate_dtype, device)
    start_rate = rate
    measure = _measure_in_subprocess if isolate else _measure
    measured = [[] for _ in points]            # each point's rows, one per round
    for round_index in range(rounds):
        for index, (point, point_rows) in enumerate(zip(points, measured)):
            if measured_rate and (round_index or index):
                # Sampled again before every point, the best kept: the machine's speed drifts
                # and other processes slow some samples down (on the shared 2-core machine the
                # start and end samples alone ranged over 381-439 GFLOP/s between runs).
                rate = max(rate, matmul_rate(rate_dtype, device, repeats=2))
            row = _row(point, measure(point, dtype, device, repeats, warmup, min_seconds))
            if rounds > 1:
                row["round"] = round_index + 1
            _judge(row, rate)
            point_rows.append(row)
            if progress:
                progress(row)
    rows = [point_rows[0] if rounds == 1 else _median_row(point, point_rows)
            for point, point_rows in zip(points, measured)]
    if measured_rate:
        # Measured again at the end and the best of all samples kept, for every row: another
        # process running at some of the moments would otherwise make fractions look larger.
        rate = max(rate, matmul_rate(rate_dtype, device))
    for row in rows:
        _judge(row, rate)
    # The load average before and after: other processes on the machine slow both sides, and
    # thread-team synchronisation suffers most when cores are shared.
    return {"machine": machine_before, "load_average_1min_after": machine()["load_average_1min"],
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(device), "matmul_gflops": rate, "matmul_gflops_start": start_rate,
            "matmul_dtype": str(rate_dtype).replace("torch.", ""),
            "points": rows}


def _row(point: Point, timing: dict) -> dict:
    """A point's row from its measured seconds (see _measure), before `_judge`."""
    gflop = point.flops() / 1e9
    products = timing["products_s"]
    return {**asdict(point), "target_class": point.target_class,
            "lstmkit_ms": timing["lstmkit_s"] * 1e3, "torch_ms": timing["torch_s"] * 1e3,
            "lstmkit_gflops": gflop / timing["lstmkit_s"],
            "torch_gflops": gflop / timing["torch_s"],
            "speedup": timing["torch_s"] / timing["lstmkit_s"], "calls": timing["calls"],
            "products_ms": None if products is None else products * 1e3,
            "products_gflops": None if products is None else gflop / products}


def _median_row(point: Point, rounds: list) -> dict:
    """One row for a point measured in several rounds (see `run`), before `_judge`."""
    gflop = point.flops() / 1e9
    lstmkit_ms = statistics.median(r["lstmkit_ms"] for r in rounds)
    torch_ms = statistics.median(r["torch_ms"] for r in rounds)
    products = [r["products_ms"] for r in rounds if r["products_ms"] is not None]
    products_ms = statistics.median(products) if products else None
    speedups = [r["speedup"] for r in rounds]
    return {**asdict(point), "target_class": point.target_class,
            "lstmkit_ms": lstmkit_ms, "torch_ms": torch_ms,
            "lstmkit_gflops": gflop / lstmkit_ms * 1e3, "torch_gflops": gflop / torch_ms * 1e3,
            "speedup": statistics.median(speedups),
            "speedup_range": [min(speedups), max(speedups)],
            "calls": sum(r["calls"] for r in rounds),
            "products_ms": products_ms,
            "products_gflops": None if products_ms is None else gflop / products_ms * 1e3,
            "rounds": [{key: r[key] for key in ("lstmkit_ms", "torch_ms", "speedup")}
                       for r in rounds]}


def speedup_bound(torch_gflops: float, rate: float) -> float:
    """The largest speedup over torch.nn physically possible at a point: torch.nn's time over
    the time of the point's matrix products at the machine's full matrix-multiply rate.

    torch_s / (flops / rate) = rate / torch_gflops. Nothing that performs the same products
    (and the gate math besides) can beat it on this machine."""
    return rate / torch_gflops


def target_status(row: dict):
    """The row's verdict: "met"; "out of reach" when missed and the target exceeds
    `speedup_bound` (it would need more than 100% of the matrix-multiply rate); "beyond lib"
    when missed and the target exceeds `products_bound`, or for the large class needs a larger
    fraction of the rate than the product library's products reach alone at these shapes (only
    an implementation with faster matrix products than the library's could meet it); "missed"
    otherwise.
    None outside the target classes."""
    if row["target_met"] is None:
        return None
    if row["target_met"]:
        return "met"
    target = TARGET_RATIO[row["target_class"]]
    if row["speedup_bound"] < target:
        return "out of reach"
    if row.get("products_bound") is not None:
        fraction_short = (row["target_class"] == "large"
                          and row["products_matmul_fraction"] < LARGE_MATMUL_FRACTION)
        if row["products_bound"] < target or fraction_short:
            return "beyond lib"
    return "missed"


def _judge(row: dict, rate: float) -> None:
    """Fill the row's fields that depend on the matrix-multiply rate."""
    row["lstmkit_matmul_fraction"] = row["lstmkit_gflops"] / rate
    row["torch_matmul_fraction"] = row["torch_gflops"] / rate
    row["speedup_bound"] = speedup_bound(row["torch_gflops"], rate)
    products = row.get("products_gflops")
    row["products_bound"] = None if products is None else products / row["torch_gflops"]
    row["products_matmul_fraction"] = None if products is None else products / rate
    row["target_met"] = target_met(row)
    row["target_status"] = target_status(row)


def target_met(row: dict):
    """True/False against the issue's target for the row's class; None outside the classes."""
    target = TARGET_RATIO.get(row["target_class"])
    if target is None:
        return None
    met = row["speedup"] >= target
    if row["target_class"] == "large":
        met = met and row["lstmkit_matmul_fraction"] >= LARGE_MATMUL_FRACTION
    return met


def streaming(hidden=256, input_size=256, steps=2000, repeats=5, dtype=torch.float32,
              device="cpu", family="LSTM") -> dict:
    """Batch-1 streaming: one cell call from Python per step, no autograd, microseconds per step.

    lstmkit's cell of the family ("LSTM", "GRU" or "RNN") against torch.nn's with the same
    weights, timed alternately. target_met: against the 2x target, which is the LSTM's (None for
    the others)."""
    import lstmkit

    if family not in STREAMING_FAMILIES:
        raise ValueError(f"family must be one of {STREAMING_FAMILIES}, got {family!r}")
    device = torch.device(device)
    torch.manual_seed(0)
    ours = getattr(lstmkit, family + "Cell")(input_size, hidden, dtype=dtype, device=device)
    theirs = getattr(torch.nn, family + "Cell")(input_size, hidden, dtype=dtype, device=device)
    theirs.load_state_dict(ours.state_dict())
    xs = torch.randn(steps, 1, input_size, dtype=dtype, device=device)

    def loop(cell):
        def go():
            h = torch.zeros(1, hidden, dtype=dtype, device=device)
            state = (h, h) if family == "LSTM" else h
            with torch.no_grad():
                for x in xs:
                    state = cell(x, state)
        return go

    run_ours, run_theirs = loop(ours), loop(theirs)
    run_ours()
    run_theirs()
    ours_times, theirs_times = [], []
    for _ in range(repeats):
        ours_times.append(_median_time(run_ours, device, 1))
        theirs_times.append(_median_time(run_theirs, device, 1))
    ours_us = statistics.median(ours_times) / steps * 1e6
    theirs_us = statistics.median(theirs_times) / steps * 1e6
    speedup = theirs_us / ours_us
    return {"family": family, "hidden": hidden, "input_size": input_size, "steps": steps,
            "lstmkit_us_per_step": ours_us, "torch_us_per_step": theirs_us, "speedup": speedup,
            "target_met": speedup >= STREAMING_TARGET if family == "LSTM" else None}


HEADER = (f"{'family':6} {'mode':7} {'B':>4} {'H':>5} {'I':>4} {'T':>5} {'L':>2} {'D':>2} "
          f"{'lstmkit ms':>11} {'torch ms':>10} {'GFLOP/s':>8} {'of mm':>6} {'torch':>6} "
          f"{'speedup':>8} {'bound':>7} {'lib':>7} {'lib mm':>7} {'class':>7} {'target':>12}")

STATUS_TEXT = {"met": "met", "missed": "MISSED", "out of reach": "out of reach",
               "beyond lib": "beyond lib", None: ""}


def _optional(value, form: str, width: int, unit: str = "") -> str:
    text = "-" if value is None else f"{value:{form}}"
    return text.rjust(width) + (unit if value is not None else " " * len(unit))


def format_row(row: dict) -> str:
    """One line of the printed table; "bound" is `speedup_bound`, "torch" torch.nn's fraction
    of the matrix-multiply rate, "lib" `products_bound` and "lib mm" the fraction of the rate
    the products reach alone at the product library's speed (see products_seconds)."""
    return (f"{row['family']:6} {row['mode']:7} {row['batch']:>4} {row['hidden']:>5} "
            f"{row['input_size']:>4} {row['steps']:>5} {row['layers']:>2} "
            f"{2 if row['bidirectional'] else 1:>2} {row['lstmkit_ms']:>11.2f} "
            f"{row['torch_ms']:>10.2f} {row['lstmkit_gflops']:>8.1f} "
            f"{row['lstmkit_matmul_fraction']:>6.0%} {row['torch_matmul_fraction']:>6.0%} "
            f"{row['speedup']:>7.2f}x {row['speedup_bound']:>6.2f}x "
            f"{_optional(row.get('products_bound'), '.2f', 6, 'x')} "
            f"{_optional(row.get('products_matmul_fraction'), '.0%', 7)} "
            f"{row['target_class']:>7} {STATUS_TEXT[row['target_status']]:>12}"
            + _range_text(row, "  ({:.2f}-{:.2f}x over {} rounds)"))


def _range_text(row: dict, form: str) -> str:
    """The slowest and fastest round's speedups, for a row measured in several rounds."""
    low_high = row.get("speedup_range")
    return "" if low_high is None else form.format(*low_high, len(row["rounds"]))


def markdown(results: dict) -> str:
    """The results as a Markdown table (the one in docs/performance.md)."""
    lines = ["| family | mode | B | H | I | T | layers | dirs | lstmkit ms | torch.nn ms | "
             "lstmkit GFLOP/s | lstmkit of matmul rate | torch.nn of matmul rate | speedup | "
             "bound (100% of matmul rate) | bound (products at library speed) | "
             "library products of matmul rate | class | target |",
             "|" + "---|" * 19]
    status_text = {"met": "met", "missed": "**missed**", "out of reach": "out of reach",
                   "beyond lib": "beyond lib", None: ""}
    for row in results["points"]:
        target = TARGET_RATIO.get(row["target_class"])
        target_text = f"{target:.1f}x {status_text[row['target_status']]}" if target else ""
        products, fraction = row.get("products_bound"), row.get("products_matmul_fraction")
        lines.append(
            f"| {row['family']} | {row['mode']} | {row['batch']} | {row['hidden']} | "
            f"{row['input_size']} | {row['steps']} | {row['layers']} | "
            f"{2 if row['bidirectional'] else 1} | {row['lstmkit_ms']:.2f} | "
            f"{row['torch_ms']:.2f} | {row['lstmkit_gflops']:.1f} | "
            f"{row['lstmkit_matmul_fraction']:.0%} | {row['torch_matmul_fraction']:.0%} | "
            f"{row['speedup']:.2f}x{_range_text(row, ' ({:.2f}-{:.2f}x, {} rounds)')} | "
            f"{row['speedup_bound']:.2f}x | "
            f"{'-' if products is None else f'{products:.2f}x'} | "
            f"{'-' if fraction is None else f'{fraction:.0%}'} | "
            f"{row['target_class']} | {target_text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    _main(sys.argv[1])
