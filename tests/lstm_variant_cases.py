"""Shared by the variant, introspection and streaming tests: random LSTM-variant problems in
NumPy float64, and the comparison of the kernel against the reference."""

import numpy as np
import torch

from lstmkit import kernels
from lstmkit.kernels import StepLayout, native
from lstmkit.reference.lstm_variants import lstm_variant_backward, lstm_variant_forward
from lstmkit.reference.variant import LSTMVariant

# One variant per equation option, and combinations that exercise their interactions.
VARIANTS = {
    "plain": LSTMVariant(),
    "peepholes": LSTMVariant(peepholes=True),
    "cifg": LSTMVariant(cifg=True),
    "cifg_peepholes": LSTMVariant(cifg=True, peepholes=True),
    "no_input_gate": LSTMVariant(input_gate=False, peepholes=True),
    "no_forget_gate": LSTMVariant(forget_gate=False),
    "no_output_gate": LSTMVariant(output_gate=False, peepholes=True),
    "no_input_activation": LSTMVariant(cell_activation="identity"),
    "no_output_activation": LSTMVariant(output_activation="identity"),
    "hard_sigmoid_softsign": LSTMVariant(gate_activation="hard_sigmoid",
                                         cell_activation="softsign", output_activation="softsign"),
    "hardtanh": LSTMVariant(cell_activation="hardtanh", output_activation="hardtanh"),
    "layer_norm": LSTMVariant(layer_norm=True),
    "layer_norm_peepholes_cifg": LSTMVariant(layer_norm=True, peepholes=True, cifg=True),
    "full_gate_recurrence": LSTMVariant(full_gate_recurrence=True, peepholes=True),
    "full_gate_recurrence_cifg_no_output_gate": LSTMVariant(full_gate_recurrence=True, cifg=True,
                                                            output_gate=False),
}

LN_NAMES = ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias",
            "ln_cell_weight", "ln_cell_bias")


def random_problem(variant, T=4, B=2, I=3, H=3, P=None, bias=True, masks=(), seed=0):
    """Random float64 parameters, inputs, masks and output weights for one layer.

    masks: names among zoneout_h, zoneout_c, recurrent, weight to draw (as the modules do).
    """
    rng = np.random.default_rng(seed)
    P = P or H
    params = {"w_ih": rng.normal(size=(4 * H, I)) * 0.6, "w_hh": rng.normal(size=(4 * H, P)) * 0.6}
    if bias:
        params["b_ih"] = rng.normal(size=4 * H) * 0.4
        params["b_hh"] = rng.normal(size=4 * H) * 0.4
    if P != H:
        params["w_hr"] = rng.normal(size=(P, H)) * 0.6
    if variant.peepholes:
        params["w_peephole"] = rng.normal(size=3 * H) * 0.6
    if variant.full_gate_recurrence:
        params["w_gate"] = rng.normal(size=(3 * H, 3 * H)) * 0.6
    if variant.layer_norm:
        for name in LN_NAMES:
            size = H if "cell" in name else 4 * H
            base = 1.0 if name.endswith("weight") else 0.0
            params[name] = base + 0.3 * rng.normal(size=size)
    drawn = {}
    if "zoneout_h" in masks:
        drawn["zoneout_h"] = (rng.random((T, B, P)) < 0.3).astype(float)
    if "zoneout_c" in masks:
        drawn["zoneout_c"] = (rng.random((T, B, H)) < 0.3).astype(float)
    if "recurrent" in masks:
        drawn["recurrent"] = (rng.random((B, P)) < 0.7) / 0.7
    if "weight" in masks:
        drawn["weight"] = (rng.random((4 * H, P)) < 0.7) / 0.7
    inputs = {"x": rng.normal(size=(T, B, I)), "h0": rng.normal(size=(B, P)) * 0.5,
              "c0": rng.normal(size=(B, H)) * 0.5}
    out_weights = {"dy": rng.normal(size=(T, B, P)), "dh": rng.normal(size=(B, P)),
                   "dc": rng.normal(size=(B, H))}
    if variant.full_gate_recurrence:                  # the previous gates: a third state
        inputs["q0"] = rng.random((B, 3 * H))
        out_weights["dq"] = rng.normal(size=(B, 3 * H))
    return params, inputs, drawn, out_weights


def reference_result(variant, params, inputs, masks, out_weights):
    """Reference outputs and gradients of L = sum(dy*y) + sum(dh*h_T) + sum(dc*c_T)
    (+ sum(dq*q_T) with full gate recurrence). Outputs: (y, h_T, c_T[, q_T])."""
    y, h, c, cache = lstm_variant_forward(inputs["x"], inputs["h0"], inputs["c0"], params,
                                          variant, masks, q0=inputs.get("q0"))
    grads = lstm_variant_backward(out_weights["dy"], out_weights["dh"], out_weights["dc"], cache,
                                  dq_T=out_weights.get("dq"))
    if "q0" in inputs:
        return (y, h, c, cache[-1]), grads
    return (y, h, c), grads


def native_loops_ran(out) -> bool:
    """Whether the LSTMVariantFunction that made `out` ran its step loops natively."""
    return out.grad_fn.native_parts > 0


def kernel_result(variant, params, inputs, masks, out_weights, dtype, backend="auto"):
    """The same loss through `kernels.lstm_variant_layer` (DropConnect applied by autograd,
    as the modules do). Returns outputs and gradients as float64 NumPy arrays. It checks that
    the native loops ran with "native", and with "auto" where the native module is there."""
    T, B, _ = inputs["x"].shape

    def tensor(a, grad):
        return torch.tensor(a, dtype=dtype, requires_grad=grad)

    p = {name: tensor(value, True) for name, value in params.items()}
    ins = {name: tensor(value, True) for name, value in inputs.items()}
    weights = dict(p)
    if "weight" in masks:
        weights["w_hh"] = p["w_hh"] * tensor(masks["weight"], False)
    kernel_masks = {}
    for name in ("zoneout_h", "zoneout_c"):
        if name in masks:
            kernel_masks[name] = tensor(masks[name], False).reshape(T * B, -1)
    if "recurrent" in masks:
        kernel_masks["recurrent"] = tensor(masks["recurrent"], False)
    out, h, c, q, _, _ = kernels.lstm_variant_layer(
        ins["x"].reshape(T * B, -1), ins["h0"], ins["c0"], weights, kernel_masks, variant,
        q0=ins.get("q0"), layout=StepLayout.padded(T, B), backend=backend)
    native_expected = backend == "native" or (backend == "auto" and native.available())
    assert native_loops_ran(out) == native_expected
    loss = ((out * tensor(out_weights["dy"], False).reshape(T * B, -1)).sum()
            + (h * tensor(out_weights["dh"], False)).sum()
            + (c * tensor(out_weights["dc"], False)).sum())
    if q is not None:
        loss = loss + (q * tensor(out_weights["dq"], False)).sum()
    loss.backward()
    outputs = (out.detach().reshape(T, B, -1).double().numpy(), h.detach().double().numpy(),
               c.detach().double().numpy())
    if q is not None:
        outputs += (q.detach().double().numpy(),)
    grads = {name: t.grad.double().numpy() for name, t in {**p, **ins}.items()}
    grads["x"] = grads["x"].reshape(inputs["x"].shape)
    return outputs, grads


def relative_error(got, expected) -> float:
    """max |got - expected| / max(1, max |expected|), as conftest.assert_close scales: a
    gradient that is ~0 by cancellation (layer norm makes the output invariant to the scale
    of its input) is held to the precision of O(1) values, not to its own."""
    scale = max(1.0, float(np.abs(expected).max()))
    return float(np.abs(np.asarray(got) - expected).max()) / scale


def central_difference_errors(loss, arrays, grads, eps=1e-6):
    """Largest relative error of each analytic gradient grads[name] against central
    differences of loss() in each of the arrays (perturbed in place, then restored)."""
    errors = {}
    for name, array in arrays.items():
        numeric = np.zeros_like(array)
        flat, out = array.reshape(-1), numeric.reshape(-1)
        for k in range(flat.size):
            old = flat[k]
            flat[k] = old + eps
            up = loss()
            flat[k] = old - eps
            down = loss()
            flat[k] = old
            out[k] = (up - down) / (2 * eps)
        scale = max(np.abs(numeric).max(), np.abs(grads[name]).max())
        # A gradient that is exactly zero (a removed gate's weights) must be zero numerically.
        errors[name] = (np.abs(numeric - grads[name]).max() / scale if scale > 1e-7
                        else np.abs(numeric).max())
    return errors
