"""Portable Elman RNN kernel: torch operations only, hand-written backward through time.

# N rows (time-major, see layout.py), B batch, I input, H hidden.

    h_t = act(x_t W_ih^T + b_ih + b_hh + h_{t-1} W_hh^T),  act = tanh or relu
    backward: da_t = (dy_t + dh_t) * act'(h_t);  dh_{t-1} = da_t W_hh
with act' taken from the saved output: 1 - h^2 for tanh, [h > 0] for relu.
"""

import torch
from torch.autograd.function import once_differentiable

from ._common import input_projection, split_bias_gradient
from ._precision import cast_like, cast_to, compute_dtype, dtypes_of, upcast
from .layout import StepLayout


def rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, layout: StepLayout, reverse: bool, nonlinearity: str):
    """x (N, I), h0 (B, H) -> out (N, H), h_T (B, H)."""
    out = input_projection(x, w_ih, b_ih, b_hh)
    w_hh_t = w_hh.t()
    h = h0 if layout.uniform else h0.clone()
    for rows, size in layout.order(reverse):
        h_prev = h if layout.uniform else h[:size]
        h_new = out[rows].addmm_(h_prev, w_hh_t)
        if nonlinearity == "tanh":
            h_new.tanh_()
        else:
            h_new.relu_()
        if layout.uniform:
            h = h_new
        else:
            h[:size] = h_new
    return out, h.clone()


def rnn_backward(d_out, d_hT, x, h0, w_ih, w_hh, out, layout: StepLayout, reverse: bool,
                 nonlinearity: str, needs_input_grad: bool):
    """Gradients of `rnn_forward`: returns dx, dh0, dw_ih, dw_hh, db (for both biases)."""
    d_pre = torch.empty_like(out)                   # dA, (N, H)
    one = out.new_ones(())
    dh = d_hT.clone()
    for rows, size in layout.order(not reverse):
        dh_next = dh if layout.uniform else dh[:size]
        h_t = out[rows]
        da = torch.add(d_out[rows], dh_next, out=d_pre[rows])
        if nonlinearity == "tanh":
            da.mul_(torch.addcmul(one, h_t, h_t, value=-1))
        else:
            da.masked_fill_(h_t <= 0, 0)
        dh_new = da @ w_hh
        if layout.uniform:
            dh = dh_new
        else:
            dh[:size] = dh_new
    dx = d_pre @ w_ih if needs_input_grad else None
    dw_ih = d_pre.t() @ x
    dw_hh = d_pre.t() @ layout.previous_rows(out, h0, reverse)
    return dx, dh, dw_ih, dw_hh, d_pre.sum(0)


class RNNFunction(torch.autograd.Function):
    """One RNN layer in one direction over a flat time-major sequence.

    apply(x (N, I), h0 (B, H), w_ih (H, I), w_hh (H, H), b_ih (H,) | None, b_hh (H,) | None,
          layout: StepLayout, reverse: bool, nonlinearity: "tanh" | "relu") -> out (N, H), h_T (B, H)
    """

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, nonlinearity):
        originals = (x, h0, w_ih, w_hh, b_ih, b_hh)
        x, h0, w_ih, w_hh, b_ih, b_hh = upcast(originals, compute_dtype(x.dtype))
        out, h_T = rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, nonlinearity)
        ctx.save_for_backward(x, h0, w_ih, w_hh, out)
        ctx.layout, ctx.reverse, ctx.nonlinearity = layout, reverse, nonlinearity
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        ctx.dtypes = dtypes_of(originals)
        return tuple(cast_like((out, h_T), originals[:2]))

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT):
        x, h0, w_ih, w_hh, out = ctx.saved_tensors
        d_out, d_hT = upcast((d_out, d_hT), x.dtype)
        dx, dh0, dw_ih, dw_hh, db = rnn_backward(
            d_out, d_hT, x, h0, w_ih, w_hh, out, ctx.layout, ctx.reverse, ctx.nonlinearity,
            ctx.needs_input_grad[0])
        db_ih, db_hh = split_bias_gradient(db, *ctx.has_bias)
        grads = (dx, dh0, dw_ih, dw_hh, db_ih, db_hh)
        return (*cast_to(grads, ctx.dtypes), None, None, None)
