"""Every kernel backend against the NumPy float64 reference, forward and backward.

Padded and packed layouts, both directions, odd sizes, T=1, batch 1, long sequences, float64
(~1e-10) and float32 (~1e-5); gradcheck on every Function; half precision runs in float32.
"""

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence, pad_packed_sequence

import lstmkit
from conftest import assert_close
from lstmkit import kernels, reference
from lstmkit.kernels import StepLayout

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
# (family, options): every cell form the kernels implement
FORMS = [
    ("lstm", {}), ("lstm", {"proj": 2}),
    ("gru", {"reset_after": True}), ("gru", {"reset_after": False}),
    ("rnn", {"nonlinearity": "tanh"}), ("rnn", {"nonlinearity": "relu"}),
]
FORM_IDS = ["lstm", "lstm-proj", "gru", "gru-reset-before", "rnn-tanh", "rnn-relu"]


def make_case(family, B, I, H, dtype, seed, bias=True, proj=0, **_):
    """Random weights and initial states (never zeros) for one layer of `family`."""
    g = torch.Generator().manual_seed(seed)
    P = proj or H

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    G = GATES[family] * H
    case = {"w_ih": rand(G, I), "w_hh": rand(G, P) * 0.5,
            "b_ih": rand(G) if bias else None, "b_hh": rand(G) if bias else None}
    if proj:
        case["w_hr"] = rand(P, H) * 0.5
    states = {"h0": rand(B, P)}
    if family == "lstm":
        states["c0"] = rand(B, H)
    return case, states


def kernel_options(family, options):
    return {k: v for k, v in options.items() if k in ("reset_after", "nonlinearity")}


def run_kernel(family, x, states, weights, layout, reverse, backend, options):
    fn = getattr(kernels, f"{family}_layer")
    return fn(x, *states.values(), **weights, layout=layout, reverse=reverse, backend=backend,
              **kernel_options(family, options))


def run_reference(family, x, states, weights, d_out, d_states, options):
    """Reference forward + backward on one (T, B, I) batch: outputs, final states, grads."""
    np_ = {k: None if v is None else v.detach().double().numpy() for k, v in weights.items()}
    st = [s.detach().double().numpy() for s in states.values()]
    opts = kernel_options(family, options)
    forward = getattr(reference, f"{family}_forward")
    backward = getattr(reference, f"{family}_backward")
    y, *finals, cache = forward(x, *st, **np_, **opts)
    grads = backward(d_out, *d_states, cache)
    return y, finals, grads


def check_layer(family, options, T_lengths, I, H, dtype, backend, reverse, seed, bias=True):
    """Run kernel and reference on sequences of the given lengths and compare everything.

    T_lengths: one int (padded batch of B equal-length sequences is given as a list of equal
    ints) or a list of lengths, longest first (a packed batch).
    """
    B = len(T_lengths)
    weights, states = make_case(family, B, I, H, dtype, seed, bias=bias, **options)
    g = torch.Generator().manual_seed(seed + 1)
    sequences = [torch.randn(L, I, generator=g, dtype=torch.float64) for L in T_lengths]
    uniform = len(set(T_lengths)) == 1
    if uniform:
        x = torch.stack(sequences, 1)                           # (T, B, I)
        layout = StepLayout.padded(T_lengths[0], B)
        x_flat = x.reshape(-1, I).to(dtype)
    else:
        packed = pack_sequence(sequences)
        layout = StepLayout.packed(packed.batch_sizes.tolist())
        x_flat = packed.data.to(dtype)
    leaves = [x_flat, *states.values(), *[w for w in weights.values() if w is not None]]
    for t in leaves:
        t.requires_grad_()
    out, *finals = run_kernel(family, x_flat, states, weights, layout, reverse, backend, options)
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    d_finals = [torch.randn(f.shape, generator=g, dtype=torch.float64).to(dtype) for f in finals]
    loss = (out * d_out).sum() + sum((f * d).sum() for f, d in zip(finals, d_finals))
    grads = torch.autograd.grad(loss, leaves)
    names = ["x", *states, *[k for k, w in weights.items() if w is not None]]
    kernel_grads = dict(zip(names, grads))

    # Reference: one call per sequence (time-reversed for the reverse direction), summed.
    if uniform:
        d_out_pad = d_out.reshape(T_lengths[0], B, -1)
        out_pad = out.reshape(T_lengths[0], B, -1)
    else:
        out_pad, _ = pad_packed_sequence(PackedSequence(out, packed.batch_sizes))
        d_out_pad, _ = pad_packed_sequence(PackedSequence(d_out, packed.batch_sizes))
        dx_pad, _ = pad_packed_sequence(PackedSequence(kernel_grads["x"], packed.batch_sizes))
    ref_weight_grads = {k: 0.0 for k in weights if weights[k] is not None}
    for b, L in enumerate(T_lengths):
        seq = sequences[b].numpy()[:, None, :]
        d_seq = d_out_pad[:L, b:b + 1].double().numpy()
        flip = (lambda a: a[::-1].copy()) if reverse else (lambda a: a)
        st = {k: v[b:b + 1] for k, v in states.items()}
        y, ref_finals, ref_grads = run_reference(
            family, flip(seq), st, weights, flip(d_seq),
            [d[b:b + 1].double().numpy() for d in d_finals], options)
        assert_close(out_pad[:L, b:b + 1], flip(y), dtype, f"output of sequence {b}")
        for name, f, rf in zip(states, finals, ref_finals):
            assert_close(f[b:b + 1], rf, dtype, f"final {name} of sequence {b}")
            assert_close(kernel_grads[name][b:b + 1], ref_grads[name], dtype, f"d{name} of seq {b}")
        dx = kernel_grads["x"].reshape(T_lengths[0], B, I)[:, b:b + 1] if uniform else dx_pad[:L, b:b + 1]
        assert_close(dx, flip(ref_grads["x"]), dtype, f"dx of sequence {b}")
        for k in ref_weight_grads:
            ref_weight_grads[k] = ref_weight_grads[k] + ref_grads[k]
    for k, expected in ref_weight_grads.items():
        assert_close(kernel_grads[k], expected, dtype, f"d{k}")


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("lengths,I,H", [
    ([1], 1, 1),                 # T=1, batch 1, H=1
    ([6], 3, 3),                 # batch 1
    ([4, 4, 4], 5, 3),           # padded batch
    ([2, 2], 4, 127),            # odd large hidden size
    ([5, 3, 3, 1], 2, 4),        # packed, with ties and a length-1 sequence
])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_kernel_matches_reference(backend, form, dtype, lengths, I, H, reverse):
    family, options = form
    if options.get("proj", 0) >= H:
        options = {**options, "proj": max(H - 1, 0)}
    check_layer(family, options, lengths, I, H, dtype, backend, reverse, seed=len(lengths) + H)


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_kernel_without_bias_matches_reference(backend, form):
    family, options = form
    check_layer(family, options, [4, 2, 1], 3, 5, torch.float64, backend, False, seed=3, bias=False)


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_kernel_long_sequence_matches_reference(backend, family):
    """300 steps: the recurrence and its gradient stay exact over a long horizon."""
    check_layer(family, {}, [300, 300], 3, 4, torch.float64, backend, False, seed=11)


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gradcheck(backend, form, packed, reverse):
    family, options = form
    H, I = 3, 2
    lengths = [3, 2, 2, 1] if packed else [3, 3]
    weights, states = make_case(family, len(lengths), I, H, torch.float64, seed=5, **options)
    layout = StepLayout.packed(
        [sum(L > t for L in lengths) for t in range(lengths[0])]) if packed else StepLayout.padded(3, 2)
    x = torch.randn(layout.rows, I, dtype=torch.float64)
    names = list(states) + [k for k, w in weights.items() if w is not None]
    tensors = [x] + [states[k] for k in states] + [weights[k] for k in names[len(states):]]
    tensors = [t.clone().requires_grad_() for t in tensors]

    def function(x, *rest):
        st = dict(zip(states, rest[:len(states)]))
        w = {k: None for k in weights} | dict(zip(names[len(states):], rest[len(states):]))
        return run_kernel(family, x, st, w, layout, reverse, backend, options)

    assert torch.autograd.gradcheck(function, tensors, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", ["portable", "native"])
@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_in_float32_and_returns_the_input_dtype(family, dtype, backend):
    """Low-precision inputs are computed in float32: the result equals the same backend's
    float32 kernel on the same (rounded) values, up to the rounding of the output to the input
    dtype, in training and in inference (the native kernels' separate forward path)."""
    weights, states = make_case(family, 2, 3, 4, dtype, seed=9)
    layout = StepLayout.padded(5, 2)
    x = torch.randn(10, 3).to(dtype)
    leaves = [x.requires_grad_(), *[w.requires_grad_() for w in weights.values() if w is not None]]
    out, *finals = run_kernel(family, x, states, weights, layout, False, backend, {})
    assert out.dtype == dtype and all(f.dtype == dtype for f in finals)
    up = {k: None if v is None else v.detach().float() for k, v in weights.items()}
    out32, *_ = run_kernel(family, x.detach().float(), {k: v.float() for k, v in states.items()},
                           up, layout, False, backend, {})
    torch.testing.assert_close(out.detach().float(), out32.to(dtype).float(), rtol=0, atol=0)
    with torch.no_grad():                 # inference: converted once per call, then the same
        out_inference, *_ = run_kernel(family, x, states, weights, layout, False, backend, {})
    assert torch.equal(out_inference, out.detach())
    grads = torch.autograd.grad(out.float().sum(), leaves)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    w32 = dict(zip([k for k, v in weights.items() if v is not None], leaves32[1:]))
    out32, *_ = run_kernel(family, leaves32[0], {k: v.float() for k, v in states.items()},
                           {k: w32.get(k) for k in weights}, layout, False, backend, {})
    grads32 = torch.autograd.grad(out32.sum(), leaves32)
    for grad, grad32 in zip(grads, grads32, strict=True):    # float32 backward, rounded once
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), grad32.to(dtype).float(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["portable", "native"])
@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_mixed_dtypes_compute_in_the_inputs_dtype_and_return_each_states_own(
        family, steps, state_dtype, backend):
    """A float16 input with float32 weights and float32 or float64 states, in inference (the
    native kernels convert in C++; one step takes the sequence path, not the single-step
    kernel): the all-float32 kernel's results, the output in float16, the final states in
    their own dtype."""
    weights, states = make_case(family, 2, 3, 4, torch.float32, seed=4)
    layout = StepLayout.padded(steps, 2)
    x = torch.randn(2 * steps, 3, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    mixed_states = {k: v.to(state_dtype) for k, v in states.items()}
    with torch.no_grad():
        out, *finals = run_kernel(family, x, mixed_states, weights, layout, False, backend, {})
        out32, *finals32 = run_kernel(family, x.float(), states, weights, layout, False, backend,
                                      {})
    assert out.dtype == torch.float16 and all(f.dtype == state_dtype for f in finals)
    # At one step the all-float32 call takes the native single-step kernel, which sums the
    # products in another order: float32's rounding there (and so at most one float16 step
    # for the output), bit for bit elsewhere.
    exact = steps > 1 or backend == "portable"
    torch.testing.assert_close(out, out32.to(torch.float16), rtol=0 if exact else 2e-3,
                               atol=0 if exact else 1e-5)
    for final, final32 in zip(finals, finals32, strict=True):
        torch.testing.assert_close(final, final32.to(state_dtype), rtol=0 if exact else 1.3e-6,
                                   atol=0 if exact else 1e-5)


@pytest.mark.parametrize("backend", ["portable", "native"])
@pytest.mark.parametrize("family", ["lstm", "gru", "rnn"])
def test_double_backward_is_refused_with_a_clear_error(family, backend):
    weights, states = make_case(family, 1, 2, 2, torch.float64, seed=1)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    out, *_ = run_kernel(family, x, states, weights, StepLayout.padded(3, 1), False, backend, {})
    direction = torch.randn_like(out, requires_grad=True)   # grad-of-grad needs a graph here
    (grad,) = torch.autograd.grad(out, x, grad_outputs=direction, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        grad.sum().backward()


@pytest.mark.parametrize("backend", ["portable", "native"])
@pytest.mark.parametrize("family", ["LSTM", "GRU", "RNN"])
def test_functorch_transforms_are_refused(family, backend):
    """torch.func.grad over a module refuses the kernels' Functions (they have no functorch
    rules) with an error rather than returning wrong gradients."""
    module = getattr(lstmkit, family)(3, 4, backend=backend)
    params = {name: p.detach() for name, p in module.named_parameters()}

    def loss(p, x):
        return torch.func.functional_call(module, p, (x,))[0].sum()

    with pytest.raises(RuntimeError, match="functorch|setup_context"):
        torch.func.grad(loss)(params, torch.randn(5, 2, 3))


def test_unknown_backend_is_refused():
    weights, states = make_case("rnn", 1, 2, 2, torch.float64, seed=1)
    with pytest.raises(ValueError, match="backend must be one of .* got 'cudnn'"):
        kernels.rnn_layer(torch.randn(2, 2, dtype=torch.float64), *states.values(), **weights,
                          layout=StepLayout.padded(2, 1), backend="cudnn")


def test_layout_rejects_increasing_batch_sizes():
    with pytest.raises(ValueError, match=r"non-increasing, got \(1, 2\)"):
        StepLayout.packed([1, 2])


def test_previous_rows_of_a_packed_layout():
    """The state each row started from, for both directions, spelled out on a tiny case."""
    layout = StepLayout.packed([3, 2, 1])                      # lengths 3, 2, 1
    seq = torch.arange(6.0).unsqueeze(1) + 10                  # rows: t0:10,11,12 t1:13,14 t2:15
    h0 = torch.tensor([[0.0], [1.0], [2.0]])
    assert layout.previous_rows(seq, h0, reverse=False).flatten().tolist() == [0, 1, 2, 10, 11, 13]
    assert layout.previous_rows(seq, h0, reverse=True).flatten().tolist() == [13, 14, 2, 15, 1, 0]
    assert np.array_equal(layout.offsets, (0, 3, 5)) and layout.rows == 6
