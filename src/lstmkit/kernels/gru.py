"""Portable GRU kernel: torch operations only, hand-written backward through time.

# N rows (time-major, see layout.py), B batch, I input, H hidden, G = 3H in torch.nn's
# order [r | z | n].

    gi = x W_ih^T + b_ih (all steps at once);  gh = h W_hh^T + b_hh
    r = sigma(gi_r + gh_r),  z = sigma(gi_z + gh_z)
    reset after  (torch): n = tanh(gi_n + r * gh_n)
    reset before (Cho):   n = tanh(gi_n + (r * h) W_hn^T + b_hn)
    h' = n + z * (h - n)
Saved: the stash [r | z | n | gh_n] (N, 4H) (gh_n only for reset after) and the outputs.

Backward per step, dh including the output gradient:
    dn = dh (1 - z);  da_n = dn (1 - n^2);  da_z = dh (h - n) z (1 - z)
    reset after:  da_r = da_n gh_n r (1 - r);  dgh = [da_r, da_z, da_n r]
                  dh_prev = dh z + dgh W_hh
    reset before: d(rh) = da_n W_hn;  da_r = d(rh) h r (1 - r)
                  dh_prev = dh z + d(rh) r + [da_r, da_z] W_h{r,z}
"""

import torch
from torch.autograd.function import once_differentiable

from ._common import linear
from ._precision import cast_like, cast_to, compute_dtype, dtypes_of, upcast
from .layout import StepLayout


def gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, layout: StepLayout, reverse: bool,
                reset_after: bool = True):
    """x (N, I), h0 (B, H) -> out (N, H), h_T (B, H), stash (N, 4H or 3H)."""
    H = w_hh.shape[0] // 3
    stash = x.new_empty(x.shape[0], 4 * H if reset_after else 3 * H)
    stash[:, :3 * H] = linear(x, w_ih, b_ih)
    out = x.new_empty(x.shape[0], H)
    b_rz = None if b_hh is None else b_hh[:2 * H]
    b_hn = None if b_hh is None else b_hh[2 * H:]
    h = h0 if layout.uniform else h0.clone()
    for rows, size in layout.order(reverse):
        h_prev = h if layout.uniform else h[:size]
        s = stash[rows]
        rz, n = s[:, :2 * H], s[:, 2 * H:3 * H]
        r, z = rz[:, :H], rz[:, H:]
        if reset_after:
            gh = linear(h_prev, w_hh, b_hh)
            rz.add_(gh[:, :2 * H]).sigmoid_()
            gh_n = s[:, 3 * H:]
            gh_n.copy_(gh[:, 2 * H:])
            n.addcmul_(r, gh_n).tanh_()
        else:
            rz.add_(linear(h_prev, w_hh[:2 * H], b_rz)).sigmoid_()
            n.add_(linear(r * h_prev, w_hh[2 * H:], b_hn)).tanh_()
        h_new = torch.sub(h_prev, n, out=out[rows]).mul_(z).add_(n)   # n + z (h - n)
        if layout.uniform:
            h = h_new
        else:
            h[:size] = h_new
    return out, h.clone(), stash


def gru_backward(d_out, d_hT, x, h0, w_ih, w_hh, out, stash, layout: StepLayout, reverse: bool,
                 reset_after: bool, needs_input_grad: bool):
    """Gradients of `gru_forward`: returns dx, dh0, dw_ih, dw_hh, db_ih, db_hh."""
    H = w_hh.shape[0] // 3
    N = x.shape[0]
    h_prev_rows = layout.previous_rows(out, h0, reverse)     # (N, H)
    one = out.new_ones(())
    d_gi = out.new_empty(N, 3 * H)                            # [da_r | da_z | da_n]
    d_gh_n = out.new_empty(N, H) if reset_after else None     # da_n * r
    w_hn = w_hh[2 * H:]
    dh = d_hT.clone()
    for rows, size in layout.order(not reverse):
        dh_next = dh if layout.uniform else dh[:size]
        s = stash[rows]
        r, z, n = s[:, :H], s[:, H:2 * H], s[:, 2 * H:3 * H]
        h_prev = h_prev_rows[rows]
        dh_t = d_out[rows] + dh_next
        dn = torch.addcmul(dh_t, dh_t, z, value=-1)           # dh (1 - z)
        d_r, d_z, d_an = d_gi[rows].chunk(3, 1)
        torch.addcmul(one, n, n, value=-1, out=d_an).mul_(dn)
        torch.sub(h_prev, n, out=d_z).mul_(dh_t).mul_(torch.addcmul(z, z, z, value=-1))
        if reset_after:
            torch.mul(d_an, s[:, 3 * H:], out=d_r).mul_(torch.addcmul(r, r, r, value=-1))
            torch.mul(d_an, r, out=d_gh_n[rows])
            d_gh = torch.cat([d_gi[rows, :2 * H], d_gh_n[rows]], 1)
            dh_new = torch.addmm(dh_t * z, d_gh, w_hh)
        else:
            d_rh = d_an @ w_hn
            torch.mul(d_rh, h_prev, out=d_r).mul_(torch.addcmul(r, r, r, value=-1))
            dh_new = torch.addmm(torch.addcmul(dh_t * z, d_rh, r), d_gi[rows, :2 * H],
                                 w_hh[:2 * H])
        if layout.uniform:
            dh = dh_new
        else:
            dh[:size] = dh_new
    dx = d_gi @ w_ih if needs_input_grad else None
    dw_ih = d_gi.t() @ x
    db_ih = d_gi.sum(0)
    d_rz = d_gi[:, :2 * H]
    if reset_after:
        d_gh = torch.cat([d_rz, d_gh_n], 1)
        dw_hh = d_gh.t() @ h_prev_rows
        db_hh = d_gh.sum(0)
    else:
        rh = stash[:, :H] * h_prev_rows
        dw_hh = torch.cat([d_rz.t() @ h_prev_rows, d_gi[:, 2 * H:].t() @ rh])
        db_hh = db_ih.clone()
    return dx, dh, dw_ih, dw_hh, db_ih, db_hh


def forward_and_save(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, reset_after):
    """The forward half of every GRU Function: upcast to the compute dtype, run gru_forward,
    save what the backward needs on ctx. Returns out, h_T, stash (compute dtype) and the
    original inputs."""
    originals = (x, h0, w_ih, w_hh, b_ih, b_hh)
    x, h0, w_ih, w_hh, b_ih, b_hh = upcast(originals, compute_dtype(x.dtype))
    out, h_T, stash = gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, reset_after)
    ctx.save_for_backward(x, h0, w_ih, w_hh, out, stash)
    ctx.layout, ctx.reverse, ctx.reset_after = layout, reverse, reset_after
    ctx.dtypes = dtypes_of(originals)
    return out, h_T, stash, originals


class GRUFunction(torch.autograd.Function):
    """One GRU layer in one direction over a flat time-major sequence.

    apply(x (N, I), h0 (B, H), w_ih (3H, I), w_hh (3H, H), b_ih (3H,) | None, b_hh (3H,) | None,
          layout: StepLayout, reverse: bool, reset_after: bool) -> out (N, H), h_T (B, H)
    """

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, reset_after):
        out, h_T, _, originals = forward_and_save(ctx, x, h0, w_ih, w_hh, b_ih, b_hh,
                                                  layout, reverse, reset_after)
        return tuple(cast_like((out, h_T), originals[:2]))

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT):
        x, h0, w_ih, w_hh, out, stash = ctx.saved_tensors
        d_out, d_hT = upcast((d_out, d_hT), x.dtype)
        grads = gru_backward(d_out, d_hT, x, h0, w_ih, w_hh, out, stash, ctx.layout, ctx.reverse,
                             ctx.reset_after, ctx.needs_input_grad[0])
        return (*cast_to(grads, ctx.dtypes), None, None, None)
