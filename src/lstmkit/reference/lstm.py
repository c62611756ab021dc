"""LSTM in NumPy float64: the seed equations one line each, and their backward through time.

Shape key: T time, B batch, I input features, H hidden units, P projection size
(P = H without projection). Weight layout and gate order follow torch.nn.LSTM:
rows of w_ih (4H, I) and w_hh (4H, P) are stacked as [input i | forget f | candidate g | output o].

Forward, for t = 0 .. T-1 (x_t is (B, I), h_{t-1} is (B, P), c_{t-1} is (B, H)):

    i_t = sigma(x_t W_ii^T + b_ii + h_{t-1} W_hi^T + b_hi)     input ("update") gate
    f_t = sigma(x_t W_if^T + b_if + h_{t-1} W_hf^T + b_hf)     forget gate
    g_t = tanh (x_t W_ig^T + b_ig + h_{t-1} W_hg^T + b_hg)     candidate memory
    o_t = sigma(x_t W_io^T + b_io + h_{t-1} W_ho^T + b_ho)     output gate
    c_t = f_t * c_{t-1} + i_t * g_t                            cell state
    m_t = o_t * tanh(c_t)                                      gated output
    h_t = m_t W_hr^T   (with projection)   or   h_t = m_t      hidden state = output y_t
"""

import numpy as np

from ._common import add_bias, dsigmoid_from_output, dtanh_from_output, sigmoid, zeros_like_or_none


def lstm_forward(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
    """Run one LSTM layer over a batch of sequences.

    Args:
        x: (T, B, I) inputs.  h0: (B, P) and c0: (B, H) initial states.
        w_ih: (4H, I), w_hh: (4H, P), b_ih, b_hh: (4H,) or None, w_hr: (P, H) or None.
    Returns:
        y (T, B, P), h_T (B, P), c_T (B, H), and a cache for `lstm_backward`.
    """
    T = x.shape[0]
    H = w_hh.shape[0] // 4
    h, c = h0, c0
    ys, steps = [], []
    for t in range(T):
        a = add_bias(x[t] @ w_ih.T, b_ih) + add_bias(h @ w_hh.T, b_hh)  # (B, 4H) pre-activations
        i = sigmoid(a[:, 0 * H:1 * H])                                   # input gate
        f = sigmoid(a[:, 1 * H:2 * H])                                   # forget gate
        g = np.tanh(a[:, 2 * H:3 * H])                                   # candidate memory
        o = sigmoid(a[:, 3 * H:4 * H])                                   # output gate
        c_prev, h_prev = c, h
        c = f * c_prev + i * g                                           # cell state
        tanh_c = np.tanh(c)
        m = o * tanh_c                                                   # (B, H)
        h = m if w_hr is None else m @ w_hr.T                            # (B, P)
        steps.append((x[t], h_prev, c_prev, i, f, g, o, tanh_c, m))
        ys.append(h)
    cache = (steps, w_ih, w_hh, b_ih, b_hh, w_hr)
    return np.stack(ys), h, c, cache


def lstm_backward(dy, dh_T, dc_T, cache):
    """Backward through time for `lstm_forward`.

    Args:
        dy: (T, B, P) gradient of the loss w.r.t. every output y_t.
        dh_T: (B, P), dc_T: (B, H) gradients w.r.t. the final states (zeros if unused).
    Returns:
        dict of gradients: x (T, B, I), h0 (B, P), c0 (B, H), w_ih, w_hh, b_ih, b_hh, w_hr
        (same shapes as the parameters; None where the parameter is None).
    """
    steps, w_ih, w_hh, b_ih, b_hh, w_hr = cache
    grads = {name: zeros_like_or_none(w) for name, w in
             (("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh), ("w_hr", w_hr))}
    dx = np.zeros((len(steps),) + steps[0][0].shape)
    dh_next, dc_next = dh_T, dc_T
    for t in range(len(steps) - 1, -1, -1):
        x_t, h_prev, c_prev, i, f, g, o, tanh_c, m = steps[t]
        dh = dy[t] + dh_next                                    # (B, P): from the output and from t+1
        if w_hr is None:
            dm = dh
        else:
            grads["w_hr"] += dh.T @ m                           # h = m W_hr^T
            dm = dh @ w_hr                                      # (B, H)
        do = dm * tanh_c                                        # m = o * tanh(c)
        dc = dc_next + dm * o * dtanh_from_output(tanh_c)       # (B, H)
        di = dc * g                                             # c = f * c_prev + i * g
        df = dc * c_prev
        dg = dc * i
        dc_next = dc * f
        da = np.concatenate([                                   # (B, 4H) through the activations
            di * dsigmoid_from_output(i),
            df * dsigmoid_from_output(f),
            dg * dtanh_from_output(g),
            do * dsigmoid_from_output(o),
        ], axis=1)
        dx[t] = da @ w_ih                                       # a = x W_ih^T + h W_hh^T + b
        dh_next = da @ w_hh
        grads["w_ih"] += da.T @ x_t
        grads["w_hh"] += da.T @ h_prev
        if b_ih is not None:
            grads["b_ih"] += da.sum(axis=0)
        if b_hh is not None:
            grads["b_hh"] += da.sum(axis=0)
    grads.update(x=dx, h0=dh_next, c0=dc_next)
    return grads
