"""Small pieces shared by the portable kernels."""

import torch


def linear(x, w, b):
    """x (N, K) W^T + b: one matrix product (with the bias fused when there is one)."""
    return x @ w.t() if b is None else torch.addmm(b, x, w.t())


def input_projection(x, w_ih, b_ih, b_hh):
    """x (N, I) -> x W_ih^T + b_ih + b_hh: every step's input part in one matrix product.

    Both biases fold in here when the recurrent part needs no bias of its own (LSTM, RNN).
    """
    if b_ih is not None and b_hh is not None:
        return linear(x, w_ih, b_ih + b_hh)
    return linear(x, w_ih, b_ih if b_hh is None else b_hh)
