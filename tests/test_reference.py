"""The NumPy reference's hand-derived backward against central finite differences (float64)."""

import numpy as np
import pytest

from lstmkit import reference

SHAPES = [  # (T, B, I, H)
    (1, 1, 1, 1),
    (1, 2, 3, 4),
    (4, 1, 2, 3),
    (5, 3, 4, 2),
]


def random(rng, *shape):
    return rng.standard_normal(shape)


def finite_difference_check(loss, arrays, grads, eps=1e-3, tol=1e-6):
    """Five-point central differences on every entry of every array.

    Passes when |numeric - analytic| / max(|numeric| + |analytic|, 1e-3) < tol: a relative error
    below `tol` for entries of size >= 1e-3, and an absolute error below tol * 1e-3 for smaller
    ones (a gradient that is exactly 0, e.g. through a dead relu, has no relative precision).
    The stencil's truncation error is O(eps^4) (~1e-13 at eps=1e-3) and its rounding error
    ~1e-16 |loss| / eps, far below both bounds.
    """
    for name, array in arrays.items():
        if array is None:
            assert grads[name] is None, name
            continue
        numeric = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            values = []
            for step in (2, 1, -1, -2):
                array[index] = saved + step * eps
                values.append(loss())
            array[index] = saved
            numeric[index] = (-values[0] + 8 * values[1] - 8 * values[2] + values[3]) / (12 * eps)
        analytic = grads[name]
        error = np.abs(numeric - analytic) / np.maximum(np.abs(numeric) + np.abs(analytic), 1e-3)
        assert error.max() < tol, f"{name}: relative error {error.max():.2e}"


@pytest.mark.parametrize("T,B,I,H,proj", [s + (0,) for s in SHAPES] + [(1, 2, 3, 4, 2), (5, 3, 4, 2, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_lstm_backward_matches_finite_differences(T, B, I, H, proj, bias):
    rng = np.random.default_rng(T * 100 + B * 10 + H)
    P = proj or H
    arrays = {
        "x": random(rng, T, B, I), "h0": random(rng, B, P), "c0": random(rng, B, H),
        "w_ih": random(rng, 4 * H, I), "w_hh": random(rng, 4 * H, P),
        "b_ih": random(rng, 4 * H) if bias else None, "b_hh": random(rng, 4 * H) if bias else None,
        "w_hr": random(rng, P, H) if proj else None,
    }
    dy, dh, dc = random(rng, T, B, P), random(rng, B, P), random(rng, B, H)

    def loss():
        y, h, c, _ = reference.lstm_forward(**arrays)
        return np.sum(y * dy) + np.sum(h * dh) + np.sum(c * dc)

    *_, cache = reference.lstm_forward(**arrays)
    grads = reference.lstm_backward(dy, dh, dc, cache)
    finite_difference_check(loss, arrays, grads)


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_backward_matches_finite_differences(T, B, I, H, bias, reset_after):
    rng = np.random.default_rng(T * 100 + B * 10 + H + 1)
    arrays = {
        "x": random(rng, T, B, I), "h0": random(rng, B, H),
        "w_ih": random(rng, 3 * H, I), "w_hh": random(rng, 3 * H, H),
        "b_ih": random(rng, 3 * H) if bias else None, "b_hh": random(rng, 3 * H) if bias else None,
    }
    dy, dh = random(rng, T, B, H), random(rng, B, H)

    def loss():
        y, h, _ = reference.gru_forward(**arrays, reset_after=reset_after)
        return np.sum(y * dy) + np.sum(h * dh)

    *_, cache = reference.gru_forward(**arrays, reset_after=reset_after)
    finite_difference_check(loss, arrays, reference.gru_backward(dy, dh, cache))


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_backward_matches_finite_differences(T, B, I, H, nonlinearity):
    rng = np.random.default_rng(T * 100 + B * 10 + H + 2)
    arrays = {
        "x": random(rng, T, B, I), "h0": random(rng, B, H),
        "w_ih": random(rng, H, I), "w_hh": random(rng, H, H),
        "b_ih": random(rng, H), "b_hh": random(rng, H),
    }
    dy, dh = random(rng, T, B, H), random(rng, B, H)

    def loss():
        y, h, _ = reference.rnn_forward(**arrays, nonlinearity=nonlinearity)
        return np.sum(y * dy) + np.sum(h * dh)

    *_, cache = reference.rnn_forward(**arrays, nonlinearity=nonlinearity)
    finite_difference_check(loss, arrays, reference.rnn_backward(dy, dh, cache))


def test_lstm_reference_follows_the_seed_equations_for_one_step():
    """One step written out by hand: c = f*c0 + i*g, h = o*tanh(c), gates in order i, f, g, o."""
    rng = np.random.default_rng(7)
    x, h0, c0 = random(rng, 1, 1, 2), random(rng, 1, 3), random(rng, 1, 3)
    w_ih, w_hh = random(rng, 12, 2), random(rng, 12, 3)
    a = x[0] @ w_ih.T + h0 @ w_hh.T
    sig = 1 / (1 + np.exp(-a))
    i, f, g, o = sig[:, 0:3], sig[:, 3:6], np.tanh(a[:, 6:9]), sig[:, 9:12]
    c = f * c0 + i * g
    y, h, c_T, _ = reference.lstm_forward(x, h0, c0, w_ih, w_hh)
    np.testing.assert_allclose(c_T, c, rtol=1e-14)
    np.testing.assert_allclose(h, o * np.tanh(c), rtol=1e-14)
    np.testing.assert_allclose(y[0], h, rtol=1e-14)


def test_sigmoid_is_finite_for_extreme_inputs():
    from lstmkit.reference._common import sigmoid

    s = sigmoid(np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0]))
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s[[0, 2, 4]], [0.0, 0.5, 1.0])


def test_rnn_rejects_unknown_nonlinearity():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="nonlinearity must be one of .* got 'gelu'"):
        reference.rnn_forward(random(rng, 1, 1, 1), random(rng, 1, 1), random(rng, 1, 1),
                              random(rng, 1, 1), nonlinearity="gelu")
