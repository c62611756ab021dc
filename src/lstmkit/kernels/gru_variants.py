"""Portable kernel for the GRU variants: torch operations only, hand-written backward through time.

# N rows (time-major, see layout.py), B batch, I input, H hidden, G = 3H gate pre-activations
# in torch.nn's order [r | z | n].

The equations are those of `lstmkit.reference.gru_variants` (read that file first); the
`GRUVariant` passed in selects them. Used only when a variant changes the equations or draws
per-step masks (the plain GRU keeps its own, faster kernel in gru.py; DropConnect only changes
the weight it receives).

Forward per step (the x-part for all steps as one matrix product):
    u = h * d_r;  r = sigma(gi_r + u W_hr^T + b_hr);  z = sigma(gi_z + u W_hz^T + b_hz)
    reset after:  gh_n = u W_hn^T + b_hn;  n = phi(gi_n + r * gh_n)
    reset before: n = phi(gi_n + (r * u) W_hn^T + b_hn)
    h~ = n + z * (h - n);  h' = h~ + k * (h - h~)
Saved: gates [r | z | n] (N, 3H) as applied, gh_n (N, H) for reset after, and the outputs.

Backward per step (reverse order), dh including the output gradient:
    dh~ = dh (1 - k);  da_n = dh~ (1 - z) phi'(n);  da_z = dh~ (h - n) sigma'(z)
    reset after:  da_r = da_n gh_n sigma'(r);  dgh = [da_r, da_z, da_n r];  du = dgh W_hh
    reset before: d(ru) = da_n W_hn;  da_r = d(ru) u sigma'(r);  du = d(ru) r + [da_r, da_z] W_hrz
    dh_prev = dh k + dh~ z + du * d_r
Then the weight gradients are one matrix product each over all rows, as in gru.py.
"""

import torch
from torch.autograd.function import once_differentiable

from ..reference.variant import GRUVariant
from ._common import linear
from ._precision import cast_like, cast_to, compute_dtype, dtypes_of, upcast
from .layout import StepLayout
from .lstm_variants import _activate_, _per_row, _rows, _slope

PARAMETERS = ("w_ih", "w_hh", "b_ih", "b_hh")
MASKS = ("zoneout_h", "recurrent")


def gru_variant_forward(x, h0, p: dict, masks: dict, v: GRUVariant, layout: StepLayout,
                        reverse: bool, reset_after: bool):
    """x (N, I), h0 (B, H) -> out (N, H), h_T (B, H), gates (N, 3H), gh_n (N, H) | None.

    p: w_ih, w_hh, b_ih, b_hh (None where absent).
    masks: zoneout_h (N, H) or (1, H), recurrent (B, H); or None.
    """
    H = p["w_hh"].shape[0] // 3
    N = x.shape[0]
    k_mask, d_r = masks["zoneout_h"], masks["recurrent"]
    w_hh, b_hh = p["w_hh"], p["b_hh"]
    gates = linear(x, p["w_ih"], p["b_ih"]).contiguous()        # gi (N, 3H), activated in place
    gh_all = x.new_empty(N, H) if reset_after else None
    out = x.new_empty(N, H)
    b_rz = None if b_hh is None else b_hh[:2 * H]
    b_hn = None if b_hh is None else b_hh[2 * H:]
    h = h0.clone()
    for rows, size in layout.order(reverse):
        h_prev = h[:size]
        u = h_prev if d_r is None else h_prev * d_r[:size]
        a = gates[rows]
        rz, n = a[:, :2 * H], a[:, 2 * H:]
        r, z = rz[:, :H], rz[:, H:]
        if reset_after:
            gh = linear(u, w_hh, b_hh)                             # (B, 3H)
            rz.add_(gh[:, :2 * H])
            _activate_(v.gate_activation, rz)
            gh_n = gh_all[rows]
            gh_n.copy_(gh[:, 2 * H:])
            n.addcmul_(r, gh_n)
        else:
            rz.add_(linear(u, w_hh[:2 * H], b_rz))
            _activate_(v.gate_activation, rz)
            n.add_(linear(r * u, w_hh[2 * H:], b_hn))
        _activate_(v.candidate_activation, n)
        h_new = torch.sub(h_prev, n, out=out[rows]).mul_(z).add_(n)   # h~ = n + z (h - n)
        if k_mask is not None:        # h~ + k (h - h~); lerp is exact at k = 0 and k = 1
            h_new.lerp_(h_prev, _rows(k_mask, rows))
        h[:size] = h_new
    return out, h, gates, gh_all


def gru_variant_backward(d_out, d_hT, x, h0, p, masks, out, gates, gh_all, v: GRUVariant,
                         layout: StepLayout, reverse: bool, reset_after: bool,
                         needs_input_grad: bool):
    """Gradients of `gru_variant_forward`: dx, dh0 and a dict of parameter gradients."""
    H = p["w_hh"].shape[0] // 3
    N = x.shape[0]
    k_mask, d_r = masks["zoneout_h"], masks["recurrent"]
    w_hh = p["w_hh"]
    h_prev_rows = layout.previous_rows(out, h0, reverse)      # (N, H)
    u_rows = h_prev_rows if d_r is None else h_prev_rows * _per_row(d_r, layout)
    d_gi = out.new_empty(N, 3 * H)                            # [da_r | da_z | da_n]
    d_gh_n = out.new_empty(N, H) if reset_after else None     # da_n * r
    dh = d_hT.clone()
    for rows, size in layout.order(not reverse):
        dh_t = d_out[rows] + dh[:size]
        h_prev, u = h_prev_rows[rows], u_rows[rows]
        r, z, n = gates[rows].chunk(3, 1)
        if k_mask is not None:
            k = _rows(k_mask, rows)
            dh_prev = dh_t * k
            dh_t = dh_t - dh_prev                              # dh (1 - k)
        da_r, da_z, da_n = d_gi[rows].chunk(3, 1)
        torch.mul(dh_t, 1.0 - z, out=da_n).mul_(_slope(v.candidate_activation, n))
        torch.sub(h_prev, n, out=da_z).mul_(dh_t).mul_(_slope(v.gate_activation, z))
        dz_path = dh_t * z
        dh_prev = dz_path if k_mask is None else dh_prev.add_(dz_path)
        if reset_after:
            torch.mul(da_n, gh_all[rows], out=da_r).mul_(_slope(v.gate_activation, r))
            torch.mul(da_n, r, out=d_gh_n[rows])
            du = torch.cat([d_gi[rows, :2 * H], d_gh_n[rows]], 1) @ w_hh
        else:
            d_ru = da_n @ w_hh[2 * H:]
            torch.mul(d_ru, u, out=da_r).mul_(_slope(v.gate_activation, r))
            du = torch.addmm(d_ru * r, d_gi[rows, :2 * H], w_hh[:2 * H])
        if d_r is not None:
            du.mul_(d_r[:size])
        dh[:size] = dh_prev.add_(du)
    grads = {}
    dx = d_gi @ p["w_ih"] if needs_input_grad else None
    grads["w_ih"] = d_gi.t() @ x
    d_rz = d_gi[:, :2 * H]
    if reset_after:
        d_gh = torch.cat([d_rz, d_gh_n], 1)
        grads["w_hh"] = d_gh.t() @ u_rows
        db_hh = d_gh.sum(0)
    else:
        ru = gates[:, :H] * u_rows
        grads["w_hh"] = torch.cat([d_rz.t() @ u_rows, d_gi[:, 2 * H:].t() @ ru])
        db_hh = d_gi.sum(0)
    grads["b_ih"] = d_gi.sum(0) if p["b_ih"] is not None else None
    grads["b_hh"] = db_hh if p["b_hh"] is not None else None
    return dx, dh, grads


class GRUVariantFunction(torch.autograd.Function):
    """One GRU-variant layer in one direction over a flat time-major sequence.

    apply(x (N, I), h0 (B, H), w_ih (3H, I), w_hh (3H, H), b_ih, b_hh (3H,) | None,
          zoneout_h (N or 1, H) | None, recurrent (B, H) | None,
          variant: GRUVariant, layout: StepLayout, reverse: bool, reset_after: bool)
    -> out (N, H), h_T (B, H), gates (N, 3H) [r | z | n]

    gates are the values the forward stored for its backward, returned as a
    non-differentiable output for introspection: they cost nothing extra.
    """

    @staticmethod
    def forward(ctx, x, h0, *args):
        tensors, (variant, layout, reverse, reset_after) = args[:-4], args[-4:]
        originals = (x, h0, *tensors)
        x, h0, *tensors = upcast(originals, compute_dtype(x.dtype))
        p = dict(zip(PARAMETERS, tensors[:len(PARAMETERS)], strict=True))
        masks = dict(zip(MASKS, tensors[len(PARAMETERS):], strict=True))
        out, h_T, gates, gh_all = gru_variant_forward(x, h0, p, masks, variant, layout, reverse,
                                                      reset_after)
        ctx.save_for_backward(x, h0, *tensors, out, gates, gh_all)
        ctx.variant, ctx.layout, ctx.reverse, ctx.reset_after = (variant, layout, reverse,
                                                                  reset_after)
        ctx.dtypes = dtypes_of(originals)
        results = cast_like((out, h_T, gates), (originals[0], originals[1], originals[0]))
        ctx.mark_non_differentiable(results[2])
        return tuple(results)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT, _d_gates):
        x, h0, *tensors, out, gates, gh_all = ctx.saved_tensors
        p = dict(zip(PARAMETERS, tensors[:len(PARAMETERS)], strict=True))
        masks = dict(zip(MASKS, tensors[len(PARAMETERS):], strict=True))
        d_out, d_hT = upcast((d_out, d_hT), x.dtype)
        dx, dh0, grads = gru_variant_backward(
            d_out, d_hT, x, h0, p, masks, out, gates, gh_all, ctx.variant, ctx.layout,
            ctx.reverse, ctx.reset_after, ctx.needs_input_grad[0])
        result = [dx, dh0] + [grads[name] if p[name] is not None else None
                              for name in PARAMETERS] + [None] * len(MASKS)
        return (*cast_to(result, ctx.dtypes), None, None, None, None)
