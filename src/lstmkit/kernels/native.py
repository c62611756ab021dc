"""Native CPU backend: the recurrences of `_native.cpp`, compiled on first use.

# N rows (time-major, see layout.py), B batch, I input, H hidden, P output size.

Same signatures and semantics as the portable kernels' Functions (lstm.py, gru.py, rnn.py).
A layer's forward is one call into C++ (bias sum, input projection, step loop), and so is its
backward (step loop, then dX and the weight and bias gradients as matrix products in one
parallel region): no Python per step, and none of the dozen small ATen calls per layer that
cost as much as the loops at batch 1. The autograd nodes are C++ too (NativeLSTMLayer, and
NativeOneStateLayer for the GRU and RNN: no Python in a backward pass). This file chooses the
driver (`_driver`, `_lstm_plan`) and routes each call: the portable Function when the
extension is missing, the bare forward without autograd, else the C++ node.

Build: `torch.utils.cpp_extension.load` compiles `_native.cpp` against the installed torch the
first time a native kernel is needed (about 20 s on 2 cores) into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions), keyed by the source, the flags and
this CPU's instruction set; later processes load the cached library. If the compiler, ninja or
the load fails, or `LSTMKIT_NATIVE=0` is set, the portable kernels run instead and one warning
says why.

Without autograd (inference, `torch.no_grad()`, or no input needing a gradient) a Function's
`apply` skips the autograd machinery and stores nothing for a backward pass.
"""

import functools
import hashlib
import operator
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

from . import gru as _gru
from . import lstm as _lstm
from . import rnn as _rnn
from ._precision import compute_dtype
from .layout import StepLayout

_SOURCE = Path(__file__).with_name("_native.cpp")
NATIVE_DTYPES = (torch.float32, torch.float64)        # what the kernels compute in
# What they take: float16 and bfloat16 too, computed in float32 (the sequence kernels get their
# inputs converted, the single-step kernel widens the weights as it reads them, see
# load_weights in _native.cpp).
INPUT_DTYPES = NATIVE_DTYPES + (torch.float16, torch.bfloat16)

# Which driver runs a layer (`_driver`). "fused": our register-blocked product, W_hh packed
# and split across the cores for the whole sequence, one synchronisation per step; it wins at
# small batches while each core's share of W_hh stays in its L2 cache. "generic": each step's
# product is one call of MKL's packed GEMM (W_hh reordered once per call; at::mm where MKL is
# absent; for an LSTM with a small input, the input inside it: INPUT_IN_STEP_MAX_RATIO), then
# the gate math over the rows; it also runs projection (proj_size) and GRU reset-before. The
# generic driver splits the batch rows into independent parts, one per thread, each running
# the whole sequence for its rows (no synchronisation at all), when the step's weights are
# small enough to be read whole by every core at every step; otherwise one part, with each
# step's product and gate math split across the threads.
# Measured on the 2-core benchmark machine before the input moved into the LSTM's steps, LSTM
# forward, ms per 100 steps: batch 16 / hidden 256, fused 4.40, parts of 8 rows 4.00 (torch.nn
# 3.99); 32 / 256, fused 8.23, two parts 7.46, one part 10.17 (6.89); 64 / 256, fused 16.74,
# two parts 14.88, one part 19.02; GRU 32 / 384 (W_hh 1.7 MiB), fused 13.9, two parts 12.8;
# but LSTM 32 / 384 (2.25 MiB), fused 18.0, two parts 18.7, one part 19.0, and 64 / 512
# (4 MiB), two parts 58.0, one part 52.9; 128 / 1024 (T=20) 71.9 and 66.7. Fused against one
# generic part (forward / training): 32 / 512 33.4 / 101 vs 31.6 / 97. With the input in the
# step, parts of 4 rows beat the fused driver at batch 8 (interleaved medians, forward /
# training): hidden 256 2.35 / 6.59 vs 2.44 / 6.97, hidden 128 0.91 / 2.83 vs 1.01 / 3.18. At
# batch 1-2 the fused driver always wins (MKL's product of one row is slower than ours).
FUSED_MAX_BATCH = 64
FUSED_ALWAYS_BATCH = 2
FUSED_MAX_WEIGHT_BYTES_PER_THREAD = 1 << 20
MIN_PART_ROWS = 4
ROW_PARTS_MAX_WEIGHT_BYTES = 2 << 20        # read whole by each core at every step
MAX_ROW_PARTS = None                        # None: one per thread (tests ask for more)

# Per-sequence products (the input projection, dX, the weight gradients) smaller than this
# (floating-point operations) run on the calling thread: waking the thread team costs more than
# they do. The value of SERIAL_FLOPS in _native.cpp, for the tests.
SERIAL_FLOPS = 4e6
# LSTM, generic driver: the input multiplied inside each step's product (see lstm_forward in
# _native.cpp) instead of projected for all steps before the loop, when input size <= this
# times hidden size. Measured, forward ms, in the step vs projected (interleaved medians):
# batch 32 / hidden 256 with input 64 7.25 vs 8.30, 128 9.01 vs 9.55, but 256 12.04 vs 11.18
# and 512 16.90 vs 15.62; 32 / 128 / input 64 2.75 vs 3.06; 64 / 512 / 256 63.9 vs 67.2.
INPUT_IN_STEP_MAX_RATIO = 0.5
# LSTM, generic driver with row parts (whose weights fit in L2: ROW_PARTS_MAX_WEIGHT_BYTES): each
# step's product can be our register-blocked one (the fused driver's), the gate math applied
# to its results in registers, instead of MKL's call (whose fixed cost is a good part of such
# small products) and a pass over its (rows, 4H) result; the forward then multiplies the input
# inside the step. The forward takes it for parts of at most OWN_FORWARD_MAX_ROWS rows (with
# AVX-512 one group of up to 8 rows reads each weight once per step), or at any row count while
# [W_ih | W_hh] takes at most OWN_FORWARD_MAX_WEIGHT_BYTES (under half of the benchmark
# machine's 2 MiB L2 per core) and the input is at most OWN_FORWARD_MAX_INPUT_RATIO times the
# hidden size (each output sums the I + H products in one chain, less accurate than MKL's
# blocked sums over long rows: float32 output error 1.1e-5 against MKL's 7.2e-6 at input 2048,
# hidden 16, 4.7e-5 against 9.7e-6 at input 8192, hidden 4); the backward (dh = da W_hh) for
# parts of at most OWN_BACKWARD_MAX_ROWS rows.
# Interleaved medians, input 64, MKL vs own, forward / training ms: batch 8 / hidden 64 0.49 /
# 1.50 vs 0.38 / 1.38; 8 / 128 0.85 / 3.00 vs 0.77 / 2.68; 8 / 256 2.15 / 6.92 vs 2.21 / 6.84;
# 12 / 256 3.63 / 10.74 vs 3.00 / 9.74; 16 / 128 1.47 / 4.89 vs 1.42 / 4.60; but 16 / 256 3.73
# / 12.04 vs 3.89 / 11.91, 24 / 256 5.64 vs 6.15 forward, 32 / 256 7.16 / 24.60 vs 7.53 / 24.09.
# With the gate math two blocks at a time, own / MKL, forward (rows per part, kilobytes of
# [W_ih | W_hh]): 32 / 64 (16, 128) 0.819, 32 / 96 (16, 240) 0.872, 24 / 128 (12, 384) 0.944,
# 32 / 128 (16, 384) 0.964, 48 / 64 (24, 128) 0.875, 64 / 96 (32, 240) 0.924, 128 / 64 (64, 128)
# 0.896; even at 32 / 160 (16, 573) 0.999, 64 / 128 (32, 384) 1.002; worse at 32 / 192 (16,
# 786) 1.008, 32 / 256 (16, 1280) 1.136. The backward, own / MKL, training: 64 / 64 (32 rows)
# 0.939, 64 / 128 0.932, 128 / 64 (64 rows) 0.956, 128 / 128 0.961, 64 / 160 0.980, 48 / 256
# 0.987, 64 / 256 1.000.
# Stop 26, with benchmarks/tunables.py (every call after a torch.nn call, as the benchmark runs
# it; the numbers above may have run in warmer caches: stop 24's script ran most calls right
# after another configuration's), forward, own / MKL (rows per part, kilobytes of
# [W_ih | W_hh], KiB): 64 / 128 (32, 384) 0.957, 128 / 128 (64, 384) 0.977, 128 / 96 (64, 240)
# 0.814, 16 / 256 (8, 1280) 0.956, 32 / 160 (16, 560) 0.970, 24 / 192 (12, 768) 0.968,
# 32 / 192 and 64 / 192 (768) 0.994-0.999, 64 / 160 0.995; but 128 / 224 (64, 1008) 1.013,
# 24 / 256 (12, 1280) 1.054, 32 / 256 1.085. Two layers (the second's input the hidden size,
# twice it when bidirectional): 64 / 128 0.901, 32 / 128 bidirectional 0.907. Training, own /
# MKL: 64 / 128 0.970, 128 / 96 0.929, 128 / 128 0.984, 16 / 256 0.999.
# The library of the float32 matrix products (the generic driver's steps, the input projection,
# dX, the weight gradients): None chooses oneDNN (torch.nn.LSTM's own) except on Intel CPUs,
# where MKL runs its AVX-512 kernels and measured as fast or faster (stops 1-28); MKL runs
# AVX2-class kernels elsewhere: on an AMD EPYC (Zen 5, 2 threads) torch.mm (MKL) ran at 192
# GFLOP/s, oneDNN at 420-430 (2048 x 2048). "mkl" or "onednn" forces one; oneDNN falls back to
# MKL where it does not run (no AVX-512). Read when the module loads.
PRODUCT_LIBRARY = None
# With oneDNN's products (whose calls cost more than MKL's packed ones for the few rows of a
# row part: 43-230 GFLOP/s at 4-16 rows against 400+ at 64 and more) the generic driver runs
# no row parts (generic_parts) except the LSTM's with our own step products, forward and
# backward, for parts of at least ONEDNN_OWN_MIN_ROWS rows while [W_ih | W_hh] takes at most
# ONEDNN_OWN_MAX_WEIGHT_BYTES; smaller batches take the fused driver, larger weights one part
# with oneDNN's multi-threaded step products. Interleaved medians on the AMD EPYC (Zen 5, 1 MiB
# of L2 per core), forward / training ms, own row parts against the fused driver or one part:
# batch 32 / hidden 256 5.59 / 18.95 vs 6.55 / 21.61, 64 / 256 10.70 / 36.21 vs 12.92 / 38.34,
# 32 / 512 (4.5 MiB) 18.08 / 66.07 vs 33.17 / 79.23, 64 / 512 35.27 / 146.5 vs 52.91 / 156.5,
# 32 / 128 1.56 vs 1.85, 64 / 128 3.51 vs 5.08; but 8 / 256 1.71 / 5.56 vs 1.35 / 4.91, and
# 128 / 1024 (17 MiB) 152.4 vs 62.4 forward (59.5 vs 56.2 after the slabs of stop 29, still a
# loss: 55.8 against 54.3 interleaved).
ONEDNN_OWN_MIN_ROWS = 8
ONEDNN_OWN_MAX_WEIGHT_BYTES = 8 << 20
# The backward's own row parts have no weight limit (W_hh's size): since stop 29 our product
# passes its row groups over the weights in slabs (slab_bytes in _native.cpp), so the weights
# stream in once per step. Training at batch 128 / hidden 1024 (16 MiB W_hh), interleaved
# medians: backward on oneDNN's steps 186.5 ms, own row parts 176.7 (the forward's own as well:
# 179.6; torch.nn 192.1).
ONEDNN_OWN_BACKWARD_MAX_WEIGHT_BYTES = 1 << 62
OWN_FORWARD_MAX_ROWS = 8
OWN_FORWARD_MAX_WEIGHT_BYTES = 768 << 10
OWN_FORWARD_MAX_INPUT_RATIO = 2.0
OWN_BACKWARD_MAX_ROWS = 64

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "reason": None, "products": "mkl"}


def _cpu_tag() -> str:
    """Hash of this CPU's instruction-set flags: a build for one CPU never loads on another."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    flags += line
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _compiler_flags(march: str = "native") -> list[str]:
    flags = ["-O3", "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append(f"-march={march}")
    return flags


def _openmp_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags for OpenMP, against the OpenMP runtime torch itself uses.

    ATen's `at::parallel_for` is an inline template that runs in parallel only when the code
    including it is compiled with OpenMP; linking torch's bundled libgomp (already loaded by
    torch) keeps one runtime and one thread pool in the process. Without it the kernels run
    single-threaded (still correct).
    """
    torch_lib = Path(torch.__file__).parent / "lib"
    if (torch_lib / "libgomp.so.1").exists():
        return ["-fopenmp"], [f"-L{torch_lib}", "-l:libgomp.so.1"]
    return [], []


def _compile(march: str = "native"):
    """Compile (or load from the cache) the extension module; raises on any failure.

    march: the x86 target; "native" (this CPU) except in the test that checks the code paths
    of CPUs without AVX-512 ("haswell") on a machine that has it."""
    from torch.utils.cpp_extension import load

    cflags, ldflags = _openmp_flags()
    suffix = _cpu_tag() if march == "native" else march
    return load(name=f"lstmkit_native_{suffix}", sources=[str(_SOURCE)],
                extra_cflags=_compiler_flags(march) + cflags, extra_ldflags=ldflags,
                verbose=False)


def _intel_cpu() -> bool:
    """Whether this is an Intel CPU (/proc/cpuinfo's vendor_id), where MKL runs its fastest
    kernels."""
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in info)
    except OSError:
        return False


def _choose_product_library(mod) -> str:
    """Set the library of the float32 matrix products ("onednn" or "mkl", see PRODUCT_LIBRARY)
    on the loaded module; returns it."""
    choice = PRODUCT_LIBRARY or ("mkl" if _intel_cpu() else "onednn")
    if choice == "onednn" and not mod.onednn_works():
        choice = "mkl"
    mod.set_use_onednn(choice == "onednn")
    return choice


def product_library() -> str:
    """The library the native kernels' float32 products run on: "onednn" or "mkl" (MKL where
    torch has it, else ATen's matmul)."""
    return _state["products"] if module() is not None else "mkl"


def module():
    """The compiled extension, or None (after one warning) when it cannot be built or loaded."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                if os.environ.get("LSTMKIT_NATIVE", "1") == "0":
                    _state["reason"] = "disabled by LSTMKIT_NATIVE=0"
                else:
                    try:
                        _state["module"] = _compile()
                        _state["products"] = _choose_product_library(_state["module"])
                    except Exception as exc:  # any build or load failure means: fall back
                        lines = str(exc).strip().splitlines() or [""]
                        detail = next((ln.strip() for ln in lines if "error:" in ln), lines[0])
                        _state["reason"] = f"{type(exc).__name__}: {detail}"[:300]
                if _state["module"] is None:
                    warnings.warn(f"lstmkit: native CPU kernels unavailable "
                                  f"({_state['reason']}); using the portable kernels",
                                  RuntimeWarning, stacklevel=3)
                _state["tried"] = True
    return _state["module"]


def available() -> bool:
    """True when the native kernels are built and loaded (builds them on the first call)."""
    return module() is not None


def unavailable_reason():
    """Why the native kernels are not in use, or None when they are."""
    module()
    return _state["reason"]


def supports(x: torch.Tensor) -> bool:
    """Whether `backend="auto"` should run native for this input: CPU, built, float32/float64
    or float16/bfloat16 (computed in float32, as every kernel here does)."""
    return x.device.type == "cpu" and x.dtype in INPUT_DTYPES and available()


def needs_autograd(tensors) -> bool:
    """Whether autograd will want a backward through a call on these tensors (None allowed)."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def pooled_empty(shape, like: torch.Tensor) -> torch.Tensor:
    """like.new_empty(shape), its memory from the native recycling pool (see _native.cpp):
    memory already mapped, where fresh memory costs a page fault per 4 KiB (0.9 us each on the
    benchmark machine: about 5000 per training step at batch 32 / hidden 256 before the pool)."""
    return module().pooled_empty(list(shape), like)


# Whether layers on the native backend draw their masks with the native module (tests that
# compare a native and a portable module on the same masks turn it off).
NATIVE_MASKS = True


def bernoulli_mask(rows: int, cols: int, p: float, like: torch.Tensor,
                   backend: str = "auto") -> torch.Tensor:
    """(rows, cols) of like's dtype and device, each element 1 with probability p, else 0,
    independently, drawn from torch's global generator (so torch.manual_seed makes it
    reproducible). For a layer whose backend runs native on the CPU ("auto" or "native", the
    native module there): the module's counter-based draw (bernoulli_mask in _native.cpp),
    seeded by one number from torch's CPU generator, about 25x faster than torch.bernoulli with
    two threads; otherwise ("portable", another device, no native module) torch.bernoulli."""
    if _native_masks(backend, like):
        seed = int(torch.randint(0, 2**62, (), device="cpu"))
        return module().bernoulli_mask(rows, cols, float(p), seed, like)
    return torch.bernoulli(torch.full((rows, cols), p, dtype=like.dtype, device=like.device))


def _native_masks(backend: str, like: torch.Tensor) -> bool:
    return NATIVE_MASKS and backend != "portable" and like.device.type == "cpu" and available()


def dropout(x: torch.Tensor, rate: float, backend: str = "auto") -> torch.Tensor:
    """F.dropout(x, rate) in training (each element zeroed with probability `rate`, the rest
    scaled by 1 / (1 - rate)), its mask from `bernoulli_mask` where a layer on `backend` draws
    natively (F.dropout's own draw took 37 ms for a (6400, 512) input, 7% of a two-layer
    training step at batch 64 / hidden 512); else F.dropout itself."""
    if not (_native_masks(backend, x) and 0.0 < rate < 1.0 and x.numel()):
        return torch.nn.functional.dropout(x, rate, training=True)
    keep = 1.0 - rate
    mask = bernoulli_mask(1, x.numel(), keep, x, backend).div_(keep)
    return x * mask.view(x.shape)


def _one_dtype(x, *tensors) -> bool:
    """Whether every tensor given (None: not given) has x's dtype, one of INPUT_DTYPES, as the
    single-step kernel takes them (the sequence kernels convert mixed dtypes)."""
    return x.dtype in INPUT_DTYPES and all(t is None or t.dtype == x.dtype for t in tensors)


def pooled_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t in pooled memory (see pooled_empty)."""
    return pooled_empty(t.shape, t).copy_(t)


def release_memory() -> None:
    """Give the free memory the native kernels keep for reuse back to the system.

    The pool keeps memory of tensors the kernels returned once they are freed (at most
    512 MiB), so that the next call of the same shape does not fault it in page by page."""
    if module() is not None:
        module().release_pool()


# The single-step kernel's cells (CellKind in _native.cpp).
CELL_KINDS = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3, "gru_reset_before": 4}


def gru_cell(reset_after: bool) -> str:
    """The single-step kernel's GRU (a CELL_KINDS key) for `reset_after`."""
    return "gru" if reset_after else "gru_reset_before"


def rnn_cell(nonlinearity: str) -> str:
    """The single-step kernel's Elman RNN (a CELL_KINDS key where the nonlinearity is one the
    kernel has, "tanh" or "relu")."""
    return f"rnn_{nonlinearity}"


def step_inference(kind: str, x, h, c, w_ih, w_hh, b_ih, b_hh, w_peephole=None, form=0):
    """One step of a cell without autograd: x (B, I), h (B, H), c (B, H) for the LSTM (None
    otherwise) -> [h' (B, H), c' (B, H)] for the LSTM, [h'] for the others.

    kind: "lstm", "gru" (reset gate after the product, torch.nn's), "gru_reset_before",
    "rnn_tanh" or "rnn_relu". The LSTM's elementwise variants: w_peephole (3H,) or None and
    the cell's form (see `cell_form`).
    The path of one-step sequences (the modules' `step()`): the weights are read as they are,
    nothing packed or cached (see cell_step in _native.cpp). The caller has checked what the
    layer's Function would: CPU tensors of one dtype in INPUT_DTYPES (`_one_dtype`), these
    shapes, no gradient wanted, the native module loaded.
    """
    return module().cell_step(CELL_KINDS[kind], x, h, c, w_ih, w_hh, b_ih, b_hh, w_peephole, form)


def step_if_fits(kind: int, x, hx, w_ih, w_hh, b_ih, b_hh):
    """The cells' fast path in inference: the step (h' or (h', c')) if the call fits the native
    single-step kernel as it is, checked in C++ (no grad mode, no autocast, x (B, I) and the
    state(s) (B, H) plain CPU tensors of the weights' dtype, one of INPUT_DTYPES); None if not,
    or if the native module is unavailable. kind: a CELL_KINDS value."""
    m = _state["module"] if _state["tried"] else module()
    return None if m is None else m.cell_step_if(kind, x, hx, w_ih, w_hh, b_ih, b_hh)


def _driver(layout, w_hh, projected: bool = False, w_ih=None, itemsize=None) -> int:
    """0: the fused driver; n >= 1: the generic driver with n row parts (see FUSED_MAX_BATCH).
    w_ih: given when the generic driver would multiply it at every step too
    (INPUT_IN_STEP_MAX_RATIO). itemsize: bytes per element of the compute dtype, when it is
    not the weights' own (float16 and bfloat16 run in float32)."""
    threads = torch.get_num_threads()
    itemsize = itemsize or w_hh.element_size()
    weight_bytes = w_hh.numel() * itemsize
    parts = generic_parts(layout, w_hh, w_ih, itemsize)
    if not projected and layout.batch <= FUSED_MAX_BATCH:
        if layout.batch <= FUSED_ALWAYS_BATCH:
            return 0
        if parts == 1 and weight_bytes < threads * FUSED_MAX_WEIGHT_BYTES_PER_THREAD:
            return 0
    return parts


def generic_parts(layout, w_hh, other=None, itemsize=None) -> int:
    """The generic driver's row parts (see ROW_PARTS_MAX_WEIGHT_BYTES): one per thread, each of
    at least MIN_PART_ROWS rows, when the step's weights (W_hh, and `other` given: W_ih in the
    step, or full gate recurrence's W_gg) fit one core's L2; else 1. The variants' loops
    (lstm_variants.py, gru_variants.py), which need each step's whole product before the gate
    math, always run on it."""
    itemsize = itemsize or w_hh.element_size()
    step_weight_bytes = (w_hh.numel() + (0 if other is None else other.numel())) * itemsize
    if step_weight_bytes > ROW_PARTS_MAX_WEIGHT_BYTES or _onednn_products():
        return 1
    most = torch.get_num_threads() if MAX_ROW_PARTS is None else MAX_ROW_PARTS
    return max(1, min(most, layout.batch // MIN_PART_ROWS))


def _own_step_product(layout, parts: int, w_ih, w_hh, w_hr, backward: bool = False,
                      itemsize=None) -> bool:
    """Whether the LSTM's generic driver with row parts runs each step's product as our own
    register-blocked one, the gate math in its epilogue, instead of MKL's (see
    OWN_FORWARD_MAX_ROWS)."""
    if parts < 2 or w_hr is not None:
        return False
    rows = -(-layout.batch // parts)
    if backward:
        return rows <= OWN_BACKWARD_MAX_ROWS
    weight_bytes = (w_ih.numel() + w_hh.numel()) * (itemsize or w_hh.element_size())
    return rows <= OWN_FORWARD_MAX_ROWS or (
        weight_bytes <= OWN_FORWARD_MAX_WEIGHT_BYTES
        and w_ih.shape[1] <= OWN_FORWARD_MAX_INPUT_RATIO * w_hh.shape[1])


def _onednn_products() -> bool:
    """Whether the float32 products run on oneDNN (see PRODUCT_LIBRARY)."""
    mod = module()
    return mod is not None and mod.uses_onednn()


def _own_row_parts(layout, w_ih, w_hh, w_hr, itemsize=None, backward=False) -> int:
    """With oneDNN's products: the row parts (one per thread) of the LSTM's generic driver with
    our own step products, in the forward (or the backward), or 0 where the usual rules choose
    (see ONEDNN_OWN_MIN_ROWS)."""
    if w_hr is not None or not _onednn_products():
        return 0
    parts = torch.get_num_threads() if MAX_ROW_PARTS is None else MAX_ROW_PARTS
    if parts < 2 or layout.batch < parts * ONEDNN_OWN_MIN_ROWS:
        return 0
    if backward:
        weight_bytes = w_hh.numel() * (itemsize or w_hh.element_size())
        return parts if weight_bytes <= ONEDNN_OWN_BACKWARD_MAX_WEIGHT_BYTES else 0
    weight_bytes = (w_ih.numel() + w_hh.numel()) * (itemsize or w_hh.element_size())
    if (weight_bytes > ONEDNN_OWN_MAX_WEIGHT_BYTES
            or w_ih.shape[1] > OWN_FORWARD_MAX_INPUT_RATIO * w_hh.shape[1]):
        return 0
    return parts


def _lstm_plan(layout, w_ih, w_hh, w_hr, itemsize=None) -> tuple[int, bool, bool]:
    """How an LSTM layer's forward runs: (driver parts, input in the step, own step product)."""
    own_parts = _own_row_parts(layout, w_ih, w_hh, w_hr, itemsize)
    if own_parts:
        return own_parts, True, True
    input_in_step = w_hr is None and w_ih.shape[1] <= INPUT_IN_STEP_MAX_RATIO * w_hh.shape[1]
    parts = _driver(layout, w_hh, w_hr is not None, w_ih if input_in_step else None, itemsize)
    own = _own_step_product(layout, parts, w_ih, w_hh, w_hr, itemsize=itemsize)
    # Generic driver with a small input (or our own step product): [x_t | h] times
    # [W_ih | W_hh]^T at each step, no projection of all steps first.
    return parts, bool(parts) and (input_in_step or own), own


def _lstm_training_plan(layout, w_ih, w_hh, w_hr, itemsize=None) -> tuple:
    """_lstm_plan and how the backward runs: (its driver parts, its own step product)."""
    backward_parts = (_own_row_parts(layout, w_ih, w_hh, w_hr, itemsize, backward=True)
                      or _driver(layout, w_hh, w_hr is not None, itemsize=itemsize))
    return _lstm_plan(layout, w_ih, w_hh, w_hr, itemsize) + (
        backward_parts, _own_step_product(layout, backward_parts, w_ih, w_hh, w_hr,
                                          backward=True, itemsize=itemsize))


_GATE_ACTIVATION_CODES = {"sigmoid": 0, "hard_sigmoid": 1}
_CELL_ACTIVATION_CODES = {"tanh": 0, "softsign": 1, "hardtanh": 2, "identity": 3}


@functools.lru_cache(maxsize=16)      # asked by every GRU layer call
def gru_form(gate_activation="sigmoid", candidate_activation="tanh") -> int:
    """GRUVariant's activations as the native GRU kernels' `form` bits (GRUActivations in
    _native.cpp): the gates' code, then the candidate's shifted by 1. 0 is torch.nn's cell."""
    return (_GATE_ACTIVATION_CODES[gate_activation]
            | _CELL_ACTIVATION_CODES[candidate_activation] << 1)


@functools.lru_cache(maxsize=64)      # asked by every LSTM layer call; a handful of forms in use
def cell_form(cifg=False, input_gate=True, forget_gate=True, output_gate=True,
              gate_activation="sigmoid", cell_activation="tanh",
              output_activation="tanh") -> int:
    """LSTMVariant's cell options as the native kernels' `form` bits (GATE_CIFG, NO_*_GATE,
    HARD_SIGMOID_GATES and the activation codes in _native.cpp): CIFG f = 1 - i; a removed gate
    is 1; the gates' activation, g's and the output's. 0 is torch.nn's cell."""
    return (int(bool(cifg)) | 2 * (not input_gate) | 4 * (not forget_gate)
            | 8 * (not output_gate) | 16 * _GATE_ACTIVATION_CODES[gate_activation]
            | _CELL_ACTIVATION_CODES[cell_activation] << 5
            | _CELL_ACTIVATION_CODES[output_activation] << 7)


def check_device(x):
    if x.device.type != "cpu":
        raise ValueError(f"backend='native' runs on the CPU only, got a tensor on {x.device}")


def _refuse_variant(family: str, *options) -> None:
    """Without the native module a Native*Function falls back to the plain portable kernel,
    which has none of the variants' options: a ValueError if any is given (kernels.lstm_layer
    and gru_layer give them to the portable variant kernel instead)."""
    def given(option):                       # a tensor, or a nonzero form
        return option is not None and (not isinstance(option, int) or bool(option))
    if any(given(option) for option in options):
        raise ValueError(f"the native {family} variants need the native module, which is "
                         f"unavailable ({unavailable_reason()}): use "
                         f"kernels.{family.lower()}_layer, which runs them on the portable "
                         "variant kernel")


# The names of the native layers' autograd nodes (_native.cpp).
_LSTM_NODE = "torch::autograd::CppNode<(anonymous namespace)::NativeLSTMLayer>"
_ONE_STATE_NODE = "torch::autograd::CppNode<(anonymous namespace)::NativeOneStateLayer>"


def saves_no_output(out: torch.Tensor) -> bool:
    """Whether `out` is an output of a native layer's autograd node that keeps no reference to
    it, so that the caller may change it in place: the LSTM layer's (it saves the previous rows
    instead), and the GRU's or RNN's in float16/bfloat16 (it saves its float32 result and
    returns a converted copy)."""
    node = out.grad_fn
    if node is None:
        return False
    name = node.name()
    if name == _LSTM_NODE:
        return True
    return name == _ONE_STATE_NODE and compute_dtype(out.dtype) != out.dtype


class NativeLSTMFunction:
    """One LSTM layer in one direction, native loops; same signature as `LSTMFunction`, and
    optionally LSTMVariant's elementwise changes to the cell, which `LSTMFunction` does not have
    (only pass them when the native module is there, as `kernels.lstm_layer` does): peephole
    connections, the cell's form (see `cell_form`): CIFG (f = 1 - i), removed input, forget
    or output gates, the gate, cell and output activations; zoneout's masks (see
    lstm_variants.py); and recurrent dropout's mask.

    apply(x (N, I), h0 (B, P), c0 (B, H), w_ih (4H, I), w_hh (4H, P), b_ih (4H,) | None,
          b_hh (4H,) | None, w_hr (P, H) | None, layout: StepLayout, reverse: bool,
          [w_peephole (3H,) = [p_i | p_f | p_o] | None, cell_form: int,
           zoneout_h (N or 1, P) | None, zoneout_c (N or 1, H) | None, recurrent (B, P) | None])
    -> out (N, P), h_T (B, P), c_T (B, H)

    The autograd node is C++ (NativeLSTMLayer in _native.cpp: at batch 1 a Python Function's
    plumbing cost 40-60 us per training step around 300 us of kernels), with the semantics of
    lstm.py's Functions: float16 and bfloat16 computed in float32, double backward refused.
    Saved for backward: x, c0, w_ih, w_hh, w_hr, the previous rows of out (N, P) (not out
    itself: see `saves_no_output`), gates (N, 4H) activated, cells (N, H) (after zoneout)
    [, w_peephole, the masks].
    """

    @staticmethod
    def apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout, reverse, w_peephole=None,
              form=None, zoneout_h=None, zoneout_c=None, recurrent=None):
        check_device(x)
        if module() is None:
            _refuse_variant("LSTM", w_peephole, form, zoneout_h, zoneout_c, recurrent)
            return _lstm.LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout,
                                            reverse)
        if not needs_autograd((x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole)):
            return NativeLSTMFunction.infer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout,
                                            reverse, w_peephole, form or 0, zoneout_h, zoneout_c,
                                            recurrent)
        plan = _lstm_training_plan(layout, w_ih, w_hh, w_hr, compute_dtype(x.dtype).itemsize)
        return tuple(module().lstm_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole,
                                         zoneout_h, zoneout_c, recurrent, layout.batch_sizes,
                                         reverse, form or 0, plan))

    @staticmethod
    def infer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout, reverse, w_peephole=None, form=0,
              zoneout_h=None, zoneout_c=None, recurrent=None):
        """apply() when no gradient is wanted: the forward kernel alone, nothing saved."""
        masked = zoneout_h is not None or zoneout_c is not None or recurrent is not None
        if layout.steps == 1 and w_hr is None and not masked and \
                _one_dtype(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_peephole):
            h_1, c_1 = step_inference("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_peephole, form)
            return h_1, h_1, c_1
        plan = _lstm_plan(layout, w_ih, w_hh, w_hr, compute_dtype(x.dtype).itemsize)
        return tuple(module().lstm_infer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole,
                                         zoneout_h, zoneout_c, recurrent, layout.batch_sizes,
                                         reverse, form, plan))


# lstm_module's plans by everything they depend on: the shapes, dtype, thread count and tunables
# (the plan functions in Python cost 10-15 us of a training step at batch 8 / hidden 64, where
# the interpreter's data and code come cold from memory after the kernels).
_module_plans: dict = {}


# The thresholds above that choose drivers and products (benchmarks/tunables.py compares
# settings of them); _tunables() returns their current values, part of a plan's key.
TUNABLE_NAMES = ("FUSED_MAX_BATCH", "FUSED_ALWAYS_BATCH", "FUSED_MAX_WEIGHT_BYTES_PER_THREAD",
                 "MIN_PART_ROWS", "ROW_PARTS_MAX_WEIGHT_BYTES", "MAX_ROW_PARTS",
                 "INPUT_IN_STEP_MAX_RATIO", "OWN_FORWARD_MAX_ROWS", "OWN_FORWARD_MAX_WEIGHT_BYTES",
                 "OWN_FORWARD_MAX_INPUT_RATIO", "OWN_BACKWARD_MAX_ROWS", "ONEDNN_OWN_MIN_ROWS",
                 "ONEDNN_OWN_MAX_WEIGHT_BYTES", "ONEDNN_OWN_BACKWARD_MAX_WEIGHT_BYTES")


_tunable_values = operator.itemgetter(*TUNABLE_NAMES)


def _tunables() -> tuple:
    return _tunable_values(globals()) + (_onednn_products(),)


def lstm_module(x, hx, w_ih, w_hh, b_ih, b_hh, batch_first: bool, hidden: int, train: bool):
    """lstmkit.LSTM's direct call (one plain layer, one direction): x (T, B, I) (or (B, T, I)
    with batch_first), hx = (h0, c0) of (1, B, H) each or None (zeros of `hidden` units) -> out
    in x's layout, (h_T, c_T) (1, B, H). The same kernel calls as NativeLSTMFunction's `infer`
    (train False) or `apply` through the autograd node (train True), with the module's reshapes
    done in C++ (lstm_module in _native.cpp), inside the node in training."""
    key = (x.shape, batch_first, x.dtype, w_ih.shape, w_hh.shape, train,
           torch.get_num_threads(), _tunables())
    plan = _module_plans.get(key)
    if plan is None:
        batch = x.shape[0] if batch_first else x.shape[1]
        layout = StepLayout.padded(x.shape[1] if batch_first else x.shape[0], batch)
        itemsize = compute_dtype(x.dtype).itemsize
        plan = (_lstm_training_plan if train else _lstm_plan)(layout, w_ih, w_hh, None, itemsize)
        if len(_module_plans) >= 256:
            _module_plans.clear()
        _module_plans[key] = plan
    h0, c0 = (None, None) if hx is None else (hx[0], hx[1])
    out, h_T, c_T = module().lstm_module(x, h0, c0, w_ih, w_hh, b_ih, b_hh, batch_first, hidden,
                                         plan)
    return out, (h_T, c_T)


class NativeGRUFunction:
    """One GRU layer in one direction, native loops; same signature as `GRUFunction`, and
    optionally zoneout's and recurrent dropout's masks (see gru_variants.py) and GRUVariant's
    activations as `gru_form` bits, which `GRUFunction` does not have (only pass them when the
    native module is there, as `kernels.gru_layer` does).

    apply(x (N, I), h0 (B, H), w_ih (3H, I), w_hh (3H, H), b_ih (3H,) | None, b_hh (3H,) | None,
          layout: StepLayout, reverse: bool, reset_after: bool,
          [zoneout_h (N or 1, H) | None, recurrent (B, H) | None, form: int])
    -> out (N, H), h_T (B, H)
    The autograd node is C++ (NativeOneStateLayer in _native.cpp), as the LSTM's.
    Saved: x, h0, w_ih, w_hh, out, stash [r | z | n | gh_n] (N, 4H) ([r | z | n] reset-before),
    in the compute dtype (float32 for float16/bfloat16, whose out returned is a converted copy)
    [, the masks].
    """

    @staticmethod
    def apply(x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, reset_after, zoneout_h=None,
              recurrent=None, form=0):
        check_device(x)
        if module() is None:
            _refuse_variant("GRU", zoneout_h, recurrent, form)
            return _gru.GRUFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse,
                                          reset_after)
        inference = not needs_autograd((x, h0, w_ih, w_hh, b_ih, b_hh))
        if inference and layout.steps == 1 and zoneout_h is None and recurrent is None and \
                not form and \
                _one_dtype(x, h0, w_ih, w_hh, b_ih, b_hh):
            (h_1,) = step_inference(gru_cell(reset_after), x, h0, None, w_ih, w_hh, b_ih, b_hh)
            return h_1, h_1
        parts = _driver(layout, w_hh, not reset_after, itemsize=compute_dtype(x.dtype).itemsize)
        run = module().one_state_infer if inference else module().one_state_layer
        return tuple(run(x, h0, w_ih, w_hh, b_ih, b_hh, zoneout_h, recurrent, layout.batch_sizes,
                         reverse, True, reset_after, parts, form))


class NativeRNNFunction:
    """One Elman RNN layer in one direction, native loops; same signature as `RNNFunction`.

    apply(x (N, I), h0 (B, H), w_ih (H, I), w_hh (H, H), b_ih (H,) | None, b_hh (H,) | None,
          layout: StepLayout, reverse: bool, nonlinearity: "tanh" | "relu")
    -> out (N, H), h_T (B, H)
    The autograd node is C++ (NativeOneStateLayer in _native.cpp), as the LSTM's.
    Saved: x, h0, w_ih, w_hh, out, in the compute dtype (as the GRU's).
    """

    @staticmethod
    def apply(x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, nonlinearity):
        check_device(x)
        if module() is None:
            return _rnn.RNNFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse,
                                          nonlinearity)
        relu = nonlinearity == "relu"
        inference = not needs_autograd((x, h0, w_ih, w_hh, b_ih, b_hh))
        if inference and layout.steps == 1 and _one_dtype(x, h0, w_ih, w_hh, b_ih, b_hh):
            (h_1,) = step_inference(rnn_cell(nonlinearity), x, h0, None, w_ih, w_hh, b_ih, b_hh)
            return h_1, h_1
        parts = _driver(layout, w_hh, itemsize=compute_dtype(x.dtype).itemsize)
        run = module().one_state_infer if inference else module().one_state_layer
        return tuple(run(x, h0, w_ih, w_hh, b_ih, b_hh, None, None, layout.batch_sizes, reverse,
                         False, relu, parts, 0))


FUNCTIONS = {"lstm": NativeLSTMFunction, "gru": NativeGRUFunction, "rnn": NativeRNNFunction}
