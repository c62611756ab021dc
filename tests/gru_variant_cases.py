"""Shared by the GRU-variant tests: random GRU-variant problems in NumPy float64, and the same
loss through the reference and through the kernel."""

import numpy as np
import torch

from lstmkit import kernels
from lstmkit.kernels import StepLayout, native
from lstmkit.reference.gru_variants import gru_variant_backward, gru_variant_forward
from lstmkit.reference.variant import GRUVariant

# One variant per equation option, and their combination.
VARIANTS = {
    "plain": GRUVariant(),
    "hard_sigmoid": GRUVariant(gate_activation="hard_sigmoid"),
    "softsign": GRUVariant(candidate_activation="softsign"),
    "hardtanh": GRUVariant(candidate_activation="hardtanh"),
    "hard_sigmoid_softsign": GRUVariant(gate_activation="hard_sigmoid",
                                        candidate_activation="softsign"),
    "layer_norm": GRUVariant(layer_norm=True),
    "layer_norm_softsign": GRUVariant(layer_norm=True, candidate_activation="softsign"),
}

LN_NAMES = ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias")

ALL_MASKS = ("zoneout_h", "recurrent", "weight")


def random_problem(variant, T=4, B=2, I=3, H=3, bias=True, masks=(), seed=0):
    """Random float64 parameters, inputs, masks and output weights for one layer.

    masks: names among zoneout_h, recurrent, weight to draw (as the modules do).
    """
    rng = np.random.default_rng(seed)
    params = {"w_ih": rng.normal(size=(3 * H, I)) * 0.6, "w_hh": rng.normal(size=(3 * H, H)) * 0.6}
    if bias:
        params["b_ih"] = rng.normal(size=3 * H) * 0.4
        params["b_hh"] = rng.normal(size=3 * H) * 0.4
    if variant.layer_norm:
        for name in LN_NAMES:
            base = 1.0 if name.endswith("weight") else 0.0
            params[name] = base + 0.3 * rng.normal(size=3 * H)
    drawn = {}
    if "zoneout_h" in masks:
        drawn["zoneout_h"] = (rng.random((T, B, H)) < 0.3).astype(float)
    if "recurrent" in masks:
        drawn["recurrent"] = (rng.random((B, H)) < 0.7) / 0.7
    if "weight" in masks:
        drawn["weight"] = (rng.random((3 * H, H)) < 0.7) / 0.7
    inputs = {"x": rng.normal(size=(T, B, I)), "h0": rng.normal(size=(B, H)) * 0.5}
    out_weights = {"dy": rng.normal(size=(T, B, H)), "dh": rng.normal(size=(B, H))}
    return params, inputs, drawn, out_weights


def reference_result(variant, params, inputs, masks, out_weights, reset_after=True):
    """Reference outputs (y, h_T) and gradients of L = sum(dy*y) + sum(dh*h_T)."""
    y, h, cache = gru_variant_forward(inputs["x"], inputs["h0"], params, variant, masks,
                                      reset_after=reset_after)
    grads = gru_variant_backward(out_weights["dy"], out_weights["dh"], cache)
    return (y, h), grads


def kernel_result(variant, params, inputs, masks, out_weights, dtype, reset_after=True,
                  backend="auto"):
    """The same loss through `kernels.gru_variant_layer` (DropConnect applied by autograd,
    as the modules do). Returns outputs and gradients as float64 NumPy arrays. It checks that
    the step loops ran natively where they can (backend "native", or "auto" with the native
    module there)."""
    T, B, _ = inputs["x"].shape

    def tensor(a, grad):
        return torch.tensor(a, dtype=dtype, requires_grad=grad)

    p = {name: tensor(value, True) for name, value in params.items()}
    ins = {name: tensor(value, True) for name, value in inputs.items()}
    weights = dict(p)
    if "weight" in masks:
        weights["w_hh"] = p["w_hh"] * tensor(masks["weight"], False)
    kernel_masks = {}
    if "zoneout_h" in masks:
        kernel_masks["zoneout_h"] = tensor(masks["zoneout_h"], False).reshape(T * B, -1)
    if "recurrent" in masks:
        kernel_masks["recurrent"] = tensor(masks["recurrent"], False)
    out, h, _ = kernels.gru_variant_layer(
        ins["x"].reshape(T * B, -1), ins["h0"], weights, kernel_masks, variant,
        layout=StepLayout.padded(T, B), reset_after=reset_after, backend=backend)
    native_expected = backend == "native" or (backend == "auto" and native.available())
    assert (out.grad_fn.native_parts > 0) == native_expected
    loss = ((out * tensor(out_weights["dy"], False).reshape(T * B, -1)).sum()
            + (h * tensor(out_weights["dh"], False)).sum())
    loss.backward()
    outputs = (out.detach().reshape(T, B, -1).double().numpy(), h.detach().double().numpy())
    grads = {name: t.grad.double().numpy() for name, t in {**p, **ins}.items()}
    grads["x"] = grads["x"].reshape(inputs["x"].shape)
    return outputs, grads
