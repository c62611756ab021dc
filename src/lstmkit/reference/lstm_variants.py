"""LSTM variants in NumPy float64: every option of `LSTMVariant`, forward and hand-derived BPTT.

Shape key: T time, B batch, I input, H hidden, P output (= H, or the projection size).
Gate order [i | f | g | o] as torch.nn. One layer, one direction, padded time-major input.

Forward, per step t (x_t (B, I), h_{t-1} (B, P), c_{t-1} (B, H)); each line is switched by
the variant field named on the right:

    r        = h_{t-1} * d_r                            recurrent dropout, d_r (B, P) per sequence
    W        = W_hh * D                                 DropConnect mask D (4H, P), per call
    a        = x_t W_ih^T + r W^T + b_ih + b_hh         (B, 4H)
             = LN_x(x_t W_ih^T) + LN_h(r W^T) + b ...   layer_norm
    a_{ifo} += q_{t-1} W_gg^T,  q = [i | f | o]         full_gate_recurrence (q_{-1} = q0)
    a_i     += p_i * c_{t-1};  a_f += p_f * c_{t-1}     peepholes
    i        = sigma(a_i)          or 1                 gate_activation / input_gate=False
    f        = sigma(a_f), 1 - i   or 1                 cifg / forget_gate=False
    g        = phi(a_g)                                 cell_activation
    c~       = f * c_{t-1} + i * g                      new cell
    o        = sigma(a_o + p_o * c~)   or 1             peepholes / output_gate=False
    s        = psi(c~)  or  psi(LN_c(c~))               output_activation / layer_norm
    h~       = (o * s) [W_hr^T]
    c_t      = z_c * c_{t-1} + (1 - z_c) * c~           zoneout mask z_c (B, H) per step
    h_t      = z_h * h_{t-1} + (1 - z_h) * h~           zoneout mask z_h (B, P) per step; y_t = h_t

Masks are passed in explicitly (the modules draw them), so a kernel can be checked exactly.
LN(v) = gain * (v - mean(v)) / sqrt(var(v) + eps) + bias over the feature axis.
"""

import numpy as np

from ._common import dsigmoid_from_output, dtanh_from_output, sigmoid
from .variant import LSTMVariant

PARAMETERS = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "w_peephole", "w_gate",
              "ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias",
              "ln_cell_weight", "ln_cell_bias")


# -- activations, with derivatives written through their outputs ------------------------------

def activate(name, a):
    if name == "sigmoid":
        return sigmoid(a)
    if name == "hard_sigmoid":
        return np.clip(a / 6.0 + 0.5, 0.0, 1.0)
    if name == "tanh":
        return np.tanh(a)
    if name == "softsign":
        return a / (1.0 + np.abs(a))
    if name == "hardtanh":
        return np.clip(a, -1.0, 1.0)
    if name == "identity":
        return a
    raise ValueError(f"unknown activation {name!r}")


def derivative_from_output(name, y):
    if name == "sigmoid":
        return dsigmoid_from_output(y)
    if name == "hard_sigmoid":
        return np.where((y > 0.0) & (y < 1.0), 1.0 / 6.0, 0.0)
    if name == "tanh":
        return dtanh_from_output(y)
    if name == "softsign":                        # y = a / (1 + |a|)  =>  y' = (1 - |y|)^2
        return (1.0 - np.abs(y)) ** 2
    if name == "hardtanh":
        return np.where(np.abs(y) < 1.0, 1.0, 0.0)
    if name == "identity":
        return np.ones_like(y)
    raise ValueError(f"unknown activation {name!r}")


# -- layer normalisation over the last axis (llm.c's layernorm_forward / _backward) ----------

def layer_norm_forward(v, gain, bias, eps):
    """v (B, F) -> LN(v) (B, F), and (v_hat, rstd) for the backward."""
    rstd = 1.0 / np.sqrt(v.var(axis=1, keepdims=True) + eps)       # (B, 1)
    v_hat = (v - v.mean(axis=1, keepdims=True)) * rstd             # (B, F)
    return v_hat * gain + bias, (v_hat, rstd)


def layer_norm_backward(d_out, cache, gain):
    """Returns dv (B, F), dgain (F,), dbias (F,)."""
    v_hat, rstd = cache
    d_hat = d_out * gain
    dv = rstd * (d_hat - d_hat.mean(axis=1, keepdims=True)
                 - v_hat * (d_hat * v_hat).mean(axis=1, keepdims=True))
    return dv, (d_out * v_hat).sum(axis=0), d_out.sum(axis=0)


# -- the cell ------------------------------------------------------------------------------------

def lstm_variant_forward(x, h0, c0, params, variant: LSTMVariant, masks=None, q0=None):
    """Run one LSTM layer with the equations `variant` selects.

    Args:
        x (T, B, I), h0 (B, P), c0 (B, H).
        params: dict with w_ih (4H, I), w_hh (4H, P), and as needed b_ih, b_hh (4H,),
            w_hr (P, H), w_peephole (3H,) = [p_i | p_f | p_o], w_gate (3H, 3H) mapping the
            previous [i | f | o] to [a_i | a_f | a_o], ln_ih_weight/bias (4H,),
            ln_hh_weight/bias (4H,), ln_cell_weight/bias (H,); a missing key means absent.
        masks: dict, any of zoneout_h (T, B, P), zoneout_c (T, B, H) (1 = keep the previous
            value), recurrent (B, P) and weight (4H, P) (already scaled by 1 / keep).
        q0: (B, 3H) the gates before the first step, for full_gate_recurrence (zeros if None).
    Returns:
        y (T, B, P), h_T (B, P), c_T (B, H), cache for `lstm_variant_backward`; with
        full_gate_recurrence the last gates q_T (B, 3H) are `cache[-1]`.
    """
    v = variant
    masks = masks or {}
    p = {name: params.get(name) for name in PARAMETERS}
    H = p["w_hh"].shape[0] // 4
    w_hh = p["w_hh"] if "weight" not in masks else p["w_hh"] * masks["weight"]
    bias = sum(b for b in (p["b_ih"], p["b_hh"]) if b is not None)
    if v.peepholes:
        p_i, p_f, p_o = p["w_peephole"][:H], p["w_peephole"][H:2 * H], p["w_peephole"][2 * H:]
    h, c = h0, c0
    q = np.zeros((x.shape[1], 3 * H)) if q0 is None else q0
    ys, steps = [], []
    for t in range(x.shape[0]):
        h_prev, c_prev, q_prev = h, c, q
        r = h_prev if "recurrent" not in masks else h_prev * masks["recurrent"]
        ax, ah = x[t] @ p["w_ih"].T, r @ w_hh.T                        # (B, 4H) each
        ln_x = ln_h = None
        if v.layer_norm:
            ax, ln_x = layer_norm_forward(ax, p["ln_ih_weight"], p["ln_ih_bias"], v.layer_norm_eps)
            ah, ln_h = layer_norm_forward(ah, p["ln_hh_weight"], p["ln_hh_bias"], v.layer_norm_eps)
        a = ax + ah + bias
        if v.full_gate_recurrence:
            aq = q_prev @ p["w_gate"].T                                # (B, 3H)
            a = a + np.concatenate([aq[:, :2 * H], np.zeros((a.shape[0], H)), aq[:, 2 * H:]], 1)
        a_i, a_f, a_g, a_o = (a[:, k * H:(k + 1) * H] for k in range(4))
        if v.peepholes:
            a_i, a_f = a_i + p_i * c_prev, a_f + p_f * c_prev
        i = activate(v.gate_activation, a_i) if v.input_gate else np.ones_like(a_i)
        if v.cifg:
            f = 1.0 - i
        elif v.forget_gate:
            f = activate(v.gate_activation, a_f)
        else:
            f = np.ones_like(a_f)
        g = activate(v.cell_activation, a_g)
        c_new = f * c_prev + i * g                                     # c~
        if v.output_gate:
            o = activate(v.gate_activation, a_o + (p_o * c_new if v.peepholes else 0.0))
        else:
            o = np.ones_like(a_o)
        ln_c = None
        c_out = c_new
        if v.layer_norm:
            c_out, ln_c = layer_norm_forward(c_new, p["ln_cell_weight"], p["ln_cell_bias"],
                                             v.layer_norm_eps)
        s = activate(v.output_activation, c_out)
        m = o * s                                                      # (B, H)
        h_new = m if p["w_hr"] is None else m @ p["w_hr"].T            # h~ (B, P)
        z_c = masks["zoneout_c"][t] if "zoneout_c" in masks else None
        z_h = masks["zoneout_h"][t] if "zoneout_h" in masks else None
        c = c_new if z_c is None else z_c * c_prev + (1.0 - z_c) * c_new
        h = h_new if z_h is None else z_h * h_prev + (1.0 - z_h) * h_new
        q = np.concatenate([i, f, o], axis=1)                         # the gates, for FGR
        steps.append(dict(x=x[t], h_prev=h_prev, c_prev=c_prev, q_prev=q_prev, r=r,
                          i=i, f=f, g=g, o=o, c_new=c_new, s=s, m=m,
                          ln_x=ln_x, ln_h=ln_h, ln_c=ln_c, z_c=z_c, z_h=z_h))
        ys.append(h)
    return np.stack(ys), h, c, (steps, p, w_hh, v, masks, q)


def lstm_variant_backward(dy, dh_T, dc_T, cache, dq_T=None):
    """Backward through time for `lstm_variant_forward`.

    Args: dy (T, B, P), dh_T (B, P), dc_T (B, H); dq_T (B, 3H) for full_gate_recurrence.
    Returns: dict with x (T, B, I), h0 (B, P), c0 (B, H), q0 (B, 3H) with full gate
        recurrence, and one gradient per parameter present in `params` (same shape; the raw
        w_hh's gradient with DropConnect).
    """
    steps, p, w_hh, v, masks, _ = cache
    H = w_hh.shape[0] // 4
    grads = {name: np.zeros_like(w) for name, w in p.items() if w is not None}
    dw_hh_eff = np.zeros_like(w_hh)
    if v.peepholes:
        p_i, p_f, p_o = p["w_peephole"][:H], p["w_peephole"][H:2 * H], p["w_peephole"][2 * H:]
    dx = np.zeros((len(steps),) + steps[0]["x"].shape)
    dh_next, dc_next = dh_T, dc_T
    dq_next = np.zeros_like(steps[0]["q_prev"]) if dq_T is None else dq_T
    for t in range(len(steps) - 1, -1, -1):
        st = steps[t]
        dh = dy[t] + dh_next                                   # dL/dh_t (B, P)
        dc = dc_next                                           # dL/dc_t (B, H) from step t+1
        dh_prev = np.zeros_like(dh)
        dc_prev = np.zeros_like(dc)
        if st["z_h"] is not None:                              # h_t = z h_{t-1} + (1 - z) h~
            dh_prev += dh * st["z_h"]
            dh = dh * (1.0 - st["z_h"])
        if st["z_c"] is not None:                              # c_t = z c_{t-1} + (1 - z) c~
            dc_prev += dc * st["z_c"]
            dc = dc * (1.0 - st["z_c"])
        if p["w_hr"] is None:
            dm = dh
        else:
            grads["w_hr"] += dh.T @ st["m"]                    # h~ = m W_hr^T
            dm = dh @ p["w_hr"]
        dq_i, dq_f, dq_o = (dq_next[:, k * H:(k + 1) * H] for k in range(3))
        do = dm * st["s"] + dq_o                               # m = o * s; q_t = [i, f, o]
        d_c_out = dm * st["o"] * derivative_from_output(v.output_activation, st["s"])
        if v.layer_norm:
            d_c_out, dgain, dbias = layer_norm_backward(d_c_out, st["ln_c"], p["ln_cell_weight"])
            grads["ln_cell_weight"] += dgain
            grads["ln_cell_bias"] += dbias
        dc_new = dc + d_c_out                                  # dL/dc~
        da_o = do * derivative_from_output(v.gate_activation, st["o"]) if v.output_gate \
            else np.zeros_like(do)
        if v.peepholes:                                        # a_o += p_o * c~
            dc_new += da_o * p_o
        di = dc_new * st["g"] + dq_i                           # c~ = f c_prev + i g
        df = dc_new * st["c_prev"] + dq_f
        dg = dc_new * st["i"]
        dc_prev += dc_new * st["f"]
        if v.cifg:                                             # f = 1 - i
            di, df = di - df, np.zeros_like(df)
        da_i = di * derivative_from_output(v.gate_activation, st["i"]) if v.input_gate \
            else np.zeros_like(di)
        da_f = df * derivative_from_output(v.gate_activation, st["f"]) \
            if v.forget_gate and not v.cifg else np.zeros_like(df)
        da_g = dg * derivative_from_output(v.cell_activation, st["g"])
        if v.peepholes:                                        # a_i += p_i c_prev, a_f += ...
            dc_prev += da_i * p_i + da_f * p_f
            grads["w_peephole"] += np.concatenate([
                (da_i * st["c_prev"]).sum(0), (da_f * st["c_prev"]).sum(0),
                (da_o * st["c_new"]).sum(0)])
        da = np.concatenate([da_i, da_f, da_g, da_o], axis=1)  # (B, 4H)
        dq_next = np.zeros_like(dq_next)
        if v.full_gate_recurrence:                             # a_ifo += q_prev W_gg^T
            da_q = np.concatenate([da_i, da_f, da_o], axis=1)
            grads["w_gate"] += da_q.T @ st["q_prev"]
            dq_next = da_q @ p["w_gate"]
        for b in ("b_ih", "b_hh"):
            if p[b] is not None:
                grads[b] += da.sum(axis=0)
        dax, dah = da, da
        if v.layer_norm:
            dax, dgain, dbias = layer_norm_backward(da, st["ln_x"], p["ln_ih_weight"])
            grads["ln_ih_weight"] += dgain
            grads["ln_ih_bias"] += dbias
            dah, dgain, dbias = layer_norm_backward(da, st["ln_h"], p["ln_hh_weight"])
            grads["ln_hh_weight"] += dgain
            grads["ln_hh_bias"] += dbias
        grads["w_ih"] += dax.T @ st["x"]                       # ax = x W_ih^T
        dx[t] = dax @ p["w_ih"]
        dw_hh_eff += dah.T @ st["r"]                           # ah = r W^T
        dr = dah @ w_hh
        dh_prev += dr if "recurrent" not in masks else dr * masks["recurrent"]
        dh_next, dc_next = dh_prev, dc_prev
    grads["w_hh"] = dw_hh_eff if "weight" not in masks else dw_hh_eff * masks["weight"]
    grads.update(x=dx, h0=dh_next, c0=dc_next)
    if v.full_gate_recurrence:
        grads["q0"] = dq_next
    return grads
