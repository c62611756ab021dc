"""GRU variants: reference vs finite differences, kernel vs reference, modules vs torch.nn,
stochastic regularisers, initialisation options, traces, streaming and the errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lstmkit
from conftest import native_setting
from gru_variant_cases import ALL_MASKS, VARIANTS, kernel_result, random_problem, reference_result
from lstm_variant_cases import central_difference_errors, relative_error
from lstmkit import kernels
from lstmkit.kernels import StepLayout
from lstmkit.nn import _gru_variant
from lstmkit.reference import gru_backward, gru_forward
from lstmkit.reference.gru_variants import gru_variant_backward, gru_variant_forward
from lstmkit.reference.variant import GRUVariant

# float32 kernel vs float64 reference: a few hundred roundings of 6e-8 over these sizes.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
RESET = pytest.mark.parametrize("reset_after", [True, False], ids=["reset_after", "reset_before"])
PARAMETER_NAMES = {"weight_ih": "w_ih", "weight_hh": "w_hh", "bias_ih": "b_ih",
                   "bias_hh": "b_hh"}
LN_PARAMETERS = ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias")
EVERY_EQUATION = GRUVariant(layer_norm=True, gate_activation="hard_sigmoid",
                            candidate_activation="softsign")


def _module_params(module, suffix):
    """One layer's parameters as NumPy arrays, under the kernels' names."""
    names = {**PARAMETER_NAMES, **{name: name for name in LN_PARAMETERS}}
    return {arg: getattr(module, stem + suffix).detach().numpy()
            for stem, arg in names.items() if hasattr(module, stem + suffix)}


def finite_difference_errors(variant, params, inputs, masks, out_weights, reset_after):
    """Largest relative error of each analytic gradient against central differences."""
    _, grads = reference_result(variant, params, inputs, masks, out_weights, reset_after)

    def loss():
        (y, h), _ = reference_result(variant, params, inputs, masks, out_weights, reset_after)
        return (y * out_weights["dy"]).sum() + (h * out_weights["dh"]).sum()

    return central_difference_errors(loss, {**params, **inputs}, grads)


def _assert_matches(outs, grads, ref_out, ref_grads, tol):
    for got, expected in zip(outs, ref_out, strict=True):
        assert relative_error(got, expected) < tol
    for key, expected in ref_grads.items():
        assert relative_error(grads[key], expected) < tol, key


# -- the reference ------------------------------------------------------------------------------


@RESET
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_reference_gradients_match_finite_differences(name, reset_after):
    variant = VARIANTS[name]
    problem = random_problem(variant, T=3, B=2, I=2, H=3, masks=ALL_MASKS, seed=1)
    errors = finite_difference_errors(variant, *problem, reset_after)
    assert max(errors.values()) < 1e-6, errors


@RESET
def test_reference_gradients_without_bias_or_masks(reset_after):
    variant = GRUVariant(candidate_activation="hardtanh")
    problem = random_problem(variant, T=3, B=1, I=2, H=2, bias=False, seed=2)
    errors = finite_difference_errors(variant, *problem, reset_after)
    assert max(errors.values()) < 1e-6, errors


@RESET
def test_reference_default_variant_is_the_plain_reference(reset_after):
    params, inputs, _, w = random_problem(GRUVariant(), T=5, B=3, I=4, H=5, seed=3)
    y, h, cache = gru_variant_forward(inputs["x"], inputs["h0"], params, GRUVariant(),
                                      reset_after=reset_after)
    grads = gru_variant_backward(w["dy"], w["dh"], cache)
    y0, h0, cache0 = gru_forward(inputs["x"], inputs["h0"], params["w_ih"], params["w_hh"],
                                 params["b_ih"], params["b_hh"], reset_after=reset_after)
    grads0 = gru_backward(w["dy"], w["dh"], cache0)
    np.testing.assert_allclose(y, y0, rtol=0, atol=1e-14)
    np.testing.assert_allclose(h, h0, rtol=0, atol=1e-14)
    for name in ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"):
        np.testing.assert_allclose(grads[name], grads0[name], rtol=0, atol=1e-12)


def test_reference_zoneout_keeps_the_masked_units():
    """The equation itself: where the zoneout mask is 1 the unit keeps its previous value."""
    variant = GRUVariant()
    params, inputs, masks, _ = random_problem(variant, T=6, B=2, I=3, H=4, masks=["zoneout_h"],
                                              seed=4)
    y, _, _ = gru_variant_forward(inputs["x"], inputs["h0"], params, variant, masks)
    previous = np.concatenate([inputs["h0"][None], y[:-1]])
    kept = masks["zoneout_h"] == 1
    assert kept.any() and (~kept).any()
    np.testing.assert_array_equal(y[kept], previous[kept])
    assert np.all(y[~kept] != previous[~kept])


# -- the kernel against the reference ----------------------------------------------------------


@RESET
@pytest.mark.parametrize("backend", ["portable", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_kernel_matches_reference(name, dtype, backend, reset_after):
    """"auto" runs layer norm's step loops natively (kernel_result checks it)."""
    variant = VARIANTS[name]
    problem = random_problem(variant, T=5, B=3, I=4, H=5, masks=ALL_MASKS, seed=5)
    ref_out, ref_grads = reference_result(variant, *problem, reset_after)
    outs, grads = kernel_result(variant, *problem, dtype=dtype, reset_after=reset_after,
                                backend=backend)
    _assert_matches(outs, grads, ref_out, ref_grads, TOLERANCE[dtype])


@RESET
@pytest.mark.parametrize("parts", [1, 3])
@pytest.mark.parametrize("masks", [(), ALL_MASKS], ids=["no-masks", "all-masks"])
@pytest.mark.parametrize("shape", [
    dict(T=1, B=1, I=1, H=1),                 # one step, one sequence, one unit
    dict(T=6, B=13, I=3, H=3),                # 13 rows (three row parts of 4-5)
    dict(T=3, B=13, I=5, H=127),              # wide: partial vector blocks in every row
    dict(T=200, B=2, I=2, H=3),               # long
], ids=["tiny", "rows", "wide", "long"])
@pytest.mark.parametrize("variant", [EVERY_EQUATION,
                                     GRUVariant(gate_activation="hard_sigmoid", zoneout_h=0.1)],
                         ids=["layer-norm", "activations"])
def test_native_variant_loops_match_reference(variant, shape, masks, parts, reset_after,
                                              monkeypatch):
    """The native variant loops (float64), with and without layer norm, at odd sizes with one
    or three row parts (native.MAX_ROW_PARTS) and every mask."""
    monkeypatch.setattr(kernels.native, "MAX_ROW_PARTS", parts)
    problem = random_problem(variant, **shape, masks=masks, seed=11)
    ref_out, ref_grads = reference_result(variant, *problem, reset_after)
    outs, grads = kernel_result(variant, *problem, dtype=torch.float64,
                                reset_after=reset_after)
    _assert_matches(outs, grads, ref_out, ref_grads, 1e-10)


@RESET
@pytest.mark.parametrize("streaming", [False, True], ids=["stores", "streaming"])
@pytest.mark.parametrize("H", [16, 17, 127])
def test_native_layer_norm_loops_in_float32(H, reset_after, streaming):
    """(Smaller H in float64 above: layer norm over few units is ill-conditioned in float32.)
    "streaming": the saved gates and d_gi take streaming stores at any size (see
    set_stream_min_bytes), as they do from 16 MiB."""
    variant = GRUVariant(layer_norm=True)
    problem = random_problem(variant, T=7, B=9, I=4, H=H, masks=ALL_MASKS, seed=12)
    ref_out, ref_grads = reference_result(variant, *problem, reset_after)
    with native_setting("stream_min_bytes", 0 if streaming else None):
        outs, grads = kernel_result(variant, *problem, dtype=torch.float32,
                                    reset_after=reset_after)
    _assert_matches(outs, grads, ref_out, ref_grads, TOLERANCE[torch.float32])


@RESET
def test_native_layer_norm_module_matches_portable(reset_after, same_masks):
    """lstmkit.GRU with layer norm, two bidirectional layers, packed sequences, training
    masks: the native loops against the portable ones, the same masks from the same seed."""
    variant = GRUVariant(layer_norm=True, zoneout_h=0.2, recurrent_dropout=0.2, weight_drop=0.1,
                         candidate_activation="softsign")
    torch.manual_seed(3)
    modules = [lstmkit.GRU(3, 5, num_layers=2, bidirectional=True, variant=variant,
                           reset_after=reset_after, dtype=torch.float64, backend=backend)
               for backend in ("auto", "portable")]
    modules[1].load_state_dict(modules[0].state_dict())
    with torch.no_grad():                         # move layer-norm parameters off 1 and 0
        for module in modules:
            torch.manual_seed(4)
            for name, p in module.named_parameters():
                if name.startswith("ln_"):
                    p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    results = []
    for module in modules:
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)
        out, h = module(xi, lengths=torch.tensor([6, 4, 1]))
        (out.sum() + h.sum()).backward()
        results.append([out.detach(), h.detach(), xi.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_native_variant_loops_check_their_arguments():
    """The GRU's native loops name a bad argument in a ValueError (masks, batch sizes, saved
    tensors), never reading out of bounds."""
    m = kernels.native.module()
    T, B, H = 2, 2, 3
    z = torch.zeros
    h0, w_hh, good_gi = z(B, H), z(3 * H, H), z(T * B, 3 * H)

    def forward(gi=good_gi, zoneout_h=None, batch_sizes=(B,) * T, gain=None, layer_norm=True):
        return m.gru_variant_loops_forward(gi, None, None, h0, w_hh, zoneout_h, None, layer_norm,
                                           gain, None, 1e-5, list(batch_sizes), False, True,
                                           True, 1, 0)

    out, _, stash, h_pre, mean, rstd = forward()
    assert forward(layer_norm=False)[3] is None               # no layer-norm stash without it
    for change, words in ((dict(gi=z(T * B, 3 * H + 1)), "gi must be"),
                          (dict(zoneout_h=z(T * B, H + 1)), "zoneout_h must have"),
                          (dict(batch_sizes=(1, 3)), "never grow"),
                          (dict(gain=z(3 * H + 1)), "ln_hh_weight must be"),
                          (dict(gain=z(3 * H), layer_norm=False),
                           "layer-norm parameters given with layer_norm=False")):
        with pytest.raises(ValueError, match=words):
            forward(**change)

    def backward(recurrent=None, zoneout_h=None, batch_sizes=(B,) * T, stash=stash,
                 saved=(h_pre, mean, rstd)):
        return m.gru_variant_loops_backward(z(T * B, H), z(B, H), h0, w_hh, out, stash, *saved,
                                            None, zoneout_h, recurrent, list(batch_sizes),
                                            False, True, 1, 0)

    assert backward()[0].shape == (T * B, 3 * H)
    assert backward(saved=(None, None, None))[2] is None      # d_product is d_gh without LN
    for change, words in ((dict(recurrent=z(1, 1)), "recurrent must have"),
                          (dict(zoneout_h=z(T * B, 1)), "zoneout_h must have"),
                          (dict(batch_sizes=(4,)), "batch_sizes"),
                          (dict(stash=z(T * B, 3 * H)), "stash must have"),
                          (dict(saved=(h_pre, None, rstd)), "needs h_pre, mean and rstd")):
        with pytest.raises(ValueError, match=words):
            backward(**change)


@RESET
def test_native_layer_norm_loops_split_rows_across_threads(reset_after, monkeypatch):
    """One row part of 130 rows at hidden 64: each step's per-row work split across threads."""
    monkeypatch.setattr(kernels.native, "MAX_ROW_PARTS", 1)
    problem = random_problem(EVERY_EQUATION, T=3, B=130, I=3, H=64, masks=ALL_MASKS, seed=14)
    ref_out, ref_grads = reference_result(EVERY_EQUATION, *problem, reset_after)
    outs, grads = kernel_result(EVERY_EQUATION, *problem, dtype=torch.float64,
                                reset_after=reset_after)
    _assert_matches(outs, grads, ref_out, ref_grads, 1e-10)


@pytest.mark.parametrize("name, shape", [("weight_ih_l0", (12, 1)), ("ln_ih_weight_l0", (1,)),
                                         ("ln_ih_bias_l0", (2,)), ("ln_hh_weight_l0", (3, 4)),
                                         ("weight_hh_l0", (12, 5))])
def test_native_layer_norm_loops_refuse_replaced_parameters(name, shape):
    module = lstmkit.GRU(3, 4, variant=GRUVariant(layer_norm=True), backend="native")
    setattr(module, name, torch.nn.Parameter(torch.randn(*shape)))
    with pytest.raises(ValueError, match="must|do not fit"):
        module(torch.randn(5, 2, 3))


@RESET
def test_native_layer_norm_inference_matches_training(reset_after):
    """No_grad inference (the native loops save nothing) gives the training forward's results;
    return_gates the portable loops' gates."""
    variant = GRUVariant(layer_norm=True, candidate_activation="softsign")
    torch.manual_seed(6)
    modules = [lstmkit.GRU(3, 5, variant=variant, reset_after=reset_after, dtype=torch.float64,
                           backend=backend) for backend in ("auto", "portable")]
    modules[1].load_state_dict(modules[0].state_dict())
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    trained, h = modules[0](x)
    with torch.no_grad():
        inferred, h_i = modules[0](x)
        _, _, trace = modules[0](x, return_gates=True)
    _, _, expected = modules[1](x, return_gates=True)
    torch.testing.assert_close(trained.detach(), inferred, rtol=0, atol=0)
    torch.testing.assert_close(h.detach(), h_i, rtol=0, atol=0)
    params = {k: torch.tensor(v) for k, v in random_problem(variant, I=3, H=4)[0].items()}
    with torch.no_grad():
        *_, gates = kernels.gru_variant_layer(torch.randn(6, 3, dtype=torch.float64),
                                              torch.zeros(2, 4, dtype=torch.float64), params, {},
                                              variant, layout=StepLayout.padded(3, 2),
                                              reset_after=reset_after, gates=False)
    assert gates.numel() == 0
    for gate in ("r", "z", "n", "h"):
        torch.testing.assert_close(trace[0, "forward"][gate], expected[0, "forward"][gate],
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", [GRUVariant(layer_norm=True), GRUVariant(zoneout_h=0.2)],
                         ids=["layer-norm", "zoneout"])
def test_native_variant_loops_backend_choices(variant):
    """backend "native" and "auto" run the GRU variants' loops natively, "portable" the Python
    loops."""
    problem = random_problem(variant, T=4, B=2, I=3, H=4, masks=("zoneout_h",), seed=13)
    for backend in ("native", "auto", "portable"):
        kernel_result(variant, *problem, dtype=torch.float64,
                      backend=backend)                             # checks which loops ran


@RESET
@pytest.mark.parametrize("shape", [
    dict(T=1, B=1, I=1, H=1),                 # one step, one sequence, one unit
    dict(T=7, B=1, I=3, H=3),                 # batch 1, odd sizes
    dict(T=3, B=2, I=5, H=127),               # wide
    dict(T=300, B=2, I=2, H=3),               # long
], ids=["T1_B1_H1", "B1_H3", "H127", "T300"])
def test_kernel_matches_reference_at_odd_sizes(shape, reset_after):
    variant = EVERY_EQUATION
    problem = random_problem(variant, **shape, masks=ALL_MASKS, seed=6)
    ref_out, ref_grads = reference_result(variant, *problem, reset_after)
    # float32 over 300 steps: rounding compounds through the recurrence (and layer norm's
    # division) to ~1e-4, so the long sequence is held to float64's tolerance only.
    for dtype in (torch.float64,) if shape["T"] > 100 else (torch.float64, torch.float32):
        outs, grads = kernel_result(variant, *problem, dtype=dtype, reset_after=reset_after)
        _assert_matches(outs, grads, ref_out, ref_grads, TOLERANCE[dtype])


@RESET
@pytest.mark.parametrize("backend", ["portable", "auto"])
def test_kernel_packed_and_reverse_match_reference_per_sequence(backend, reset_after):
    """Packed sequences of different lengths, both directions, with zoneout and recurrent
    dropout masks: each sequence as the reference runs it alone (reverse = the reference on
    the time-flipped sequence)."""
    variant = GRUVariant(candidate_activation="softsign", layer_norm=True)
    lengths = (5, 3, 2)
    H = 3
    params, _, _, _ = random_problem(variant, I=3, H=H, seed=7)
    rng = np.random.default_rng(7)
    seqs = [rng.normal(size=(n, 3)) for n in lengths]
    h0 = rng.normal(size=(3, H))
    layout = StepLayout.packed([sum(n > t for n in lengths) for t in range(max(lengths))])
    x = np.concatenate([np.stack([s[t] for s in seqs if len(s) > t])
                        for t in range(max(lengths))])
    zoneout = (rng.random((layout.rows, H)) < 0.3).astype(float)
    recurrent = (rng.random((3, H)) < 0.7) / 0.7
    masks = {"zoneout_h": torch.tensor(zoneout), "recurrent": torch.tensor(recurrent)}
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    for reverse in (False, True):
        xt = torch.tensor(x, requires_grad=True)
        h0t = torch.tensor(h0, requires_grad=True)
        out, h_T, _ = kernels.gru_variant_layer(xt, h0t, p, masks, variant, layout=layout,
                                                reverse=reverse, reset_after=reset_after,
                                                backend=backend)
        assert (out.grad_fn.native_parts > 0) == (backend == "auto")
        (out.sum() + h_T.sum()).backward()
        for b, seq in enumerate(seqs):
            rows = [layout.offsets[t] + b for t in range(len(seq))]
            order = (lambda a: a[::-1]) if reverse else (lambda a: a)
            seq_masks = {"zoneout_h": order(zoneout[rows])[:, None],
                         "recurrent": recurrent[b:b + 1]}
            y, h, cache = gru_variant_forward(order(seq)[:, None], h0[b:b + 1], params, variant,
                                              seq_masks, reset_after=reset_after)
            grads = gru_variant_backward(np.ones_like(y), np.ones_like(h), cache)
            np.testing.assert_allclose(out.detach().numpy()[rows], order(y[:, 0]), atol=1e-12)
            np.testing.assert_allclose(h_T.detach().numpy()[b], h[0], atol=1e-12)
            np.testing.assert_allclose(xt.grad.numpy()[rows], order(grads["x"][:, 0]),
                                       atol=1e-12)
            np.testing.assert_allclose(h0t.grad.numpy()[b], grads["h0"][0], atol=1e-12)


@RESET
@pytest.mark.parametrize("variant", [
    GRUVariant(),
    GRUVariant(gate_activation="hard_sigmoid", candidate_activation="softsign"),
    GRUVariant(candidate_activation="hardtanh"),
    GRUVariant(layer_norm=True),
], ids=["plain", "hard_sigmoid_softsign", "hardtanh", "layer_norm"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["portable", "auto"])
def test_variant_function_gradcheck(variant, bias, backend, reset_after):
    """(With "auto", layer norm runs on the native loops.)"""
    torch.manual_seed(0)
    T, B, I, H = 3, 2, 2, 3
    layout = StepLayout.padded(T, B)

    def leaf(*shape, scale=0.5, offset=0.0):
        return (offset + scale * torch.randn(*shape, dtype=torch.float64)).requires_grad_()

    params = {"w_ih": leaf(3 * H, I), "w_hh": leaf(3 * H, H)}
    if bias:
        params.update(b_ih=leaf(3 * H), b_hh=leaf(3 * H))
    if variant.layer_norm:
        for name in LN_PARAMETERS:
            params[name] = leaf(3 * H, offset=1.0 if name.endswith("weight") else 0.0)
    masks = {"zoneout_h": torch.bernoulli(torch.full((T * B, H), 0.3, dtype=torch.float64)),
             "recurrent": torch.bernoulli(torch.full((B, H), 0.7, dtype=torch.float64)) / 0.7}
    names = list(params)

    def run(x, h0, *values):
        out, h, _ = kernels.gru_variant_layer(x, h0, dict(zip(names, values, strict=True)),
                                              masks, variant, layout=layout,
                                              reset_after=reset_after, backend=backend)
        assert (out.grad_fn.native_parts > 0) == (backend == "auto")
        return out, h

    assert torch.autograd.gradcheck(run, (leaf(T * B, I), leaf(B, H), *params.values()))


@settings(max_examples=25, deadline=None)
@given(
    gate=st.sampled_from(["sigmoid", "hard_sigmoid"]),
    candidate=st.sampled_from(["tanh", "softsign", "hardtanh"]), layer_norm=st.booleans(),
    masks=st.lists(st.sampled_from(ALL_MASKS), unique=True), reset_after=st.booleans(),
    T=st.integers(1, 5), B=st.integers(1, 3), I=st.integers(1, 3), H=st.integers(1, 4),
    bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_any_combination_of_options_matches_reference(gate, candidate, layer_norm, masks,
                                                      reset_after, T, B, I, H, bias, seed):
    variant = GRUVariant(gate_activation=gate, candidate_activation=candidate,
                         layer_norm=layer_norm)
    problem = random_problem(variant, T=T, B=B, I=I, H=H, bias=bias, masks=masks, seed=seed)
    ref_out, ref_grads = reference_result(variant, *problem, reset_after)
    outs, grads = kernel_result(variant, *problem, dtype=torch.float64, reset_after=reset_after)
    _assert_matches(outs, grads, ref_out, ref_grads, 1e-10)


# -- modules -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [
    None, GRUVariant(), GRUVariant(update_bias=1.0), GRUVariant(orthogonal_init=True),
    GRUVariant(recurrent_dropout=0.3, weight_drop=0.4, zoneout_h=0.2),
    GRUVariant(gate_activation="sigmoid", candidate_activation="tanh", zoneout_eval="expectation"),
], ids=["none", "default", "update_bias", "orthogonal", "dropouts_in_eval", "options_off"])
def test_module_with_equations_unchanged_is_torch_nn(variant):
    torch.manual_seed(0)
    ours = lstmkit.GRU(3, 5, num_layers=2, bidirectional=True, variant=variant,
                       dtype=torch.float64).eval()
    theirs = torch.nn.GRU(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64).eval()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        out, h = module(xi)
        (out.sum() + h.sum()).backward()
        results.append([out.detach(), h.detach(), xi.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_variant_kernel_with_options_off_is_torch_nn():
    """The variant kernel itself (forced by zoneout in training with all masks zero) against
    torch.nn.GRU: values and gradients."""
    torch.manual_seed(1)
    theirs = torch.nn.GRU(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    out_t, h_t = theirs(x)
    (out_t.sum() + h_t.sum()).backward()
    weights = {arg: getattr(theirs, stem + "_l0").detach().clone().requires_grad_()
               for stem, arg in PARAMETER_NAMES.items()}
    xo = x.detach().clone().requires_grad_()
    masks = {"zoneout_h": torch.zeros(10, 4, dtype=torch.float64),
             "recurrent": torch.ones(2, 4, dtype=torch.float64)}
    out, h, _ = kernels.gru_variant_layer(xo.reshape(10, 3), torch.zeros(2, 4,
                                                                         dtype=torch.float64),
                                          weights, masks, GRUVariant(),
                                          layout=StepLayout.padded(5, 2))
    (out.sum() + h.sum()).backward()
    torch.testing.assert_close(out.reshape(5, 2, 4), out_t, rtol=0, atol=1e-12)
    torch.testing.assert_close(xo.grad, x.grad, rtol=0, atol=1e-12)
    for stem, arg in PARAMETER_NAMES.items():
        torch.testing.assert_close(weights[arg].grad, getattr(theirs, stem + "_l0").grad,
                                   rtol=0, atol=1e-12)


def test_default_module_keeps_torch_initialisation():
    torch.manual_seed(5)
    ours = lstmkit.GRU(4, 6, num_layers=2, variant=GRUVariant())
    torch.manual_seed(5)
    theirs = torch.nn.GRU(4, 6, num_layers=2)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert "variant" not in repr(ours)


def _reference_stack(module, x, variant, reset_after):
    """Run a multi-layer, bidirectional eval-mode GRU's parameters through the reference.

    In eval, zoneout is its expectation when asked: masks filled with the rate."""
    layer_input = x
    T, B = x.shape[:2]
    H = module.hidden_size
    masks = {"zoneout_h": np.full((T, B, H), variant.zoneout_h)} \
        if variant.zoneout_in_eval() else {}
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(module.num_directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            params = _module_params(module, suffix)
            seq = layer_input[::-1] if direction else layer_input
            y, _, _ = gru_variant_forward(seq, np.zeros((B, H)), params, variant, masks,
                                          reset_after=reset_after)
            outputs.append(y[::-1] if direction else y)
        layer_input = np.concatenate(outputs, axis=2)
    return layer_input


@RESET
def test_module_variant_matches_reference_through_layers_and_directions(reset_after):
    variant = GRUVariant(gate_activation="hard_sigmoid", candidate_activation="softsign",
                         layer_norm=True, zoneout_h=0.3, zoneout_eval="expectation")
    torch.manual_seed(2)
    module = lstmkit.GRU(3, 4, num_layers=2, bidirectional=True, variant=variant,
                         reset_after=reset_after, dtype=torch.float64).eval()
    with torch.no_grad():                         # move layer-norm parameters off 1 and 0
        for name, p in module.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.2 * torch.randn_like(p))
    x = np.random.default_rng(2).normal(size=(6, 2, 3))
    expected = _reference_stack(module, x, variant, reset_after)
    got = module(torch.tensor(x))[0].detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@RESET
def test_trace_of_a_variant_matches_reference_gates(reset_after):
    variant = GRUVariant(gate_activation="hard_sigmoid", candidate_activation="hardtanh",
                         layer_norm=True)
    torch.manual_seed(3)
    module = lstmkit.GRU(3, 4, variant=variant, reset_after=reset_after, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    output, h_n, trace = module(x, return_gates=True)
    assert trace.names == ("r", "z", "n", "h")
    params = _module_params(module, "_l0")
    y, _, (steps, *_) = gru_variant_forward(x.numpy(), np.zeros((2, 4)), params, variant,
                                            reset_after=reset_after)
    record = trace[0, "forward"]
    for name in ("r", "z", "n"):
        np.testing.assert_allclose(record[name].numpy(), np.stack([s[name] for s in steps]),
                                   atol=1e-12)
    np.testing.assert_allclose(record["h"].numpy(), y, atol=1e-12)
    torch.testing.assert_close(output, module(x)[0])


def test_trace_in_training_with_zoneout_keeps_gradients():
    torch.manual_seed(4)
    module = lstmkit.GRU(2, 3, variant=GRUVariant(zoneout_h=0.5), dtype=torch.float64)
    x = torch.randn(6, 2, 2, dtype=torch.float64, requires_grad=True)
    out, _, trace = module(x, return_gates=True)
    out.sum().backward()
    assert x.grad is not None and not trace[0, "forward"]["z"].requires_grad
    h, previous = trace[0, "forward"]["h"], torch.cat([torch.zeros(1, 2, 3), out[:-1].detach()])
    assert (h == previous).any()                  # zoneout kept some units


# -- cells and streaming ---------------------------------------------------------------------------


STREAMED = {
    "activations_zoneout_expectation": GRUVariant(
        gate_activation="hard_sigmoid", candidate_activation="softsign", zoneout_h=0.2,
        zoneout_eval="expectation", recurrent_dropout=0.3, weight_drop=0.2),
    "hardtanh_layer_norm": GRUVariant(candidate_activation="hardtanh", layer_norm=True),
}


@RESET
@pytest.mark.parametrize("name", sorted(STREAMED))
def test_chunks_and_steps_equal_one_call(name, reset_after):
    torch.manual_seed(0)
    module = lstmkit.GRU(3, 5, num_layers=2, variant=STREAMED[name], reset_after=reset_after,
                         dtype=torch.float64).eval()
    x = torch.randn(17, 3, 3, dtype=torch.float64)
    whole, final = module(x)
    state, pieces = None, []
    for chunk in x.split([5, 1, 7, 4]):
        out, state = module(chunk, state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=0, atol=1e-13)
    torch.testing.assert_close(state, final, rtol=0, atol=1e-13)
    state, outputs = None, []
    for x_t in x:
        y_t, state = module.step(x_t, state)
        outputs.append(y_t)
    torch.testing.assert_close(torch.stack(outputs), whole, rtol=0, atol=1e-13)
    torch.testing.assert_close(state, final, rtol=0, atol=1e-13)


@RESET
def test_cell_variant_streams_like_the_layer(reset_after):
    variant = GRUVariant(gate_activation="hard_sigmoid", candidate_activation="softsign",
                         layer_norm=True, zoneout_h=0.25, zoneout_eval="expectation")
    torch.manual_seed(3)
    layer = lstmkit.GRU(3, 4, variant=variant, reset_after=reset_after,
                        dtype=torch.float64).eval()
    cell = lstmkit.GRUCell(3, 4, variant=variant, reset_after=reset_after,
                           dtype=torch.float64).eval()
    cell.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})
    assert "variant=GRUVariant(" in repr(cell)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    whole, _ = layer(x)
    state = None
    for t in range(6):
        state = cell(x[t], state)
        torch.testing.assert_close(state, whole[t], rtol=0, atol=1e-13)


def test_cell_zoneout_in_training_and_eval():
    torch.manual_seed(4)
    cell = lstmkit.GRUCell(3, 4, variant=GRUVariant(zoneout_h=0.5), dtype=torch.float64)
    plain = torch.nn.GRUCell(3, 4, dtype=torch.float64)
    plain.load_state_dict(cell.state_dict())
    x, h = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    new = cell(x, h)
    kept = new == h
    assert kept.any() and not kept.all()          # training: some units keep h
    torch.testing.assert_close(new[~kept], plain(x, h)[~kept], rtol=0, atol=1e-12)
    cell.eval()
    torch.testing.assert_close(cell(x, h), plain(x, h), rtol=0, atol=1e-12)


def test_step_in_training_refuses_per_sequence_masks():
    module = lstmkit.GRU(2, 3, variant=GRUVariant(recurrent_dropout=0.2))
    with pytest.raises(ValueError, match=r"GRU.step.*recurrent_dropout=0.2.*\.eval\(\)"):
        module.step(torch.randn(1, 2))
    module.eval().step(torch.randn(1, 2))
    zoneout = lstmkit.GRU(2, 3, variant=GRUVariant(zoneout_h=0.2))
    zoneout.step(torch.randn(1, 2))               # a mask per step: fine in training


# -- stochastic regularisers ---------------------------------------------------------------------


STOCHASTIC = GRUVariant(zoneout_h=0.2, recurrent_dropout=0.25, weight_drop=0.4)


def test_stochastic_variants_are_reproducible_with_the_seed_and_random_without():
    module = lstmkit.GRU(3, 6, num_layers=2, variant=STOCHASTIC)
    x = torch.randn(5, 2, 3)
    torch.manual_seed(11)
    a = module(x)[0]
    torch.manual_seed(11)
    b = module(x)[0]
    c = module(x)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("option", ["zoneout_h", "recurrent_dropout", "weight_drop"])
def test_each_regulariser_acts_in_training_and_is_off_in_eval(option):
    torch.manual_seed(9)
    module = lstmkit.GRU(2, 3, variant=GRUVariant(**{option: 0.4}), dtype=torch.float64)
    plain = torch.nn.GRU(2, 3, dtype=torch.float64)
    plain.load_state_dict(module.state_dict())
    x = torch.randn(6, 2, 2, dtype=torch.float64)
    assert not torch.allclose(module(x)[0], plain(x)[0])          # training: masks drawn
    module.eval()
    torch.testing.assert_close(module(x)[0], module(x)[0], rtol=0, atol=0)
    torch.testing.assert_close(module(x)[0], plain(x)[0], rtol=0, atol=1e-12)


def test_zoneout_in_eval_can_use_the_expectation():
    variant = GRUVariant(zoneout_h=0.25, zoneout_eval="expectation")
    assert variant.changes_equations and not GRUVariant(zoneout_h=0.25).changes_equations
    module = lstmkit.GRU(2, 3, variant=variant, dtype=torch.float64).eval()
    x = np.random.default_rng(3).normal(size=(4, 2, 2))
    y, *_ = gru_variant_forward(x, np.zeros((2, 3)), _module_params(module, "_l0"), variant,
                                {"zoneout_h": np.full((4, 2, 3), 0.25)})
    np.testing.assert_allclose(module(torch.tensor(x))[0].detach().numpy(), y, atol=1e-12)


def test_mask_keep_rates():
    torch.manual_seed(0)
    layout = StepLayout.padded(200, 50)
    like = torch.empty(0, dtype=torch.float64)
    masks = _gru_variant.draw_masks(GRUVariant(zoneout_h=0.2, recurrent_dropout=0.3), True,
                                    layout, like, 40)
    n = 200 * 50 * 40
    assert masks["zoneout_h"].shape == (200 * 50, 40)
    assert abs(masks["zoneout_h"].mean().item() - 0.2) < 5 * math.sqrt(0.16 / n)
    recurrent = masks["recurrent"]
    assert recurrent.shape == (50, 40)                     # one mask per sequence
    assert set(recurrent.unique().tolist()) <= {0.0, 1 / 0.7}
    assert abs((recurrent > 0).double().mean().item() - 0.7) < 5 * math.sqrt(0.21 / 2000)
    assert _gru_variant.draw_masks(GRUVariant(zoneout_h=0.2, recurrent_dropout=0.3), False,
                                   layout, like, 40) == {}
    eval_masks = _gru_variant.draw_masks(GRUVariant(zoneout_h=0.2, recurrent_dropout=0.3,
                                                    zoneout_eval="expectation"),
                                         False, layout, like, 40)
    assert set(eval_masks) == {"zoneout_h"} and torch.all(eval_masks["zoneout_h"] == 0.2)


def test_recurrent_dropout_mask_is_shared_by_all_steps(monkeypatch):
    """One (B, H) mask per layer and direction, for all its steps (gru_layer takes it, and
    runs it natively where it can)."""
    seen = []
    original = kernels.gru_layer

    def recording(*args, **kwargs):
        seen.append(kwargs["recurrent"])
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "gru_layer", recording)
    module = lstmkit.GRU(2, 3, num_layers=2, bidirectional=True,
                         variant=GRUVariant(recurrent_dropout=0.5))
    module(torch.randn(7, 4, 2))
    assert len(seen) == 4                                  # each layer and direction its own
    assert all(mask.shape == (4, 3) for mask in seen)
    assert len({mask.data_ptr() for mask in seen}) == 4


def test_weight_drop_gradient_flows_to_the_raw_weight_through_the_mask():
    torch.manual_seed(6)
    module = lstmkit.GRU(2, 4, variant=GRUVariant(weight_drop=0.5), dtype=torch.float64)
    out, _ = module(torch.randn(5, 3, 2, dtype=torch.float64))
    out.sum().backward()
    zero_fraction = (module.weight_hh_l0.grad == 0).double().mean().item()
    assert 0.25 < zero_fraction < 0.75               # dropped weights get no gradient


# -- initialisation ------------------------------------------------------------------------------


def test_update_bias_init():
    H = 5
    module = lstmkit.GRU(3, H, num_layers=2, bidirectional=True,
                         variant=GRUVariant(update_bias=1.5))
    for layer in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        total = getattr(module, "bias_ih" + layer) + getattr(module, "bias_hh" + layer)
        torch.testing.assert_close(total[H:2 * H], torch.full((H,), 1.5))
    cell = lstmkit.GRUCell(3, H, variant=GRUVariant(update_bias=-1.0))
    torch.testing.assert_close((cell.bias_ih + cell.bias_hh)[H:2 * H], torch.full((H,), -1.0))


def test_layer_norm_parameters_start_at_identity():
    module = lstmkit.GRU(3, 4, num_layers=2, variant=GRUVariant(layer_norm=True))
    assert [name for name, _ in module.named_parameters()][:8] == [
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
        "ln_ih_weight_l0", "ln_ih_bias_l0", "ln_hh_weight_l0", "ln_hh_bias_l0"]
    assert torch.all(module.ln_hh_weight_l1 == 1) and torch.all(module.ln_ih_bias_l1 == 0)
    assert module.ln_ih_weight_l0.shape == (12,)
    assert "variant=GRUVariant(layer_norm=True)" in repr(module)
    cell = lstmkit.GRUCell(3, 4, variant=GRUVariant(layer_norm=True))
    assert torch.all(cell.ln_ih_weight == 1) and torch.all(cell.ln_hh_bias == 0)


def test_orthogonal_recurrent_init():
    H = 6
    module = lstmkit.GRU(3, H, num_layers=2, variant=GRUVariant(orthogonal_init=True),
                         dtype=torch.float64)
    cell = lstmkit.GRUCell(3, H, variant=GRUVariant(orthogonal_init=True), dtype=torch.float64)
    for weight in (module.weight_hh_l0, module.weight_hh_l1, cell.weight_hh):
        for k in range(3):
            block = weight[k * H:(k + 1) * H].detach()
            torch.testing.assert_close(block @ block.T, torch.eye(H, dtype=torch.float64))


# -- errors and precision ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, words", [
    (dict(gate_activation="relu"), ["gate_activation='relu'", "unbounded"]),
    (dict(gate_activation="tanh"), ["gate_activation='tanh'", "negative"]),
    (dict(gate_activation="swish"), ["gate_activation", "'swish'"]),
    (dict(candidate_activation="relu"), ["candidate_activation", "'relu'"]),
    (dict(candidate_activation="identity"), ["candidate_activation", "'identity'"]),
    (dict(zoneout_h=1.0), ["zoneout_h", "1.0"]),
    (dict(recurrent_dropout=-0.1), ["recurrent_dropout", "-0.1"]),
    (dict(weight_drop=2), ["weight_drop", "2"]),
    (dict(zoneout_eval="never"), ["zoneout_eval", "'never'"]),
    (dict(update_bias=float("nan")), ["update_bias", "nan"]),
    (dict(layer_norm_eps=0.0), ["layer_norm_eps", "0.0"]),
])
def test_invalid_variants_name_the_options(kwargs, words):
    with pytest.raises(ValueError) as error:
        GRUVariant(**kwargs)
    for word in words:
        assert word in str(error.value)


def test_module_level_errors():
    with pytest.raises(ValueError, match="update_bias=1.0.*bias=False"):
        lstmkit.GRU(2, 3, bias=False, variant=GRUVariant(update_bias=1.0))
    with pytest.raises(ValueError, match="update_bias=1.0.*bias=False"):
        lstmkit.GRUCell(2, 3, bias=False, variant=GRUVariant(update_bias=1.0))
    with pytest.raises(TypeError, match="GRUVariant"):
        lstmkit.GRU(2, 3, variant=lstmkit.LSTMVariant())
    with pytest.raises(TypeError, match="orthogonal_init"):
        GRUVariant(orthogonal_init=1)
    with pytest.raises(TypeError, match="zoneout_h"):
        GRUVariant(zoneout_h="0.1")
    for option in ("recurrent_dropout", "weight_drop"):
        with pytest.raises(ValueError, match=f"GRUCell.*{option}.*lstmkit.GRU"):
            lstmkit.GRUCell(2, 3, variant=GRUVariant(**{option: 0.1}))
    with pytest.raises(ValueError, match="unknown GRU-variant arguments.*'w_hr'"):
        kernels.gru_variant_layer(torch.randn(2, 2), torch.zeros(1, 3),
                                  {"w_ih": torch.randn(9, 2), "w_hh": torch.randn(9, 3),
                                   "w_hr": torch.randn(3, 3)}, {}, GRUVariant(),
                                  layout=StepLayout.padded(2, 1))
    assert repr(GRUVariant(zoneout_h=0.1)) == "GRUVariant(zoneout_h=0.1)"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_runs_in_float32_and_returns_its_dtype(dtype):
    variant = EVERY_EQUATION
    torch.manual_seed(8)
    module = lstmkit.GRU(3, 4, variant=variant, dtype=torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    expected, _ = module(x)
    low = lstmkit.GRU(3, 4, variant=variant, dtype=dtype)
    low.load_state_dict(module.state_dict())
    xl = x.to(dtype).requires_grad_()
    out, h = low(xl)
    out.sum().backward()
    assert out.dtype == h.dtype == xl.grad.dtype == low.weight_hh_l0.grad.dtype == dtype
    # the error of rounding inputs and weights to 8 (bfloat16) or 11 (float16) bits
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0.05)
