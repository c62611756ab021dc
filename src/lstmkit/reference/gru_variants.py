"""GRU variants in NumPy float64: every option of `GRUVariant`, forward and hand-derived BPTT.

Shape key: T time, B batch, I input, H hidden. Gate order [r | z | n] as torch.nn. One layer,
one direction, padded time-major input.

Forward, per step t (x_t (B, I), h_{t-1} (B, H)); each line is switched by the variant field
(or the `reset_after` argument) named on the right:

    u        = h_{t-1} * d_r                             recurrent dropout, d_r (B, H) per sequence
    W        = W_hh * D                                  DropConnect mask D (3H, H), per call
    gi       = x_t W_ih^T + b_ih                         (B, 3H)
    r        = sigma(gi_r + u W_hr^T + b_hr)             gate_activation
    z        = sigma(gi_z + u W_hz^T + b_hz)
    n        = phi(gi_n + r * (u W_hn^T + b_hn))         reset_after=True (torch), candidate_activation
             = phi(gi_n + (r * u) W_hn^T + b_hn)         reset_after=False (Cho et al. 2014)
    h~       = (1 - z) * n + z * h_{t-1}
    h_t      = k * h_{t-1} + (1 - k) * h~                zoneout mask k (B, H) per step; y_t = h_t

Masks are passed in explicitly (the modules draw them), so a kernel can be checked exactly.
With no masks and the default variant this is `gru.gru_forward` line for line.
"""

import numpy as np

from .lstm_variants import activate, derivative_from_output
from .variant import GRUVariant

PARAMETERS = ("w_ih", "w_hh", "b_ih", "b_hh")


def gru_variant_forward(x, h0, params, variant: GRUVariant, masks=None, reset_after=True):
    """Run one GRU layer with the equations `variant` selects.

    Args:
        x (T, B, I), h0 (B, H).
        params: dict with w_ih (3H, I), w_hh (3H, H), and as needed b_ih, b_hh (3H,); a
            missing key means absent.
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
    h = h0
    ys, steps = [], []
    for t in range(x.shape[0]):
        h_prev = h
        u = h_prev if "recurrent" not in masks else h_prev * masks["recurrent"]
        gi = x[t] @ p["w_ih"].T + b_ih                                 # (B, 3H)
        gh_rz = u @ w_hh[:2 * H].T + b_hh[:2 * H]                      # (B, 2H)
        r = activate(v.gate_activation, gi[:, :H] + gh_rz[:, :H])     # reset gate
        z = activate(v.gate_activation, gi[:, H:2 * H] + gh_rz[:, H:])  # update gate
        if reset_after:
            gh_n = u @ w_hh[2 * H:].T + b_hh[2 * H:]                   # (B, H)
            n = activate(v.candidate_activation, gi[:, 2 * H:] + r * gh_n)
        else:
            gh_n = None
            n = activate(v.candidate_activation,
                         gi[:, 2 * H:] + (r * u) @ w_hh[2 * H:].T + b_hh[2 * H:])
        h_new = (1.0 - z) * n + z * h_prev                             # h~
        k = masks["zoneout_h"][t] if "zoneout_h" in masks else None
        h = h_new if k is None else k * h_prev + (1.0 - k) * h_new
        steps.append(dict(x=x[t], h_prev=h_prev, u=u, r=r, z=z, n=n, gh_n=gh_n, k=k))
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
        if reset_after:                                        # a_n = gi_n + r * gh_n
            dr = da_n * st["gh_n"]
            dgh_n = da_n * r
            dw_hh_eff[2 * H:] += dgh_n.T @ u
            du = dgh_n @ w_hh[2 * H:]
        else:                                                  # a_n = gi_n + (r u) W_hn^T + b_hn
            d_ru = da_n @ w_hh[2 * H:]
            dr = d_ru * u
            dgh_n = da_n
            dw_hh_eff[2 * H:] += da_n.T @ (r * u)
            du = d_ru * r
        da_r = dr * derivative_from_output(v.gate_activation, r)
        da_z = dz * derivative_from_output(v.gate_activation, z)
        d_rz = np.concatenate([da_r, da_z], axis=1)            # (B, 2H), input and recurrent
        dgi = np.concatenate([d_rz, da_n], axis=1)             # (B, 3H)
        dw_hh_eff[:2 * H] += d_rz.T @ u
        du = du + d_rz @ w_hh[:2 * H]
        dh_prev += du if "recurrent" not in masks else du * masks["recurrent"]
        grads["w_ih"] += dgi.T @ st["x"]
        dx[t] = dgi @ p["w_ih"]
        db_ih += dgi.sum(axis=0)
        db_hh += np.concatenate([d_rz, dgh_n], axis=1).sum(axis=0)
        dh_next = dh_prev
    grads["w_hh"] = dw_hh_eff if "weight" not in masks else dw_hh_eff * masks["weight"]
    if p["b_ih"] is not None:
        grads["b_ih"] = db_ih
    if p["b_hh"] is not None:
        grads["b_hh"] = db_hh
    grads.update(x=dx, h0=dh_next)
    return grads
