"""Small pieces shared by the kernels (portable and native)."""

import torch


def linear(x, w, b):
    """x (N, K) W^T + b: one matrix product (with the bias fused when there is one)."""
    return x @ w.t() if b is None else torch.addmm(b, x, w.t())


def bias_sum(b_ih, b_hh):
    """b_ih + b_hh (G,), or whichever is given, or None: the one bias of a cell (LSTM, RNN)
    whose recurrent part needs no bias of its own."""
    if b_ih is None or b_hh is None:
        return b_hh if b_ih is None else b_ih
    return b_ih + b_hh


def split_bias_gradient(db, has_ih: bool, has_hh: bool):
    """The gradients of b_ih and b_hh when they enter as one sum: db for each that is there, a
    copy for the second (autograd must never be handed one tensor twice)."""
    return (db if has_ih else None), (db.clone() if has_hh else None)


def input_projection(x, w_ih, b_ih, b_hh):
    """x (N, I) -> x W_ih^T + b_ih + b_hh: every step's input part in one matrix product.

    Both biases fold in here when the recurrent part needs no bias of its own (LSTM, RNN).
    """
    return linear(x, w_ih, bias_sum(b_ih, b_hh))
