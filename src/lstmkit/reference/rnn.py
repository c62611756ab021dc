"""Plain (Elman) RNN in NumPy float64:  h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh).

Shape key: T time, B batch, I input features, H hidden units; act is tanh or relu.
"""

import numpy as np

from ._common import add_bias, dtanh_from_output, zeros_like_or_none

NONLINEARITIES = ("tanh", "relu")


def _activate(a, nonlinearity):
    return np.tanh(a) if nonlinearity == "tanh" else np.maximum(a, 0.0)


def _dactivate_from_output(h, nonlinearity):
    return dtanh_from_output(h) if nonlinearity == "tanh" else (h > 0).astype(h.dtype)


def rnn_forward(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """Run one RNN layer. x (T, B, I), h0 (B, H) -> y (T, B, H), h_T (B, H), cache."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    h = h0
    ys, steps = [], []
    for t in range(x.shape[0]):
        h_prev = h
        h = _activate(add_bias(x[t] @ w_ih.T, b_ih) + add_bias(h_prev @ w_hh.T, b_hh), nonlinearity)
        steps.append((x[t], h_prev, h))
        ys.append(h)
    return np.stack(ys), h, (steps, w_ih, w_hh, b_ih, b_hh, nonlinearity)


def rnn_backward(dy, dh_T, cache):
    """Backward through time for `rnn_forward`. Returns dict: x, h0, w_ih, w_hh, b_ih, b_hh."""
    steps, w_ih, w_hh, b_ih, b_hh, nonlinearity = cache
    grads = {name: zeros_like_or_none(w) for name, w in
             (("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh))}
    dx = np.zeros((len(steps),) + steps[0][0].shape)
    dh_next = dh_T
    for t in range(len(steps) - 1, -1, -1):
        x_t, h_prev, h = steps[t]
        da = (dy[t] + dh_next) * _dactivate_from_output(h, nonlinearity)   # (B, H)
        dx[t] = da @ w_ih
        dh_next = da @ w_hh
        grads["w_ih"] += da.T @ x_t
        grads["w_hh"] += da.T @ h_prev
        if b_ih is not None:
            grads["b_ih"] += da.sum(axis=0)
        if b_hh is not None:
            grads["b_hh"] += da.sum(axis=0)
    grads.update(x=dx, h0=dh_next)
    return grads
