"""return_gates=True: per-step gates and states of every layer and direction, and saturation."""

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from lstmkit import kernels
from lstmkit.reference import gru_forward
from lstmkit.reference.lstm_variants import lstm_variant_forward
from lstmkit.reference.variant import LSTMVariant


def _layer_params(module, suffix):
    names = {"weight_ih": "w_ih", "weight_hh": "w_hh", "bias_ih": "b_ih", "bias_hh": "b_hh",
             "weight_hr": "w_hr", "weight_peephole": "w_peephole"}
    return {arg: getattr(module, stem + suffix).detach().numpy()
            for stem, arg in names.items() if hasattr(module, stem + suffix)}


@pytest.mark.parametrize("variant", [None, LSTMVariant(peepholes=True, cifg=True)],
                         ids=["plain", "peephole_cifg"])
def test_lstm_trace_matches_reference_gates(variant):
    torch.manual_seed(0)
    module = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, variant=variant,
                          dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    output, (h_n, c_n), trace = module(x, return_gates=True)
    assert trace.names == ("i", "f", "g", "o", "c", "h")
    assert list(trace) == [(0, "forward"), (0, "reverse"), (1, "forward"), (1, "reverse")]
    v = module.variant
    layer_input = x.numpy()
    for layer in range(2):
        outs = []
        for d, direction in enumerate(("forward", "reverse")):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            seq = layer_input[::-1] if d else layer_input
            y, _, _, (steps, *_) = lstm_variant_forward(seq, np.zeros((2, 4)), np.zeros((2, 4)),
                                                        _layer_params(module, suffix), v)
            order = (lambda a: a[::-1]) if d else (lambda a: a)
            record = trace[layer, direction]
            for name in ("i", "f", "g", "o"):
                expected = order(np.stack([s[name] for s in steps]))
                np.testing.assert_allclose(record[name].numpy(), expected, atol=1e-12)
            np.testing.assert_allclose(record["c"].numpy(),
                                       order(np.stack([s["c_new"] for s in steps])), atol=1e-12)
            np.testing.assert_allclose(record["h"].numpy(), order(y), atol=1e-12)
            outs.append(order(y))
        layer_input = np.concatenate(outs, axis=2)
    # the trace agrees with the module's own outputs
    torch.testing.assert_close(trace[1, "forward"]["c"][-1], c_n[2])
    torch.testing.assert_close(trace[1, "reverse"]["c"][0], c_n[3])
    torch.testing.assert_close(trace[1, "forward"]["h"], output[..., :4])


def test_trace_changes_nothing_else_and_keeps_gradients():
    torch.manual_seed(1)
    module = lstmkit.LSTM(3, 5, num_layers=2, proj_size=2, dtype=torch.float64)
    x = torch.randn(6, 3, 3, dtype=torch.float64, requires_grad=True)
    plain_out, (plain_h, plain_c) = module(x)
    plain_out.sum().backward()
    plain_grads = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    x.grad = None
    module.zero_grad()
    out, (h, c), trace = module(x, return_gates=True)
    out.sum().backward()
    torch.testing.assert_close(out, plain_out, rtol=0, atol=1e-14)
    torch.testing.assert_close(c, plain_c, rtol=0, atol=1e-14)
    for a, b in zip([x.grad] + [p.grad for p in module.parameters()], plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert trace[0, "forward"]["h"].shape == (6, 3, 2)        # projected output size P
    assert trace[0, "forward"]["c"].shape == (6, 3, 5)
    assert not any(t.requires_grad for t in trace[1, "forward"].values())


def test_trace_follows_the_input_layout():
    module = lstmkit.LSTM(2, 3, batch_first=True)
    _, _, trace = module(torch.randn(4, 7, 2), return_gates=True)
    assert trace[0, "forward"]["f"].shape == (4, 7, 3)           # (B, T, H)
    _, _, trace = module(torch.randn(7, 2), return_gates=True)
    assert trace[0, "forward"]["o"].shape == (7, 3)              # unbatched (T, H)
    packed = pack_padded_sequence(torch.randn(3, 5, 2), [5, 2, 4], batch_first=True,
                                  enforce_sorted=False)
    out, _, trace = module(packed, return_gates=True)
    gate = trace[0, "forward"]["i"]
    assert torch.equal(gate.batch_sizes, out.batch_sizes) and gate.data.shape == (11, 3)


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_trace_matches_reference(reset_after):
    torch.manual_seed(2)
    module = lstmkit.GRU(3, 4, reset_after=reset_after, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    out, h, trace = module(x, return_gates=True)
    assert trace.names == ("r", "z", "n", "h")
    w = [getattr(module, n).detach().numpy() for n in
         ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")]
    y, _, (steps, *_) = gru_forward(x.detach().numpy(), np.zeros((2, 4)), *w,
                                    reset_after=reset_after)
    for k, name in enumerate(("r", "z", "n")):
        expected = np.stack([s[2 + k] for s in steps])
        np.testing.assert_allclose(trace[0, "forward"][name].numpy(), expected, atol=1e-12)
    # gradients flow as without the trace
    out.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    module(x)[0].sum().backward()
    torch.testing.assert_close(x.grad, grad, rtol=0, atol=1e-14)


def test_lstm_trace_function_gradcheck():
    torch.manual_seed(4)
    layout = kernels.StepLayout.padded(3, 2)
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True)
            for s in ((6, 2), (2, 2), (2, 3), (12, 2), (12, 2), (12,), (12,), (2, 3))]

    def run(*tensors):
        out, h, c, _, _ = kernels.lstm_layer_with_gates(*tensors, layout=layout)
        return out, h, c

    assert torch.autograd.gradcheck(run, args)


@pytest.mark.parametrize("module, options", [
    ("LSTM", {}), ("LSTM", {"proj_size": 2}),
    ("LSTM", {"variant": LSTMVariant(peepholes=True, zoneout_h=0.2)}),
    ("GRU", {}), ("GRU", {"reset_after": False}),
    ("GRU", {"variant": lstmkit.GRUVariant(zoneout_h=0.2, candidate_activation="softsign")}),
], ids=["lstm", "lstm-projection", "lstm-variant", "gru", "gru-reset-before", "gru-variant"])
def test_native_traces_match_portable(module, options, same_masks):
    """Traces on the variants' native loops (backend "auto" on the CPU), the plain cells' and
    the elementwise variants' alike: the portable traces' gates, outputs and gradients, two
    layers, both directions, in training (the same masks from the same seed)."""
    torch.manual_seed(7)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    names = "ifgoch" if module == "LSTM" else "rznh"
    results = []
    for backend in ("auto", "portable"):
        torch.manual_seed(8)
        model = getattr(lstmkit, module)(4, 5, num_layers=2, bidirectional=True,
                                         dtype=torch.float64, backend=backend, **options)
        xi = x.clone().requires_grad_()
        torch.manual_seed(9)
        out, states, trace = model(xi, return_gates=True)
        states = states if isinstance(states, tuple) else (states,)
        (out.sin().sum() + sum(s.cos().sum() for s in states)).backward()
        results.append([out, *states, xi.grad, *(p.grad for p in model.parameters()),
                        *(trace[layer, direction][name] for layer in range(2)
                          for direction in ("forward", "reverse") for name in names)])
        ran_native = any(getattr(node, "native_parts", 0) > 0 for node in _graph_nodes(out))
        assert ran_native == (backend == "auto")
    for mine, theirs in zip(*results, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


def _graph_nodes(tensor) -> list:
    """The autograd nodes that produced `tensor`."""
    nodes, seen, todo = [], set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            nodes.append(node)
            todo += [next_node for next_node, _ in node.next_functions]
    return nodes


def test_plain_trace_is_the_plain_kernel_exactly():
    # The portable trace comes from the portable kernel's own stash, so it matches it bit for
    # bit; the native loops (backend "auto" on the CPU) agree to rounding.
    torch.manual_seed(5)
    x = torch.randn(7, 3, 3)
    for backend in ("portable", "auto"):
        torch.manual_seed(6)
        module = lstmkit.LSTM(3, 4, num_layers=2, proj_size=2, backend=backend)
        out, (h, c) = module(x)
        traced, (h2, c2), _ = module(x, return_gates=True)
        if backend == "portable":
            assert torch.equal(out, traced) and torch.equal(h, h2) and torch.equal(c, c2)
        for got, expected in ((traced, out), (h2, h), (c2, c)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gru_trace_function_gradcheck():
    torch.manual_seed(3)
    layout = kernels.StepLayout.padded(3, 2)
    args = [torch.randn(s, dtype=torch.float64, requires_grad=True)
            for s in ((6, 2), (2, 3), (9, 2), (9, 3), (9,), (9,))]

    def run(*tensors):
        out, h, _ = kernels.gru_layer_with_gates(*tensors, layout=layout)
        return out, h

    assert torch.autograd.gradcheck(run, args)


def test_zero_cost_when_off(monkeypatch):
    """Without return_gates the plain path never touches the tracing kernels."""
    def forbidden(*args, **kwargs):
        raise AssertionError("tracing kernel used without return_gates")

    monkeypatch.setattr(kernels, "lstm_variant_layer", forbidden)
    monkeypatch.setattr(kernels, "lstm_layer_with_gates", forbidden)
    monkeypatch.setattr(kernels, "gru_layer_with_gates", forbidden)
    out = lstmkit.LSTM(2, 3)(torch.randn(4, 1, 2))
    assert len(out) == 2
    assert len(lstmkit.GRU(2, 3)(torch.randn(4, 1, 2))) == 2


def test_rnn_has_no_gates():
    with pytest.raises(ValueError, match="no gates"):
        lstmkit.RNN(2, 3)(torch.randn(4, 1, 2), return_gates=True)
    with pytest.raises(TypeError, match="return_gates"):
        lstmkit.LSTM(2, 3)(torch.randn(4, 1, 2), return_gates="yes")


def test_saturation_counts_exactly():
    # one layer, 4 steps, 1 sequence, 2 units: unit 0 shut 3 of 4 steps, unit 1 open 2 of 4
    f = torch.tensor([[[0.05, 0.95]], [[0.0, 0.5]], [[0.09, 0.91]], [[0.5, 0.2]]])
    other = torch.full_like(f, 0.5)
    trace = lstmkit.GateTrace("LSTM", {(0, "forward"): {"i": other, "f": f, "o": other}})
    stats = lstmkit.gate_saturation(trace)
    np.testing.assert_array_equal(stats[0, "forward"]["f"]["low"], [0.75, 0.0])
    np.testing.assert_array_equal(stats[0, "forward"]["f"]["high"], [0.0, 0.5])
    np.testing.assert_array_equal(stats[0, "forward"]["i"]["low"], [0.0, 0.0])
    assert set(stats[0, "forward"]) == {"i", "f", "o"}


def test_saturation_of_a_real_trace():
    module = lstmkit.GRU(2, 3, num_layers=2)
    packed = pack_padded_sequence(torch.randn(2, 6, 2) * 5, [6, 1], batch_first=True)
    _, _, trace = module(packed, return_gates=True)
    stats = lstmkit.gate_saturation(trace, low=0.2, high=0.8)
    assert set(stats) == {(0, "forward"), (1, "forward")}
    for gate in ("r", "z"):
        values = trace[0, "forward"][gate].data                  # 7 valid steps, no padding
        expected = (values < 0.2).double().mean(0).numpy()
        np.testing.assert_allclose(stats[0, "forward"][gate]["low"], expected)
        assert stats[0, "forward"][gate]["high"].shape == (3,)
    with pytest.raises(ValueError, match="low=0.9, high=0.1"):
        lstmkit.gate_saturation(trace, low=0.9, high=0.1)
    with pytest.raises(TypeError, match="GateTrace"):
        lstmkit.gate_saturation({})
    with pytest.raises(KeyError, match="available"):
        trace[5, "forward"]


def test_trace_with_lengths_is_padded_like_the_output():
    module = lstmkit.LSTM(2, 3, batch_first=True)
    x = torch.randn(2, 5, 2)
    out, _, trace = module(x, lengths=[5, 3], return_gates=True)
    gate = trace[0, "forward"]["f"]
    assert gate.shape == (2, 5, 3)
    assert torch.all(gate[1, 3:] == 0) and torch.all(gate[1, :3] > 0)
    _, _, full = module(x[1:, :3], return_gates=True)
    torch.testing.assert_close(gate[1, :3], full[0, "forward"]["f"][0])
