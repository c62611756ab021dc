"""The native CPU backend against the NumPy float64 reference, torch.nn and gradcheck.

Both native drivers run every case: "fused" (own register-blocked product, workers kept for the
whole sequence; small products) and "generic" (a library matrix product per step: MKL's packed
GEMM, or at::mm as "generic-mm"; with the batch rows in one part, or split into independent
parts as "generic-rows", whose LSTM steps can also use the fused driver's product, "own-rows";
projection, GRU reset-before, large products), chosen here through the constants `_driver`
and `_own_step_product` read.
"""

import multiprocessing
import os
import platform
import subprocess
import sys
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from conftest import native_setting
from lstmkit import kernels, reference
from lstmkit.kernels import StepLayout, native

# The LSTM variants the native kernels compute: peephole, cifg, the removed gates (noinput,
# noforget, nooutput: LSTMVariant(input_gate=False), ...), the activations (hardsigmoid for
# the gates; cell... and out... for g's and the output's: softsign, hardtanh, identity),
# zoneout (zoneouth, zoneoutc: masks drawn per row; with "expectation" one row of rates for all)
# and recurrent dropout (recurrent: a mask per batch row); the GRU's activations: hardsigmoid
# for the gates, cand... for the candidate's (softsign, hardtanh).
VARIANT_WORDS = ("peephole", "cifg", "noinput", "noforget", "nooutput", "hardsigmoid", "cell",
                 "out", "zoneout", "expectation", "recurrent", "cand")
FAMILIES = ("lstm", "lstm_proj", "lstm_nobias", "lstm_peephole", "lstm_proj_peephole",
            "lstm_cifg", "lstm_peephole_cifg", "lstm_peephole_noinput", "lstm_noforget",
            "lstm_proj_peephole_nooutput", "lstm_hardsigmoid_cellsoftsign_outidentity",
            "lstm_proj_peephole_cellhardtanh_outsoftsign", "lstm_cifg_cellidentity_outhardtanh",
            "gru", "gru_reset_before", "rnn_tanh", "rnn_relu")
# Zoneout, the LSTM's with the other elementwise variants (and its h with a projection),
# the GRU's in both forms; recurrent dropout, alone and with zoneout.
MASKED_FAMILIES = ("lstm_zoneouth", "lstm_zoneouth_zoneoutc", "lstm_proj_peephole_cifg_zoneoutc",
                   "lstm_peephole_noforget_outsoftsign_zoneouth_zoneoutc_expectation",
                   "lstm_nooutput_zoneouth", "gru_zoneouth", "gru_reset_before_zoneouth",
                   "gru_zoneouth_expectation", "lstm_recurrent", "lstm_proj_recurrent_zoneoutc",
                   "lstm_peephole_recurrent_zoneouth_zoneoutc", "gru_recurrent",
                   "gru_reset_before_recurrent_zoneouth", "lstm_proj_zoneouth_zoneoutc",
                   "lstm_proj_peephole_recurrent_zoneouth")
# The GRU's activations, alone and with the masks.
GRU_VARIANT_FAMILIES = ("gru_hardsigmoid_candsoftsign", "gru_reset_before_candhardtanh_zoneouth",
                        "gru_candsoftsign_recurrent")


def gate_options(family) -> dict:
    """kernels.lstm_layer's cell arguments for a family name (see VARIANT_WORDS)."""
    words = family.split("_")

    def activation(prefix):
        return next((w[len(prefix):] for w in words if w.startswith(prefix)), "tanh")

    return {"cifg": "cifg" in words, "input_gate": "noinput" not in words,
            "forget_gate": "noforget" not in words, "output_gate": "nooutput" not in words,
            "gate_activation": "hard_sigmoid" if "hardsigmoid" in words else "sigmoid",
            "cell_activation": activation("cell"), "output_activation": activation("out")}


def gru_options(family) -> dict:
    """kernels.gru_layer's activation arguments for a GRU family name (see VARIANT_WORDS)."""
    words = family.split("_")
    candidate = next((w[len("cand"):] for w in words if w.startswith("cand")), "tanh")
    return {"gate_activation": "hard_sigmoid" if "hardsigmoid" in words else "sigmoid",
            "candidate_activation": candidate}
# (T, B, I, H): T=1, batch 1, odd sizes (batch 7: a group of 6 rows and one of 1), H=127 (a
# partial SIMD block), a long sequence, a batch above the fused driver's limit when that is
# the default, and batch 1 with two fused workers (each projecting the input for its blocks).
SHAPES = [(1, 1, 2, 1), (5, 7, 4, 3), (4, 2, 3, 127), (300, 2, 3, 5), (6, 20, 5, 9),
          (7, 1, 9, 83)]
# Relative to the largest magnitude of each result (float32 is compared with the float64
# reference, so its tolerance is float32's rounding over a few hundred steps).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(scope="module", autouse=True)
def native_built():
    assert native.available(), f"native kernels did not build: {native.unavailable_reason()}"


@pytest.fixture(params=["fused", "fused-chunked", "generic", "generic-rows", "generic-mm",
                        "generic-onednn", "own-rows-chunked"])
def driver(request, monkeypatch):
    if request.param == "generic-onednn" and not native.module().onednn_works():
        pytest.skip("oneDNN's float32 matmul does not run on this CPU (it needs AVX-512)")
    generic = request.param.startswith(("generic", "own"))
    monkeypatch.setattr(native, "FUSED_MAX_BATCH", 0 if generic else 10**9)
    monkeypatch.setattr(native, "FUSED_ALWAYS_BATCH", 0 if generic else 10**9)
    # "generic-rows": the batch rows split into up to 3 independent parts (uneven ones too);
    # the other generic cases run one part. "own-rows": the same parts, each step's LSTM
    # product our register-blocked one (the generic ones always MKL's or at::mm).
    rows = request.param in ("generic-rows", "own-rows-chunked")
    monkeypatch.setattr(native, "MIN_PART_ROWS", 1 if rows else 10**9)
    monkeypatch.setattr(native, "MAX_ROW_PARTS", 3 if rows else None)
    monkeypatch.setattr(native, "ROW_PARTS_MAX_WEIGHT_BYTES", 2**62)
    own = request.param.startswith("own")
    for limit in ("OWN_FORWARD_MAX_ROWS", "OWN_FORWARD_MAX_WEIGHT_BYTES",
                  "OWN_FORWARD_MAX_INPUT_RATIO", "OWN_BACKWARD_MAX_ROWS"):
        monkeypatch.setattr(native, limit, 2**62 if own else 0)
    monkeypatch.setattr(native, "INPUT_IN_STEP_MAX_RATIO",
                        0 if request.param == "generic-mm" else 1e9)
    # "generic-onednn": one part, every float32 product (each step's, the projection, dX, the
    # weight gradients as one stacked product), however small, through oneDNN's matmul, as off
    # Intel CPUs (where the small ones take MKL: onednn_min_flops); the
    # others through MKL (or at::mm), whatever this CPU would choose. No case takes the LSTM's
    # own row parts that oneDNN's products choose at larger batches (own-rows covers them).
    onednn = request.param == "generic-onednn"
    monkeypatch.setattr(native, "ONEDNN_OWN_MIN_ROWS", 2**62)
    # "chunked": the contraction split into chunks of 4, as large matrices are split to stay
    # in the L2 cache, so the running sums between chunks are checked on small shapes too.
    # "generic" multiplies by MKL's packed W_hh where this torch has it; "generic-mm" by at::mm,
    # and takes the LSTM input as a projection of all steps (the others multiply it at each step);
    # it also runs the layer's other products (dX, the weight gradients) through at::mm, not
    # MKL's gemm called directly.
    # "generic": the weight gradients as one stacked product (the others take the separate
    # products that small shapes get, see WeightGradients).
    # The chunked cases also pass their row groups over the weights one slab of blocks (two
    # for one gate) at a time, as large weights are (batch 20: several row groups).
    with native_setting("chunk_bytes", 1 if request.param.endswith("chunked") else None), \
            native_setting("slab_bytes", 1 if request.param.endswith("chunked") else None), \
            native_setting("use_mkl", request.param != "generic-mm"), \
            native_setting("use_onednn", onednn), \
            native_setting("onednn_min_flops", 0 if onednn else None), \
            native_setting("weight_products_form",
                           2 if request.param in ("generic", "generic-onednn") else 1):
        yield request.param


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"
                         and torch.backends.mkl.is_available()),
                    reason="MKL's routines are looked for in x86-64 Linux builds of torch")
def test_torch_mm_driver_finds_mkl_packed_gemm_and_gemm():
    assert native.module().mkl_packed_gemm()


def make_weights(family, I, H, rng):
    """NumPy float64 weights for one layer of `family`, scaled like torch.nn's initialisation."""
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[family.split("_")[0]]
    P = max(1, H // 2) if "proj" in family else H
    bound = 1 / np.sqrt(H)
    w = {"w_ih": rng.uniform(-bound, bound, (gates * H, I)) * 2,
         "w_hh": rng.uniform(-bound, bound, (gates * H, P)) * 2,
         "b_ih": rng.uniform(-1, 1, gates * H), "b_hh": rng.uniform(-1, 1, gates * H)}
    if family == "lstm_nobias":
        w["b_ih"] = w["b_hh"] = None
    if "proj" in family:
        w["w_hr"] = rng.uniform(-bound, bound, (P, H)) * 2
    if "peephole" in family:       # as the module initialises them (over 300 float32 steps,
        w["w_peephole"] = rng.uniform(-bound, bound, 3 * H)    # twice that gave 1.3e-5)
    return w, P


def family_masks(family, T, B, P, H, rng) -> dict:
    """A family's masks (see VARIANT_WORDS) as the reference takes them: zoneout's (T, B, F),
    0/1 with probability 0.3 of keeping, or 0.3 everywhere for the expectation; recurrent
    dropout's (B, P), 0 or 1 / 0.8 with probability 0.8 of keeping; {} without (the GRU's P
    is H)."""
    words = family.split("_")
    masks = {}
    for name, word, width in (("zoneout_h", "zoneouth", P), ("zoneout_c", "zoneoutc", H)):
        if word in words:
            masks[name] = (np.full((T, B, width), 0.3) if "expectation" in words
                           else (rng.random((T, B, width)) < 0.3).astype(float))
    if "recurrent" in words:
        masks["recurrent"] = (rng.random((B, P)) < 0.8) / 0.8
    return masks


def layer_masks(family, masks, dtype) -> dict:
    """family_masks's masks as kernels.lstm_layer takes them: zoneout's (T B, F), a row per
    step and batch row, or (1, F) for the expectation; recurrent dropout's as they are."""
    expectation = "expectation" in family.split("_")

    def layer_mask(name, mask):
        if name == "recurrent":
            return mask
        return mask[0, :1] if expectation else mask.reshape(-1, mask.shape[2])
    return {name: torch.tensor(layer_mask(name, mask), dtype=dtype)
            for name, mask in masks.items()}


def reference_run(family, x, states, w, dy, d_states, masks=None):
    """Forward and backward of the NumPy reference: (outputs, gradients by argument name)."""
    if family.startswith("lstm") and any(word.startswith(VARIANT_WORDS)
                                         for word in family.split("_")[1:]):
        variant = lstmkit.LSTMVariant(peepholes="peephole" in family, **gate_options(family))
        y, h, c, cache = reference.lstm_variant_forward(x, *states, w, variant, masks=masks)
        return (y, h, c), reference.lstm_variant_backward(dy, *d_states, cache)
    if family.startswith("lstm"):
        y, h, c, cache = reference.lstm_forward(x, *states, w["w_ih"], w["w_hh"], w["b_ih"],
                                                w["b_hh"], w.get("w_hr"))
        return (y, h, c), reference.lstm_backward(dy, *d_states, cache)
    if family.startswith("gru") and (masks or gru_options(family) != gru_options("gru")):
        y, h, cache = reference.gru_variant_forward(x, *states, w,
                                                    lstmkit.GRUVariant(**gru_options(family)),
                                                    masks, reset_after="reset_before" not in family)
        return (y, h), reference.gru_variant_backward(dy, *d_states, cache)
    if family.startswith("gru"):
        y, h, cache = reference.gru_forward(x, *states, w["w_ih"], w["w_hh"], w["b_ih"],
                                            w["b_hh"], reset_after=family == "gru")
        return (y, h), reference.gru_backward(dy, *d_states, cache)
    y, h, cache = reference.rnn_forward(x, *states, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"],
                                        nonlinearity=family.split("_")[1])
    return (y, h), reference.rnn_backward(dy, *d_states, cache)


def native_layer(family, x, states, w, layout, reverse, masks=None):
    if family.startswith("lstm"):
        return kernels.lstm_layer(x, *states, **w, layout=layout, reverse=reverse,
                                  backend="native", **gate_options(family), **(masks or {}))
    if family.startswith("gru"):
        return kernels.gru_layer(x, *states, **w, layout=layout, reverse=reverse,
                                 reset_after="reset_before" not in family, backend="native",
                                 **gru_options(family), **(masks or {}))
    return kernels.rnn_layer(x, *states, **w, layout=layout, reverse=reverse,
                             nonlinearity=family.split("_")[1], backend="native")


def assert_close(name, actual, expected, dtype):
    expected = np.asarray(expected)
    scale = max(1.0, np.abs(expected).max())       # relu RNNs over 300 steps grow large
    error = np.abs(actual.detach().double().numpy() - expected).max() / scale
    assert error <= TOLERANCE[dtype], f"{name}: error {error:.2e} > {TOLERANCE[dtype]:.0e}"


# A projection needs proj_size < hidden_size, so H=1 has none.
REFERENCE_CASES = [pytest.param(family, shape, id="{}-T{}-B{}-I{}-H{}".format(family, *shape))
                   for family in FAMILIES + MASKED_FAMILIES + GRU_VARIANT_FAMILIES
                   for shape in SHAPES
                   if not ("proj" in family and shape[3] == 1)]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("family, shape", REFERENCE_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_reference(family, shape, reverse, dtype, driver):
    check_against_reference(family, shape, reverse, dtype)


def check_against_reference(family, shape, reverse, dtype):
    """Outputs, final states and every gradient of one native layer against the reference."""
    T, B, I, H = shape
    rng = np.random.default_rng(zlib.crc32(repr((family, shape, reverse)).encode()))
    w, P = make_weights(family, I, H, rng)
    x = rng.standard_normal((T, B, I))
    sizes = (P, H) if family.startswith("lstm") else (H,)
    states = [rng.standard_normal((B, s)) for s in sizes]
    dy = rng.standard_normal((T, B, P))
    d_states = [rng.standard_normal((B, s)) for s in sizes]
    # The reverse direction is the forward direction over the time-flipped sequence.
    flip = (lambda a: a[::-1].copy()) if reverse else (lambda a: a)
    masks = family_masks(family, T, B, P, H, rng)
    (y, *finals), grads = reference_run(family, flip(x), states, w, flip(dy), d_states,
                                        {name: mask if name == "recurrent" else flip(mask)
                                         for name, mask in masks.items()})

    def tensor(a):
        return torch.tensor(a, dtype=dtype, requires_grad=True)

    xt = tensor(x.reshape(T * B, I))
    st = [tensor(s) for s in states]
    wt = {k: None if v is None else tensor(v) for k, v in w.items()}
    out, *finals_t = native_layer(family, xt, st, wt, StepLayout.padded(T, B), reverse,
                                  layer_masks(family, masks, dtype))
    loss = (out * torch.tensor(dy.reshape(T * B, P), dtype=dtype)).sum()
    for final, d_final in zip(finals_t, d_states, strict=True):
        loss = loss + (final * torch.tensor(d_final, dtype=dtype)).sum()
    loss.backward()
    assert out.dtype == dtype and out.shape == (T * B, P)
    assert_close("output", out, flip(y).reshape(T * B, P), dtype)
    for name, got, expected in zip(("h_T", "c_T"), finals_t, finals, strict=False):
        assert_close(name, got, expected, dtype)
    assert_close("dx", xt.grad, flip(grads["x"]).reshape(T * B, I), dtype)
    for name, state in zip(("h0", "c0"), st, strict=False):
        assert_close(f"d{name}", state.grad, grads[name], dtype)
    for name, param in wt.items():
        if param is not None:
            assert_close(f"d{name}", param.grad, grads[name], dtype)


@pytest.mark.parametrize("steal_after", [0, None], ids=["taking", "own"])
@pytest.mark.parametrize("shape", [(40, 1, 5, 83), (30, 1, 3, 200), (20, 3, 4, 83)],
                         ids=lambda shape: "T{}-B{}-I{}-H{}".format(*shape))
@pytest.mark.parametrize("family", ["lstm", "gru", "rnn_tanh",
                                    "lstm_peephole_recurrent_zoneouth_zoneoutc",
                                    "gru_recurrent_zoneouth"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fused_workers_match_reference(family, shape, dtype, steal_after, monkeypatch):
    """Two fused workers: at batch 1 the LSTM's workers begin each step with their own units of
    h (see run_steps) and its backward takes its blocks by fours; hidden 83 (6 unit blocks, the
    last partial) and 200 (13, an odd count: fours, a pair and one). With steal_after 0 a
    waiting worker takes the other's unclaimed blocks at once, so steps mix begun, taken and
    whole blocks; None keeps the kernels' own patience."""
    monkeypatch.setattr(native, "FUSED_MAX_BATCH", 10**9)
    monkeypatch.setattr(native, "FUSED_ALWAYS_BATCH", 10**9)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with native_setting("steal_after_spins", steal_after):
            for reverse in (False, True):
                check_against_reference(family, shape, reverse, dtype)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=["all steps", "ring"])
def projection_ring(request):
    """The fused LSTM's projection of the input at batch 1: of all steps at once (the default
    at these lengths), or 3 rows at a time into a ring of 4 (set_fused_projection_ring)."""
    ring = request.param == "ring"
    with native_setting("fused_projection_ring", *((3, 0) if ring else (None,))):
        yield ring


@pytest.mark.parametrize(("rows", "shape", "chunk_bytes"), [
    (1, (37, 1, 5, 83), None), (3, (37, 1, 5, 83), None), (16, (37, 1, 5, 83), None),
    (16, (5, 1, 5, 83), None), (3, (13, 1, 40, 35), 1)],
    ids=["rows1", "rows3", "rows16", "shorter-than-ring", "split-sums"])
@pytest.mark.parametrize("family", ["lstm", "lstm_peephole_recurrent_zoneouth_zoneoutc"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_batch_one_projection_ring_matches_reference(family, rows, shape, chunk_bytes, dtype):
    """At batch 1 the fused LSTM projects a long sequence's input a chunk of rows at a time
    into a ring of rows the steps read (native.module().set_fused_projection_ring), forced on
    here: chunks of 1, 3 (a ring of 4 rows) and 16 rows over 37 steps, the last chunk
    part-full; 5 steps, fewer than a chunk; and the projection's sums over the input split in
    pieces (set_chunk_bytes(1)). Both directions, one worker, and two that take each other's
    blocks at every step (the taker projects them)."""
    threads = torch.get_num_threads()
    try:
        with native_setting("fused_projection_ring", rows, 0), \
                native_setting("chunk_bytes", chunk_bytes):
            for workers, steal_after in ((1, None), (2, 0)):
                torch.set_num_threads(workers)
                with native_setting("steal_after_spins", steal_after):
                    for reverse in (False, True):
                        check_against_reference(family, shape, reverse, dtype)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(9, 5, 3, 32), (4, 3, 2, 19), (30, 2, 4, 16)],
                         ids=lambda shape: "T{}-B{}-I{}-H{}".format(*shape))
@pytest.mark.parametrize("family", ["lstm", "lstm_peephole_recurrent_zoneouth_zoneoutc", "gru",
                                    "gru_recurrent_zoneouth_candsoftsign"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_streaming_stores_match_reference(driver, family, shape, dtype):
    """The saved gates (and the GRU's d_gi) written with streaming stores
    (set_stream_min_bytes(0): every buffer; the benchmark's sizes take them from 16 MiB), on
    every driver, the LSTM's plain cell and its general one (peepholes): hidden 32 and 16 in
    whole vectors; at 19 the whole vectors of the rows that start aligned stream, the others
    and the partial vector take ordinary stores. (In a build without AVX-512 every store is
    ordinary.)"""
    with native_setting("stream_min_bytes", 0):
        for reverse in (False, True):
            check_against_reference(family, shape, reverse, dtype)


def test_fused_projection_ring_rejects_an_empty_chunk():
    with pytest.raises(RuntimeError, match="rows: at least 1, got 0"):
        native.module().set_fused_projection_ring(0, 0)


def test_batch_one_lstm_forward_does_not_depend_on_the_threads_timing(projection_ring):
    """At batch 1 the LSTM's fused workers begin steps with their own units of h; a step that
    was not begun (the first, one after a theft, one taken by the other worker) must add up
    its sums in the same order, so that the same call gives the same bits whoever did which
    block (the module's direct path is tested against the general path to the bit). With the
    projection in a ring, a taken block's rows are projected by the taker."""
    torch.manual_seed(11)
    lstm = lstmkit.LSTM(4, 127, backend="native", dtype=torch.float64)
    x = torch.randn(60, 1, 4, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            expected = lstm(x)[0]
            with native_setting("steal_after_spins", 0):            # thefts at every step
                runs = [lstm(x)[0] for _ in range(100)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(run, expected) for run in runs)


@pytest.mark.parametrize("used", ["out", "h_T", "c_T"])
@pytest.mark.parametrize("family", ["lstm", "lstm_proj"])
def test_loss_through_one_output(family, used):
    """The LSTM node gets no gradient for the outputs a loss does not use (it makes zeros for
    them itself); every gradient still matches the reference with zeros there."""
    T, B, I, H = 4, 3, 2, 5
    rng = np.random.default_rng(zlib.crc32(repr((family, used)).encode()))
    w, P = make_weights(family, I, H, rng)
    x = rng.standard_normal((T, B, I))
    states = [rng.standard_normal((B, s)) for s in (P, H)]
    upstream = {"out": rng.standard_normal((T, B, P)), "h_T": rng.standard_normal((B, P)),
                "c_T": rng.standard_normal((B, H))}
    zeros = {name: np.zeros_like(g) for name, g in upstream.items()}
    wanted = {**zeros, used: upstream[used]}
    _, grads = reference_run(family, x, states, w, wanted["out"], [wanted["h_T"], wanted["c_T"]])
    xt = torch.tensor(x.reshape(T * B, I), requires_grad=True)
    st = [torch.tensor(s, requires_grad=True) for s in states]
    wt = {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}
    results = dict(zip(("out", "h_T", "c_T"),
                       native_layer(family, xt, st, wt, StepLayout.padded(T, B), False),
                       strict=True))
    gradient = upstream[used].reshape(results[used].shape)
    (results[used] * torch.tensor(gradient)).sum().backward()
    assert_close("dx", xt.grad, grads["x"].reshape(T * B, I), torch.float64)
    for name, state in zip(("h0", "c0"), st, strict=True):
        assert_close(f"d{name}", state.grad, grads[name], torch.float64)
    for name, param in wt.items():
        assert_close(f"d{name}", param.grad, grads[name], torch.float64)


# The weight and bias gradients come out of one stacked product or of one product each
# (WeightGradients in _native.cpp); each subset of wanted gradients must still get exactly its
# own, right, gradients, either way.
GRADIENT_SUBSETS = [("b_hh",), ("b_ih",), ("w_hh",), ("w_ih", "b_hh"), ("x", "w_hh", "b_ih")]


@pytest.fixture(params=["separate", "stacked"])
def weight_products(request):
    with native_setting("weight_products_form", 1 if request.param == "separate" else 2):
        yield request.param


@pytest.mark.parametrize("wanted", GRADIENT_SUBSETS, ids="+".join)
@pytest.mark.parametrize("family", ["lstm", "lstm_proj", "gru", "gru_reset_before", "rnn_tanh",
                                    "lstm_recurrent_zoneoutc", "gru_recurrent",
                                    "gru_reset_before_recurrent"])
def test_only_the_wanted_gradients(family, wanted, weight_products):
    """Each subset of gradients, the others not computed (recurrent dropout's masked operand of
    dW_hh only when it is wanted)."""
    T, B, I, H = 5, 3, 4, 6
    rng = np.random.default_rng(zlib.crc32(repr((family, wanted)).encode()))
    w, P = make_weights(family, I, H, rng)
    x = rng.standard_normal((T, B, I))
    states = [rng.standard_normal((B, s)) for s in ((P, H) if family.startswith("lstm") else (H,))]
    dy = rng.standard_normal((T, B, P))
    masks = family_masks(family, T, B, P, H, rng)
    _, grads = reference_run(family, x, states, w, dy, [np.zeros_like(s) for s in states], masks)
    tensors = {"x": x.reshape(T * B, I), **w}
    tensors = {k: torch.tensor(v, requires_grad=k in wanted) for k, v in tensors.items()}
    xt = tensors.pop("x")
    out = native_layer(family, xt, [torch.tensor(s) for s in states], tensors,
                       StepLayout.padded(T, B), reverse=False,
                       masks=layer_masks(family, masks, torch.float64))[0]
    (out * torch.tensor(dy.reshape(T * B, P))).sum().backward()
    for name, param in {"x": xt, **tensors}.items():
        if name in wanted:
            expected = grads[name].reshape(param.shape)
            assert_close(f"d{name}", param.grad, expected, torch.float64)
        else:
            assert param.grad is None, name


def test_own_step_product_by_rows_and_weight_size(monkeypatch):
    """The LSTM's row parts take our own step product in the forward for up to 8 rows, or while
    [W_ih | W_hh] takes at most OWN_FORWARD_MAX_WEIGHT_BYTES (768 KiB) and the input at most
    twice the hidden size; in the backward for
    up to OWN_BACKWARD_MAX_ROWS rows; never with one part or a projection (input 64, float32,
    two threads)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(native, "_onednn_products", lambda: False)    # MKL's rules

    def own(batch, hidden, backward=False, proj=False, inputs=64):
        w_ih, w_hh = torch.empty(4 * hidden, inputs), torch.empty(4 * hidden, hidden)
        w_hr = torch.empty(hidden // 2, hidden) if proj else None
        layout = StepLayout.padded(10, batch)
        parts = native._driver(layout, w_hh, proj, None if backward else w_ih)
        return native._own_step_product(layout, parts, w_ih, w_hh, w_hr, backward=backward)

    assert own(8, 256) and own(16, 256)                # 4 and 8 rows: always
    assert not own(24, 256) and not own(32, 256)       # 12 and 16 rows of 1.25 MiB
    assert own(64, 128) and own(128, 192) and own(128, 64)   # 384, 768 and 128 KiB: any rows
    assert not own(64, 208)                            # 884 KiB
    assert own(64, 32, inputs=64) and not own(64, 32, inputs=65)  # input up to twice hidden
    assert own(16, 4, inputs=4096)                     # 8 rows: any input
    assert own(128, 128, backward=True) and not own(130, 128, backward=True)   # 64 rows, 65
    assert not own(32, 128, proj=True) and not own(2, 64)   # projection; the fused driver



def test_onednn_plans_own_row_parts_fused_or_one_part(monkeypatch):
    """With oneDNN's products (off Intel CPUs) the generic driver runs no row parts but the
    LSTM's own: parts of at least ONEDNN_OWN_MIN_ROWS (8) rows, [W_ih | W_hh] at most
    ONEDNN_OWN_MAX_WEIGHT_BYTES (8 MiB), no projection, input at most twice the hidden size;
    smaller batches take the fused driver (0 parts), larger weights one part (input 64, float32,
    two threads). The backward takes its own row parts whatever W_hh's size."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(native, "_onednn_products", lambda: True)

    def plans(batch, hidden, proj=False, inputs=64):
        w_ih, w_hh = torch.empty(4 * hidden, inputs), torch.empty(4 * hidden, hidden)
        w_hr = torch.empty(hidden // 2, hidden) if proj else None
        return native._lstm_training_plan(StepLayout.padded(10, batch), w_ih, w_hh, w_hr)

    assert plans(32, 256) == (2, True, True, 2, True)      # parts, input in step, own; backward
    assert plans(16, 512) == (2, True, True, 2, True)      # 8 rows of 4.25 MiB
    assert plans(64, 640)[:3] == (2, True, True)           # 6.9 MiB
    assert plans(64, 704)[:3] == (1, True, False)          # 8.25 MiB: one part, oneDNN's steps
    assert plans(128, 1024) == (1, True, False, 2, True)   # the backward: own parts at any size
    assert plans(14, 256)[:3] == (0, False, False)         # 7 rows: the fused driver
    assert plans(8, 128)[0] == 0 and plans(64, 64, inputs=129)[:3] == (0, False, False)
    assert plans(64, 128, proj=True)[0] == 1               # projection: one part, oneDNN's
    # GRU and RNN: no row parts either (the fused driver up to batch 64, then one part).
    gru_w_hh = torch.empty(3 * 256, 256)
    assert native._driver(StepLayout.padded(10, 32), gru_w_hh) == 0
    assert native._driver(StepLayout.padded(10, 128), gru_w_hh) == 1


def test_tunable_names_are_the_plan_keys_tunables():
    """TUNABLE_NAMES (what benchmarks/tunables.py may set) names _tunables()'s values, in order,
    then whether the products run on oneDNN."""
    assert native._tunables() == tuple(getattr(native, name) for name in native.TUNABLE_NAMES) + (
        native.product_library() == "onednn",)
    assert len(set(native.TUNABLE_NAMES)) == len(native.TUNABLE_NAMES)


def test_product_library_is_onednn_off_intel_where_it_runs(monkeypatch):
    """PRODUCT_LIBRARY None: MKL on Intel CPUs, oneDNN elsewhere where it runs; "mkl" and
    "onednn" force one (oneDNN falling back to MKL where it does not run)."""
    mod = native.module()
    previous = mod.uses_onednn()
    try:
        for intel, forced, works, expected in [(True, None, True, "mkl"),
                                               (False, None, True, "onednn"),
                                               (False, None, False, "mkl"),
                                               (True, "onednn", True, "onednn"),
                                               (False, "mkl", True, "mkl")]:
            monkeypatch.setattr(native, "_intel_cpu", lambda intel=intel: intel)
            monkeypatch.setattr(native, "PRODUCT_LIBRARY", forced)

            class Module:      # the real setter, a stand-in for the check
                onednn_works = staticmethod(lambda works=works: works)
                set_use_onednn = staticmethod(mod.set_use_onednn)
            assert native._choose_product_library(Module) == expected
            assert mod.uses_onednn() == (expected == "onednn")
    finally:
        mod.set_use_onednn(previous)

def test_stacked_weight_products_by_rows_and_threads():
    """Stacked from 800 rows while threads x count <= N: the threads' partial sums take no more
    memory than the gate gradients."""
    stacked = native.module().stacked_weight_products
    with native_setting("weight_products_form", 0):
        assert stacked(800, 321, 2) and not stacked(799, 10, 2)    # batch 8, hidden 256 and less
        assert not stacked(800, 577, 2)                             # batch 8, hidden 512
        assert stacked(6400, 577, 2) and not stacked(6400, 577, 64)


@pytest.mark.parametrize("x_layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("family", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
@pytest.mark.parametrize("form", ["separate", "stacked", "by-size"])
def test_weight_gradients_split_across_threads(family, dtype, form, x_layout):
    """Products above SERIAL_FLOPS: each thread multiplies its share of the rows (the stacked
    form sums the threads' partial sums, adding and transposing them in 16 x 16 tiles, some
    partial: 17 input columns, hidden 40); "by-size" takes the stacked form at this size. Each
    thread writes its rows of the stacked operand: a strided x (every other column of a wider
    tensor) must give the same gradients."""
    T, B, I, H = 60, 14, 17, 40
    assert 2 * T * B * (I + H + 1) * 4 * H > native.SERIAL_FLOPS
    assert native.module().stacked_weight_products(T * B, I + H + 1, 2)
    rng = np.random.default_rng(zlib.crc32(repr((family, str(dtype))).encode()))
    w, P = make_weights(family, I, H, rng)
    x = rng.standard_normal((T, B, I))
    states = [rng.standard_normal((B, s)) for s in ((P, H) if family.startswith("lstm") else (H,))]
    dy = rng.standard_normal((T, B, P))
    _, grads = reference_run(family, x, states, w, dy, [np.zeros_like(s) for s in states])
    tensors = {k: torch.tensor(v, dtype=dtype, requires_grad=True)
               for k, v in {"x": x.reshape(T * B, I), **w}.items()}
    xt = tensors.pop("x")
    if x_layout == "strided":
        wide = torch.zeros(T * B, 2 * I, dtype=dtype)
        wide[:, ::2] = xt.detach()
        xt = wide[:, ::2].requires_grad_()
        assert not xt.is_contiguous()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with native_setting("weight_products_form",
                            {"by-size": 0, "separate": 1, "stacked": 2}[form]):
            out = native_layer(family, xt, [torch.tensor(s, dtype=dtype) for s in states],
                               tensors, StepLayout.padded(T, B), reverse=False)[0]
            (out * torch.tensor(dy.reshape(T * B, P), dtype=dtype)).sum().backward()
    finally:
        torch.set_num_threads(threads)
    for name, param in {"x": xt, **tensors}.items():
        assert_close(f"d{name}", param.grad, grads[name].reshape(param.shape), dtype)


TORCH_MODULES = {
    "LSTM": dict(num_layers=2, bidirectional=True),
    "LSTM-proj": dict(num_layers=2, bidirectional=True, proj_size=3),
    "LSTM-nobias": dict(bias=False, bidirectional=True),
    "GRU": dict(num_layers=2, bidirectional=True),
    "RNN": dict(num_layers=2, bidirectional=True, nonlinearity="relu"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", TORCH_MODULES)
def test_packed_unsorted_matches_torch(name, driver, dtype):
    """Packed sequences of unsorted lengths, both directions, two layers, against torch.nn (in
    float32 the generic driver's step products are MKL's, the GRU's input product per step
    among them, on steps with fewer rows than the batch)."""
    family = name.split("-")[0]
    torch.manual_seed(7)
    options = TORCH_MODULES[name]
    ours = getattr(lstmkit, family)(4, 6, dtype=dtype, backend="native", **options)
    theirs = getattr(torch.nn, family)(4, 6, dtype=dtype, **options)
    theirs.load_state_dict(ours.state_dict())
    lengths = torch.tensor([3, 9, 1, 6, 9])
    x = torch.randn(9, 5, 4, dtype=dtype)
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        packed = pack_padded_sequence(xi, lengths, enforce_sorted=False)
        out, state = module(packed)
        padded, _ = pad_packed_sequence(out)
        finals = state if isinstance(state, tuple) else (state,)
        loss = (padded * torch.linspace(-1, 1, padded.numel(), dtype=dtype)
                .view_as(padded)).sum() + sum((f * f).sum() for f in finals)
        loss.backward()
        results.append([padded.detach(), *[f.detach() for f in finals], xi.grad,
                        *[p.grad for p in module.parameters()]])
    for ours_value, torch_value in zip(*results, strict=True):
        bound = 1e-10 if dtype == torch.float64 else \
            TOLERANCE[dtype] * max(1.0, torch_value.abs().max().item())
        assert (ours_value - torch_value).abs().max().item() < bound


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_extreme_inputs_match_torch(name, driver):
    """float32 (the SIMD exp, sigmoid and tanh): pre-activations far past saturation, +-inf and
    NaN give what torch.nn gives: saturated gates, finite states, NaN only in the NaN's row."""
    torch.manual_seed(11)
    ours = getattr(lstmkit, name)(1, 19, backend="native")
    theirs = getattr(torch.nn, name)(1, 19)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 6, 1)
    x[1, :, 0] = torch.tensor([1e4, -1e4, float("inf"), float("-inf"), float("nan"), 3e38])
    with torch.no_grad():
        (out, state), (expected, expected_state) = ours(x), theirs(x)
    finals = state if isinstance(state, tuple) else (state,)
    expected_finals = expected_state if isinstance(expected_state, tuple) else (expected_state,)
    assert out[:, 4].isnan().any() and not out[:, [0, 1, 2, 3, 5]].isnan().any()
    for actual, wanted in zip((out, *finals), (expected, *expected_finals), strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_float32_tanh_is_accurate(driver):
    """The float32 tanh (a rational function, see _native.cpp) through a tanh RNN whose step is
    h = tanh(x): within 6 ulp of float64 tanh from tiny to saturated inputs, never past +-1,
    exact for tiny x, +-1 at +-inf (NaN: test_extreme_inputs_match_torch)."""
    tiny = [1e-30, 1e-7, 3e-4]
    x = np.concatenate([np.linspace(-12, 12, 2401), tiny, np.negative(tiny),
                        [0.0, np.inf, -np.inf]])
    x = np.resize(x, (len(x) + 7) // 8 * 8).astype(np.float32)          # (T, 8) steps x rows
    rnn = lstmkit.RNN(1, 16, backend="native")
    with torch.no_grad():
        rnn.weight_ih_l0.fill_(1)
        for name in ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(rnn, name).zero_()
        out, _ = rnn(torch.from_numpy(x).view(-1, 8, 1))
    got = out.double().numpy()
    assert np.array_equal(got, got[..., :1].repeat(16, -1))            # every unit the same
    got, x = got[..., 0].ravel(), x.ravel().astype(np.float64)
    wanted = np.tanh(x)
    assert (np.abs(got) <= 1).all()
    ulp = np.spacing(np.abs(wanted).astype(np.float32)).astype(np.float64)
    error_ulp = np.abs(got - wanted) / ulp
    assert error_ulp.max() <= 6, f"{error_ulp.max():.1f} ulp at x = {x[error_ulp.argmax()]}"
    small = np.abs(x) <= 1e-7
    assert np.array_equal(got[small], x[small].astype(np.float32))


def test_float32_lstm_cell_is_accurate_when_saturated(driver):
    """The float32 LSTM cell (two divisions, exponents clamped at +-25, see ratio_cell) against
    float64 numbers, with pre-activations from 0 to far past saturation (|a| up to 60): the same
    bits with and without autograd, and within 1e-6 of float64 over 40 steps."""
    rng = np.random.default_rng(5)
    H, T, B = 19, 40, 6
    lstm = lstmkit.LSTM(1, H, backend="native")
    scales = rng.uniform(-30, 30, size=(4 * H, 1))
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(torch.from_numpy(scales))
        lstm.weight_hh_l0.zero_()
        lstm.bias_ih_l0.copy_(torch.from_numpy(rng.uniform(-1, 1, 4 * H)))
        lstm.bias_hh_l0.zero_()
    x = torch.from_numpy(rng.uniform(-2, 2, size=(T, B, 1)).astype(np.float32))
    with torch.no_grad():
        inferred, _ = lstm(x)
    trained, _ = lstm(x.clone().requires_grad_())
    assert torch.equal(inferred, trained.detach())
    a = x.double().numpy() @ scales.T + lstm.bias_ih_l0.detach().double().numpy()   # (T, B, 4H)
    i, f, g, o = np.split(a, 4, axis=-1)
    sigmoid = lambda v: 1 / (1 + np.exp(-v))                           # noqa: E731
    c = np.zeros((B, H))
    wanted = []
    for t in range(T):
        c = sigmoid(f[t]) * c + sigmoid(i[t]) * np.tanh(g[t])
        wanted.append(sigmoid(o[t]) * np.tanh(c))
    assert np.abs(inferred.double().numpy() - np.array(wanted)).max() <= 1e-6


def _function_cases():
    torch.manual_seed(3)
    d = torch.float64

    def r(*shape):
        return torch.randn(*shape, dtype=d) * 0.5

    def keep(*shape):                                # a zoneout mask, keeping with p = 0.4
        return Mask(torch.bernoulli(torch.full(shape, 0.4, dtype=d)))

    lstm = native.NativeLSTMFunction
    gru = native.NativeGRUFunction
    rnn = native.NativeRNNFunction
    packed = StepLayout.packed([3, 3, 2, 1])       # N = 9 rows, B = 3
    padded = StepLayout.padded(3, 2)
    return {
        "lstm": (lstm, [r(6, 2), r(2, 3), r(2, 3), r(12, 2), r(12, 3), r(12), r(12), None,
                        padded, False]),
        "lstm-packed-reverse": (lstm, [r(9, 2), r(3, 3), r(3, 3), r(12, 2), r(12, 3), r(12),
                                       None, None, packed, True]),
        "lstm-proj": (lstm, [r(9, 2), r(3, 2), r(3, 3), r(12, 2), r(12, 2), r(12), r(12),
                             r(2, 3), packed, False]),
        "lstm-peephole": (lstm, [r(9, 2), r(3, 3), r(3, 3), r(12, 2), r(12, 3), r(12), r(12),
                                 None, packed, True, r(9), 0]),
        "lstm-proj-peephole": (lstm, [r(6, 2), r(2, 2), r(2, 3), r(12, 2), r(12, 2), r(12),
                                      None, r(2, 3), padded, False, r(9), 8]),
        "lstm-cifg": (lstm, [r(9, 2), r(3, 3), r(3, 3), r(12, 2), r(12, 3), r(12), r(12), None,
                             packed, False, None, 1]),
        "lstm-peephole-cifg": (lstm, [r(6, 2), r(2, 3), r(2, 3), r(12, 2), r(12, 3), None, r(12),
                                      None, padded, True, r(9), 1]),
        "lstm-noinput-noforget": (lstm, [r(9, 2), r(3, 3), r(3, 3), r(12, 2), r(12, 3), r(12),
                                         r(12), None, packed, True, r(9), 6]),
        # softsign cell input, identity output (hard sigmoid and hardtanh have kinks)
        "lstm-activations": (lstm, [r(6, 2), r(2, 2), r(2, 3), r(12, 2), r(12, 2), r(12), r(12),
                                    r(2, 3), padded, False, None,
                                    native.cell_form(cell_activation="softsign",
                                                     output_activation="identity")]),
        # zoneout's masks get no gradient (Mask: not marked as wanting one)
        "lstm-zoneout": (lstm, [r(9, 2), r(3, 3), r(3, 3), r(12, 2), r(12, 3), r(12), r(12),
                                None, packed, True, None, 0, keep(9, 3), keep(9, 3)]),
        "lstm-proj-peephole-cifg-zoneout-c": (lstm, [
            r(6, 2), r(2, 2), r(2, 3), r(12, 2), r(12, 2), r(12), r(12), r(2, 3), padded, False,
            r(9), 1, None, keep(6, 3)]),
        "lstm-recurrent-dropout": (lstm, [r(9, 2), r(3, 3), r(3, 3), r(12, 2), r(12, 3), r(12),
                                          r(12), None, packed, True, None, 0, None, None,
                                          Mask(torch.bernoulli(torch.full((3, 3), 0.7,
                                                                          dtype=d)) / 0.7)]),
        "lstm-proj-recurrent-dropout-zoneout-c": (lstm, [
            r(6, 2), r(2, 2), r(2, 3), r(12, 2), r(12, 2), None, r(12), r(2, 3), padded, False,
            None, 0, None, keep(6, 3), Mask(torch.tensor([[1.25, 0.0], [1.25, 1.25]], dtype=d))]),
        "lstm-zoneout-expectation": (lstm, [
            r(6, 2), r(2, 3), r(2, 3), r(12, 2), r(12, 3), None, r(12), None, padded, True, r(9),
            0, Mask(torch.full((1, 3), 0.3, dtype=d)), Mask(torch.full((1, 3), 0.6, dtype=d))]),
        "gru": (gru, [r(9, 2), r(3, 3), r(9, 2), r(9, 3), r(9), r(9), packed, True, True]),
        "gru-reset-before": (gru, [r(6, 2), r(2, 3), r(9, 2), r(9, 3), r(9), r(9), padded,
                                   False, False]),
        "gru-zoneout": (gru, [r(9, 2), r(3, 3), r(9, 2), r(9, 3), r(9), r(9), packed, True, True,
                              keep(9, 3)]),
        "gru-reset-before-zoneout": (gru, [r(9, 2), r(3, 3), r(9, 2), r(9, 3), None, r(9), packed,
                                           False, False, keep(9, 3)]),
        "gru-recurrent-dropout": (gru, [r(9, 2), r(3, 3), r(9, 2), r(9, 3), r(9), r(9), packed,
                                        True, True, keep(9, 3),
                                        Mask(torch.tensor([[1.25, 0, 1.25], [0, 1.25, 1.25],
                                                           [1.25, 1.25, 1.25]], dtype=d))]),
        "gru-reset-before-recurrent-dropout": (gru, [
            r(9, 2), r(3, 3), r(9, 2), r(9, 3), r(9), None, packed, True, False, None,
            Mask(torch.tensor([[1.25, 0, 1.25], [0, 1.25, 1.25], [1.25, 1.25, 0]], dtype=d))]),
        # softsign candidate (hard sigmoid and hardtanh have kinks)
        "gru-softsign": (gru, [r(9, 2), r(3, 3), r(9, 2), r(9, 3), r(9), r(9), packed, True, True,
                               None, None, native.gru_form(candidate_activation="softsign")]),
        "gru-reset-before-softsign-zoneout": (gru, [
            r(6, 2), r(2, 3), r(9, 2), r(9, 3), r(9), r(9), padded, False, False, keep(6, 3),
            None, native.gru_form(candidate_activation="softsign")]),
        "gru-zoneout-expectation": (gru, [r(6, 2), r(2, 3), r(9, 2), r(9, 3), r(9), r(9), padded,
                                          True, True, Mask(torch.full((1, 3), 0.3, dtype=d))]),
        "rnn-tanh": (rnn, [r(9, 2), r(3, 3), r(3, 2), r(3, 3), r(3), r(3), packed, True, "tanh"]),
        "rnn-relu": (rnn, [r(6, 2), r(2, 3), r(3, 2), r(3, 3), r(3), r(3), padded, False, "relu"]),
    }


@dataclass
class Mask:
    """A Function argument that is not differentiated (zoneout's masks)."""
    tensor: torch.Tensor


@pytest.mark.parametrize("case", list(_function_cases()))
def test_gradcheck(case, driver):
    function, args = _function_cases()[case]
    args = [a.tensor if isinstance(a, Mask) else a.requires_grad_()
            if isinstance(a, torch.Tensor) else a for a in args]
    assert torch.autograd.gradcheck(lambda *a: function.apply(*a), args)


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn_tanh"])
def test_inference_path_matches_training_path(family, driver):
    """Without autograd the Functions skip saving for backward; the results must not change."""
    rng = np.random.default_rng(0)
    w, P = make_weights(family, 3, 17, rng)
    wt = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in w.items()}
    layout = StepLayout.packed([4, 4, 3, 3, 2, 1, 1])
    x = torch.randn(layout.rows, 3)
    sizes = (P, 17) if family == "lstm" else (17,)
    states = [torch.randn(4, s) for s in sizes]
    trained = native_layer(family, x, states, wt, layout, reverse=False)
    with torch.no_grad():
        inferred = native_layer(family, x, states, wt, layout, reverse=False)
    for a, b in zip(trained, inferred, strict=True):
        assert not b.requires_grad
        assert torch.equal(a.detach(), b)


def test_cell_matches_torch():
    torch.manual_seed(0)
    ours = lstmkit.LSTMCell(5, 256, backend="native")
    theirs = torch.nn.LSTMCell(5, 256)
    theirs.load_state_dict(ours.state_dict())
    x, h, c = torch.randn(1, 5), torch.randn(1, 256), torch.randn(1, 256)
    with torch.no_grad():
        for _ in range(3):
            (h1, c1), (h2, c2) = ours(x, (h, c)), theirs(x, (h, c))
            assert (h1 - h2).abs().max() < 1e-5 and (c1 - c2).abs().max() < 1e-5
            h, c = h1, c1


# The single-step cells the native kernel computes: (cell, its options, the NumPy reference).
STREAMING_CELLS = {
    "lstm": (lstmkit.LSTMCell, {}, reference.lstm_forward),
    "gru": (lstmkit.GRUCell, {}, reference.gru_forward),
    "gru_reset_before": (lstmkit.GRUCell, {"reset_after": False},
                         lambda *a, **k: reference.gru_forward(*a, **k, reset_after=False)),
    "rnn_tanh": (lstmkit.RNNCell, {}, reference.rnn_forward),
    "rnn_relu": (lstmkit.RNNCell, {"nonlinearity": "relu"},
                 lambda *a, **k: reference.rnn_forward(*a, **k, nonlinearity="relu")),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,hidden,bias", [(1, 1, True), (1, 256, True), (3, 3, False),
                                               (2, 127, True), (5, 17, False), (9, 33, True)])
@pytest.mark.parametrize("backend", ["auto", "native"])
@pytest.mark.parametrize("kind", list(STREAMING_CELLS))
def test_streaming_cell_fast_path_matches_reference(kind, dtype, batch, hidden, bias, backend,
                                                     monkeypatch):
    """The cells under no_grad go straight to the native single-step kernel (once per step from
    Python); over several steps they must equal the NumPy float64 reference. Batch 9: two
    groups of four rows and one alone; hidden 1, 17, 33 and 127: a partial unit block; hidden
    256: two workers (the reset-before GRU's two phases then cross between them)."""
    general = count_general_cell_calls(monkeypatch)
    cls, options, forward = STREAMING_CELLS[kind]
    g = torch.Generator().manual_seed(hidden + batch)
    cell = cls(4, hidden, bias=bias, dtype=dtype, backend=backend, **options)
    xs = torch.randn(6, batch, 4, dtype=dtype, generator=g)
    states = [torch.randn(batch, hidden, dtype=dtype, generator=g)
              for _ in range(2 if kind == "lstm" else 1)]
    weights = {"w_ih": cell.weight_ih, "w_hh": cell.weight_hh, "b_ih": cell.bias_ih,
               "b_hh": cell.bias_hh}
    expected, *final = forward(
        xs.double().numpy(), *(s.double().numpy() for s in states),
        **{k: None if w is None else w.detach().double().numpy() for k, w in weights.items()})
    state = tuple(states) if kind == "lstm" else states[0]
    with torch.no_grad():
        for t in range(len(xs)):
            state = cell(xs[t], state)
            h = state[0] if kind == "lstm" else state
            assert_close(f"h at step {t}", h, expected[t], dtype)
    if kind == "lstm":
        assert_close("final c", state[1], final[1], dtype)
    assert general == []                                   # every step took the fast path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,hidden", [(1, 1), (1, 256), (5, 17), (9, 33)])
@pytest.mark.parametrize("kind", list(STREAMING_CELLS))
def test_low_precision_cells_compute_in_float32(kind, dtype, batch, hidden, monkeypatch):
    """float16 and bfloat16 cells take the fast path too, their weights widened to float32 as
    the kernel reads them: each step equals the float32 cell's on the same (widened) weights,
    input and state, rounded to the dtype, bit for bit. Input size 20 and hidden 17 and 33: a
    full 16-element load of a weight row and a partial one; hidden 256: two workers."""
    general = count_general_cell_calls(monkeypatch)
    cls, options, _ = STREAMING_CELLS[kind]
    g = torch.Generator().manual_seed(hidden + batch)
    cell = cls(20, hidden, dtype=dtype, **options)
    wide = cls(20, hidden, **options)
    wide.load_state_dict({k: v.float() for k, v in cell.state_dict().items()})
    xs = torch.randn(4, batch, 20, generator=g).to(dtype)
    state = tuple(torch.randn(batch, hidden, generator=g).to(dtype)
                  for _ in range(2 if kind == "lstm" else 1))
    with torch.no_grad():
        for t in range(len(xs)):
            expected = wide(xs[t].float(), tuple(s.float() for s in state) if kind == "lstm"
                            else state[0].float())
            new = cell(xs[t], state if kind == "lstm" else state[0])
            state = new if kind == "lstm" else (new,)
            expected = expected if kind == "lstm" else (expected,)
            for got, want in zip(state, expected, strict=True):
                assert got.dtype == dtype and torch.equal(got, want.to(dtype)), f"step {t}"
    assert general == []


ELEMENTWISE_VARIANTS = {
    "peepholes": lstmkit.LSTMVariant(peepholes=True),
    "cifg-peepholes": lstmkit.LSTMVariant.greff("CIFG"),
    "no-input-no-output-gate": lstmkit.LSTMVariant(input_gate=False, output_gate=False),
    "nfg-hard-sigmoid": lstmkit.LSTMVariant(forget_gate=False, gate_activation="hard_sigmoid"),
    "softsign-identity": lstmkit.LSTMVariant(cell_activation="softsign",
                                             output_activation="identity"),
    "peepholes-hardtanh": lstmkit.LSTMVariant(peepholes=True, cell_activation="hardtanh"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("batch,hidden", [(1, 1), (5, 17), (1, 256)])
@pytest.mark.parametrize("variant", list(ELEMENTWISE_VARIANTS))
def test_elementwise_variant_cells_take_the_single_step_kernel(variant, batch, hidden, dtype,
                                                               monkeypatch):
    """LSTMCell with peepholes, CIFG, removed gates or other activations runs native: in
    inference one step of the single-step kernel per call, equal to the portable variant
    kernel in float64 (to float32's tolerance in float32, and in bfloat16 bit for bit to
    the float32 kernel on the widened values); in training the native layer, whose
    gradients equal the portable kernel's."""
    g = torch.Generator().manual_seed(hidden * 10 + batch)
    cell = lstmkit.LSTMCell(4, hidden, variant=ELEMENTWISE_VARIANTS[variant], dtype=dtype)
    if "peephole" in variant:
        with torch.no_grad():
            cell.weight_peephole.copy_(torch.rand(3 * hidden, generator=g) - 0.5)
    exact = lstmkit.LSTMCell(4, hidden, variant=cell.variant, dtype=torch.float64,
                             backend="portable")
    exact.load_state_dict({k: v.double() for k, v in cell.state_dict().items()})
    widened = lstmkit.LSTMCell(4, hidden, variant=cell.variant)
    widened.load_state_dict({k: v.float() for k, v in cell.state_dict().items()})
    xs = torch.randn(3, batch, 4, generator=g).to(dtype)
    state = tuple(torch.randn(batch, hidden, generator=g).to(dtype) for _ in range(2))
    calls = count_native_steps(monkeypatch, "step_inference")
    with torch.no_grad():
        for t in range(len(xs)):
            expected = exact(xs[t].double(), tuple(s.double() for s in state))
            if dtype == torch.bfloat16:
                widened_step = widened(xs[t].float(), tuple(s.float() for s in state))
            state = cell(xs[t], state)
            for name, got, want in zip(("h", "c"), state, expected, strict=True):
                if dtype == torch.bfloat16:
                    want32 = widened_step[0 if name == "h" else 1]
                    assert torch.equal(got, want32.to(dtype)), f"{name} at step {t}"
                else:
                    assert_close(f"{name} at step {t}", got, want.numpy(), dtype)
    assert calls == ["lstm"] * len(xs) * (2 if dtype == torch.bfloat16 else 1)
    if dtype != torch.float64:
        return
    # Training: the native layer (a one-step sequence), gradients as the portable kernel's.
    x = xs[0].clone().requires_grad_()
    for module in (cell, exact):
        module.zero_grad()
    cell(x, state)[0].sum().backward()
    x_exact = xs[0].clone().requires_grad_()
    exact(x_exact, state)[0].sum().backward()
    assert_close("dx", x.grad, x_exact.grad.numpy(), dtype)
    for (name, p), q in zip(cell.named_parameters(), exact.parameters(), strict=True):
        assert_close(f"d{name}", p.grad, q.grad.numpy(), dtype)


def test_single_step_kernel_refuses_weights_of_the_wrong_shape():
    """A weight replaced by one of another shape must not be read past its end: the fast path
    leaves the call to the general path, and the kernel itself refuses it with a ValueError."""
    cell = lstmkit.LSTMCell(3, 4)
    cell.weight_hh = torch.nn.Parameter(torch.randn(16, 5))
    x, h, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        assert native.module().cell_step_if(0, x, (h, c), cell.weight_ih, cell.weight_hh,
                                            cell.bias_ih, cell.bias_hh) is None
        with pytest.raises(ValueError, match=r"w_hh must have shape \[16, 4\], got \[16, 5\]"):
            cell(x, (h, c))


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "training"])
@pytest.mark.parametrize("steps", [1, 7])
@pytest.mark.parametrize("cls,name,shape,message", [
    (lstmkit.LSTM, "weight_hh_l0", (16, 5), r"w_hh must have shape \[16, 4\], got \[16, 5\]"),
    (lstmkit.LSTM, "bias_ih_l0", (15,), r"b_ih must have shape \[16\], got \[15\]"),
    (lstmkit.GRU, "weight_ih_l0", (12, 2), r"w_ih must have shape \[12, 3\], got \[12, 2\]"),
    (lstmkit.RNN, "bias_hh_l0", (5,), r"b_hh must have shape \[4\], got \[5\]"),
])
def test_layers_refuse_weights_of_the_wrong_shape(cls, name, shape, message, steps, grad):
    """A parameter replaced by one of another shape: a ValueError naming it and both shapes,
    where the native kernels read it with the strides the states imply (out of step or past its
    end) and returned numbers."""
    module = cls(3, 4, backend="native")
    setattr(module, name, torch.nn.Parameter(torch.randn(*shape)))
    x = torch.randn(steps, 2, 3)
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=message):
        module(x)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "training"])
@pytest.mark.parametrize("masks, proj, message", [
    ({"zoneout_c": (7, 4)}, False, r"zoneout_c must have shape \(6, 4\) or \(1, 4\), got \[7, 4\]"),
    ({"zoneout_h": (6,)}, False, r"zoneout_h must have shape \(6, 4\) or \(1, 4\), got \[6\]"),
    ({"zoneout_h": (1, 3)}, False, r"zoneout_h must have shape \(6, 4\) or \(1, 4\), got \[1, 3\]"),
    ({"zoneout_h": (6, 4)}, True, r"zoneout_h must have shape \(6, 2\) or \(1, 2\), got \[6, 4\]"),
    ({"recurrent": (6, 4)}, False, r"recurrent must have h0's shape \[2, 4\], got \[6, 4\]"),
])
def test_native_lstm_refuses_zoneout_masks_that_do_not_fit(masks, proj, message, grad):
    """Zoneout masks of the wrong shape (the kernels would read them out of step or past their
    end; zoneout_h's is the projection's width when there is one): a ValueError naming the mask
    and the shapes it may have."""
    x, h0, c0 = torch.randn(6, 3), torch.randn(2, 2 if proj else 4), torch.randn(2, 4)
    w_hh = torch.randn(16, h0.shape[1])
    w_hr = torch.randn(2, 4) if proj else None
    params = [t.requires_grad_(grad) for t in (torch.randn(16, 3), w_hh)]
    zoneout = {name: torch.rand(*shape) for name, shape in masks.items()}
    with pytest.raises(ValueError, match=message):
        native.NativeLSTMFunction.apply(x, h0, c0, *params, None, None, w_hr,
                                        StepLayout.padded(3, 2), False, None, 0, **zoneout)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "training"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_low_precision_masks_compute_in_float32(family, dtype, grad):
    """float16/bfloat16 with zoneout and recurrent dropout masks (exact in those dtypes): the
    float32 kernel's results on the widened values, rounded once, and its gradients."""
    g = torch.Generator().manual_seed(7)
    B, H, T = 3, 20, 4
    gates = 4 if family == "lstm" else 3

    def low(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)
    x, h, c = low(T * B, 5), low(B, H), low(B, H)
    weights = [low(gates * H, 5, scale=0.3), low(gates * H, H, scale=0.3)]
    masks = {"zoneout_h": torch.bernoulli(torch.full((T * B, H), 0.3), generator=g).to(dtype)}
    masks["recurrent"] = (torch.bernoulli(torch.full((B, H), 0.8), generator=g) * 1.25).to(dtype)
    if family == "lstm":
        masks["zoneout_c"] = torch.full((1, H), 0.25).to(dtype)
    layout = StepLayout.padded(T, B)

    def run(cast):
        inputs = [t.to(cast, copy=True).requires_grad_(grad) for t in [x, h, c, *weights]]
        wide = {name: mask.to(cast) for name, mask in masks.items()}
        if family == "lstm":
            out = kernels.lstm_layer(*inputs, layout=layout, backend="native", **wide)
        else:
            inputs.pop(2)
            out = kernels.gru_layer(*inputs, layout=layout, backend="native", **wide)
        if not grad:
            return list(out)
        sum(o.float().sum() * (k + 1) for k, o in enumerate(out)).backward()
        return list(out) + [t.grad for t in inputs]
    for got, wide in zip(run(dtype), run(torch.float32), strict=True):
        assert got.dtype == dtype and torch.equal(got, wide.to(dtype))


@pytest.mark.parametrize("option", ["zoneout_h", "recurrent", "form"])
@pytest.mark.parametrize("run", ["one_state_layer", "one_state_infer"])
def test_native_rnn_refuses_the_gru_variants(run, option):
    """The GRU's and RNN's shared entry points take zoneout and recurrent dropout masks and
    other activations for the GRU only."""
    x, h0, w_ih, w_hh = torch.randn(6, 3), torch.randn(2, 4), torch.randn(4, 3), torch.randn(4, 4)
    masks = [torch.rand(6, 4) if option == "zoneout_h" else None,
             torch.rand(2, 4) if option == "recurrent" else None]
    with pytest.raises(ValueError, match="the native RNN has no zoneout, recurrent dropout or "
                                         "other activations"):
        getattr(native.module(), run)(x, h0, w_ih, w_hh, None, None, *masks, [2, 2, 2], False,
                                      False, False, 1, 3 if option == "form" else 0)


@pytest.mark.parametrize("mask, shape, message", [
    ("zoneout_h", (2, 4), r"zoneout_h must have shape \(6, 4\) or \(1, 4\), got \[2, 4\]"),
    ("recurrent", (6, 4), r"recurrent must have h0's shape \[2, 4\], got \[6, 4\]")])
def test_native_gru_refuses_masks_that_do_not_fit(mask, shape, message):
    x, h0 = torch.randn(6, 3), torch.randn(2, 4)
    with pytest.raises(ValueError, match=message):
        kernels.gru_layer(x, h0, torch.randn(12, 3), torch.randn(12, 4),
                          layout=StepLayout.padded(3, 2), backend="native",
                          **{mask: torch.rand(*shape)})


def count_native_steps(monkeypatch, entry="step_if_fits") -> list:
    """Record the cell kind of every call of a single-step kernel entry of native.py: the
    cells' fast path (step_if_fits, kinds as CELL_KINDS values) or one-step sequences
    (step_inference, kinds as names)."""
    calls, called = [], getattr(native, entry)
    monkeypatch.setattr(native, entry, lambda kind, *a: calls.append(kind) or called(kind, *a))
    return calls


@pytest.mark.parametrize("kind", ["gru", "rnn_tanh"])
def test_one_step_sequences_take_the_single_step_kernel(kind, monkeypatch):
    """lstmkit.GRU and RNN in inference run a one-step sequence (their step() streams) through
    the single-step kernel, as lstmkit.LSTM does, with the layer's results."""
    calls = count_native_steps(monkeypatch, "step_inference")
    torch.manual_seed(0)
    ours = (lstmkit.GRU if kind == "gru" else lstmkit.RNN)(5, 19, num_layers=2)
    theirs = (torch.nn.GRU if kind == "gru" else torch.nn.RNN)(5, 19, num_layers=2)
    theirs.load_state_dict(ours.state_dict())
    x, h = torch.randn(1, 3, 5), torch.randn(2, 3, 19)
    with torch.no_grad():
        (y1, h1), (y2, h2) = ours(x, h), theirs(x, h)
    assert calls == [kind, kind]                           # one per layer
    assert (y1 - y2).abs().max() < 1e-5 and (h1 - h2).abs().max() < 1e-5


def count_general_calls(monkeypatch, base, method="forward") -> list:
    """Record every call that takes the general (checked, dispatched) path: `base.<method>`,
    under the cells' or the modules' fast path."""
    calls, general = [], getattr(base, method)
    monkeypatch.setattr(base, method,
                        lambda self, *a, **k: calls.append(1) or general(self, *a, **k))
    return calls


def count_general_cell_calls(monkeypatch) -> list:
    from lstmkit.nn import cells

    return count_general_calls(monkeypatch, cells._CellBase, "_checked_forward")


def test_streaming_cell_leaves_other_calls_to_the_general_path(monkeypatch):
    general = count_general_cell_calls(monkeypatch)
    cell = lstmkit.LSTMCell(3, 4)
    x, h, c = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 4)
    cell(x, (h, c))                                        # gradients wanted
    with torch.no_grad():
        cell(x)                                            # no state given
        cell(x[0], (h[0], c[0]))                           # unbatched
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cell(x, (h, c))
        lstmkit.LSTMCell(3, 4, backend="portable")(x, (h, c))
        lstmkit.LSTMCell(3, 4, variant=lstmkit.LSTMVariant(peepholes=True))(x, (h, c))
        with pytest.raises(ValueError, match="h must have shape \\(2, 4\\), got \\(2, 5\\)"):
            cell(x, (torch.randn(2, 5), c))
        with pytest.raises(TypeError, match="h must have dtype torch.float32"):
            cell(x, (h.double(), c))
        # The GRU and RNN cells.
        lstmkit.GRUCell(3, 4, variant=lstmkit.GRUVariant(layer_norm=True))(x, h)
        lstmkit.RNNCell(3, 4)(x)                           # no state given
        with pytest.raises(ValueError, match="h must have shape \\(2, 4\\), got \\(1, 4\\)"):
            lstmkit.RNNCell(3, 4)(x, h[:1])
    assert len(general) == 8 + 3


MODULE_STEPS = {"lstm": (lstmkit.LSTM, torch.nn.LSTM, {}), "gru": (lstmkit.GRU, torch.nn.GRU, {}),
                "rnn_relu": (lstmkit.RNN, torch.nn.RNN, {"nonlinearity": "relu"})}


def test_module_step_of_the_reset_before_gru_takes_the_single_step_kernel(monkeypatch):
    """GRU(reset_after=False) has no torch.nn twin: its steps must equal its own forward over
    the whole sequence, layer after layer through the kernel."""
    calls = count_native_steps(monkeypatch)
    torch.manual_seed(3)
    gru = lstmkit.GRU(5, 33, num_layers=2, reset_after=False, dtype=torch.float64).eval()
    xs, h0 = torch.randn(6, 3, 5, dtype=torch.float64), torch.randn(2, 3, 33, dtype=torch.float64)
    with torch.no_grad():
        whole, h_T = gru(xs, h0)
        state = h0
        for t in range(len(xs)):
            y, state = gru.step(xs[t], state)
            assert (y - whole[t]).abs().max() < 1e-12
    assert (state - h_T).abs().max() < 1e-12
    assert calls == [native.CELL_KINDS["gru_reset_before"]] * 2 * len(xs)
    kinds = count_native_steps(monkeypatch, "step_inference")   # a one-step sequence: forward
    with torch.no_grad():
        y_1, h_1 = gru(xs[:1], h0)
    assert kinds == ["gru_reset_before"] * 2
    assert (y_1[0] - whole[0]).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layers,batch,hidden,bias,state", [
    (1, 1, 1, True, False), (2, 1, 17, False, True), (3, 5, 33, True, True),
    (2, 9, 4, True, False)])
@pytest.mark.parametrize("family", list(MODULE_STEPS))
def test_module_step_takes_the_single_step_kernel(family, dtype, layers, batch, hidden, bias,
                                                   state, monkeypatch):
    """step() in inference runs each layer through the native single-step kernel: over several
    steps the outputs and states of torch.nn run one step at a time, and every step's outputs
    and states are new tensors (none shares memory with another or with the input state)."""
    ours_cls, theirs_cls, options = MODULE_STEPS[family]
    torch.manual_seed(layers * 100 + hidden)
    ours = ours_cls(5, hidden, num_layers=layers, bias=bias, dtype=dtype, **options).eval()
    theirs = theirs_cls(5, hidden, num_layers=layers, bias=bias, dtype=dtype, **options)
    theirs.load_state_dict(ours.state_dict())
    xs = torch.randn(4, batch, 5, dtype=dtype)
    shape = (layers, batch, hidden)
    hx = None
    if state:
        hx = torch.randn(shape, dtype=dtype)
        hx = (hx, torch.randn(shape, dtype=dtype)) if family == "lstm" else hx
    calls = count_native_steps(monkeypatch)
    with torch.no_grad():
        ours_state, theirs_state = hx, hx
        for t in range(len(xs)):
            y, ours_state = ours.step(xs[t], ours_state)
            expected, theirs_state = theirs(xs[t:t + 1], theirs_state)
            assert_close(f"output at step {t}", y, expected[0].double().numpy(), dtype)
            for got, want in zip(ours_state if family == "lstm" else [ours_state],
                                 theirs_state if family == "lstm" else [theirs_state],
                                 strict=True):
                assert got.shape == shape
                assert_close(f"state at step {t}", got, want.double().numpy(), dtype)
                assert got.data_ptr() != y.data_ptr()
    assert calls == [native.CELL_KINDS[family]] * layers * len(xs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", list(MODULE_STEPS))
def test_low_precision_module_step_takes_the_single_step_kernel(family, dtype, monkeypatch):
    """step() of a float16 or bfloat16 module runs each layer through the single-step kernel:
    each layer's results are the float32 layer's on the widened weights, input and state,
    rounded to the dtype, bit for bit (the second layer's input is the first's rounded
    output)."""
    ours_cls, _, options = MODULE_STEPS[family]
    torch.manual_seed(3)
    ours = ours_cls(5, 17, num_layers=2, dtype=dtype, **options).eval()
    wide = [ours_cls(5 if layer == 0 else 17, 17, **options).eval() for layer in range(2)]
    for layer, module in enumerate(wide):
        module.load_state_dict({name.replace(f"_l{layer}", "_l0"): p.float()
                                for name, p in ours.state_dict().items()
                                if name.endswith(f"_l{layer}")})
    x = torch.randn(3, 5).to(dtype)
    hx = torch.randn(2, 3, 17).to(dtype)
    hx = (hx, torch.randn(2, 3, 17).to(dtype)) if family == "lstm" else hx
    calls = count_native_steps(monkeypatch)
    with torch.no_grad():
        y, state = ours.step(x, hx)
        layer_input = x
        for layer, module in enumerate(wide):
            layer_state = tuple(s[layer:layer + 1].float() for s in hx) if family == "lstm" \
                else hx[layer:layer + 1].float()
            out, new = module(layer_input[None].float(), layer_state)
            for got, want in zip(state if family == "lstm" else [state],
                                 new if family == "lstm" else [new], strict=True):
                assert torch.equal(got[layer], want[0].to(dtype)), f"layer {layer}"
            layer_input = out[0].to(dtype)
    assert y.dtype == dtype and torch.equal(y, layer_input)
    assert calls[:2] == [native.CELL_KINDS[family]] * 2


def test_module_step_leaves_other_calls_to_forward(monkeypatch):
    """What the single-step kernel does not compute as it is takes forward's path, with the
    same results: gates wanted, a projection, a variant, gradients, dropout in training,
    unbatched input, and every error."""
    calls = count_native_steps(monkeypatch)
    x = torch.randn(2, 3)
    with torch.no_grad():
        lstm = lstmkit.LSTM(3, 4, num_layers=2, dropout=0.5)
        lstm.step(x)                                       # training, dropout between layers
        lstm.eval().step(x, return_gates=True)
        lstmkit.LSTM(3, 4, proj_size=2).step(x)
        lstmkit.GRU(3, 4, variant=lstmkit.GRUVariant(layer_norm=True)).step(x)
        lstmkit.LSTM(3, 4, variant=lstmkit.LSTMVariant(peepholes=True)).step(x)
        lstmkit.RNN(3, 4, backend="portable").step(x)
        lstmkit.RNN(3, 4).step(x[0])                        # unbatched
        with pytest.raises(ValueError, match=r"h_0 must have shape \(1, 2, 4\)"):
            lstmkit.RNN(3, 4).step(x, torch.randn(1, 3, 4))
        with pytest.raises(TypeError, match="hx must be a tuple"):
            lstmkit.LSTM(3, 4).step(x, torch.randn(1, 2, 4))
    lstmkit.GRU(3, 4).step(x)                              # gradients wanted
    assert calls == []
    with torch.no_grad():
        y, h = lstmkit.GRU(3, 4, num_layers=2).step(x)     # and the fast path itself
    assert calls == [native.CELL_KINDS["gru"]] * 2 and h.shape == (2, 2, 4)


def count_general_module_calls(monkeypatch) -> list:
    from lstmkit.nn import recurrent

    return count_general_calls(monkeypatch, recurrent._RecurrentBase)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "training"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("steps,batch,hidden,bias,state", [
    (1, 1, 1, True, False), (2, 1, 3, False, True), (30, 1, 127, True, True),
    (7, 3, 83, True, False), (5, 9, 16, False, True)])
def test_lstm_direct_path_matches_general_path(grad, dtype, batch_first, steps, batch, hidden,
                                               bias, state, monkeypatch):
    """LSTM with one layer and direction and the plain cell calls the native kernel straight
    from forward(), under no_grad and in training: the same outputs and gradients (of the
    input, the initial state and every parameter), to the bit, as the general path, and as
    torch.nn.LSTM within float tolerance."""
    torch.manual_seed(steps * 100 + hidden)
    ours = lstmkit.LSTM(4, hidden, bias=bias, batch_first=batch_first, dtype=dtype)
    theirs = torch.nn.LSTM(4, hidden, bias=bias, batch_first=batch_first, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(*((batch, steps) if batch_first else (steps, batch)), 4, dtype=dtype)
    hx = tuple(torch.randn(1, batch, hidden, dtype=dtype) for _ in range(2)) if state else None
    leaves = [x, *(hx or ())]
    weights = torch.randn(*x.shape[:2], hidden, dtype=dtype)    # d loss / d output

    def run(module):
        for t in (*leaves, *module.parameters()):
            t.grad = None
            t.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out, (h, c) = module(x, hx)
        if grad:
            ((out * weights).sum() + (h * c).sum()).backward()
        results = [out, h, c]
        if grad:
            results += [t.grad for t in (*leaves, *module.parameters())]
        return [r.detach() for r in results]

    general = count_general_module_calls(monkeypatch)
    module_calls = []
    monkeypatch.setattr(native, "lstm_module", lambda *args, call=native.lstm_module:
                        module_calls.append(args) or call(*args))
    direct = run(ours)
    assert general == []                                   # the direct path ran
    # In training, and in inference over several steps, with the module's reshapes in C++
    # (lstm_module), inside the autograd node in training.
    assert [args[-1] for args in module_calls] == ([grad] if grad or steps > 1 else [])
    monkeypatch.setattr(type(ours), "_runs_directly", lambda self, x, hx: False)
    via_general = run(ours)
    assert len(general) == 1
    expected = run(theirs)
    assert len(direct) == len(via_general) == len(expected) == (3 + len(leaves) + 4 - 2 * (not bias)
                                                                if grad else 3)
    for got, same, torch_nn in zip(direct, via_general, expected, strict=True):
        assert got.shape == same.shape == torch_nn.shape and got.dtype == dtype
        assert torch.equal(got, same)
        assert_close("vs torch.nn", got, torch_nn.double().numpy(), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lstm_direct_inference_in_low_precision_matches_general_path(dtype, monkeypatch):
    """float16 and bfloat16 modules (computed in float32) take the direct inference call too,
    with the general path's results to the bit, in the module's dtype."""
    torch.manual_seed(3)
    lstm = lstmkit.LSTM(5, 17, batch_first=True, dtype=dtype)
    x = torch.randn(3, 6, 5, dtype=dtype)
    hx = tuple(torch.randn(1, 3, 17, dtype=dtype) for _ in range(2))
    with torch.no_grad():
        direct = [lstm(x)[0], *lstm(x, hx)[1]]
        monkeypatch.setattr(type(lstm), "_runs_directly", lambda self, x, hx: False)
        general = [lstm(x)[0], *lstm(x, hx)[1]]
    for got, expected in zip(direct, general, strict=True):
        assert got.dtype == dtype and got.shape == expected.shape
        assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("state", [False, True], ids=["no-state", "state"])
def test_lstm_direct_training_results_are_the_nodes_own(dtype, batch_first, state, monkeypatch):
    """In training the direct path's output and states come straight from the layer's autograd
    node in the module's shapes (no view node around it), and the caller may change each of
    them in place: the gradients are then the general path's, to the bit."""
    torch.manual_seed(11)
    lstm = lstmkit.LSTM(3, 5, batch_first=batch_first, dtype=dtype)
    x = torch.randn(*((2, 4) if batch_first else (4, 2)), 3, dtype=dtype)
    hx = tuple(torch.randn(1, 2, 5, dtype=dtype) for _ in range(2)) if state else None
    weights = torch.randn(*x.shape[:2], 5, dtype=dtype)

    def run():
        leaves = [x, *(hx or ()), *lstm.parameters()]
        for t in leaves:
            t.grad = None
            t.requires_grad_(True)
        out, (h, c) = lstm(x, hx)
        nodes = {r.grad_fn.name() for r in (out, h, c)}
        out += 1.0                                       # the caller's in-place edits
        h.mul_(2.0)
        c.add_(0.5)
        ((out * weights).sum() + (h * c).sum()).backward()
        return nodes, [out.detach(), h.detach(), c.detach(), *(t.grad for t in leaves)]

    nodes, direct = run()
    assert nodes == {native._LSTM_NODE}
    monkeypatch.setattr(type(lstm), "_runs_directly", lambda self, x, hx: False)
    _, general = run()
    assert len(direct) == len(general) == 3 + 1 + 2 * state + 4
    for got, expected in zip(direct, general, strict=True):
        assert got.shape == expected.shape and got.dtype == dtype
        assert torch.equal(got, expected)


@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
def test_lstm_direct_training_refuses_an_input_changed_in_place(batch_first):
    """An input (an earlier layer's output) changed in place between the direct path's forward
    and backward makes the backward raise torch's usual error, which names the change and the
    tensor, as torch.nn.LSTM's does."""
    lstm = lstmkit.LSTM(3, 5, batch_first=batch_first)
    x = torch.randn(4, 2, 3, requires_grad=True) * 1.0        # not a leaf
    out, _ = lstm(x.transpose(0, 1) if batch_first else x)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def _modules_with_same_weights(family, *args, **kwargs):
    ours = getattr(lstmkit, family)(*args, **kwargs)
    theirs = getattr(torch.nn, family)(*args, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("family", ["LSTM", "GRU", "RNN"])
def test_an_expanded_input_is_read_as_its_values(family):
    """An input expanded over time and batch (its flattened rows 0 elements apart) gives
    torch.nn's outputs and gradients: BLAS, which would read such rows as if they were
    consecutive, past the memory behind them, is never handed them."""
    torch.manual_seed(8)
    ours, theirs = _modules_with_same_weights(family, 4, 5, dtype=torch.float64)
    base = torch.randn(1, 1, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 3, 5, dtype=torch.float64)
    results = []
    for module in (ours, theirs):
        with torch.no_grad():
            inferred = module(base.expand(5, 3, 4))[0]
        base.grad = None
        out = module(base.expand(5, 3, 4))[0]
        (out * weights).sum().backward()
        results.append([inferred, out.detach(), base.grad.clone(),
                        *(p.grad.clone() for p in module.parameters())])
        module.zero_grad()
    for got, expected in zip(*results, strict=True):
        assert_close("expanded input", got, expected.numpy(), torch.float64)


@pytest.mark.parametrize("family", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("state", ["negated view", "one-element imaginary part",
                                   "zero tensor"])
def test_states_without_plain_memory_are_read_as_their_values(family, state):
    """Initial states whose values are not the bytes in their memory: a negated view (its sign
    a flag; `conj().imag` of a complex tensor is one) and a zero tensor (no memory at all; both
    made here with torch's private constructors, the only way at these sizes). The kernels'
    plain copies take neither; torch.nn's results, in inference and in training."""
    torch.manual_seed(9)
    hidden, batch = (1, 1) if state == "one-element imaginary part" else (6, 2)
    ours, theirs = _modules_with_same_weights(family, 3, hidden, dtype=torch.float32)
    x = torch.randn(4, batch, 3)
    values = [torch.randn(1, batch, hidden) for _ in range(2)]
    if state == "negated view":
        states = [torch._neg_view(v) for v in values]
    elif state == "one-element imaginary part":
        states = [torch.complex(torch.randn_like(v), -v).conj().imag for v in values]
    else:
        states = [torch._efficientzerotensor(v.shape) for v in values]
    expected_states = [s.clone() for s in states]          # plain tensors, same values
    assert states[0].is_neg() or states[0]._is_zerotensor()
    hx = tuple(states) if family == "LSTM" else states[0]
    expected_hx = tuple(expected_states) if family == "LSTM" else expected_states[0]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = ours(x, hx)
            expected = theirs(x, expected_hx)
        for a, b in zip(torch.utils._pytree.tree_leaves(got),
                        torch.utils._pytree.tree_leaves(expected), strict=True):
            assert_close(f"{state}, grad {grad}", a.detach(), b.detach().double().numpy(),
                         torch.float32)


def test_lstm_direct_path_leaves_other_calls_to_the_general_path(monkeypatch):
    general = count_general_module_calls(monkeypatch)
    lstm = lstmkit.LSTM(3, 4)
    x, h, c = torch.randn(5, 2, 3), torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            lstm(x, [h, c])                                # a list, not a tuple
            lstm(x[:, 0])                                  # unbatched
            lstm(x, (h, c), return_gates=True)
            lstm(x, (h, c), lengths=[5, 3])                # twice: it packs and calls forward
            lstm(pack_padded_sequence(x, [5, 3]))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lstm(x, (h, c))
            for other in (lstmkit.LSTM(3, 4, num_layers=2),
                          lstmkit.LSTM(3, 4, bidirectional=True),
                          lstmkit.LSTM(3, 4, proj_size=2), lstmkit.LSTM(3, 4, backend="portable"),
                          lstmkit.LSTM(3, 4, variant=lstmkit.LSTMVariant(peepholes=True)),
                          lstmkit.LSTM(3, 4, variant=lstmkit.LSTMVariant(weight_drop=0.5))):
                other(x)                                   # the last: DropConnect in training
    assert len(general) == 2 * 13
    with torch.no_grad():                                  # errors: the general path's
        with pytest.raises(ValueError, match=r"h_0 must have shape \(1, 2, 4\), got \(1, 2, 5\)"):
            lstm(x, (torch.randn(1, 2, 5), c))
        with pytest.raises(ValueError, match="input must have 3 features"):
            lstm(torch.randn(5, 2, 4))
        with pytest.raises(TypeError, match="input must have dtype torch.float64"):
            lstmkit.LSTM(3, 4, dtype=torch.float64)(x)


@pytest.mark.parametrize("update", ["in place", "through .data", "one element of .data"])
def test_cell_sees_weight_updates(update):
    """Every step reads the weights as they are now: an in-place update (an optimizer step), one
    made through `.data` (which autograd's version counter does not see) and a single changed
    element all reach the next step."""
    torch.manual_seed(1)
    ours = lstmkit.LSTMCell(3, 19, backend="native")
    theirs = torch.nn.LSTMCell(3, 19)
    x = torch.randn(5, 3)
    for _ in range(3):
        theirs.load_state_dict(ours.state_dict())
        with torch.no_grad():
            (h1, c1), (h2, c2) = ours(x), theirs(x)
            assert (h1 - h2).abs().max() < 1e-5 and (c1 - c2).abs().max() < 1e-5
            for p in ours.parameters():
                if update == "in place":
                    p.mul_(1.5)
                elif update == "through .data":
                    p.data.mul_(1.5)
                else:
                    p.data.view(-1)[7] += 2.0


def test_projection_scratch_is_per_thread_and_never_aliases_results():
    """The input projection reuses one buffer per thread: layers, directions, successive calls
    of other sizes and two Python threads at once must still get their own numbers."""
    torch.manual_seed(3)
    ours = lstmkit.LSTM(64, 40, num_layers=2, bidirectional=True, backend="native")
    theirs = torch.nn.LSTM(64, 40, num_layers=2, bidirectional=True)
    theirs.load_state_dict(ours.state_dict())
    inputs = [torch.randn(50, 8, 64), torch.randn(30, 12, 64)]   # projections above 4 MFLOP
    assert 2 * 50 * 8 * 64 * 160 > native.SERIAL_FLOPS
    expected = [theirs(x)[0] for x in inputs]
    results = {}

    def work(index):
        with torch.no_grad():
            for _ in range(3):
                results[index] = ours(inputs[index])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first = ours(inputs[0])[0]
    ours(inputs[1])                                   # reuses the buffer `first` came through
    for index, want in enumerate(expected):
        assert (results[index] - want).abs().max() < 1e-5
    assert (first - expected[0]).abs().max() < 1e-5


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_previous_rows_into_columns_of_a_wider_buffer(reverse):
    """The weight gradients' operand: each row's previous state, written into some columns of a
    wider buffer; large enough that the steps are copied in parallel."""
    sizes = [32] * 40 + [30, 17, 9, 3, 1]
    layout = StepLayout.packed(sizes)
    sequence, h0 = torch.randn(layout.rows, 256), torch.randn(32, 256)
    wide = torch.full((layout.rows, 256 + 70), 7.0)
    native.module().previous_rows(wide[:, 64:320], sequence, h0, layout.batch_sizes, reverse)
    assert torch.equal(wide[:, 64:320], layout.previous_rows(sequence, h0, reverse))
    assert (wide[:, :64] == 7.0).all() and (wide[:, 320:] == 7.0).all()


@pytest.fixture
def empty_pool():
    native.release_memory()
    yield native.module()
    native.release_memory()


def test_pool_gives_freed_memory_to_the_next_tensor_of_that_size(empty_pool):
    pool = empty_pool
    like = torch.empty(0)
    t = native.pooled_empty((512, 256), like)          # 512 KiB: pooled
    address = t.data_ptr()
    t.fill_(3.0)
    del t
    assert pool.pool_free_bytes() == 512 * 256 * 4
    again = native.pooled_empty((256, 512), like)      # same bytes, another shape
    assert again.data_ptr() == address and pool.pool_free_bytes() == 0
    smaller = native.pooled_empty((100, 256), like)    # would waste more than a quarter: fresh
    assert smaller.data_ptr() != address
    small = native.pooled_empty((3,), like)            # below the pooled size: not kept
    del small
    assert pool.pool_free_bytes() == 0
    native.release_memory()
    assert pool.pool_free_bytes() == 0


def test_pool_keeps_at_most_its_limit(empty_pool):
    pool = empty_pool
    with native_setting("pool_limit", 1 << 20):
        tensors = [native.pooled_empty((256, 256), torch.empty(0)) for _ in range(3)]
        del tensors                                   # 3 x 256 KiB freed, 1 MiB kept at most
        assert pool.pool_free_bytes() == 3 * 256 * 256 * 4
        more = [native.pooled_empty((512, 512), torch.empty(0)) for _ in range(2)]
        del more                                      # 2 x 1 MiB: neither fits beside them
        assert pool.pool_free_bytes() == 3 * 256 * 256 * 4


def _pool_in_child(queue):
    torch.set_num_threads(1)      # GNU OpenMP's thread team does not survive a fork
    t = native.pooled_empty((400, 400), torch.empty(0))
    t.fill_(1.0)
    del t
    queue.put(native.module().pool_free_bytes())


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_pool_works_in_a_forked_child(empty_pool):
    keep = native.pooled_empty((300, 300), torch.empty(0))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_pool_in_child, args=(queue,))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and queue.get(timeout=5) == 400 * 400 * 4
    del keep


def test_pooled_tensors_behave_like_any_tensor(empty_pool):
    """Resizing, dtype, autograd through a pooled copy, and threads allocating at once."""
    t = native.pooled_empty((300, 300), torch.empty(0, dtype=torch.float64))
    assert t.dtype == torch.float64 and t.is_contiguous() and t.shape == (300, 300)
    t.fill_(2.0)
    t.resize_(700, 700)                               # grows through the same allocator
    assert t.shape == (700, 700) and (t.view(-1)[:300 * 300] == 2.0).all()
    t.fill_(1.0)
    assert t.sum().item() == 700 * 700
    x = torch.randn(400, 400, requires_grad=True)
    y = native.pooled_copy(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    (y * 3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
    errors = []

    def churn(seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(200):
            n = int(torch.randint(200, 400, (1,), generator=g))
            a = native.pooled_empty((n, 300), torch.empty(0))
            a.fill_(seed)
            if not (a == seed).all():
                errors.append(seed)

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


def test_auto_picks_native_on_the_cpu_for_every_floating_dtype():
    # float16 and bfloat16 are computed in float32, as the portable kernels do.
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        assert kernels._function("lstm", "auto", torch.zeros(1, dtype=dtype)) is \
            native.NativeLSTMFunction
    assert kernels._function("gru", "auto", torch.zeros(1, dtype=torch.int64)) is \
        kernels.GRUFunction


def test_native_refuses_other_devices():
    x = torch.empty(4, 2, device="meta")
    with pytest.raises(ValueError, match="CPU only"):
        kernels.rnn_layer(x, torch.empty(2, 3, device="meta"), torch.empty(3, 2, device="meta"),
                          torch.empty(3, 3, device="meta"), layout=StepLayout.padded(2, 2),
                          backend="native")


def _graph_node_objects(tensor) -> dict:
    """The autograd nodes that produced `tensor`, by name (one of each)."""
    nodes, todo = {}, [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node.name() not in nodes:
            nodes[node.name()] = node
            todo += [next_node for next_node, _ in node.next_functions]
    return nodes


def _graph_nodes(tensor) -> set:
    """Names of the autograd nodes that produced `tensor`."""
    return set(_graph_node_objects(tensor))


@pytest.mark.parametrize("family", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_modules_copy_their_output_only_where_the_layer_saved_it(family, dtype):
    """A training module's output is copied for its caller (who may edit it in place) only
    where the layer's node saved that tensor: the GRU's and RNN's in float32; their float16 and
    bfloat16 nodes save their float32 result and return a converted copy, the LSTM's saves the
    previous rows."""
    module = getattr(lstmkit, family)(3, 4, num_layers=2, backend="native", dtype=dtype)
    out, _ = module(torch.randn(5, 2, 3, dtype=dtype, requires_grad=True))
    copied = any(name.endswith("CopyBackwards") for name in _graph_nodes(out))
    assert copied == (family != "LSTM" and dtype == torch.float32)


@pytest.mark.parametrize("variant", [
    lstmkit.LSTMVariant(peepholes=True, forget_bias=1.0),
    lstmkit.LSTMVariant(cifg=True, chrono_init=10),
    lstmkit.LSTMVariant(peepholes=True, cifg=True, weight_drop=0.3),
    lstmkit.LSTMVariant(peepholes=True, output_gate=False),
    lstmkit.LSTMVariant(forget_gate=False, orthogonal_init=True),
    lstmkit.LSTMVariant(gate_activation="hard_sigmoid", cell_activation="identity",
                        output_activation="softsign"),
], ids=["peepholes", "cifg", "peepholes-cifg-dropconnect", "peepholes-no-output-gate",
        "no-forget-gate", "activations"])
def test_native_variant_lstm_module_matches_portable(variant, same_masks):
    """Peepholes, CIFG and removed gates, with init-only options and DropConnect, run on the
    native kernels (both directions, two layers, training mode) with the portable variant
    kernel's results and gradients."""
    options = dict(num_layers=2, bidirectional=True, variant=variant, dtype=torch.float64)
    ours = lstmkit.LSTM(3, 6, backend="native", **options)
    portable = lstmkit.LSTM(3, 6, backend="portable", **options)
    portable.load_state_dict(ours.state_dict())
    results = []
    for model in (ours, portable):
        torch.manual_seed(5)                   # the same DropConnect masks for both
        x = torch.randn(5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
        out, (h, c) = model(x)
        (out.sin().sum() + h.cos().sum() + c.sum()).backward()
        nodes = _graph_nodes(out)
        native_ran = any("NativeLSTM" in name for name in nodes)
        assert native_ran == (model is ours), nodes
        results.append([out, h, c, x.grad, *(p.grad for p in model.parameters())])
    for mine, theirs in zip(*results, strict=True):
        assert (mine - theirs).abs().max().item() < 1e-10


# name: (family, training, variant, the module's options)
_MASKED_CASES = {
    "zoneout-c-training": ("LSTM", True, lstmkit.LSTMVariant(peepholes=True, zoneout_c=0.2), {}),
    "zoneout-h-expectation": ("LSTM", False, lstmkit.LSTMVariant(cifg=True, zoneout_h=0.2,
                                                                 zoneout_eval="expectation"), {}),
    "zoneout-h-projection-training": ("LSTM", True, lstmkit.LSTMVariant(zoneout_h=0.2,
                                                                        zoneout_c=0.1),
                                      {"proj_size": 2}),
    "zoneout-c-projection-training": ("LSTM", True, lstmkit.LSTMVariant(zoneout_c=0.1),
                                      {"proj_size": 2}),
    "zoneout-h-expectation-plain": ("LSTM", False, lstmkit.LSTMVariant(
        zoneout_h=0.2, zoneout_eval="expectation"), {}),
    "zoneout-h-softsign": ("LSTM", True, lstmkit.LSTMVariant(zoneout_h=0.2,
                                                             cell_activation="softsign"), {}),
    "recurrent-dropout": ("LSTM", True, lstmkit.LSTMVariant(recurrent_dropout=0.3), {}),
    "recurrent-dropout-zoneout-projection": ("LSTM", True, lstmkit.LSTMVariant(
        recurrent_dropout=0.3, zoneout_c=0.2, peepholes=True, weight_drop=0.2),
        {"proj_size": 2}),
    "recurrent-dropout-zoneout-cifg": ("LSTM", True, lstmkit.LSTMVariant(
        recurrent_dropout=0.3, zoneout_h=0.2, zoneout_c=0.2, cifg=True), {}),
    "gru-zoneout-training": ("GRU", True, lstmkit.GRUVariant(zoneout_h=0.3, update_bias=1.0),
                             {}),
    "gru-zoneout-dropconnect": ("GRU", True, lstmkit.GRUVariant(zoneout_h=0.3, weight_drop=0.2),
                                {}),
    "gru-reset-before-zoneout-training": ("GRU", True, lstmkit.GRUVariant(zoneout_h=0.3),
                                          {"reset_after": False}),
    "gru-zoneout-expectation": ("GRU", False, lstmkit.GRUVariant(zoneout_h=0.3,
                                                                 zoneout_eval="expectation"), {}),
    "gru-recurrent-dropout-zoneout": ("GRU", True, lstmkit.GRUVariant(
        recurrent_dropout=0.3, zoneout_h=0.2, weight_drop=0.2), {}),
    "gru-reset-before-recurrent-dropout": ("GRU", True, lstmkit.GRUVariant(recurrent_dropout=0.3),
                                           {"reset_after": False}),
    "gru-activations-zoneout": ("GRU", True, lstmkit.GRUVariant(
        gate_activation="hard_sigmoid", candidate_activation="softsign", zoneout_h=0.2), {}),
    "gru-reset-before-hardtanh": ("GRU", False, lstmkit.GRUVariant(candidate_activation="hardtanh"),
                                  {"reset_after": False}),
    # on the variant Function's native loops since stop 23 (the portable kernel ran them before)
    "fgr": ("LSTM", True, lstmkit.LSTMVariant(full_gate_recurrence=True, peepholes=True), {}),
    "fgr-projection-masks": ("LSTM", True, lstmkit.LSTMVariant(
        full_gate_recurrence=True, cifg=True, zoneout_h=0.2, recurrent_dropout=0.2,
        weight_drop=0.1), {"proj_size": 2}),
    "fgr-layer-norm": ("LSTM", True, lstmkit.LSTMVariant(layer_norm=True,
                                                         full_gate_recurrence=True,
                                                         zoneout_c=0.2), {}),
    "layer-norm-zoneout-h-projection": ("LSTM", True, lstmkit.LSTMVariant(
        layer_norm=True, zoneout_h=0.3, recurrent_dropout=0.2), {"proj_size": 2}),
}


@pytest.mark.parametrize("module, training, variant, options", [
    pytest.param(family + cell, *case, id=f"{family + cell}-{name}")
    for name, (family, *case) in _MASKED_CASES.items()
    # the cells have no projection and refuse DropConnect, recurrent dropout (a mask per
    # sequence) and full gate recurrence (a third state)
    for cell in ("", "Cell") if not (cell and ("proj_size" in case[2] or case[1].weight_drop
                                               or getattr(case[1], "full_gate_recurrence", 0)
                                               or getattr(case[1], "recurrent_dropout", 0)))])
def test_native_masked_variants_match_portable(module, training, variant, options, same_masks):
    """Zoneout, in training (masks drawn per call) and its expectation in eval, and recurrent
    dropout, with other elementwise variants (and initialisation and DropConnect), and full gate
    recurrence and layer norm with them: the native kernels (the native layers, or the variant
    Function's native loops) give the portable variant kernel's results and gradients, with the
    same masks from the same seed.
    Two layers, both directions and packed sequences for the modules, one step for the
    cells."""
    cell, lstm = module.endswith("Cell"), module.startswith("LSTM")
    options = dict(options, variant=variant, dtype=torch.float64)
    if not cell:
        options.update(num_layers=2, bidirectional=True)
    ours = getattr(lstmkit, module)(3, 6, backend="native", **options).train(training)
    portable = getattr(lstmkit, module)(3, 6, backend="portable", **options).train(training)
    portable.load_state_dict(ours.state_dict())
    results = []
    for model in (ours, portable):
        x = torch.randn(5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
        torch.manual_seed(5)                   # the same masks for both
        if cell:
            states = model(x[0])
            out = states[0] if lstm else states
        else:
            packed = pack_padded_sequence(x, [5, 4, 4, 2], enforce_sorted=False)
            out, states = model(packed)
            out = pad_packed_sequence(out)[0]
        states = states if isinstance(states, tuple) else (states,)
        loss = out.sin().sum() + states[0].cos().sum() + sum(s.sum() for s in states[1:])
        loss.backward()
        nodes = _graph_node_objects(out)
        native_ran = any("Native" in name or getattr(node, "native_parts", 0) > 0
                         for name, node in nodes.items())
        assert native_ran == (model is ours), list(nodes)
        results.append([out, *states, x.grad, *(p.grad for p in model.parameters())])
    for mine, theirs in zip(*results, strict=True):
        assert (mine - theirs).abs().max().item() < 1e-10


@pytest.mark.parametrize("backend", ["native", "portable"])
@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_zoneout_keeps_the_masked_units_exactly(family, backend):
    """Where zoneout's mask is 1 a unit keeps its previous h (and c) bit for bit: the mix is
    computed as torch.lerp does, from the nearer end, on both kernels."""
    g = torch.Generator().manual_seed(4)
    B, H = 8, 16
    x, h, c = (torch.randn(B, size, generator=g) for size in (3, H, H))
    gates = 4 if family == "lstm" else 3
    w_ih, w_hh = torch.randn(gates * H, 3, generator=g), torch.randn(gates * H, H, generator=g)
    masks = {name: torch.bernoulli(torch.full((B, H), 0.5), generator=g)
             for name in ("zoneout_h", "zoneout_c")[:2 if family == "lstm" else 1]}
    layout = StepLayout.padded(1, B)
    if family == "lstm":
        _, h_1, c_1 = kernels.lstm_layer(x, h, c, w_ih, w_hh, layout=layout, backend=backend,
                                         **masks)
        pairs = ((h_1, h, masks["zoneout_h"]), (c_1, c, masks["zoneout_c"]))
    else:
        _, h_1 = kernels.gru_layer(x, h, w_ih, w_hh, layout=layout, backend=backend, **masks)
        pairs = ((h_1, h, masks["zoneout_h"]),)
    for new, old, mask in pairs:
        kept = mask == 1
        assert torch.equal(new[kept], old[kept]) and not torch.equal(new[~kept], old[~kept])


@pytest.mark.parametrize("training, variant", [
    (False, lstmkit.LSTMVariant(peepholes=True, cifg=True, layer_norm=True)),
    (True, lstmkit.LSTMVariant(recurrent_dropout=0.1, layer_norm=True)),
    (True, lstmkit.LSTMVariant(zoneout_h=0.1, full_gate_recurrence=True)),
    (True, lstmkit.GRUVariant(recurrent_dropout=0.1, layer_norm=True)),
    (False, lstmkit.GRUVariant(zoneout_h=0.1, zoneout_eval="expectation", layer_norm=True)),
    (False, lstmkit.GRUVariant(candidate_activation="softsign", layer_norm=True)),
], ids=["layer-norm", "recurrent-dropout-layer-norm", "zoneout-full-gate-recurrence",
        "gru-recurrent-dropout-layer-norm", "gru-zoneout-layer-norm", "gru-activation-layer-norm"])
def test_native_variants_with_other_changes_take_the_variant_kernel(training, variant):
    """The variant Function, whose step loops are native (its native_parts) for every LSTM
    variant and for the GRU's layer norm."""
    lstm = isinstance(variant, lstmkit.LSTMVariant)
    model = (lstmkit.LSTM if lstm else lstmkit.GRU)(3, 4, variant=variant).train(training)
    out, _ = model(torch.randn(5, 2, 3))
    name = f"{'LSTM' if lstm else 'GRU'}VariantFunctionBackward"
    nodes = _graph_node_objects(out)
    assert name in nodes
    assert not any("Native" in node for node in nodes)
    assert nodes[name].native_parts == 1


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as info:
            return set(next(ln for ln in info if ln.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"
                         and {"avx512f", "avx2", "fma"} <= _cpu_flags()),
                    reason="checks the AVX2 build on an x86-64 Linux machine with AVX-512, "
                           "whose own build takes the AVX-512 paths")
def test_avx2_build_matches_reference():
    """The code paths of CPUs without AVX-512 (4-row groups, no 6-row group, 8-float vectors):
    the kernels built for Haswell pass the reference comparisons of every driver and of the
    single-step cells (whose lane sums shuffle 16-float vectors held as two halves, and whose
    float16 and bfloat16 weights are widened 8 at a time with F16C)."""
    tests = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider",
         "-p", "native_for_avx2", f"{tests / 'test_native.py'}::test_matches_reference",
         f"{tests / 'test_native.py'}::test_streaming_cell_fast_path_matches_reference",
         f"{tests / 'test_native.py'}::test_low_precision_cells_compute_in_float32"],
        capture_output=True, text=True, cwd=tests.parent,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(tests), os.environ.get("PYTHONPATH")]))})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "native build in use: lstmkit_native_haswell" in done.stdout
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    def broken_build():
        raise RuntimeError("Error building extension: no C++ compiler found")

    monkeypatch.setattr(native, "_compile", broken_build)
    monkeypatch.setattr(native, "_state", {"tried": False, "module": None, "reason": None})
    x, h0 = torch.randn(6, 2), torch.zeros(2, 3)
    weights = dict(w_ih=torch.randn(3, 2), w_hh=torch.randn(3, 3))
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*portable"):
        out_auto, _ = kernels.rnn_layer(x, h0, **weights, layout=StepLayout.padded(3, 2))
    assert native.unavailable_reason().endswith("no C++ compiler found")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # once: no second warning
        out_native, _ = kernels.rnn_layer(x, h0, **weights, layout=StepLayout.padded(3, 2),
                                          backend="native")
        out_portable, _ = kernels.rnn_layer(x, h0, **weights, layout=StepLayout.padded(3, 2),
                                            backend="portable")
    assert torch.equal(out_auto, out_portable) and torch.equal(out_native, out_portable)


def test_without_the_native_module_variants_run_portable_or_are_refused(monkeypatch):
    """With the native module unavailable, kernels.lstm_layer and gru_layer run zoneout and
    recurrent dropout on the portable variant kernel (backend="native" too, as for the plain
    cell), the variant layers and the gate traces their Python loops; the Native*Functions,
    whose fallback is the plain kernel, refuse the masks rather than drop them."""
    monkeypatch.setenv("LSTMKIT_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {"tried": False, "module": None, "reason": None})
    g = torch.Generator().manual_seed(3)
    x, h, c = (torch.randn(rows, size, generator=g, dtype=torch.float64)
               for rows, size in ((6, 2), (2, 3), (2, 3)))
    layout = StepLayout.padded(3, 2)
    masks = {"zoneout_h": torch.bernoulli(torch.full((6, 3), 0.5, dtype=torch.float64),
                                          generator=g),
             "recurrent": torch.full((2, 3), 1.25, dtype=torch.float64)}
    lstm = dict(w_ih=torch.randn(12, 2, dtype=torch.float64, generator=g),
                w_hh=torch.randn(12, 3, dtype=torch.float64, generator=g))
    gru = dict(w_ih=torch.randn(9, 2, dtype=torch.float64, generator=g),
               w_hh=torch.randn(9, 3, dtype=torch.float64, generator=g))
    with pytest.warns(RuntimeWarning, match="LSTMKIT_NATIVE=0"):
        out, _, _ = kernels.lstm_layer(x, h, c, **lstm, layout=layout, backend="native", **masks)
    expected = kernels.lstm_variant_layer(x, h, c, lstm, masks, lstmkit.LSTMVariant(),
                                          layout=layout)[0]
    assert torch.equal(out, expected)
    out, _ = kernels.gru_layer(x, h, **gru, layout=layout, backend="native", **masks)
    expected = kernels.gru_variant_layer(x, h, gru, masks, lstmkit.GRUVariant(), layout=layout)[0]
    assert torch.equal(out, expected)
    # the variant layers and the gate traces with backend="native": the portable loops
    for variant in (lstmkit.LSTMVariant(), lstmkit.LSTMVariant(full_gate_recurrence=True)):
        params = {**lstm, "w_gate": torch.randn(9, 9, dtype=torch.float64, generator=g)} \
            if variant.full_gate_recurrence else lstm
        out = kernels.lstm_variant_layer(x.clone().requires_grad_(), h, c, params, masks,
                                         variant, layout=layout, backend="native")[0]
        assert out.grad_fn.native_parts == 0
    for module in (lstmkit.LSTM(2, 3, backend="native"), lstmkit.GRU(2, 3, backend="native"),
                   lstmkit.GRU(2, 3, backend="native", variant=lstmkit.GRUVariant(zoneout_h=0.2))):
        out, _, trace = module(torch.randn(4, 2, 2), return_gates=True)
        assert trace[0, "forward"]["h"].shape == (4, 2, 3)
    with pytest.raises(ValueError, match="native LSTM variants need the native module.*"
                                         "LSTMKIT_NATIVE=0.*kernels.lstm_layer"):
        native.NativeLSTMFunction.apply(x, h, c, *lstm.values(), None, None, None, layout,
                                        False, None, 0, None, None, masks["recurrent"])
    with pytest.raises(ValueError, match="native GRU variants need the native module"):
        native.NativeGRUFunction.apply(x, h, *gru.values(), None, None, layout, False, True,
                                       masks["zoneout_h"])
    with pytest.raises(ValueError, match="native GRU variants need the native module"):
        native.NativeGRUFunction.apply(x, h, *gru.values(), None, None, layout, False, True,
                                       None, masks["recurrent"])


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("LSTMKIT_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {"tried": False, "module": None, "reason": None})
    with pytest.warns(RuntimeWarning, match="LSTMKIT_NATIVE=0"):
        assert not native.available()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_bernoulli_mask_draws_zeros_and_ones_at_rate_p(dtype):
    """The masks' native draw: 0 and 1 of the caller's dtype, at rate p (a million draws: the
    mean within 5 standard deviations, 0.0023 at p = 0.3), adjacent elements and rows
    uncorrelated, p = 0 and 1 exact."""
    like = torch.empty(0, dtype=dtype)
    torch.manual_seed(0)
    mask = native.bernoulli_mask(1000, 1000, 0.3, like)
    assert mask.dtype == dtype and mask.shape == (1000, 1000)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    m = mask.double()
    assert abs(m.mean().item() - 0.3) < 5 * (0.3 * 0.7 / 1e6) ** 0.5
    for pairs in ((m[:, 1:], m[:, :-1]), (m[1:], m[:-1])):       # neighbours in a row, rows
        assert abs((pairs[0] * pairs[1]).mean().item() - 0.09) < 0.002
    assert native.bernoulli_mask(7, 9, 0.0, like).sum() == 0
    assert native.bernoulli_mask(7, 9, 1.0, like).sum() == 63


def test_bernoulli_mask_follows_torch_seed_not_threads():
    """One seed from torch's global generator: torch.manual_seed reproduces a mask, the next
    call draws another, and the thread count does not change it."""
    like = torch.empty(0)
    torch.manual_seed(4)
    first, second = (native.bernoulli_mask(300, 700, 0.5, like) for _ in range(2))
    assert not torch.equal(first, second)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(4)
        assert torch.equal(native.bernoulli_mask(300, 700, 0.5, like), first)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        native.module().bernoulli_mask(2, 2, 1.5, 0, like)


@pytest.mark.parametrize("backend", ["portable", "auto-without-module"])
def test_bernoulli_mask_from_torch_for_portable_layers(backend, monkeypatch):
    """For a layer on the portable backend, or without the native module, torch.bernoulli
    draws the masks; a portable module in training never asks for the native module."""
    def no_module():
        raise AssertionError("the native module was asked for")

    if backend == "auto-without-module":
        monkeypatch.setattr(native, "available", lambda: False)
    else:
        monkeypatch.setattr(native, "available", no_module)
    torch.manual_seed(2)
    mask = native.bernoulli_mask(5, 6, 0.4, torch.empty(0, dtype=torch.float64),
                                 backend.split("-")[0])
    torch.manual_seed(2)
    expected = torch.bernoulli(torch.full((5, 6), 0.4, dtype=torch.float64))
    assert torch.equal(mask, expected)
    if backend == "portable":
        variant = lstmkit.LSTMVariant(zoneout_h=0.2, zoneout_c=0.1, recurrent_dropout=0.2)
        lstmkit.LSTM(3, 4, variant=variant, backend="portable").train()(torch.randn(5, 2, 3))
        gru = lstmkit.GRUVariant(zoneout_h=0.2, recurrent_dropout=0.2)
        lstmkit.GRU(3, 4, variant=gru, backend="portable").train()(torch.randn(5, 2, 3))


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_native_dropout_is_f_dropout_in_distribution(rate):
    """native.dropout, the modules' dropout between layers and DropConnect: each element zeroed
    with probability `rate`, the rest scaled by 1 / (1 - rate), the gradient the mask; its mask
    drawn natively for native layers (0 < rate < 1), F.dropout's own for portable ones."""
    torch.manual_seed(3)
    x = (torch.rand(2000, 500, dtype=torch.float64) + 0.5).requires_grad_()
    y = native.dropout(x, rate, "auto")
    kept = y != 0
    assert abs(kept.double().mean().item() - (1 - rate)) <= 5 * (rate * (1 - rate) / 1e6) ** 0.5
    if 0 < rate < 1:
        torch.testing.assert_close(y[kept], x[kept] / (1 - rate), rtol=1e-15, atol=0)
        y.sum().backward()
        torch.testing.assert_close(x.grad, kept.double() / (1 - rate), rtol=1e-15, atol=0)
        torch.manual_seed(3)
        z = (torch.rand(2000, 500, dtype=torch.float64) + 0.5)
        torch.manual_seed(9)
        native_mask = native.dropout(z, rate, "auto") != 0
        torch.manual_seed(9)
        torch_mask = native.dropout(z, rate, "portable") != 0
        assert not torch.equal(native_mask, torch_mask)        # two draws: native, F.dropout
        torch.manual_seed(9)
        assert torch.equal(torch_mask, torch.nn.functional.dropout(z, rate) != 0)
