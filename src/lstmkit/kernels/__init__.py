"""Recurrent kernels: autograd Functions with hand-written backward through time.

One Function per cell family and backend. The functional entry points below pick the backend;
modules call only these. Shape key: N rows of a flat time-major sequence (see `layout.py`),
B batch, I input, H hidden, P output (projection) size.

Backends:
    "portable": torch operations only; any device, any floating dtype. The reference for the
    faster backends and the fallback when they are unavailable.
    "native": whole-sequence loops compiled from C++ on first use (see `native.py`); CPU,
    computing in float32 or float64 (float16 and bfloat16 in float32, as the portable kernels
    do). If it cannot be built, the portable kernels run (one warning says why).
    "auto": native for CPU inputs when it is available, portable otherwise.
"""

from ..reference.rnn import NONLINEARITIES
from ..reference.variant import CELL_FORM_FIELDS, GRUVariant, LSTMVariant
from . import native
from ._precision import compute_dtype
from .gru import GRUFunction
from .gru_variants import MASKS as _GRU_VARIANT_MASKS
from .gru_variants import PARAMETERS as _GRU_VARIANT_PARAMETERS
from .gru_variants import GRUVariantFunction
from .layout import StepLayout
from .lstm import LSTMFunction
from .lstm_variants import MASKS as _VARIANT_MASKS
from .lstm_variants import PARAMETERS as _VARIANT_PARAMETERS
from .lstm_variants import LSTMVariantFunction
from .rnn import RNNFunction
from .traces import GRUTraceFunction, LSTMTraceFunction

_BACKENDS = {
    "portable": {"lstm": LSTMFunction, "gru": GRUFunction, "rnn": RNNFunction},
    "native": native.FUNCTIONS,
}
BACKENDS = ("auto", *_BACKENDS)


def _function(family: str, backend: str, x):
    if backend == "auto":
        backend = "native" if native.supports(x) else "portable"
    try:
        return _BACKENDS[backend][family]
    except KeyError:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}") from None


def caller_output(x, backend: str):
    """A layer's output as a module hands it to its caller: a copy when the kernel saved the
    output for its backward pass, so that in-place edits of it (out += residual) work as they do
    with torch.nn (in the native kernels' recycled memory when they ran it, `native.pooled_copy`:
    no page faults for a fresh block); the output itself when the kernel kept no reference to
    it (`native.saves_no_output`: the native LSTM layer, and the native GRU and RNN layers in
    float16/bfloat16)."""
    if native.saves_no_output(x):
        return x
    if backend != "portable" and native.supports(x):
        return native.pooled_copy(x)
    return x.clone()


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *,
               layout: StepLayout, reverse: bool = False, backend: str = "auto",
               w_peephole=None, cifg: bool = False, input_gate: bool = True,
               forget_gate: bool = True, output_gate: bool = True,
               gate_activation: str = "sigmoid", cell_activation: str = "tanh",
               output_activation: str = "tanh", zoneout_h=None, zoneout_c=None, recurrent=None):
    """One LSTM layer, one direction: x (N, I), h0 (B, P), c0 (B, H) -> out (N, P), h_T, c_T.

    LSTMVariant's elementwise changes to the cell, with its meanings (the other variants take
    `lstm_variant_layer`): w_peephole (3H,) = [p_i | p_f | p_o], peephole connections; cifg,
    f = 1 - i; input_gate, forget_gate, output_gate False: that gate is 1; the gate, cell and
    output activations; zoneout_h (N or 1, P), zoneout_c (N or 1, H): zoneout's masks, by row
    or one row for all; recurrent (B, P): recurrent dropout's mask, scaled by 1 / keep
    (`lstm_variant_layer`'s masks, drawn by the caller). The native kernel computes them, the
    portable backend (or a machine without the native kernels) the variant kernel."""
    fn = _function("lstm", backend, x)
    cell = (bool(cifg), input_gate, forget_gate, output_gate, gate_activation, cell_activation,
            output_activation)                               # in CELL_FORM_FIELDS's order
    form = native.cell_form(*cell)
    if w_peephole is None and not form and zoneout_h is None and zoneout_c is None and \
            recurrent is None:
        return fn.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout, reverse)
    if fn is native.NativeLSTMFunction and native.available():
        return fn.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout, reverse, w_peephole,
                        form, zoneout_h, zoneout_c, recurrent)
    # The variant kernel: on the portable backend, and without the native module.
    params = {"w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, "w_hr": w_hr,
              "w_peephole": w_peephole}
    masks = {name: mask for name, mask in (("zoneout_h", zoneout_h), ("zoneout_c", zoneout_c),
                                           ("recurrent", recurrent)) if mask is not None}
    variant = LSTMVariant(peepholes=w_peephole is not None,
                          **dict(zip(CELL_FORM_FIELDS, cell, strict=True)))
    out, h_T, c_T, *_ = lstm_variant_layer(x, h0, c0, params, masks, variant, layout=layout,
                                           reverse=reverse, backend="portable", gates=False)
    return out, h_T, c_T


def lstm_layer_with_gates(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *,
                          layout: StepLayout, reverse: bool = False, backend: str = "portable"):
    """`lstm_layer`, also returning gates (N, 4H) = [i | f | g | o] and cells (N, H): on the
    variants' native loops (`lstm_variant_layer` with the plain LSTMVariant) where `backend`
    runs native, else from the portable kernel's own stash."""
    if _native_loops(backend, x):
        params = {"w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, "w_hr": w_hr}
        out, h_T, c_T, _, gates, cells = lstm_variant_layer(
            x, h0, c0, params, {}, LSTMVariant(), layout=layout, reverse=reverse,
            backend=backend)
        return out, h_T, c_T, gates, cells
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return LSTMTraceFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout, reverse)


def lstm_variant_layer(x, h0, c0, params: dict, masks: dict, variant, *, q0=None,
                       layout: StepLayout, reverse: bool = False, backend: str = "auto",
                       gates: bool = True):
    """One LSTM-variant layer, one direction (see lstm_variants.py).

    params: w_ih, w_hh, ... as `LSTMVariantFunction`'s (missing keys are absent); masks:
    zoneout_h, zoneout_c, recurrent (missing keys are off); q0 (B, 3H): the previous gates,
    for full gate recurrence (zeros when None).
    Returns out (N, P), h_T (B, P), c_T (B, H), q_T (B, 3H) or None without full gate
    recurrence, gates (N, 4H), cells (N, H); with `gates` False the last two may be empty
    (where nothing needs a gradient, the native loops then save nothing for a backward).

    The step loops are native on the CPU (`backend` "auto" or "native", where the native
    module is there; every variant, gate traces included), else portable. The variant's own
    parameters (w_peephole, w_gate, ln_*) must be given exactly where it uses them (ln_* may be
    absent with layer norm).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    unknown = (set(params) - set(_VARIANT_PARAMETERS)) | (set(masks) - set(_VARIANT_MASKS))
    if unknown:
        raise ValueError(f"unknown LSTM-variant arguments {sorted(unknown)}; expected some of "
                         f"{_VARIANT_PARAMETERS + _VARIANT_MASKS}")
    H, P, G, B = c0.shape[1], h0.shape[1], 4 * c0.shape[1], layout.batch
    _check_shapes({"x": x, "h0": h0, "c0": c0, "q0": q0},
                  {"x": (layout.rows, x.shape[1]), "h0": (B, P), "c0": (B, H), "q0": (B, 3 * H)})
    _check_shapes(params, {"w_ih": (G, x.shape[1]), "w_hh": (G, P), "b_ih": (G,), "b_hh": (G,),
                           "w_hr": (P, H), "w_peephole": (3 * H,), "w_gate": (3 * H, 3 * H),
                           **{f"ln_{stem}_{k}": (size,) for stem, size in
                              (("ih", G), ("hh", G), ("cell", H)) for k in ("weight", "bias")}})
    _check_variant_parameters(params, variant, {"w_peephole": "peepholes",
                                                "w_gate": "full_gate_recurrence"})
    native_parts = 0
    if _native_loops(backend, x):
        # (W_gg is multiplied at every step as well: its bytes count towards the parts' L2.)
        native_parts = native.generic_parts(layout, params["w_hh"], params.get("w_gate"),
                                            itemsize=compute_dtype(x.dtype).itemsize)
    if not variant.full_gate_recurrence:
        q0 = None
    elif q0 is None:
        q0 = h0.new_zeros(h0.shape[0], 3 * c0.shape[1])
    save = gates or native.needs_autograd((x, h0, c0, q0, *params.values()))
    out, h_T, c_T, q_T, gate_values, cells = LSTMVariantFunction.apply(
        x, h0, c0, q0, *(params.get(k) for k in _VARIANT_PARAMETERS),
        *(masks.get(k) for k in _VARIANT_MASKS), variant, layout, reverse, native_parts, save)
    return out, h_T, c_T, (q_T if q0 is not None else None), gate_values, cells


def gru_layer(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, *, layout: StepLayout,
              reverse: bool = False, reset_after: bool = True, backend: str = "auto",
              zoneout_h=None, recurrent=None, gate_activation: str = "sigmoid",
              candidate_activation: str = "tanh"):
    """One GRU layer, one direction: x (N, I), h0 (B, H) -> out (N, H), h_T (B, H).

    zoneout_h (N or 1, H): zoneout's mask, by row or one row for all; recurrent (B, H):
    recurrent dropout's, scaled by 1 / keep (`gru_variant_layer`'s masks, drawn by the caller);
    GRUVariant's gate and candidate activations. The native kernel computes them, the portable
    backend (or a machine without the native kernels) the variant kernel."""
    fn = _function("gru", backend, x)
    form = native.gru_form(gate_activation, candidate_activation)
    if zoneout_h is None and recurrent is None and not form:
        return fn.apply(x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, reset_after)
    if fn is native.NativeGRUFunction and native.available():
        return fn.apply(x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, reset_after, zoneout_h,
                        recurrent, form)
    params = {"w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh}
    masks = {name: mask for name, mask in (("zoneout_h", zoneout_h), ("recurrent", recurrent))
             if mask is not None}
    variant = GRUVariant(gate_activation=gate_activation,
                         candidate_activation=candidate_activation)
    out, h_T, _ = gru_variant_layer(x, h0, params, masks, variant,
                                    layout=layout, reverse=reverse, reset_after=reset_after,
                                    backend="portable", gates=False)
    return out, h_T


def gru_layer_with_gates(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, *, layout: StepLayout,
                         reverse: bool = False, reset_after: bool = True,
                         backend: str = "portable"):
    """`gru_layer`, also returning gates (N, 3H) = [r | z | n]: on the variants' native loops
    (`gru_variant_layer` with the plain GRUVariant) where `backend` runs native, else from the
    portable kernel's own stash."""
    if _native_loops(backend, x):
        params = {"w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh}
        return gru_variant_layer(x, h0, params, {}, GRUVariant(), layout=layout,
                                 reverse=reverse, reset_after=reset_after, backend=backend)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return GRUTraceFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, reset_after)


def gru_variant_layer(x, h0, params: dict, masks: dict, variant, *, layout: StepLayout,
                      reverse: bool = False, reset_after: bool = True, backend: str = "auto",
                      gates: bool = True):
    """One GRU-variant layer, one direction (see gru_variants.py).

    params: w_ih (3H, I), w_hh (3H, H), b_ih, b_hh (3H,) (missing keys are absent); masks:
    zoneout_h (N or 1, H), recurrent (B, H) (missing keys are off).
    Returns out (N, H), h_T (B, H), gates (N, 3H) = [r | z | n] (may be empty with `gates`
    False, as lstm_variant_layer's).

    The step loops are native on the CPU (`backend` "auto" or "native", where the native
    module is there; every variant in either reset form, gate traces included), else portable.
    ln_* may be given only with layer norm.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    unknown = (set(params) - set(_GRU_VARIANT_PARAMETERS)) | (set(masks) - set(_GRU_VARIANT_MASKS))
    if unknown:
        raise ValueError(f"unknown GRU-variant arguments {sorted(unknown)}; expected some of "
                         f"{_GRU_VARIANT_PARAMETERS + _GRU_VARIANT_MASKS}")
    G = 3 * h0.shape[1]
    _check_shapes({"x": x, "h0": h0}, {"x": (layout.rows, x.shape[1]),
                                       "h0": (layout.batch, h0.shape[1])})
    _check_shapes(params, {"w_ih": (G, x.shape[1]), "w_hh": (G, h0.shape[1]), "b_ih": (G,),
                           "b_hh": (G,), **{f"ln_{stem}_{k}": (G,) for stem in ("ih", "hh")
                                            for k in ("weight", "bias")}})
    _check_variant_parameters(params, variant, {})
    native_parts = 0
    if _native_loops(backend, x):
        native_parts = native.generic_parts(layout, params["w_hh"],
                                            itemsize=compute_dtype(x.dtype).itemsize)
    save = gates or native.needs_autograd((x, h0, *params.values()))
    return GRUVariantFunction.apply(
        x, h0, *(params.get(k) for k in _GRU_VARIANT_PARAMETERS),
        *(masks.get(k) for k in _GRU_VARIANT_MASKS), variant, layout, reverse, reset_after,
        native_parts, save)


def _check_shapes(params: dict, shapes: dict) -> None:
    """Each parameter given against its shape: a ValueError naming the first that differs (the
    kernels slice and read them as such; the GRU's slicing hid a longer layer-norm gain)."""
    for name, shape in shapes.items():
        t = params.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_variant_parameters(params: dict, variant, options: dict) -> None:
    """A variant's own parameters against the variant: each of `options` (parameter -> the
    variant's flag) given exactly when its flag is on, and layer norm's only with it (both
    kernels would read a parameter the variant says is off, or miss one it needs)."""
    for name, flag in options.items():
        if (params.get(name) is not None) != bool(getattr(variant, flag)):
            state = "without" if params.get(name) is None else "with"
            raise ValueError(f"{name} given {state} {flag}={getattr(variant, flag)}: the variant "
                             f"needs it exactly when {flag} is on")
    given = sorted(k for k, t in params.items() if k.startswith("ln_") and t is not None)
    if given and not variant.layer_norm:
        raise ValueError(f"layer-norm parameters {given} given with layer_norm=False")


def _native_loops(backend: str, x) -> bool:
    """Whether a variant layer (or a gate trace) runs the native loops: backend "auto" or
    "native" where the native module runs x. Without the module the portable loops run, as
    the plain layers do (native's one warning says why); "native" for another device is a
    ValueError."""
    if backend == "native":
        native.check_device(x)
    return backend != "portable" and native.supports(x)


def rnn_layer(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, *, layout: StepLayout,
              reverse: bool = False, nonlinearity: str = "tanh", backend: str = "auto"):
    """One Elman RNN layer, one direction: x (N, I), h0 (B, H) -> out (N, H), h_T (B, H)."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    fn = _function("rnn", backend, x)
    return fn.apply(x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, nonlinearity)


__all__ = [
    "BACKENDS", "GRUFunction", "NONLINEARITIES", "LSTMFunction", "RNNFunction", "StepLayout",
    "gru_layer", "lstm_layer", "rnn_layer",
]
# Variants and gate traces: LSTMVariant and GRUVariant options (layer norm's step loops native
# where they can), return_gates.
__all__ += ["GRUTraceFunction", "GRUVariantFunction", "LSTMTraceFunction", "LSTMVariantFunction",
            "gru_layer_with_gates", "gru_variant_layer", "lstm_layer_with_gates",
            "lstm_variant_layer"]
