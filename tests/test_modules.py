"""lstmkit.LSTM/GRU/RNN and the cells against torch.nn with the same weights.

Outputs, final states and the gradients of the input, the initial states and every parameter,
over a grid of module options and input forms, in float64 (~1e-10) and float32 (~1e-5).
"""

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import lstmkit
from conftest import assert_close

FAMILIES = {  # name: (lstmkit class, torch class, extra constructor arguments)
    "lstm": (lstmkit.LSTM, nn.LSTM, {}),
    "lstm-proj": (lstmkit.LSTM, nn.LSTM, {"proj_size": 3}),
    "gru": (lstmkit.GRU, nn.GRU, {}),
    "rnn-tanh": (lstmkit.RNN, nn.RNN, {}),
    "rnn-relu": (lstmkit.RNN, nn.RNN, {"nonlinearity": "relu"}),
}
INPUT_SIZE, HIDDEN, T, B = 4, 5, 6, 4
LENGTHS = torch.tensor([4, 6, 1, 4])          # unsorted, a tie, a length-1 sequence


def make_pair(family, dtype, backend, **options):
    ours_cls, torch_cls, extra = FAMILIES[family]
    ours = ours_cls(INPUT_SIZE, HIDDEN, **extra, **options, dtype=dtype, backend=backend)
    theirs = torch_cls(INPUT_SIZE, HIDDEN, **extra, **options, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def initial_state(module, batched, dtype, generator):
    D = 2 if module.bidirectional else 1
    P = getattr(module, "proj_size", 0) or module.hidden_size
    lead = (module.num_layers * D,) + ((B,) if batched else ())
    h = torch.randn(*lead, P, dtype=dtype, generator=generator)
    if isinstance(module, nn.LSTM):
        return h, torch.randn(*lead, module.hidden_size, dtype=dtype, generator=generator)
    return h


def run(module, form, x, hx, lengths):
    """Forward in the given input form; returns (output as a padded tensor, state leaves)."""
    if form == "packed":
        packed = pack_padded_sequence(x, lengths, batch_first=module.batch_first,
                                      enforce_sorted=False)
        out, state = module(packed, hx)
        assert isinstance(out, PackedSequence)
        out, _ = pad_packed_sequence(out, batch_first=module.batch_first)
    else:
        out, state = module(x, hx)
    return out, (state if isinstance(state, tuple) else (state,))


def compare(family, dtype, backend, form, given_state, seed=0, **options):
    ours, theirs = make_pair(family, dtype, backend, **options)
    g = torch.Generator().manual_seed(seed)
    batched = form != "unbatched"
    shape = ((B, T) if ours.batch_first else (T, B)) if batched else (T,)
    x = torch.randn(*shape, INPUT_SIZE, dtype=dtype, generator=g)
    hx = initial_state(theirs, batched, dtype, g) if given_state else None
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        hxi = None if hx is None else (
            tuple(h.clone().requires_grad_() for h in hx) if isinstance(hx, tuple)
            else hx.clone().requires_grad_())
        out, state = run(module, form, xi, hxi, LENGTHS)
        weight = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
        loss = (out * weight).sum() + sum((s * (k + 2)).sum() for k, s in enumerate(state))
        loss.backward()
        leaves = [xi] + ([] if hx is None else list(hxi if isinstance(hxi, tuple) else [hxi]))
        results.append((out, state, [leaf.grad for leaf in leaves],
                        {n: p.grad for n, p in module.named_parameters()}))
    (out_a, st_a, lg_a, pg_a), (out_b, st_b, lg_b, pg_b) = results
    assert out_a.shape == out_b.shape and out_a.dtype == out_b.dtype
    assert_close(out_a, out_b, dtype, "output")
    for k, (a, b) in enumerate(zip(st_a, st_b, strict=True)):
        assert_close(a, b, dtype, f"final state {k}")
    for k, (a, b) in enumerate(zip(lg_a, lg_b, strict=True)):
        assert_close(a, b, dtype, ["input", "h_0", "c_0"][k] + " gradient")
    assert pg_a.keys() == pg_b.keys()
    for name in pg_a:
        assert_close(pg_a[name], pg_b[name], dtype, f"{name} gradient")


GRID = list(itertools.product(
    [1, 2, 3],                           # num_layers
    [False, True],                       # bidirectional
    [False, True],                       # batch_first
    [True, False],                       # bias
))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,bias", GRID)
@pytest.mark.parametrize("form", ["padded", "packed", "unbatched"])
def test_matches_torch_nn_in_float64(backend, family, num_layers, bidirectional, batch_first,
                                     bias, form):
    given_state = (num_layers + bidirectional + batch_first) % 2 == 0   # half the grid each way
    compare(family, torch.float64, backend, form, given_state, num_layers=num_layers,
            bidirectional=bidirectional, batch_first=batch_first, bias=bias)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", ["padded", "packed", "unbatched"])
@pytest.mark.parametrize("given_state", [False, True], ids=["zero-state", "given-state"])
def test_matches_torch_nn_in_float32(backend, family, form, given_state):
    compare(family, torch.float32, backend, form, given_state, num_layers=2, bidirectional=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dicts_load_both_ways_and_seeded_init_matches_torch(family):
    ours_cls, torch_cls, extra = FAMILIES[family]
    torch.manual_seed(3)
    ours = ours_cls(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True, **extra)
    torch.manual_seed(3)
    theirs = torch_cls(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True, **extra)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    other = torch_cls(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True, **extra)
    ours.load_state_dict(other.state_dict(), strict=True)        # torch -> lstmkit
    fresh = torch_cls(INPUT_SIZE, HIDDEN, num_layers=2, bidirectional=True, **extra)
    fresh.load_state_dict(ours.state_dict(), strict=True)        # lstmkit -> torch
    for name, value in other.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


@pytest.mark.parametrize("family", ["lstm", "gru", "rnn-tanh"])
def test_lengths_keyword_equals_packing_by_hand(backend, family):
    ours, _ = make_pair(family, torch.float64, backend, batch_first=True, num_layers=2)
    x = torch.randn(B, T, INPUT_SIZE, dtype=torch.float64)
    out, state = ours(x, lengths=LENGTHS)
    packed_out, packed_state = ours(pack_padded_sequence(x, LENGTHS, batch_first=True,
                                                         enforce_sorted=False))
    expected, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=T)
    assert torch.equal(out, expected)
    for a, b in zip(state if isinstance(state, tuple) else (state,),
                    packed_state if isinstance(packed_state, tuple) else (packed_state,)):
        assert torch.equal(a, b)
    assert torch.all(out[2, 1:] == 0)              # sequence 2 has length 1: zero padding after


CELLS = {
    "lstm": (lstmkit.LSTMCell, nn.LSTMCell, {}),
    "gru": (lstmkit.GRUCell, nn.GRUCell, {}),
    "rnn-tanh": (lstmkit.RNNCell, nn.RNNCell, {}),
    "rnn-relu": (lstmkit.RNNCell, nn.RNNCell, {"nonlinearity": "relu"}),
}


@pytest.mark.parametrize("family", CELLS)
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("given_state", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cells_match_torch_nn(backend, family, batched, given_state, bias, dtype):
    ours_cls, torch_cls, extra = CELLS[family]
    ours = ours_cls(INPUT_SIZE, HIDDEN, bias=bias, **extra, dtype=dtype, backend=backend)
    theirs = torch_cls(INPUT_SIZE, HIDDEN, bias=bias, **extra, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    lead = (B,) if batched else ()
    x = torch.randn(*lead, INPUT_SIZE, dtype=dtype)
    hx = None
    if given_state:
        hx = torch.randn(*lead, HIDDEN, dtype=dtype)
        if family == "lstm":
            hx = (hx, torch.randn(*lead, HIDDEN, dtype=dtype))
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        hxi = hx
        if hx is not None:
            hxi = tuple(h.clone().requires_grad_() for h in hx) if isinstance(hx, tuple) \
                else hx.clone().requires_grad_()
        new = module(xi, hxi)
        new = new if isinstance(new, tuple) else (new,)
        sum(((k + 1) * torch.sin(s)).sum() for k, s in enumerate(new)).backward()
        state_leaves = [] if hxi is None else list(hxi) if isinstance(hxi, tuple) else [hxi]
        results.append((new, [xi.grad] + [h.grad for h in state_leaves],
                        [p.grad for p in module.parameters()]))
    (new_a, gx_a, gp_a), (new_b, gx_b, gp_b) = results
    for a, b in zip(new_a, new_b, strict=True):
        assert_close(a, b, dtype, "new state")
    for name, a, b in zip(["input", "h", "c"], gx_a, gx_b):
        assert_close(a, b, dtype, f"{name} gradient")
    for a, b in zip(gp_a, gp_b, strict=True):
        assert_close(a, b, dtype, "parameter gradient")


# -- dropout between layers ------------------------------------------------------------------

def identity_relu_stack(p):
    """2-layer relu RNN whose layers copy their input: the output shows the dropout mask."""
    rnn = lstmkit.RNN(64, 64, num_layers=2, nonlinearity="relu", dropout=p, bias=False)
    with torch.no_grad():
        for layer in range(2):
            getattr(rnn, f"weight_ih_l{layer}").copy_(torch.eye(64))
            getattr(rnn, f"weight_hh_l{layer}").zero_()
    return rnn


def test_dropout_keeps_the_right_fraction_and_rescales():
    p = 0.3
    rnn = identity_relu_stack(p).train()
    x = torch.rand(50, 20, 64) + 0.5                   # positive: relu passes it unchanged
    out, _ = rnn(x)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - p) < 0.01      # 64,000 Bernoulli draws
    torch.testing.assert_close(out[~dropped], (x / (1 - p))[~dropped])


def test_dropout_is_off_in_eval_and_seeded_in_training():
    ours, theirs = make_pair("lstm", torch.float64, "portable", num_layers=3, dropout=0.5)
    x = torch.randn(T, B, INPUT_SIZE, dtype=torch.float64)
    ours.eval()
    theirs.eval()
    assert_close(ours(x)[0], theirs(x)[0], torch.float64, "eval output")
    ours.train()
    torch.manual_seed(1)
    first = ours(x)[0]
    torch.manual_seed(1)
    again = ours(x)[0]
    torch.manual_seed(2)
    other = ours(x)[0]
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="dropout=0.5 acts between layers"):
        lstmkit.LSTM(2, 3, dropout=0.5)


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    ({"input_size": 0}, ValueError, "input_size must be a positive int, got 0"),
    ({"hidden_size": -3}, ValueError, "hidden_size must be a positive int, got -3"),
    ({"num_layers": 0}, ValueError, "num_layers must be a positive int, got 0"),
    ({"hidden_size": 2.5}, TypeError, "hidden_size must be an int, got float 2.5"),
    ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\), got -0.1"),
    ({"bidirectional": "yes"}, TypeError, "bidirectional must be a bool, got str 'yes'"),
    ({"proj_size": 5}, ValueError, r"proj_size must be smaller than hidden_size \(5\), got 5"),
    ({"proj_size": -1}, ValueError, "proj_size must be a non-negative int, got -1"),
    ({"backend": "cudnn"}, ValueError, "backend must be one of .* got 'cudnn'"),
])
def test_constructor_errors_name_the_bad_value(kwargs, error, match):
    arguments = {"input_size": 3, "hidden_size": 5} | kwargs
    with pytest.raises(error, match=match):
        lstmkit.LSTM(**arguments)


def test_rnn_rejects_unknown_nonlinearity():
    with pytest.raises(ValueError, match="nonlinearity must be one of .* got 'gelu'"):
        lstmkit.RNN(3, 4, nonlinearity="gelu")


def test_forward_errors_name_the_bad_value():
    lstm = lstmkit.LSTM(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    cases = [
        (lambda: lstm(torch.randn(5, 3)[None, None]), ValueError, "must be 3-D .* got 4-D"),
        (lambda: lstm(torch.randn(5, 2, 7)), ValueError, "3 features .* got shape \\(5, 2, 7\\)"),
        (lambda: lstm(torch.randint(0, 3, (5, 2, 3))), TypeError, "floating-point .* torch.int64"),
        (lambda: lstm([[1.0]]), TypeError, "input must be a torch.Tensor, got list"),
        (lambda: lstm(torch.randn(0, 2, 3)), ValueError, "at least one time step"),
        (lambda: lstm(x, torch.zeros(2, 2, 4)), TypeError, "tuple \\(h_0, c_0\\)"),
        (lambda: lstm(x, (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4))), ValueError,
         "h_0 must have shape \\(2, 2, 4\\), got \\(1, 2, 4\\)"),
        (lambda: lstm(x, (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4, dtype=torch.float64))),
         TypeError, "c_0 must have dtype torch.float32 .* got torch.float64"),
        (lambda: lstm(x, (torch.zeros(2, 2, 4, device="meta"), torch.zeros(2, 2, 4))),
         ValueError, "h_0 must be on device cpu .* got meta"),
        (lambda: lstm(torch.randn(5, 3), (torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))),
         ValueError, "h_0 must have shape \\(2, 4\\)"),
        (lambda: lstm(x.double()), TypeError,
         "input must have dtype torch.float32 \\(as the parameters\\), got torch.float64"),
        (lambda: lstm(x, lengths=[5, 6]), ValueError,
         "lengths must be in \\[1, 5\\] .* got 6 for sequence 1"),
        (lambda: lstm(x, lengths=[0, 5]), ValueError, "got 0 for sequence 0"),
        (lambda: lstm(x, lengths=[5]), ValueError, "lengths must have shape \\(2,\\)"),
        (lambda: lstm(x, lengths=[5.0, 2.0]), TypeError, "lengths must hold integers"),
        (lambda: lstm(x[:, 0], lengths=[5]), ValueError, "lengths is only for batched padded input"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_cell_errors_name_the_bad_value():
    cell = lstmkit.LSTMCell(3, 4)
    with pytest.raises(ValueError, match="input must have shape \\(B, 3\\) or \\(3,\\), got \\(2, 5\\)"):
        cell(torch.randn(2, 5))
    with pytest.raises(ValueError, match="h must have shape \\(2, 4\\), got \\(2, 3\\)"):
        cell(torch.randn(2, 3), (torch.zeros(2, 3), torch.zeros(2, 4)))
    with pytest.raises(TypeError, match="hx must be a tuple \\(h, c\\)"):
        cell(torch.randn(2, 3), torch.zeros(2, 4))


def test_repr_lists_non_default_options():
    assert repr(lstmkit.LSTM(3, 4, num_layers=2, batch_first=True)) == \
        "LSTM(3, 4, num_layers=2, batch_first=True)"
    assert repr(lstmkit.RNN(3, 4, nonlinearity="relu")) == "RNN(3, 4, nonlinearity='relu')"
