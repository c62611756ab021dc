"""Recurrent kernels: autograd Functions with hand-written backward through time.

One Function per cell family and backend. The functional entry points below pick the backend;
modules call only these. Shape key: N rows of a flat time-major sequence (see `layout.py`),
B batch, I input, H hidden, P output (projection) size.

Backends:
    "portable": torch operations only; any device, any floating dtype. The reference for the
    faster backends and the fallback when they are unavailable.
    "native": whole-sequence loops compiled from C++ on first use (see `native.py`); CPU,
    float32 and float64. If it cannot be built, the portable kernels run (one warning says why).
    "auto": native for CPU float32/float64 inputs when it is available, portable otherwise.
"""

from . import native
from .gru import GRUFunction
from .layout import StepLayout
from .lstm import LSTMFunction
from .rnn import NONLINEARITIES, RNNFunction

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


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *,
               layout: StepLayout, reverse: bool = False, backend: str = "auto"):
    """One LSTM layer, one direction: x (N, I), h0 (B, P), c0 (B, H) -> out (N, P), h_T, c_T."""
    fn = _function("lstm", backend, x)
    return fn.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout, reverse)


def gru_layer(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, *, layout: StepLayout,
              reverse: bool = False, reset_after: bool = True, backend: str = "auto"):
    """One GRU layer, one direction: x (N, I), h0 (B, H) -> out (N, H), h_T (B, H)."""
    fn = _function("gru", backend, x)
    return fn.apply(x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, reset_after)


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
