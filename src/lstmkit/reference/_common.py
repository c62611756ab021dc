"""Activations and their derivatives, written in terms of the activation's *output*.

Backward passes keep the gate activations from the forward pass, so each derivative is
expressed through the value it differentiates: sigma' = s(1 - s), tanh' = 1 - t^2.
"""

import numpy as np


def sigmoid(a):
    """Logistic function 1 / (1 + e^-a), evaluated without overflow for large |a|."""
    out = np.empty_like(a)
    positive = a >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-a[positive]))
    e = np.exp(a[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def dsigmoid_from_output(s):
    return s * (1.0 - s)


def dtanh_from_output(t):
    return 1.0 - t * t


def zeros_like_or_none(w):
    return None if w is None else np.zeros_like(w)


def add_bias(a, b):
    return a if b is None else a + b
