"""Stateful use: chunks carrying the state, one step at a time, and truncated BPTT."""

import pytest
import torch

import lstmkit
from lstmkit import kernels
from lstmkit.reference.variant import LSTMVariant

MODULES = {
    "lstm": lambda: lstmkit.LSTM(3, 5, num_layers=2, dtype=torch.float64),
    "lstm_proj": lambda: lstmkit.LSTM(3, 5, num_layers=3, proj_size=2, dtype=torch.float64),
    "lstm_variant": lambda: lstmkit.LSTM(
        3, 5, num_layers=2, dtype=torch.float64,
        variant=LSTMVariant(peepholes=True, layer_norm=True, cifg=True, zoneout_h=0.1,
                            zoneout_c=0.2, zoneout_eval="expectation", recurrent_dropout=0.3)),
    "lstm_full_gate_recurrence": lambda: lstmkit.LSTM(
        3, 5, num_layers=2, dtype=torch.float64,
        variant=LSTMVariant(full_gate_recurrence=True, cifg=True)),
    "gru": lambda: lstmkit.GRU(3, 5, num_layers=2, dtype=torch.float64),
    "gru_reset_before": lambda: lstmkit.GRU(3, 5, num_layers=2, reset_after=False,
                                            dtype=torch.float64),
    "rnn": lambda: lstmkit.RNN(3, 5, num_layers=2, dtype=torch.float64),
}


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("batch_first", [False, True])
def test_chunks_carrying_the_state_equal_one_call(name, batch_first):
    torch.manual_seed(0)
    module = MODULES[name]().eval()
    module.batch_first = batch_first
    time_dim = 1 if batch_first else 0
    x = torch.randn(3, 17, 3, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    whole, final = module(x)
    state, pieces = None, []
    for chunk in x.split([5, 1, 7, 4], dim=time_dim):
        out, state = module(chunk, state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, time_dim), whole, rtol=0, atol=1e-13)
    for a, b in zip(state if isinstance(state, tuple) else [state],
                    final if isinstance(final, tuple) else [final], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_step_by_step_equals_the_sequence(name):
    torch.manual_seed(1)
    module = MODULES[name]().eval()
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    whole, final = module(x)
    state, outputs = None, []
    for x_t in x:
        y_t, state = module.step(x_t, state)
        outputs.append(y_t)
    torch.testing.assert_close(torch.stack(outputs), whole, rtol=0, atol=1e-13)
    torch.testing.assert_close(state, final, rtol=0, atol=1e-13)
    # unbatched steps
    y0, _ = module.step(x[0, 0])
    assert y0.dim() == 1
    torch.testing.assert_close(y0, whole[0, 0], rtol=0, atol=1e-13)


def test_step_costs_one_step(monkeypatch):
    """Each step runs every layer's kernel over exactly one time step, whatever came before."""
    seen = []
    original = kernels.lstm_layer

    def recording(x, h0, c0, *args, layout, **kwargs):
        seen.append(layout.steps)
        return original(x, h0, c0, *args, layout=layout, **kwargs)

    monkeypatch.setattr(kernels, "lstm_layer", recording)
    module = lstmkit.LSTM(2, 3, num_layers=3)
    state = None
    for _ in range(20):
        _, state = module.step(torch.randn(1, 2), state)
    assert seen == [1] * 60


@pytest.mark.parametrize("batch_first", [False, True])
def test_step_returns_the_gates_of_its_step(batch_first):
    torch.manual_seed(5)
    module = lstmkit.LSTM(2, 3, num_layers=2, batch_first=batch_first)
    x = torch.randn(4, 2, 2)                                    # (T, B, I)
    _, _, whole = module(x.transpose(0, 1) if batch_first else x, return_gates=True)
    state = None
    for t in range(4):
        y_t, state, trace = module.step(x[t], state, return_gates=True)
        for name in trace.names:
            expected = whole[1, "forward"][name]
            expected = expected[:, t] if batch_first else expected[t]
            torch.testing.assert_close(trace[1, "forward"][name], expected, rtol=0, atol=1e-6)
    assert trace[0, "forward"]["f"].shape == (2, 3)
    _, _, unbatched = lstmkit.GRU(2, 3).step(x[0, 0], return_gates=True)
    assert unbatched[0, "forward"]["z"].shape == (3,)


def test_step_batch_first_and_shapes():
    module = lstmkit.LSTM(2, 4, num_layers=2, batch_first=True)
    y, (h, c) = module.step(torch.randn(3, 2))
    assert y.shape == (3, 4) and h.shape == (2, 3, 4) and c.shape == (2, 3, 4)


def test_bidirectional_and_per_sequence_masks_cannot_step():
    with pytest.raises(ValueError, match="bidirectional=False"):
        lstmkit.LSTM(2, 3, bidirectional=True).step(torch.randn(1, 2))
    with pytest.raises(ValueError, match="bidirectional=False"):
        lstmkit.GRU(2, 3, bidirectional=True).step(torch.randn(1, 2))
    module = lstmkit.LSTM(2, 3, variant=LSTMVariant(recurrent_dropout=0.2))
    with pytest.raises(ValueError, match=r"recurrent_dropout=0.2.*\.eval\(\)"):
        module.step(torch.randn(1, 2))
    module.eval().step(torch.randn(1, 2))
    with pytest.raises(ValueError, match=r"step input must have shape \(B, 2\)"):
        lstmkit.LSTM(2, 3).step(torch.randn(4, 1, 2))


def test_cells_stream_like_the_layer():
    torch.manual_seed(2)
    variant = LSTMVariant(peepholes=True, layer_norm=True)
    layer = lstmkit.LSTM(3, 4, variant=variant, dtype=torch.float64)
    cell = lstmkit.LSTMCell(3, 4, variant=variant, dtype=torch.float64)
    cell.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    whole, _ = layer(x)
    state = None
    for t in range(6):
        state = cell(x[t], state)
        torch.testing.assert_close(state[0], whole[t], rtol=0, atol=1e-13)


def test_detach_state_structures():
    h = torch.randn(2, 3, requires_grad=True) * 2
    c = torch.randn(2, 3, requires_grad=True) * 2
    detached = lstmkit.detach_state((h, c))
    assert isinstance(detached, tuple) and len(detached) == 2
    assert all(not t.requires_grad for t in detached)
    assert torch.equal(detached[0], h) and torch.equal(detached[1], c)
    assert not lstmkit.detach_state(h).requires_grad
    assert lstmkit.detach_state(None) is None
    nested = lstmkit.detach_state([h, (c, h)])
    assert isinstance(nested, list) and not nested[1][0].requires_grad
    with pytest.raises(TypeError, match="got str"):
        lstmkit.detach_state("state")


def test_truncated_bptt_stops_gradients_at_the_chunk_boundary():
    torch.manual_seed(3)
    module = lstmkit.LSTM(2, 3, num_layers=2, dtype=torch.float64)
    first = torch.randn(4, 1, 2, dtype=torch.float64, requires_grad=True)
    second = torch.randn(4, 1, 2, dtype=torch.float64)
    _, state = module(first)
    # without detaching, the second chunk's loss reaches back into the first chunk
    out, _ = module(second, state)
    out.sum().backward()
    assert first.grad.abs().sum() > 0
    first.grad = None
    module.zero_grad()
    out, _ = module(second, lstmkit.detach_state(state))
    out.sum().backward()
    assert first.grad is None
    truncated = [p.grad.clone() for p in module.parameters()]
    # ... and equals the gradient of the second chunk started from a constant state
    module.zero_grad()
    constant = tuple(s.detach().clone() for s in state)
    module(second, constant)[0].sum().backward()
    for a, p in zip(truncated, module.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=0)


def test_truncated_bptt_training_loop_runs():
    torch.manual_seed(4)
    module = lstmkit.LSTM(1, 8, batch_first=True, variant=LSTMVariant(zoneout_h=0.1,
                                                                       recurrent_dropout=0.1))
    head = torch.nn.Linear(8, 1)
    optimizer = torch.optim.Adam([*module.parameters(), *head.parameters()], lr=0.01)
    t = torch.linspace(0, 12, 121)
    x, y = torch.sin(t)[None, :-1, None], torch.sin(t)[None, 1:, None]
    losses = []
    for _ in range(15):
        state, total = None, 0.0
        for xc, yc in zip(x.split(20, 1), y.split(20, 1), strict=True):
            out, state = module(xc, state)
            loss = torch.nn.functional.mse_loss(head(out), yc)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state = lstmkit.detach_state(state)
            total += loss.item()
        losses.append(total)
    assert losses[-1] < 0.5 * losses[0]
