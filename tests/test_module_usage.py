"""How code written for torch.nn uses the modules: autocast, in-place edits, torch.nn's
bookkeeping attributes, the textbook GRU, error paths of GRU/RNN, and `lstmkit check`."""

import numpy as np
import pytest
import torch
from torch import nn

import lstmkit
from conftest import assert_close
from lstmkit import reference
from lstmkit.cli import main

FAMILIES = {"LSTM": {}, "GRU": {}, "RNN": {}, "LSTM-proj": {"proj_size": 2}}


def make(family, backend, **options):
    cls = getattr(lstmkit, family.split("-")[0])
    return cls(3, 4, num_layers=2, **FAMILIES[family], **options, backend=backend)


def leaves_and_loss(module, x, in_place):
    """Forward; the loss reads the output and final states after optional in-place edits."""
    out, state = module(x)
    states = state if isinstance(state, tuple) else (state,)
    if in_place:
        out += 1.0                                     # a residual added in place
        out.mul_(2.0)
        for s in states:
            s.mul_(3.0)
    else:
        out = (out + 1.0) * 2.0
        states = [s * 3.0 for s in states]
    weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    return (out * weight).sum() + sum((s.sin()).sum() for s in states)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_edits_of_outputs_and_states_keep_the_gradients_right(backend, family, dtype):
    """In bfloat16 the native GRU and RNN layers hand out their output uncopied (the node keeps
    only its float32 result), as the LSTM layer does in every dtype."""
    torch.manual_seed(0)
    module = make(family, backend, dtype=dtype)
    x = torch.randn(5, 2, 3, dtype=dtype)
    grads = []
    for in_place in (False, True):
        xi = x.clone().requires_grad_()
        module.zero_grad()
        leaves_and_loss(module, xi, in_place).backward()
        grads.append([xi.grad] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_the_parameters_dtype(backend, family, autocast_dtype):
    """Under autocast the module takes low-precision input from the layers before it and
    returns the result of a float32 run on that input, with float32 gradients."""
    torch.manual_seed(1)
    module = make(family, backend)
    linear = nn.Linear(3, 3)
    x = torch.randn(5, 2, 3)
    with torch.autocast("cpu", dtype=autocast_dtype):
        features = linear(x)                             # autocast: low precision
        assert features.dtype == autocast_dtype
        out, _ = module(features)
    assert out.dtype == torch.float32
    out.sum().backward()
    grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    expected, _ = module(features.detach().float())
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for got, want in zip(grads, [p.grad for p in module.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [lstmkit.LSTMCell, lstmkit.GRUCell, lstmkit.RNNCell])
def test_cells_under_autocast(backend, cls):
    cell = cls(3, 4, backend=backend)
    x = torch.randn(2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new = cell(x.bfloat16())
    expected = cell(x.bfloat16().float())
    for a, b in zip(new if isinstance(new, tuple) else (new,),
                    expected if isinstance(expected, tuple) else (expected,), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("family,torch_cls", [("LSTM", nn.LSTM), ("GRU", nn.GRU),
                                              ("RNN", nn.RNN), ("LSTM-proj", nn.LSTM)])
def test_torch_nn_bookkeeping_attributes(family, torch_cls):
    ours = make(family, "portable", bidirectional=True)
    theirs = torch_cls(3, 4, num_layers=2, **FAMILIES[family], bidirectional=True)
    assert ours.mode == theirs.mode
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert ours._all_weights == theirs._all_weights
    assert all(w is getattr(ours, n)
               for w, n in zip(ours._flat_weights, ours._flat_weights_names, strict=True))
    assert lstmkit.RNN(3, 4, nonlinearity="relu").mode == "RNN_RELU"


def test_textbook_gru_module_matches_the_reference(backend):
    """GRU(reset_after=False): module output and gradients against the NumPy reference."""
    torch.manual_seed(2)
    module = lstmkit.GRU(3, 4, reset_after=False, dtype=torch.float64, backend=backend)
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    out, h_n = module(x, h0)
    d_out = torch.randn_like(out)
    d_h = torch.randn_like(h_n)
    ((out * d_out).sum() + (h_n * d_h).sum()).backward()
    weights = {k: getattr(module, f"{name}_l0").detach().numpy()
               for k, name in [("w_ih", "weight_ih"), ("w_hh", "weight_hh"),
                               ("b_ih", "bias_ih"), ("b_hh", "bias_hh")]}
    y, h_T, cache = reference.gru_forward(x.detach().numpy(), h0[0].detach().numpy(),
                                          **weights, reset_after=False)
    grads = reference.gru_backward(d_out.numpy(), d_h[0].numpy(), cache)
    dtype = torch.float64
    assert_close(out, y, dtype, "output")
    assert_close(h_n[0], h_T, dtype, "h_n")
    assert_close(x.grad, grads["x"], dtype, "dx")
    assert_close(h0.grad[0], grads["h0"], dtype, "dh0")
    for k, name in [("w_ih", "weight_ih"), ("w_hh", "weight_hh"), ("b_ih", "bias_ih"),
                    ("b_hh", "bias_hh")]:
        assert_close(getattr(module, f"{name}_l0").grad, grads[k], dtype, f"d{k}")
    # and it is a different cell from torch's reset-after GRU on the same weights
    after = lstmkit.GRU(3, 4, dtype=torch.float64)
    after.load_state_dict(module.state_dict())
    assert not np.allclose(after(x)[0].detach().numpy(), y)


@pytest.mark.parametrize("family", ["GRU", "RNN"])
def test_gru_and_rnn_errors_name_the_bad_value(family):
    module = getattr(lstmkit, family)(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    cases = [
        (lambda: module(torch.randn(5, 2, 6)), ValueError, "3 features .* got shape \\(5, 2, 6\\)"),
        (lambda: module(x, torch.zeros(1, 2, 4)), ValueError,
         "h_0 must have shape \\(2, 2, 4\\), got \\(1, 2, 4\\)"),
        (lambda: module(x, (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))), TypeError,
         "must be a torch.Tensor, got tuple"),
        (lambda: module(x, torch.zeros(2, 2, 4, dtype=torch.float64)), TypeError,
         "h_0 must have dtype torch.float32 .* got torch.float64"),
        (lambda: module(x, lengths=[6, 1]), ValueError, "lengths must be in \\[1, 5\\]"),
        (lambda: module(x, lengths=["a", "b"]), TypeError, "lengths must be a sequence"),
        (lambda: module(torch.randn(5, 2, 7), lengths=[5, 5]), ValueError, "3 features"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    cell = getattr(lstmkit, f"{family}Cell")(3, 4)
    with pytest.raises(ValueError, match="h must have shape \\(2, 4\\), got \\(2, 5\\)"):
        cell(torch.randn(2, 3), torch.zeros(2, 5))


def test_proj_size_type_errors():
    with pytest.raises(TypeError, match="proj_size must be an int, got float 2.0"):
        lstmkit.LSTM(3, 5, proj_size=2.0)
    assert lstmkit.LSTM(3, 5, proj_size=np.int64(2)).proj_size == 2


def test_cell_repr_lists_non_default_options():
    assert repr(lstmkit.GRUCell(3, 4, reset_after=False)) == "GRUCell(3, 4, reset_after=False)"
    assert repr(lstmkit.RNNCell(3, 4, nonlinearity="relu")) == \
        "RNNCell(3, 4, nonlinearity='relu')"
    assert repr(lstmkit.RNNCell(3, 4, bias=False)) == "RNNCell(3, 4, bias=False)"


def test_check_command_passes_and_reports_every_backend(capsys):
    assert main(["check", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "lstmkit matches torch.nn."
    assert sum(" portable " in line and line.endswith("ok") for line in lines) == 3


def test_check_command_fails_on_a_mismatch(capsys, monkeypatch):
    from lstmkit.cli import check

    monkeypatch.setattr(check, "largest_differences", lambda family, seed, backend: (0.0, 1e-3))
    assert main(["check"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "lstmkit does NOT match torch.nn."


def test_cli_usage_error_is_one_line_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["check", "--seed", "x"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'x'" in err
