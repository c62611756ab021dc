"""GRU in NumPy float64, in torch.nn.GRU's convention and the textbook one.

Shape key: T time, B batch, I input features, H hidden units. Rows of w_ih (3H, I) and
w_hh (3H, H) are stacked as [reset r | update z | new n], as in torch.nn.GRU.

    r_t = sigma(x_t W_ir^T + b_ir + h_{t-1} W_hr^T + b_hr)          reset gate
    z_t = sigma(x_t W_iz^T + b_iz + h_{t-1} W_hz^T + b_hz)          update gate
    reset after  (torch, cuDNN):  n_t = tanh(x_t W_in^T + b_in + r_t * (h_{t-1} W_hn^T + b_hn))
    reset before (Cho et al. 2014): n_t = tanh(x_t W_in^T + b_in + (r_t * h_{t-1}) W_hn^T + b_hn)
    h_t = (1 - z_t) * n_t + z_t * h_{t-1}
"""

import numpy as np

from ._common import add_bias, dsigmoid_from_output, dtanh_from_output, sigmoid, zeros_like_or_none


def gru_forward(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, reset_after=True):
    """Run one GRU layer. x (T, B, I), h0 (B, H) -> y (T, B, H), h_T (B, H), cache."""
    H = w_hh.shape[0] // 3
    w_hn = w_hh[2 * H:]
    b_hn = None if b_hh is None else b_hh[2 * H:]
    h = h0
    ys, steps = [], []
    for t in range(x.shape[0]):
        gi = add_bias(x[t] @ w_ih.T, b_ih)                      # (B, 3H) input part
        gh_rz = add_bias(h @ w_hh[:2 * H].T, None if b_hh is None else b_hh[:2 * H])
        r = sigmoid(gi[:, :H] + gh_rz[:, :H])                   # reset gate
        z = sigmoid(gi[:, H:2 * H] + gh_rz[:, H:])              # update gate
        if reset_after:
            gh_n = add_bias(h @ w_hn.T, b_hn)                   # (B, H)
            n = np.tanh(gi[:, 2 * H:] + r * gh_n)               # new memory
        else:
            gh_n = None
            n = np.tanh(gi[:, 2 * H:] + add_bias((r * h) @ w_hn.T, b_hn))
        h_prev = h
        h = (1.0 - z) * n + z * h_prev
        steps.append((x[t], h_prev, r, z, n, gh_n))
        ys.append(h)
    return np.stack(ys), h, (steps, w_ih, w_hh, b_ih, b_hh, reset_after)


def gru_backward(dy, dh_T, cache):
    """Backward through time for `gru_forward`. Returns dict: x, h0, w_ih, w_hh, b_ih, b_hh."""
    steps, w_ih, w_hh, b_ih, b_hh, reset_after = cache
    H = w_hh.shape[0] // 3
    w_hn = w_hh[2 * H:]
    grads = {name: zeros_like_or_none(w) for name, w in
             (("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh))}
    dx = np.zeros((len(steps),) + steps[0][0].shape)
    dh_next = dh_T
    for t in range(len(steps) - 1, -1, -1):
        x_t, h_prev, r, z, n, gh_n = steps[t]
        dh = dy[t] + dh_next
        dn = dh * (1.0 - z)                                     # h = (1 - z) n + z h_prev
        dz = dh * (h_prev - n)
        dh_prev = dh * z
        dan = dn * dtanh_from_output(n)                         # (B, H) pre-activation of n
        if reset_after:
            dr = dan * gh_n
            dgh_n = dan * r                                     # through r * (h W_hn^T + b_hn)
            dh_prev = dh_prev + dgh_n @ w_hn
            grads["w_hh"][2 * H:] += dgh_n.T @ h_prev
        else:
            d_rh = dan @ w_hn                                   # through (r * h) W_hn^T
            dr = d_rh * h_prev
            dh_prev = dh_prev + d_rh * r
            dgh_n = dan
            grads["w_hh"][2 * H:] += dan.T @ (r * h_prev)
        dar = dr * dsigmoid_from_output(r)
        daz = dz * dsigmoid_from_output(z)
        d_rz = np.concatenate([dar, daz], axis=1)               # (B, 2H), shared by input and hidden
        dgi = np.concatenate([d_rz, dan], axis=1)               # (B, 3H)
        dh_prev = dh_prev + d_rz @ w_hh[:2 * H]
        grads["w_hh"][:2 * H] += d_rz.T @ h_prev
        grads["w_ih"] += dgi.T @ x_t
        dx[t] = dgi @ w_ih
        if b_ih is not None:
            grads["b_ih"] += dgi.sum(axis=0)
        if b_hh is not None:
            grads["b_hh"] += np.concatenate([d_rz, dgh_n], axis=1).sum(axis=0)
        dh_next = dh_prev
    grads.update(x=dx, h0=dh_next)
    return grads
