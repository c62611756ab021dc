"""Single-step cells with torch.nn's API: LSTMCell, GRUCell, RNNCell.

A cell is one time step of the layer kernels (T = 1), so its arithmetic and its backward are
the kernels' own. Shape key: B batch, I input_size, H hidden_size.
"""

import math

import torch
from torch import nn

from .. import kernels
from ..kernels import StepLayout
from . import _checks


class _CellBase(nn.Module):
    _gates = 1
    _state_count = 1

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__()
        self.backend = _checks.choice("backend", backend, kernels.BACKENDS)
        self.input_size = _checks.positive_int("input_size", input_size)
        self.hidden_size = _checks.positive_int("hidden_size", hidden_size)
        self.bias = _checks.flag("bias", bias)
        factory = {"device": device, "dtype": dtype}
        G = self._gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(G, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G, **factory))
            self.bias_hh = nn.Parameter(torch.empty(G, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch.nn."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")

    def _weights(self) -> dict:
        return {"w_ih": self.weight_ih, "w_hh": self.weight_hh,
                "b_ih": self.bias_ih, "b_hh": self.bias_hh}

    def forward(self, input, hx=None):
        """input (B, I) or (I,); hx state(s) (B, H) or (H,), zeros when None -> new state(s)."""
        x = _checks.floating_tensor("input", input, self.weight_ih, "the parameters")
        if x.dim() not in (1, 2) or x.shape[-1] != self.input_size:
            raise ValueError(f"input must have shape (B, {self.input_size}) or "
                             f"({self.input_size},), got {tuple(x.shape)}")
        batched = x.dim() == 2
        if not batched:
            x = x.unsqueeze(0)
        batch = x.shape[0]
        if batch == 0:
            raise ValueError("input must hold at least one sequence, got batch size 0")
        names = ("h", "c")[:self._state_count]
        if hx is None:
            states = [x.new_zeros(batch, self.hidden_size) for _ in names]
        else:
            if self._state_count > 1:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError(f"hx must be a tuple (h, c) for {type(self).__name__}, "
                                    f"got {type(hx).__name__}")
                states = list(hx)
            else:
                states = [hx]
            expected = (batch, self.hidden_size) if batched else (self.hidden_size,)
            for name, state in zip(names, states):
                _checks.shape(name, _checks.floating_tensor(name, state, like=x), expected)
            if not batched:
                states = [s.unsqueeze(0) for s in states]
        _, *new = self._step(x, states, StepLayout.padded(1, batch))
        if not batched:
            new = [s.squeeze(0) for s in new]
        return tuple(new) if len(new) > 1 else new[0]

    def _step(self, x, states, layout):
        raise NotImplementedError


class LSTMCell(_CellBase):
    """One LSTM step, a drop-in for `torch.nn.LSTMCell`: (input, (h, c)) -> (h', c').

    Same equations as `lstmkit.LSTM`; weight_ih (4H, I), weight_hh (4H, H), gate order i, f, g, o.
    """

    _gates = 4
    _state_count = 2

    def _step(self, x, states, layout):
        return kernels.lstm_layer(x, *states, **self._weights(), layout=layout,
                                  backend=self.backend)


class GRUCell(_CellBase):
    """One GRU step, a drop-in for `torch.nn.GRUCell`: (input, h) -> h'. Gate order r, z, n."""

    _gates = 3

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *,
                 reset_after: bool = True, backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, device, dtype, backend=backend)
        self.reset_after = _checks.flag("reset_after", reset_after)

    def _step(self, x, states, layout):
        return kernels.gru_layer(x, *states, **self._weights(), layout=layout,
                                 reset_after=self.reset_after, backend=self.backend)


class RNNCell(_CellBase):
    """One Elman RNN step, a drop-in for `torch.nn.RNNCell`: (input, h) -> h'."""

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None,
                 dtype=None, *, backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, device, dtype, backend=backend)
        self.nonlinearity = _checks.choice("nonlinearity", nonlinearity, kernels.NONLINEARITIES)

    def _step(self, x, states, layout):
        return kernels.rnn_layer(x, *states, **self._weights(), layout=layout,
                                 nonlinearity=self.nonlinearity, backend=self.backend)
