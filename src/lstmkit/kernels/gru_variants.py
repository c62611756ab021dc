"""Kernel for the GRU variants: hand-written backward through time, torch operations only, or
with native step loops on the CPU (every variant; see gru_variant_loops_forward in
_native.cpp).

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
from . import native
from ._common import linear
from ._precision import cast_like, cast_to, compute_dtype, dtypes_of, upcast
from .layout import StepLayout
from .lstm_variants import (
    _activate_,
    _layer_norm,
    _layer_norm_backward,
    _per_row,
    _previous_rows,
    _products,
    _rows,
    _slope,
)

PARAMETERS = ("w_ih", "w_hh", "b_ih", "b_hh", "ln_ih_weight", "ln_ih_bias", "ln_hh_weight",
              "ln_hh_bias")
MASKS = ("zoneout_h", "recurrent")
_STASH = ("x_pre", "h_pre", "mean_x_rz", "rstd_x_rz", "mean_x_n", "rstd_x_n", "mean_h_rz",
          "rstd_h_rz", "mean_h_n", "rstd_h_n", "stash", "mean_h", "rstd_h")   # the last three
# are the native loops' own: their stash [r | z | n | gh_n] and (N, 2) [rz | n] moments.


def _blocks(H: int):
    """The two layer-norm blocks of a (., 3H) product: gates [r | z] and candidate n."""
    return (slice(0, 2 * H), "rz"), (slice(2 * H, 3 * H), "n")


def _block(t, block):
    """A (3H) parameter's block, or None."""
    return None if t is None else t[block]


def _native_forward(x, h0, p, masks, v: GRUVariant, layout, reverse, reset_after, parts,
                    save):
    """gru_variant_forward's results from the native loops (see gru_variant_loops_forward and
    GRULayerNorms in _native.cpp): the input's products (and their layer norm) here, in the
    native module's recycled memory, then the loops. Without `save` the stash's entries and the
    gates are None."""
    H = p["w_hh"].shape[0] // 3
    module = native.module()
    gi = _products(x, [(x, p["w_ih"].t())], in_pool=True)[0]
    st = {}
    if v.layer_norm:
        st["x_pre"], gi = gi, native.pooled_empty([x.shape[0], 3 * H], x)
        for block, name in _blocks(H):
            _, st["mean_x_" + name], st["rstd_x_" + name] = module.layer_norm_rows(
                st["x_pre"][:, block], _block(p["ln_ih_weight"], block),
                _block(p["ln_ih_bias"], block), v.layer_norm_eps, into=gi[:, block])
    out, h, stash, st["h_pre"], st["mean_h"], st["rstd_h"] = module.gru_variant_loops_forward(
        gi, p["b_ih"], p["b_hh"], h0, p["w_hh"], masks["zoneout_h"], masks["recurrent"],
        v.layer_norm, p["ln_hh_weight"], p["ln_hh_bias"], v.layer_norm_eps, layout.batch_sizes,
        reverse, reset_after, save, parts,
        native.gru_form(v.gate_activation, v.candidate_activation))
    if not save:
        return out, h, None, None, st
    for q, (_, name) in enumerate(_blocks(H) if v.layer_norm else ()):
        st["mean_h_" + name] = st["mean_h"][:, q:q + 1]
        st["rstd_h_" + name] = st["rstd_h"][:, q:q + 1]
    st["stash"] = stash
    return out, h, stash[:, :3 * H], stash[:, 3 * H:] if reset_after else None, st


def gru_variant_forward(x, h0, p: dict, masks: dict, v: GRUVariant, layout: StepLayout,
                        reverse: bool, reset_after: bool, native_parts: int = 0,
                        save: bool = True):
    """x (N, I), h0 (B, H) -> out (N, H), h_T (B, H), gates (N, 3H), gh_n (N, H) | None,
    stash dict (layer norm's inputs, means and reciprocal deviations).

    p: w_ih, w_hh, b_ih, b_hh, ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias (None where
    absent). masks: zoneout_h (N, H) or (1, H), recurrent (B, H); or None.
    native_parts: 0 for the loop below; n >= 1 for the native loops on n row parts (as
    kernels.gru_variant_layer picks them), which save the same stash and their own, or nothing
    without `save`.
    """
    if native_parts:
        return _native_forward(x, h0, p, masks, v, layout, reverse, reset_after, native_parts,
                               save)
    H = p["w_hh"].shape[0] // 3
    N = x.shape[0]
    k_mask, d_r = masks["zoneout_h"], masks["recurrent"]
    w_hh, b_hh = p["w_hh"], p["b_hh"]
    b_rz = None if b_hh is None else b_hh[:2 * H]
    b_hn = None if b_hh is None else b_hh[2 * H:]
    st = {}
    if v.layer_norm:                      # stash each LN's input, mean and 1/deviation
        ax = x @ p["w_ih"].t()
        st["x_pre"], st["h_pre"] = ax, x.new_empty(N, 3 * H)
        gates = torch.empty_like(ax)
        for block, name in _blocks(H):
            gates[:, block], st["mean_x_" + name], st["rstd_x_" + name] = _layer_norm(
                ax[:, block].contiguous(), _block(p["ln_ih_weight"], block),
                _block(p["ln_ih_bias"], block), v.layer_norm_eps)
            st["mean_h_" + name], st["rstd_h_" + name] = x.new_empty(N, 1), x.new_empty(N, 1)
        if p["b_ih"] is not None:
            gates.add_(p["b_ih"])
    else:
        gates = linear(x, p["w_ih"], p["b_ih"]).contiguous()  # gi (N, 3H), activated in place

    def recurrent(u, block, name, rows, bias):
        """u W_hh[block]^T (+ LN) + bias, for one block of gate rows."""
        if not v.layer_norm:
            return linear(u, w_hh[block], bias)
        product = u @ w_hh[block].t()
        st["h_pre"][rows, block] = product
        product, st["mean_h_" + name][rows], st["rstd_h_" + name][rows] = _layer_norm(
            product, _block(p["ln_hh_weight"], block), _block(p["ln_hh_bias"], block),
            v.layer_norm_eps)
        return product if bias is None else product.add_(bias)

    (rz_block, _), (n_block, _) = _blocks(H)
    gh_all = x.new_empty(N, H) if reset_after else None
    out = x.new_empty(N, H)
    h = h0.clone()
    for rows, size in layout.order(reverse):
        h_prev = h[:size]
        u = h_prev if d_r is None else h_prev * d_r[:size]
        a = gates[rows]
        rz, n = a[:, :2 * H], a[:, 2 * H:]
        r, z = rz[:, :H], rz[:, H:]
        if reset_after:
            if v.layer_norm:
                gh = torch.cat([recurrent(u, rz_block, "rz", rows, b_rz),
                                recurrent(u, n_block, "n", rows, b_hn)], 1)
            else:
                gh = linear(u, w_hh, b_hh)                         # (B, 3H)
            rz.add_(gh[:, :2 * H])
            _activate_(v.gate_activation, rz)
            gh_n = gh_all[rows]
            gh_n.copy_(gh[:, 2 * H:])
            n.addcmul_(r, gh_n)
        else:
            rz.add_(recurrent(u, rz_block, "rz", rows, b_rz))
            _activate_(v.gate_activation, rz)
            n.add_(recurrent(r * u, n_block, "n", rows, b_hn))
        _activate_(v.candidate_activation, n)
        h_new = torch.sub(h_prev, n, out=out[rows]).mul_(z).add_(n)   # h~ = n + z (h - n)
        if k_mask is not None:        # h~ + k (h - h~); lerp is exact at k = 0 and k = 1
            h_new.lerp_(h_prev, _rows(k_mask, rows))
        h[:size] = h_new
    return out, h, gates, gh_all, st


def gru_variant_backward(d_out, d_hT, x, h0, p, masks, out, gates, gh_all, st, v: GRUVariant,
                         layout: StepLayout, reverse: bool, reset_after: bool,
                         needs_input_grad: bool, native_parts: int = 0):
    """Gradients of `gru_variant_forward` (with the same native_parts): dx, dh0 and a dict of
    parameter gradients."""
    H = p["w_hh"].shape[0] // 3
    N = x.shape[0]
    k_mask, d_r = masks["zoneout_h"], masks["recurrent"]
    w_hh = p["w_hh"]
    (rz_block, _), (n_block, _) = _blocks(H)
    h_prev_rows = _previous_rows(out, h0, layout, reverse, in_pool=bool(native_parts))  # (N, H)
    u_rows = h_prev_rows if d_r is None else h_prev_rows * _per_row(d_r, layout)
    if native_parts:
        d_gi, d_gh, d_prod, dh = native.module().gru_variant_loops_backward(
            d_out, d_hT, h0, w_hh, out, st["stash"], st["h_pre"], st["mean_h"], st["rstd_h"],
            p["ln_hh_weight"], k_mask, d_r, layout.batch_sizes, reverse, reset_after,
            native_parts, native.gru_form(v.gate_activation, v.candidate_activation))
        return _parameter_gradients(x, p, gates, st, v, reset_after, needs_input_grad, u_rows,
                                    d_gi, d_gh, d_prod, dh, in_pool=True)
    d_gi = out.new_empty(N, 3 * H)                            # [da_r | da_z | da_n]
    d_gh_n = out.new_empty(N, H) if reset_after else None     # da_n * r
    d_prod = out.new_empty(N, 3 * H) if v.layer_norm else None   # d(u W_hh^T), before LN

    def through_norm(d, rows, block, name):
        """dL/d(product) from dL/dLN(product) for one block of one step."""
        if not v.layer_norm:
            return d
        d = _layer_norm_backward(d.contiguous(), st["h_pre"][rows, block].contiguous(),
                                 st["mean_h_" + name][rows], st["rstd_h_" + name][rows],
                                 _block(p["ln_hh_weight"], block), _block(p["ln_hh_bias"], block))
        d_prod[rows, block] = d
        return d

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
            if v.layer_norm:
                du = torch.cat([through_norm(d_gi[rows, :2 * H], rows, rz_block, "rz"),
                                through_norm(d_gh_n[rows], rows, n_block, "n")], 1) @ w_hh
            else:
                du = torch.cat([d_gi[rows, :2 * H], d_gh_n[rows]], 1) @ w_hh
        else:
            d_ru = through_norm(da_n, rows, n_block, "n") @ w_hh[2 * H:]
            torch.mul(d_ru, u, out=da_r).mul_(_slope(v.gate_activation, r))
            du = torch.addmm(d_ru * r, through_norm(d_gi[rows, :2 * H], rows, rz_block, "rz"),
                             w_hh[:2 * H])
        if d_r is not None:
            du.mul_(d_r[:size])
        dh[:size] = dh_prev.add_(du)
    # the gradient at the recurrent products' outputs (after LN): [da_r, da_z, da_n (* r)]
    d_gh = torch.cat([d_gi[:, :2 * H], d_gh_n], 1) if reset_after else d_gi
    return _parameter_gradients(x, p, gates, st, v, reset_after, needs_input_grad, u_rows, d_gi,
                                d_gh, d_prod, dh)


def _parameter_gradients(x, p, gates, st, v: GRUVariant, reset_after: bool,
                         needs_input_grad: bool, u_rows, d_gi, d_gh, d_prod, dh,
                         in_pool: bool = False):
    """After the backward loop, what is sequence-wide: dx and the parameters' gradients from
    d_gi (N, 3H) (of the input's side), d_gh (N, 3H) (of the recurrent products after LN),
    d_prod (N, 3H) (before LN; None without layer norm) and u_rows (N, H), each row's product
    operand. With `in_pool`, the big results in the native module's recycled memory. Returns
    dx, dh0, grads."""
    H = p["w_hh"].shape[0] // 3
    grads = {}
    d_ax = d_gi
    if v.layer_norm:
        d_ax = native.pooled_empty(d_gi.shape, d_gi) if in_pool else torch.empty_like(d_gi)
        # gain and bias gradients of all steps at once, from the stashed LN inputs
        for name, stem, d_after, target in (("x", "ln_ih", d_gi, d_ax),
                                            ("h", "ln_hh", d_gh, None)):
            weight, bias = [], []                       # each block's (absent: None)
            for block, part in _blocks(H):
                args = (d_after[:, block], st[name + "_pre"][:, block],
                        st[f"mean_{name}_{part}"], st[f"rstd_{name}_{part}"])
                dv, d_weight, d_bias = _layer_norm_backward(
                    *(a.contiguous() for a in args), _block(p[stem + "_weight"], block),
                    _block(p[stem + "_bias"], block), parameters=True,
                    input=target is not None and not in_pool)
                weight.append(d_weight)
                bias.append(d_bias)
                if target is not None and in_pool:
                    native.module().layer_norm_rows_backward(
                        *args, _block(p[stem + "_weight"], block), into=target[:, block])
                elif target is not None:
                    target[:, block] = dv
            grads[stem + "_weight"], grads[stem + "_bias"] = (
                None if blocks[0] is None else torch.cat(blocks) for blocks in (weight, bias))
    d_rec = d_prod if v.layer_norm else d_gh                  # d(u W_hh^T), before LN
    products = [(d_ax.t(), x)]
    if reset_after:
        products.append((d_rec.t(), u_rows))
    else:
        ru = gates[:, :H] * u_rows
        products += [(d_rec[:, :2 * H].t(), u_rows), (d_rec[:, 2 * H:].t(), ru)]
    if needs_input_grad:
        products.append((d_ax, p["w_ih"]))
    results = _products(x, products, in_pool)
    grads["w_ih"] = results.pop(0)
    dx = results.pop() if needs_input_grad else None
    grads["w_hh"] = results[0] if reset_after else torch.cat(results)
    grads["b_ih"] = d_gi.sum(0) if p["b_ih"] is not None else None
    grads["b_hh"] = d_gh.sum(0) if p["b_hh"] is not None else None
    return dx, dh, grads


class GRUVariantFunction(torch.autograd.Function):
    """One GRU-variant layer in one direction over a flat time-major sequence.

    apply(x (N, I), h0 (B, H), w_ih (3H, I), w_hh (3H, H), b_ih, b_hh (3H,) | None,
          ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias (3H,) | None,
          zoneout_h (N or 1, H) | None, recurrent (B, H) | None,
          variant: GRUVariant, layout: StepLayout, reverse: bool, reset_after: bool,
          native_parts: int, save: bool)
    -> out (N, H), h_T (B, H), gates (N, 3H) [r | z | n]

    native_parts: 0 for the Python loops of torch operations; n >= 1 for the native loops on n
    row parts. save: False when nothing will need a backward and no one
    wants the gates: the native loops then save nothing (and return empty gates).

    gates are the values the forward stored for its backward, returned as a
    non-differentiable output for introspection: they cost nothing extra.
    """

    @staticmethod
    def forward(ctx, x, h0, *args):
        tensors, (variant, layout, reverse, reset_after, native_parts, save) = (args[:-6],
                                                                                args[-6:])
        originals = (x, h0, *tensors)
        x, h0, *tensors = upcast(originals, compute_dtype(x.dtype))
        p = dict(zip(PARAMETERS, tensors[:len(PARAMETERS)], strict=True))
        masks = dict(zip(MASKS, tensors[len(PARAMETERS):], strict=True))
        out, h_T, gates, gh_all, st = gru_variant_forward(x, h0, p, masks, variant, layout,
                                                          reverse, reset_after, native_parts,
                                                          save)
        if gates is None:
            gates = x.new_empty(0)
        ctx.save_for_backward(x, h0, *tensors, out, gates, gh_all, *(st.get(k) for k in _STASH))
        ctx.variant, ctx.layout, ctx.reverse, ctx.reset_after = (variant, layout, reverse,
                                                                  reset_after)
        ctx.native_parts = native_parts
        ctx.set_materialize_grads(False)          # no zeros for the gates' (never used)
        ctx.dtypes = dtypes_of(originals)
        results = cast_like((out, h_T, gates), (originals[0], originals[1], originals[0]))
        ctx.mark_non_differentiable(results[2])
        return tuple(results)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT, _d_gates):
        x, h0, *rest = ctx.saved_tensors
        count = len(PARAMETERS) + len(MASKS)
        tensors, (out, gates, gh_all) = rest[:count], rest[count:count + 3]
        st = dict(zip(_STASH, rest[count + 3:], strict=True))
        p = dict(zip(PARAMETERS, tensors[:len(PARAMETERS)], strict=True))
        masks = dict(zip(MASKS, tensors[len(PARAMETERS):], strict=True))
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_hT = h0.new_zeros(h0.shape) if d_hT is None else d_hT
        d_out, d_hT = upcast((d_out, d_hT), x.dtype)
        dx, dh0, grads = gru_variant_backward(
            d_out, d_hT, x, h0, p, masks, out, gates, gh_all, st, ctx.variant, ctx.layout,
            ctx.reverse, ctx.reset_after, ctx.needs_input_grad[0], ctx.native_parts)
        result = [dx, dh0] + [grads[name] if p[name] is not None else None
                              for name in PARAMETERS] + [None] * len(MASKS)
        return (*cast_to(result, ctx.dtypes), None, None, None, None, None, None)
