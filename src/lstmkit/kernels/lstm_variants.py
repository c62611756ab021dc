"""Kernel for the LSTM variants: hand-written backward through time, torch operations only, or
with native step loops on the CPU (every variant; see lstm_variant_loops_forward in
_native.cpp).

# N rows (time-major, see layout.py), B batch, I input, H hidden, P output (= H, or proj size),
# G = 4H gate pre-activations in torch.nn's order [i | f | g | o].

The equations are those of `lstmkit.reference.lstm_variants` (read that file first); the
`LSTMVariant` passed in selects them. Used only when a variant changes the equations (the
plain LSTM keeps its own, faster kernel in lstm.py).

Forward per step (the x-part for all steps as one matrix product, then normalised once):
    r = h * d_r;  a = [LN_x](x W_ih^T)[rows] + [LN_h](r W_hh^T) + b;  a_{i,f} += p_{i,f} * c
    a_{i,f,o} += q W_gg^T   (full gate recurrence, q = the previous step's [i | f | o])
    i, f, g = sigma(a_i) | 1,  sigma(a_f) | 1 - i | 1,  phi(a_g);  c~ = f * c + i * g
    o = sigma(a_o + p_o * c~) | 1;  s = psi([LN_c](c~));  h~ = (o * s) [W_hr^T]
    c' = z_c * c + (1 - z_c) * c~;  h' = z_h * h + (1 - z_h) * h~
Saved: gates [i | f | g | o] (N, 4H) as applied, carried cells (N, H), c~ (N, H) when it differs,
s (N, H), and for layer norm each LN's input with its mean and reciprocal deviation (N, 1).

Backward per step (reverse order), dh including the output gradient:
    dh~ = dh (1 - z_h);  dc~ = dc (1 - z_c) + [LN_c'](dm o psi'(s)) + da_o p_o, dm = dh~ [W_hr]
    da = [dc~ g (- dc~ c for cifg), dc~ c, dc~ i, dm s] * activation slopes (0 for a removed gate)
    dh_prev = dh z_h + ([LN_h'](da) W_hh) * d_r;  dc_prev = dc z_c + dc~ f + da_i p_i + da_f p_f
    full gate recurrence: dq (the gradient of the gates as values) joins di, df, do, and
    dq_prev = [da_i, da_f, da_o] W_gg
Then the weight gradients are one matrix product each over all rows, as in lstm.py.
"""

import torch
from torch.autograd.function import once_differentiable

from ..reference.variant import CELL_FORM_FIELDS, LSTMVariant
from . import native
from ._precision import cast_like, cast_to, compute_dtype, dtypes_of, upcast
from .layout import StepLayout

# -- activations (in place on a view) and their slopes from the output -------------------------


def _activate_(name: str, a: torch.Tensor) -> None:
    if name == "sigmoid":
        a.sigmoid_()
    elif name == "hard_sigmoid":
        a.div_(6.0).add_(0.5).clamp_(0.0, 1.0)
    elif name == "tanh":
        a.tanh_()
    elif name == "softsign":
        a.div_(a.abs().add_(1.0))
    elif name == "hardtanh":
        a.clamp_(-1.0, 1.0)
    elif name != "identity":
        raise ValueError(f"unknown activation {name!r}")


def _slope(name: str, y: torch.Tensor) -> torch.Tensor:
    if name == "sigmoid":
        return y - y * y
    if name == "hard_sigmoid":
        return ((y > 0) & (y < 1)).to(y.dtype) / 6.0
    if name == "tanh":
        return 1.0 - y * y
    if name == "softsign":
        return (1.0 - y.abs()).square_()
    if name == "hardtanh":
        return (y.abs() < 1).to(y.dtype)
    if name == "identity":
        return torch.ones_like(y)
    raise ValueError(f"unknown activation {name!r}")


# -- layer normalisation over the feature axis ------------------------------------------------


def _layer_norm(v, gain, bias, eps):
    """v (M, F) -> (LN(v), mean (M, 1), rstd (M, 1)), with torch's fused layer norm.

    Layer norm is not part of the recurrence's own mathematics, so it comes from torch (one
    fused kernel each way); the recurrence around it is ours."""
    return torch.native_layer_norm(v, [v.shape[1]], gain, bias, eps)


def _layer_norm_backward(d_out, v, mean, rstd, gain, bias, parameters=False, input=True):
    """dL/dv for LN(v) = gain * (v - mean) * rstd + bias, given dL/dLN (M, F); with
    `parameters`, (dL/dv, dL/dgain, dL/dbias), the last two summed over the rows (None for an
    absent gain or bias), and dL/dv None when not `input`."""
    dv, dgain, dbias = torch.ops.aten.native_layer_norm_backward(
        d_out, v, [v.shape[1]], mean, rstd, gain, bias,
        [input, parameters and gain is not None, parameters and bias is not None])
    return (dv, dgain, dbias) if parameters else dv


def _rows(mask, rows):
    """A per-row mask's rows, or a broadcast (1, F) mask (zoneout's expectation in eval)."""
    return mask if mask.shape[0] == 1 else mask[rows]


def _per_row(batch_mask, layout: StepLayout):
    """(B, F) per-sequence mask -> (N, F), row n holding its sequence's mask."""
    if layout.uniform:
        return batch_mask.repeat(layout.steps, 1)
    return torch.cat([batch_mask[:size] for size in layout.batch_sizes])


# -- forward and backward ---------------------------------------------------------------------


def _form(v: LSTMVariant) -> int:
    """The variant's cell as the native kernels' `form` bits (native.cell_form)."""
    return native.cell_form(*(getattr(v, name) for name in CELL_FORM_FIELDS))


def _native_forward(x, h0, c0, q0, p: dict, masks: dict, v: LSTMVariant, layout: StepLayout,
                    reverse: bool, parts: int, save: bool):
    """lstm_variant_forward's results from the native loops (see lstm_variant_loops_forward in
    _native.cpp): the input's products (and their layer norm) here, in the native module's
    recycled memory (fresh tensors of this size cost about as much in page faults as the
    arithmetic, see layer_norm_rows), then the loops. Without `save` the stash's entries are
    None (nothing will need a backward); without layer norm so are cand and s (the backward
    recomputes them where it needs them, see _cell_outputs)."""
    module = native.module()
    ax = _products(x, [(x, p["w_ih"].t())], in_pool=True)[0]
    st = {}
    if v.layer_norm:
        st["x_pre"] = ax
        ax, st["mean_x"], st["rstd_x"] = module.layer_norm_rows(
            ax, p["ln_ih_weight"], p["ln_ih_bias"], v.layer_norm_eps)
    (out, h, c, q, st["gates"], st["cells"], st["cand"], st["s"], st["h_pre"], st["mean_h"],
     st["rstd_h"], st["mean_c"], st["rstd_c"]) = module.lstm_variant_loops_forward(
        ax, p["b_ih"], p["b_hh"], h0, c0, p["w_hh"], p["w_hr"], p["w_peephole"], _form(v),
        masks["zoneout_h"], masks["zoneout_c"], masks["recurrent"], p["w_gate"], q0,
        v.layer_norm, p["ln_hh_weight"], p["ln_hh_bias"], p["ln_cell_weight"],
        p["ln_cell_bias"], v.layer_norm_eps, layout.batch_sizes, reverse, save, parts)
    return out, h, c, q, st


def lstm_variant_forward(x, h0, c0, q0, p: dict, masks: dict, v: LSTMVariant,
                         layout: StepLayout, reverse: bool, native_parts: int = 0,
                         save: bool = True):
    """x (N, I), h0 (B, P), c0 (B, H), q0 (B, 3H) | None
    -> out (N, P), h_T (B, P), c_T (B, H), q_T (B, 3H) | None, stash dict.

    p: w_ih, w_hh, b_ih, b_hh, w_hr, w_peephole, w_gate, ln_* (None where absent).
    masks: zoneout_h (N, P) or (1, P), zoneout_c (N, H) or (1, H), recurrent (B, P); or None.
    native_parts: 0 for the loop below; n >= 1 for the native loops with n row parts (as
    kernels.lstm_variant_layer picks them), which save the same stash (but cand and s only with
    layer norm), or none of it without `save`.
    """
    if native_parts:
        return _native_forward(x, h0, c0, q0, p, masks, v, layout, reverse, native_parts, save)
    H = p["w_hh"].shape[0] // 4
    N = x.shape[0]
    z_h, z_c, d_r = masks["zoneout_h"], masks["zoneout_c"], masks["recurrent"]
    st = {}
    ax = x @ p["w_ih"].t()                                       # (N, 4H)
    if v.layer_norm:                      # stash each LN's input, mean and 1/deviation
        st["x_pre"] = ax
        ax, st["mean_x"], st["rstd_x"] = _layer_norm(ax, p["ln_ih_weight"], p["ln_ih_bias"],
                                                     v.layer_norm_eps)
        st["h_pre"] = x.new_empty(N, 4 * H)
        st["mean_h"], st["rstd_h"] = x.new_empty(N, 1), x.new_empty(N, 1)
        st["mean_c"], st["rstd_c"] = x.new_empty(N, 1), x.new_empty(N, 1)
    for b in (p["b_ih"], p["b_hh"]):
        if b is not None:
            ax = ax + b
    gates = ax.contiguous()
    cells = x.new_empty(N, H)
    cand = x.new_empty(N, H) if z_c is not None else cells      # c~, when zoneout separates it
    s_all = x.new_empty(N, H)
    out = x.new_empty(N, h0.shape[1])
    w_hh_t = p["w_hh"].t()
    w_hr_t = None if p["w_hr"] is None else p["w_hr"].t()
    if v.peepholes:
        p_i, p_f, p_o = p["w_peephole"].chunk(3)
    fgr = v.full_gate_recurrence
    w_gate_t = p["w_gate"].t() if fgr else None
    h, c = h0.clone(), c0.clone()
    q = q0.clone() if fgr else None
    for rows, size in layout.order(reverse):
        h_prev, c_prev = h[:size], c[:size]
        r = h_prev if d_r is None else h_prev * d_r[:size]
        ah = r @ w_hh_t
        if v.layer_norm:
            st["h_pre"][rows] = ah
            ah, st["mean_h"][rows], st["rstd_h"][rows] = _layer_norm(
                ah, p["ln_hh_weight"], p["ln_hh_bias"], v.layer_norm_eps)
        a = gates[rows]
        a.add_(ah)
        a_i, a_f, a_g, a_o = a.chunk(4, 1)
        if fgr:
            aq = q[:size] @ w_gate_t                              # (B, 3H)
            a[:, :2 * H].add_(aq[:, :2 * H])
            a_o.add_(aq[:, 2 * H:])
        if v.peepholes:
            a_i.addcmul_(p_i, c_prev)
            a_f.addcmul_(p_f, c_prev)
        if v.input_gate:
            _activate_(v.gate_activation, a_i)
        else:
            a_i.fill_(1.0)
        if v.cifg:
            torch.sub(1.0, a_i, out=a_f)
        elif v.forget_gate:
            _activate_(v.gate_activation, a_f)
        else:
            a_f.fill_(1.0)
        _activate_(v.cell_activation, a_g)
        c_new = torch.mul(a_f, c_prev, out=cand[rows]).addcmul_(a_i, a_g)   # c~
        if v.output_gate:
            if v.peepholes:
                a_o.addcmul_(p_o, c_new)
            _activate_(v.gate_activation, a_o)
        else:
            a_o.fill_(1.0)
        c_out = c_new
        if v.layer_norm:
            c_out, st["mean_c"][rows], st["rstd_c"][rows] = _layer_norm(
                c_new, p["ln_cell_weight"], p["ln_cell_bias"], v.layer_norm_eps)
        s = s_all[rows]
        s.copy_(c_out)
        _activate_(v.output_activation, s)
        m = a_o * s
        h_new = m if w_hr_t is None else m @ w_hr_t                           # h~
        if z_h is not None:       # h~ + z (h_prev - h~); lerp is exact at z = 0 and z = 1
            h_new = torch.lerp(h_new, h_prev, _rows(z_h, rows))
        out[rows] = h_new
        if z_c is not None:
            cells[rows] = torch.lerp(c_new, c_prev, _rows(z_c, rows))
        h[:size] = h_new
        c[:size] = cells[rows]
        if fgr:
            q[:size, :2 * H] = a[:, :2 * H]
            q[:size, 2 * H:] = a_o
    st.update(gates=gates, cells=cells, cand=cand, s=s_all)
    return out, h, c, q, st


def _ifo(t):
    """[i | f | o] of gate rows [i | f | g | o] (M, 4H) -> (M, 3H)."""
    H = t.shape[1] // 4
    return torch.cat([t[:, :2 * H], t[:, 3 * H:]], 1)


def lstm_variant_backward(d_out, d_hT, d_cT, d_qT, x, h0, c0, q0, p, masks, out, st,
                          v: LSTMVariant, layout: StepLayout, reverse: bool,
                          needs_input_grad: bool, native_parts: int = 0):
    """Gradients of `lstm_variant_forward` (with the same native_parts): dx, dh0, dc0, dq0
    and a dict of parameter gradients."""
    z_h, z_c, d_r = masks["zoneout_h"], masks["zoneout_c"], masks["recurrent"]
    gates, cells, cand, s_all = st["gates"], st["cells"], st["cand"], st["s"]
    w_hh, w_hr = p["w_hh"], p["w_hr"]
    if native_parts:
        d_gates, d_ah, d_c_ln, d_h_tilde, dh, dc, dq = \
            native.module().lstm_variant_loops_backward(
                d_out, d_hT, d_cT, d_qT, c0, w_hh, w_hr, p["w_gate"], gates, cells, v.layer_norm,
                cand, s_all, st["h_pre"], st["mean_h"], st["rstd_h"], st["mean_c"],
                st["rstd_c"], p["ln_hh_weight"], p["ln_cell_weight"], p["w_peephole"], _form(v),
                z_h, z_c, d_r, layout.batch_sizes, reverse, native_parts)
        c_prev_rows = None
        if v.peepholes or (not v.layer_norm and z_c is not None and w_hr is not None):
            c_prev_rows = _previous_rows(cells, c0, layout, reverse, in_pool=True)
        if not v.layer_norm:
            st = {**st, **_cell_outputs(gates, cells, c_prev_rows, v, z_c is not None,
                                        w_hr is not None)}
        return _parameter_gradients(x, h0, q0, p, d_r, out, st, v, layout, reverse,
                                    needs_input_grad, d_gates, d_ah, d_c_ln, d_h_tilde,
                                    c_prev_rows, dh, dc, dq, in_pool=True)
    d_gates = torch.empty_like(gates)                         # dA, (N, 4H)
    d_ah = torch.empty_like(gates) if v.layer_norm else d_gates   # d(r W_hh^T)
    d_c_ln = torch.empty_like(cells) if v.layer_norm else None   # dL/dLN_c(c~)
    d_h_tilde = torch.empty_like(out) if p["w_hr"] is not None else None
    c_prev_rows = layout.previous_rows(cells, c0, reverse)    # (N, H)
    if v.peepholes:
        p_i, p_f, p_o = p["w_peephole"].chunk(3)
    fgr = v.full_gate_recurrence
    dh, dc = d_hT.clone(), d_cT.clone()
    dq = d_qT.clone() if fgr else None
    for rows, size in layout.order(not reverse):
        dh_t = d_out[rows] + dh[:size]
        dc_t = dc[:size]
        c_prev = c_prev_rows[rows]
        if z_h is not None:
            zh = _rows(z_h, rows)
            dh_prev = dh_t * zh
            dh_t = dh_t - dh_prev                              # dh (1 - z)
        if z_c is not None:
            zc = _rows(z_c, rows)
            dc_prev = dc_t * zc
            dc_t = dc_t - dc_prev
        else:
            dc_prev = None
        if w_hr is None:
            dm = dh_t
        else:
            d_h_tilde[rows] = dh_t
            dm = dh_t @ w_hr
        i, f, g, o = gates[rows].chunk(4, 1)
        s = s_all[rows]
        da = d_gates[rows]
        da_i, da_f, da_g, da_o = da.chunk(4, 1)
        d_c_out = dm * o * _slope(v.output_activation, s)
        if v.layer_norm:
            d_c_ln[rows] = d_c_out
            d_c_out = _layer_norm_backward(d_c_out, cand[rows], st["mean_c"][rows],
                                           st["rstd_c"][rows], p["ln_cell_weight"],
                                           p["ln_cell_bias"])
        dc_new = dc_t + d_c_out                                  # dL/dc~
        if fgr:                                                  # q_t = [i, f, o] as values
            dq_i, dq_f, dq_o = dq[:size].chunk(3, 1)
        if v.output_gate:
            torch.mul(dm, s, out=da_o)
            if fgr:
                da_o.add_(dq_o)
            da_o.mul_(_slope(v.gate_activation, o))
            if v.peepholes:
                dc_new.addcmul_(da_o, p_o)
        else:
            da_o.zero_()
        torch.mul(dc_new, g, out=da_i)                           # di
        torch.mul(dc_new, c_prev, out=da_f)                      # df
        if fgr:
            da_i.add_(dq_i)
            da_f.add_(dq_f)
        torch.mul(dc_new, i, out=da_g).mul_(_slope(v.cell_activation, g))
        dc_from_cell = dc_new * f
        dc_prev = dc_from_cell if dc_prev is None else dc_prev.add_(dc_from_cell)
        if v.cifg:                                               # f = 1 - i
            da_i.sub_(da_f)
            da_f.zero_()
        if v.input_gate:
            da_i.mul_(_slope(v.gate_activation, i))
        else:
            da_i.zero_()
        if v.forget_gate and not v.cifg:
            da_f.mul_(_slope(v.gate_activation, f))
        elif not v.cifg:
            da_f.zero_()
        if v.peepholes:
            dc_prev.addcmul_(da_i, p_i).addcmul_(da_f, p_f)
        dah = da
        if v.layer_norm:
            dah = _layer_norm_backward(da, st["h_pre"][rows], st["mean_h"][rows],
                                       st["rstd_h"][rows], p["ln_hh_weight"], p["ln_hh_bias"])
            d_ah[rows] = dah
        dr = dah @ w_hh
        if d_r is not None:
            dr.mul_(d_r[:size])
        if z_h is not None:
            dr.add_(dh_prev)
        dh[:size] = dr
        dc[:size] = dc_prev
        if fgr:
            dq[:size] = _ifo(da) @ p["w_gate"]
    return _parameter_gradients(x, h0, q0, p, d_r, out, st, v, layout, reverse, needs_input_grad,
                                d_gates, d_ah, d_c_ln, d_h_tilde, c_prev_rows, dh, dc, dq)


def _cell_outputs(gates, cells, c_prev_rows, v: LSTMVariant, zoneout_c: bool, need_s: bool):
    """What the native loops save only with layer norm, from their gates and cells, where the
    parameters' gradients need them: cand (N, H) c~ (the peepholes' operand; the carried cells
    themselves without zoneout_c, else f c_prev + i g), and s (N, H) = psi(c~) when `need_s`
    (W_hr's operand is o s)."""
    if not (v.peepholes or need_s):
        return {}
    H = cells.shape[1]
    cand = cells
    if zoneout_c:
        cand = torch.addcmul(gates[:, H:2 * H] * c_prev_rows, gates[:, :H], gates[:, 2 * H:3 * H])
    s = None
    if need_s:
        s = cand.clone()
        _activate_(v.output_activation, s)
    return {"cand": cand, "s": s}


def _gate_recurrence_gradient(like, d_gates, gates, q0, layout: StepLayout, reverse: bool,
                              in_pool: bool):
    """dW_gg (3H, 3H) = [da_i | da_f | da_o]^T q_prev over all rows, q_prev each row's previous
    [i | f | o] (q0 for a sequence's first step): four products of column blocks ([i | f] and
    o) of d_gates and of the previous rows of gates, read in place rather than gathered into
    fresh (N, 3H) copies (at batch 64 / hidden 512 / length 100: 110 ms against 133 ms gathered;
    the product is 30 GFLOP, 91 ms at the matmul rate)."""
    H = gates.shape[1] // 4
    q0_rows = q0.new_zeros(q0.shape[0], 4 * H)          # [i | f | (unused) | o]
    q0_rows[:, :2 * H], q0_rows[:, 3 * H:] = q0[:, :2 * H], q0[:, 2 * H:]
    prev = _previous_rows(gates, q0_rows, layout, reverse, in_pool)
    blocks = (slice(0, 2 * H), slice(3 * H, 4 * H))
    parts = _products(like, [(d_gates[:, rows].t(), prev[:, cols])
                             for rows in blocks for cols in blocks], in_pool)
    return torch.cat([torch.cat(parts[:2], 1), torch.cat(parts[2:], 1)])


def _products(like, pairs, in_pool: bool):
    """a @ b for each (a, b) in `pairs`: with `in_pool` in the native module's recycled memory,
    in one parallel region (native.products; fresh tensors of the sequence-wide sizes cost
    about as much in page faults as the arithmetic), else torch's."""
    if not in_pool:
        return [a @ b for a, b in pairs]
    outs = [native.pooled_empty([a.shape[0], b.shape[1]], like) for a, b in pairs]
    native.module().products(outs, [a for a, _ in pairs], [b for _, b in pairs])
    return outs


def _previous_rows(sequence, initial, layout: StepLayout, reverse: bool, in_pool: bool):
    """layout.previous_rows(sequence, initial, reverse), in the native module's recycled memory
    with `in_pool`."""
    if not in_pool:
        return layout.previous_rows(sequence, initial, reverse)
    rows = native.pooled_empty(sequence.shape, sequence)
    native.module().previous_rows(rows, sequence, initial, layout.batch_sizes, reverse)
    return rows


def _parameter_gradients(x, h0, q0, p, d_r, out, st, v: LSTMVariant, layout: StepLayout,
                         reverse: bool, needs_input_grad: bool, d_gates, d_ah, d_c_ln,
                         d_h_tilde, c_prev_rows, dh, dc, dq, in_pool: bool = False):
    """After the backward loop, what is sequence-wide: dx and the parameters' gradients from
    d_gates (N, 4H) (of the pre-activations a), d_ah (N, 4H) (of r W_hh^T before LN_h; d_gates
    without layer norm), d_c_ln (N, H) (of LN_c(c~)), d_h_tilde (N, P) (of h~ before the
    projection), c_prev_rows (N, H) (with peepholes); d_r: recurrent dropout's mask (B, P) or
    None. With `in_pool` (the native loops'), the big results in the native module's recycled
    memory. Returns dx, dh0, dc0, dq0, grads."""
    H = p["w_hh"].shape[0] // 4
    gates, cand, s_all = st["gates"], st["cand"], st["s"]
    w_hr, fgr = p["w_hr"], v.full_gate_recurrence
    grads = {}
    d_ax = d_gates
    if v.layer_norm:
        # gain and bias gradients of all steps at once, from the stashed LN inputs
        _, grads["ln_hh_weight"], grads["ln_hh_bias"] = _layer_norm_backward(
            d_gates, st["h_pre"], st["mean_h"], st["rstd_h"], p["ln_hh_weight"],
            p["ln_hh_bias"], parameters=True, input=False)
        _, grads["ln_cell_weight"], grads["ln_cell_bias"] = _layer_norm_backward(
            d_c_ln, cand, st["mean_c"], st["rstd_c"], p["ln_cell_weight"], p["ln_cell_bias"],
            parameters=True, input=False)
        # the input side's gradient too: torch's, or the native module's in recycled memory
        d_ax, grads["ln_ih_weight"], grads["ln_ih_bias"] = _layer_norm_backward(
            d_gates, st["x_pre"], st["mean_x"], st["rstd_x"], p["ln_ih_weight"],
            p["ln_ih_bias"], parameters=True, input=not in_pool)
        if in_pool:                                      # (torch's was not asked for)
            d_ax = native.module().layer_norm_rows_backward(
                d_gates, st["x_pre"], st["mean_x"], st["rstd_x"], p["ln_ih_weight"])
    r_prev_rows = _previous_rows(out, h0, layout, reverse, in_pool)
    if d_r is not None:
        r_prev_rows = r_prev_rows * _per_row(d_r, layout)
    products = [(d_ax.t(), x), (d_ah.t(), r_prev_rows)]
    if needs_input_grad:
        products.append((d_ax, p["w_ih"]))
    grads["w_ih"], grads["w_hh"], *dx = _products(x, products, in_pool)
    dx = dx[0] if dx else None
    db = d_gates.sum(0)
    grads["b_ih"] = db if p["b_ih"] is not None else None
    grads["b_hh"] = db.clone() if p["b_hh"] is not None else None
    if w_hr is not None:
        grads["w_hr"] = d_h_tilde.t() @ (gates[:, 3 * H:] * s_all)
    if fgr:
        grads["w_gate"] = _gate_recurrence_gradient(x, d_gates, gates, q0, layout, reverse,
                                                    in_pool)
    if v.peepholes:
        grads["w_peephole"] = torch.cat([
            (d_gates[:, :H] * c_prev_rows).sum(0),
            (d_gates[:, H:2 * H] * c_prev_rows).sum(0),
            (d_gates[:, 3 * H:] * cand).sum(0)])
    return dx, dh, dc, dq, grads


# -- autograd Function -----------------------------------------------------------------------

PARAMETERS = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "w_peephole", "w_gate",
              "ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias",
              "ln_cell_weight", "ln_cell_bias")
MASKS = ("zoneout_h", "zoneout_c", "recurrent")
_STASH = ("gates", "cells", "cand", "s", "x_pre", "mean_x", "rstd_x", "h_pre", "mean_h",
          "rstd_h", "mean_c", "rstd_c")


class LSTMVariantFunction(torch.autograd.Function):
    """One LSTM-variant layer in one direction over a flat time-major sequence.

    apply(x (N, I), h0 (B, P), c0 (B, H), q0 (B, 3H) | None, w_ih (4H, I), w_hh (4H, P),
          b_ih, b_hh (4H,) | None, w_hr (P, H) | None, w_peephole (3H,) | None,
          w_gate (3H, 3H) | None, ln_ih_weight, ln_ih_bias,
          ln_hh_weight, ln_hh_bias (4H,) | None, ln_cell_weight, ln_cell_bias (H,) | None,
          zoneout_h (N or 1, P) | None, zoneout_c (N or 1, H) | None, recurrent (B, P) | None,
          variant: LSTMVariant, layout: StepLayout, reverse: bool, native_parts: int,
          save: bool)
    -> out (N, P), h_T (B, P), c_T (B, H), q_T (B, 3H) (empty without full gate recurrence),
       gates (N, 4H) [i | f | g | o], cells (N, H)

    native_parts: 0 for the Python loops of torch operations; n >= 1 for the native loops (as
    kernels.lstm_variant_layer picks them) on n row parts. save: False when nothing will need a
    backward and no one wants gates and cells: the native loops then save nothing (and return
    empty gates and cells).

    gates and cells are the values the forward stored for its backward, returned as
    non-differentiable outputs for introspection: they cost nothing extra.
    """

    @staticmethod
    def forward(ctx, x, h0, c0, q0, *args):
        tensors, (variant, layout, reverse, native_parts, save) = args[:-5], args[-5:]
        originals = (x, h0, c0, q0, *tensors)
        x, h0, c0, q0, *tensors = upcast(originals, compute_dtype(x.dtype))
        p = dict(zip(PARAMETERS, tensors[:len(PARAMETERS)], strict=True))
        masks = dict(zip(MASKS, tensors[len(PARAMETERS):], strict=True))
        out, h_T, c_T, q_T, st = lstm_variant_forward(x, h0, c0, q0, p, masks, variant, layout,
                                                      reverse, native_parts, save)
        ctx.save_for_backward(x, h0, c0, q0, *tensors, out, *(st.get(k) for k in _STASH))
        ctx.variant, ctx.layout, ctx.reverse = variant, layout, reverse
        ctx.native_parts = native_parts
        # No zeros made for the gradients of outputs no one used (gates and cells, (N, 4H) and
        # (N, H), never get one); backward makes the zeros it needs.
        ctx.set_materialize_grads(False)
        ctx.dtypes = dtypes_of(originals)
        if q_T is None:
            q_T = h_T.new_empty(0)
        gates, cells = (x.new_empty(0) if st[k] is None else st[k] for k in ("gates", "cells"))
        like = (originals[0], originals[1], originals[2], originals[0], originals[0], originals[0])
        results = cast_like((out, h_T, c_T, q_T, gates, cells), like)
        ctx.mark_non_differentiable(*results[4:] if q0 is not None else results[3:])
        return tuple(results)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT, d_cT, d_qT, _d_gates, _d_cells):
        saved = ctx.saved_tensors
        x, h0, c0, q0 = saved[:4]
        count = len(PARAMETERS) + len(MASKS)
        tensors, out = saved[4:4 + count], saved[4 + count]
        st = dict(zip(_STASH, saved[5 + count:], strict=True))
        p = dict(zip(PARAMETERS, tensors[:len(PARAMETERS)], strict=True))
        masks = dict(zip(MASKS, tensors[len(PARAMETERS):], strict=True))
        d_out = torch.zeros_like(out) if d_out is None else d_out
        d_hT = h0.new_zeros(h0.shape) if d_hT is None else d_hT
        d_cT = torch.zeros_like(c0) if d_cT is None else d_cT
        d_out, d_hT, d_cT = upcast((d_out, d_hT, d_cT), x.dtype)
        if q0 is not None:
            d_qT = torch.zeros_like(q0) if d_qT is None else d_qT.to(x.dtype)
        dx, dh0, dc0, dq0, grads = lstm_variant_backward(
            d_out, d_hT, d_cT, d_qT, x, h0, c0, q0, p, masks, out, st, ctx.variant, ctx.layout,
            ctx.reverse, ctx.needs_input_grad[0], ctx.native_parts)
        result = [dx, dh0, dc0, dq0] + [grads.get(name) if p[name] is not None else None
                                        for name in PARAMETERS] + [None] * len(MASKS)
        return (*cast_to(result, ctx.dtypes), None, None, None, None, None)
