"""GRU variants in NumPy float64: every option of `GRUVariant`, forward and hand-derived BPTT.

Shape key: T time, B batch, I input, H hidden. Gate order [r | z | n] as torch.nn. One layer,
one direction, padded time-major input.

Forward, per step t (x_t (B, I), h_{t-1} (B, H)); each line is switched by the variant field
(or the `reset_after` argument) named on the right:

    u        = h_{t-1} * d_r                             recurrent dropout, d_r (B, H) per sequence
    W        = W_hh * D                                  DropConnect mask D (3H, H), per call
    gi       = x_t W_ih^T + b_ih                         (B, 3H)
             = LN_x(x_t W_ih^T) + b_ih                   layer_norm (per block, see below)
    r        = sigma(gi_r + u W_hr^T + b_hr)             gate_activation
    z        = sigma(gi_z + u W_hz^T + b_hz)             (layer_norm: LN_h(u W_h{rz}^T) + b_h{rz})
    n        = phi(gi_n + r * (u W_hn^T + b_hn))         reset_after=True (torch), candidate_activation
             = phi(gi_n + (r * u) W_hn^T + b_hn)         reset_after=False (Cho et al. 2014)
                                                         (layer_norm: LN_h of the product, + b_hn)
    h~       = (1 - z) * n + z * h_{t-1}
    h_t      = k * h_{t-1} + (1 - k) * h~                zoneout mask k (B, H) per step; y_t = h_t

Layer norm (Ba et al. 2016, whose layer-normalised GRU this is) normalises each product in
two blocks, the gates [r | z] (2H) and the candidate n (H), so that reset-before can normalise
(r * u) W_hn^T after r is known: LN(v) = gain * (v - mean(v)) / sqrt(var(v) + eps) + bias
over the block's features, with gains and biases ln_ih_* and ln_hh_* (3H) = [rz | n].

Masks are passed in explicitly (the modules draw them), so a kernel can be checked exactly.
With no masks and the default variant this is `gru.gru_forward` line for line.
"""

import numpy as np

from .lstm_variants import activate, derivative_from_output, layer_norm_backward, layer_norm_forward
from .variant import GRUVariant

PARAMETERS = ("w_ih", "w_hh", "b_ih", "b_hh", "ln_ih_weight", "ln_ih_bias", "ln_hh_weight",
              "ln_hh_bias")


def _normalise(v, gain, bias, eps, block):
    """LN of one block of columns of v (B, F): block slice into the (3H,) gain and bias."""
    return layer_norm_forward(v, gain[block], bias[block], eps)


def _normalise_backward(d_out, cache, gain, grads, name, block):
    """dL/dv of `_normalise`; accumulates the gain and bias gradients into grads[name_*]."""
    dv, dgain, dbias = layer_norm_backward(d_out, cache, gain[block])
    grads[name + "_weight"][block] += dgain
    grads[name + "_bias"][block] += dbias
    return dv


def gru_variant_forward(x, h0, params, variant: GRUVariant, masks=None, reset_after=True):
    """Run one GRU layer with the equations `variant` selects.

    Args:
        x (T, B, I), h0 (B, H).
        params: dict with w_ih (3H, I), w_hh (3H, H), and as needed b_ih, b_hh (3H,),
            ln_ih_weight/bias, ln_hh_weight/bias (3H,); a missing key means absent.
        masks: dict, any of zoneout_h (T, B, H) (1 = keep the previous value), recurrent (B, H)
            and weight (3H, H) (both already scaled by 1 / keep).
    Returns:
        y (T, B, H), h_T (B, H), cache for `gru_variant_backward`.
    """
    v = variant
    masks = masks or {}
    p = {name: params.get(name) for name in PARAMETERS}
    H = p["w_hh"].shape[0] // 3
    w_hh = p["w_hh"] if "weight" not in masks else p["w_hh"] * masks["weight"]
    b_ih = np.zeros(3 * H) if p["b_ih"] is None else p["b_ih"]
    b_hh = np.zeros(3 * H) if p["b_hh"] is None else p["b_hh"]
    rz, nb = slice(0, 2 * H), slice(2 * H, 3 * H)                      # the LN blocks
    eps = v.layer_norm_eps

    def norm(product, name, block):                                    # LN or identity
        if not v.layer_norm:
            return product, None
        return _normalise(product, p[name + "_weight"], p[name + "_bias"], eps, block)

    h = h0
    ys, steps = [], []
    for t in range(x.shape[0]):
        h_prev = h
        u = h_prev if "recurrent" not in masks else h_prev * masks["recurrent"]
        ax = x[t] @ p["w_ih"].T                                        # (B, 3H)
        ax_rz, ln_x_rz = norm(ax[:, rz], "ln_ih", rz)
        ax_n, ln_x_n = norm(ax[:, nb], "ln_ih", nb)
        gi = np.concatenate([ax_rz, ax_n], axis=1) + b_ih
        gh_rz, ln_h_rz = norm(u @ w_hh[rz].T, "ln_hh", rz)
        gh_rz = gh_rz + b_hh[rz]                                       # (B, 2H)
        r = activate(v.gate_activation, gi[:, :H] + gh_rz[:, :H])     # reset gate
        z = activate(v.gate_activation, gi[:, H:2 * H] + gh_rz[:, H:])  # update gate
        if reset_after:
            gh_n, ln_h_n = norm(u @ w_hh[nb].T, "ln_hh", nb)
            gh_n = gh_n + b_hh[nb]                                     # (B, H)
            n = activate(v.candidate_activation, gi[:, 2 * H:] + r * gh_n)
        else:
            rh_n, ln_h_n = norm((r * u) @ w_hh[nb].T, "ln_hh", nb)
            gh_n = None
            n = activate(v.candidate_activation, gi[:, 2 * H:] + rh_n + b_hh[nb])
        h_new = (1.0 - z) * n + z * h_prev                             # h~
        k = masks["zoneout_h"][t] if "zoneout_h" in masks else None
        h = h_new if k is None else k * h_prev + (1.0 - k) * h_new
        steps.append(dict(x=x[t], h_prev=h_prev, u=u, r=r, z=z, n=n, gh_n=gh_n, k=k,
                          ln=(ln_x_rz, ln_x_n, ln_h_rz, ln_h_n)))
        ys.append(h)
    return np.stack(ys), h, (steps, p, w_hh, v, masks, reset_after)


def gru_variant_backward(dy, dh_T, cache):
    """Backward through time for `gru_variant_forward`.

    Args: dy (T, B, H), dh_T (B, H).
    Returns: dict with x (T, B, I), h0 (B, H) and one gradient per parameter present in
        `params` (same shape; the raw w_hh's gradient with DropConnect).
    """
    steps, p, w_hh, v, masks, reset_after = cache
    H = w_hh.shape[0] // 3
    grads = {name: np.zeros_like(w) for name, w in p.items() if w is not None}
    dw_hh_eff = np.zeros_like(w_hh)
    db_ih = np.zeros(3 * H)
    db_hh = np.zeros(3 * H)
    dx = np.zeros((len(steps),) + steps[0]["x"].shape)
    rz, nb = slice(0, 2 * H), slice(2 * H, 3 * H)

    def norm_back(d_out, cache, name, block):                          # through LN, if any
        if not v.layer_norm:
            return d_out
        return _normalise_backward(d_out, cache, p[name + "_weight"], grads, name, block)

    dh_next = dh_T
    for t in range(len(steps) - 1, -1, -1):
        st = steps[t]
        r, z, n, u, h_prev = st["r"], st["z"], st["n"], st["u"], st["h_prev"]
        dh = dy[t] + dh_next                                   # dL/dh_t (B, H)
        dh_prev = np.zeros_like(dh)
        if st["k"] is not None:                                # h_t = k h_{t-1} + (1 - k) h~
            dh_prev += dh * st["k"]
            dh = dh * (1.0 - st["k"])
        dn = dh * (1.0 - z)                                    # h~ = (1 - z) n + z h_prev
        dz = dh * (h_prev - n)
        dh_prev += dh * z
        da_n = dn * derivative_from_output(v.candidate_activation, n)
        ln_x_rz, ln_x_n, ln_h_rz, ln_h_n = st["ln"]
        if reset_after:                                        # a_n = gi_n + r * gh_n
            dr = da_n * st["gh_n"]
            dgh_n = da_n * r
            d_prod = norm_back(dgh_n, ln_h_n, "ln_hh", nb)     # d(u W_hn^T)
            dw_hh_eff[nb] += d_prod.T @ u
            du = d_prod @ w_hh[nb]
        else:                                                  # a_n = gi_n + (r u) W_hn^T + b_hn
            dgh_n = da_n
            d_prod = norm_back(da_n, ln_h_n, "ln_hh", nb)      # d((r u) W_hn^T)
            d_ru = d_prod @ w_hh[nb]
            dr = d_ru * u
            dw_hh_eff[nb] += d_prod.T @ (r * u)
            du = d_ru * r
        da_r = dr * derivative_from_output(v.gate_activation, r)
        da_z = dz * derivative_from_output(v.gate_activation, z)
        d_rz = np.concatenate([da_r, da_z], axis=1)            # (B, 2H), input and recurrent
        dgi = np.concatenate([d_rz, da_n], axis=1)             # (B, 3H)
        d_prod_rz = norm_back(d_rz, ln_h_rz, "ln_hh", rz)      # d(u W_h{rz}^T)
        dw_hh_eff[rz] += d_prod_rz.T @ u
        du = du + d_prod_rz @ w_hh[rz]
        dh_prev += du if "recurrent" not in masks else du * masks["recurrent"]
        dax = np.concatenate([norm_back(d_rz, ln_x_rz, "ln_ih", rz),
                              norm_back(da_n, ln_x_n, "ln_ih", nb)], axis=1)   # d(x W_ih^T)
        grads["w_ih"] += dax.T @ st["x"]
        dx[t] = dax @ p["w_ih"]
        db_ih += dgi.sum(axis=0)                               # biases act after LN
        db_hh += np.concatenate([d_rz, dgh_n], axis=1).sum(axis=0)
        dh_next = dh_prev
    grads["w_hh"] = dw_hh_eff if "weight" not in masks else dw_hh_eff * masks["weight"]
    if p["b_ih"] is not None:
        grads["b_ih"] = db_ih
    if p["b_hh"] is not None:
        grads["b_hh"] = db_hh
    grads.update(x=dx, h0=dh_next)
    return grads
