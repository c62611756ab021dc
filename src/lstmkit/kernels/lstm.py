"""Portable LSTM kernel: torch operations only, hand-written backward through time.

# N rows (time-major, see layout.py), B batch, I input, H hidden, P output (= H, or proj size),
# G = 4H gate pre-activations in torch.nn's order [i | f | g | o].

Forward per step (x-part precomputed for all steps as one matrix product):
    a = (x W_ih^T + b_ih + b_hh)[rows] + h W_hh^T        (B, 4H)
    i, f, o = sigma(a_i, a_f, a_o);  g = tanh(a_g)
    c = f * c + i * g;  h = (o * tanh(c)) [W_hr^T]
Saved for backward: the activated gates (N, 4H), the cell states (N, H) and the outputs (N, P).

Backward per step (reverse order), with dh including the output gradient:
    dm = dh [W_hr];  dc = dc_next + dm * o * (1 - tanh(c)^2)
    da = [dc*g, dc*c_prev, dc*i, dm*tanh(c)] * [i(1-i), f(1-f), 1-g^2, o(1-o)]
    dh_next = da W_hh;  dc_next = dc * f
Then dW_ih = dA^T X, dW_hh = dA^T H_prev, db = sum dA, dX = dA W_ih, each one matrix product.
"""

import torch
from torch.autograd.function import once_differentiable

from ._common import input_projection, split_bias_gradient
from ._precision import cast_like, cast_to, compute_dtype, dtypes_of, upcast
from .layout import StepLayout


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout: StepLayout, reverse: bool):
    """x (N, I), h0 (B, P), c0 (B, H) -> out (N, P), h_T (B, P), c_T (B, H), gates (N, 4H), cells (N, H)."""
    H = w_hh.shape[0] // 4
    gates = input_projection(x, w_ih, b_ih, b_hh)
    cells = x.new_empty(x.shape[0], H)
    out = x.new_empty(x.shape[0], h0.shape[1])
    w_hh_t = w_hh.t()
    w_hr_t = None if w_hr is None else w_hr.t()
    h, c = (h0, c0) if layout.uniform else (h0.clone(), c0.clone())
    for rows, size in layout.order(reverse):
        h_prev, c_prev = (h, c) if layout.uniform else (h[:size], c[:size])
        a = gates[rows]
        a.addmm_(h_prev, w_hh_t)
        a[:, :2 * H].sigmoid_()                    # input and forget gates
        a[:, 2 * H:3 * H].tanh_()                  # candidate memory
        a[:, 3 * H:].sigmoid_()                    # output gate
        i, f, g, o = a.chunk(4, 1)
        c_new = torch.mul(f, c_prev, out=cells[rows])
        c_new.addcmul_(i, g)                       # c = f * c_prev + i * g
        if w_hr_t is None:
            h_new = torch.mul(o, c_new.tanh(), out=out[rows])
        else:
            h_new = torch.mm(o * c_new.tanh(), w_hr_t, out=out[rows])
        if layout.uniform:
            h, c = h_new, c_new
        else:
            h[:size] = h_new
            c[:size] = c_new
    return out, h.clone(), c.clone(), gates, cells


def lstm_backward(d_out, d_hT, d_cT, x, h0, c0, w_ih, w_hh, w_hr, out, gates, cells,
                  layout: StepLayout, reverse: bool, needs_input_grad: bool):
    """Gradients of `lstm_forward`: returns dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr."""
    H = w_hh.shape[0] // 4
    d_gates = torch.empty_like(gates)                       # dA, (N, 4H)
    d_h_rows = None if w_hr is None else torch.empty_like(out)   # dh per row, for dW_hr
    c_prev_rows = layout.previous_rows(cells, c0, reverse)  # (N, H)
    one = gates.new_ones(())
    dh, dc = d_hT.clone(), d_cT.clone()
    for rows, size in layout.order(not reverse):
        dh_next, dc_next = (dh, dc) if layout.uniform else (dh[:size], dc[:size])
        i, f, g, o = gates[rows].chunk(4, 1)
        tanh_c = cells[rows].tanh()
        dh_t = d_out[rows] + dh_next
        if w_hr is None:
            dm = dh_t
        else:
            d_h_rows[rows] = dh_t
            dm = dh_t @ w_hr
        dc_t = torch.addcmul(dc_next, dm * o, torch.addcmul(one, tanh_c, tanh_c, value=-1))
        da = d_gates[rows]
        di, df, dg, do = da.chunk(4, 1)
        torch.mul(dc_t, g, out=di)
        torch.mul(dc_t, c_prev_rows[rows], out=df)
        torch.mul(dc_t, i, out=dg)
        torch.mul(dm, tanh_c, out=do)
        act = gates[rows]
        slope = torch.addcmul(act, act, act, value=-1)     # s(1 - s) for the sigmoid gates
        torch.addcmul(one, g, g, value=-1, out=slope[:, 2 * H:3 * H])   # 1 - g^2 for tanh
        da.mul_(slope)
        dh_new = da @ w_hh
        dc_new = dc_t * f
        if layout.uniform:
            dh, dc = dh_new, dc_new
        else:
            dh[:size] = dh_new
            dc[:size] = dc_new
    dx = d_gates @ w_ih if needs_input_grad else None
    dw_ih = d_gates.t() @ x
    dw_hh = d_gates.t() @ layout.previous_rows(out, h0, reverse)
    db = d_gates.sum(0)
    dw_hr = None
    if w_hr is not None:
        m = gates[:, 3 * H:] * cells.tanh()                # o * tanh(c), (N, H)
        dw_hr = d_h_rows.t() @ m
    return dx, dh, dc, dw_ih, dw_hh, db, dw_hr


def forward_and_save(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout, reverse):
    """The forward half of every LSTM Function: upcast to the compute dtype, run lstm_forward,
    save what the backward needs on ctx. Returns out, h_T, c_T, gates, cells (compute dtype)
    and the original inputs."""
    originals = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = upcast(originals, compute_dtype(x.dtype))
    out, h_T, c_T, gates, cells = lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout,
                                               reverse)
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, out, gates, cells)
    ctx.layout, ctx.reverse = layout, reverse
    ctx.has_bias = (b_ih is not None, b_hh is not None)
    ctx.dtypes = dtypes_of(originals)
    return out, h_T, c_T, gates, cells, originals


class LSTMFunction(torch.autograd.Function):
    """One LSTM layer in one direction over a flat time-major sequence.

    apply(x (N, I), h0 (B, P), c0 (B, H), w_ih (4H, I), w_hh (4H, P), b_ih (4H,) | None,
          b_hh (4H,) | None, w_hr (P, H) | None, layout: StepLayout, reverse: bool)
    -> out (N, P), h_T (B, P), c_T (B, H)
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout, reverse):
        out, h_T, c_T, _, _, originals = forward_and_save(
            ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout, reverse)
        return tuple(cast_like((out, h_T, c_T), originals[:3]))

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT, d_cT):
        x, h0, c0, w_ih, w_hh, w_hr, out, gates, cells = ctx.saved_tensors
        d_out, d_hT, d_cT = upcast((d_out, d_hT, d_cT), x.dtype)
        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = lstm_backward(
            d_out, d_hT, d_cT, x, h0, c0, w_ih, w_hh, w_hr, out, gates, cells,
            ctx.layout, ctx.reverse, ctx.needs_input_grad[0])
        db_ih, db_hh = split_bias_gradient(db, *ctx.has_bias)
        grads = (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr)
        return (*cast_to(grads, ctx.dtypes), None, None)
