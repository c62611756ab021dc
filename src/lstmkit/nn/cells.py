"""Single-step cells with torch.nn's API: LSTMCell, GRUCell, RNNCell.

A cell is one time step of the layer kernels (T = 1), so its arithmetic and its backward are
the kernels' own. Shape key: B batch, I input_size, H hidden_size.
"""

import math

import torch
from torch import nn

from .. import kernels
from ..kernels import StepLayout, native
from ..reference.variant import GRUVariant, LSTMVariant
from . import _checks, _gru_variant, _lstm_variant
from ._autocast import outside_autocast
from ._lstm_variant import KERNEL_ARGUMENT


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
        for stem, size in self._extra_shapes():
            self.register_parameter(stem, nn.Parameter(torch.empty(size, **factory)))
        self.reset_parameters()

    def _extra_shapes(self) -> list:
        """(name, shape) of parameters a subclass adds."""
        return []

    def reset_parameters(self) -> None:
        """U(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch.nn."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")

    def _weights(self) -> dict:
        """Keyword arguments of the kernel: w_ih, w_hh, b_ih, b_hh and any variant parameters."""
        parameters = self._parameters      # not getattr: nn.Module's lookup costs ~0.3 us each
        weights = {"w_ih": parameters["weight_ih"], "w_hh": parameters["weight_hh"],
                   "b_ih": parameters["bias_ih"], "b_hh": parameters["bias_hh"]}
        for stem, _ in self._extra_shapes():
            weights[KERNEL_ARGUMENT[stem]] = parameters[stem]
        return weights

    def _native_kind(self):
        """The native single-step kernel's cell for this one now (a CELL_KINDS value), or None
        where it cannot compute it (a variant). Asked at every call:
        cheap, from what the constructor worked out and the attributes it reads."""
        return None

    def forward(self, input, hx=None):
        """input (B, I) or (I,); hx state(s) (B, H) or (H,), zeros when None -> new state(s)."""
        kind = self._native_kind()
        if kind is not None and hx is not None and self.backend != "portable":
            # Online inference, one call per step: the native single-step kernel, if the call
            # fits it as it is (checked in C++); anything else takes the general path.
            p = self._parameters
            new = native.step_if_fits(kind, input, hx, p["weight_ih"], p["weight_hh"],
                                      p["bias_ih"], p["bias_hh"])
            if new is not None:
                return new
        return self._checked_forward(input, hx)

    @outside_autocast
    def _checked_forward(self, input, hx=None):
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
    `variant=lstmkit.LSTMVariant(...)` selects the same variants as `lstmkit.LSTM` (adding
    weight_peephole (3H) and ln_* parameters where needed), except recurrent_dropout and
    weight_drop, whose one-mask-per-sequence a single step cannot keep: use `lstmkit.LSTM`.
    Zoneout draws its masks per call in training; in eval it is off (or its expectation, with
    zoneout_eval="expectation").
    """

    _gates = 4
    _state_count = 2

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *,
                 variant: LSTMVariant | None = None, backend: str = "auto"):
        # Set first: the parameters registered (and initialised) by the base depend on it.
        self.variant = _lstm_variant.check_variant(variant, bias)
        if self.variant.recurrent_dropout or self.variant.weight_drop:
            raise ValueError(f"LSTMCell cannot apply recurrent_dropout="
                             f"{self.variant.recurrent_dropout} or weight_drop="
                             f"{self.variant.weight_drop}: they draw one mask per sequence and a "
                             "cell sees one step; use lstmkit.LSTM (whose step() also streams)")
        if self.variant.full_gate_recurrence:
            raise ValueError("LSTMCell cannot apply full_gate_recurrence=True: it carries the "
                             "previous gates as a third state beside (h, c); use lstmkit.LSTM, "
                             "whose state is then (h, c, q) and whose step() also streams")
        super().__init__(input_size, hidden_size, bias, device, dtype, backend=backend)
        # Per training mode: does the plain LSTM kernel compute this cell? (The variant is fixed
        # at construction: the parameters registered depend on it.)
        self._plain_kernel = {mode: not _lstm_variant.uses_variant_kernel(self.variant, mode)
                              for mode in (False, True)}

    def _native_kind(self):
        return native.CELL_KINDS["lstm"] if self._plain_kernel[self.training] else None

    def _extra_shapes(self):
        return _lstm_variant.extra_shapes(self.variant, self.hidden_size)

    def reset_parameters(self) -> None:
        """torch.nn's initialisation, then the variant's (layer-norm gains, biases, ...)."""
        super().reset_parameters()
        if self.variant != LSTMVariant():
            _lstm_variant.initialise(self._weights(), self.variant, self.hidden_size)

    def extra_repr(self) -> str:
        described = self.variant.describe()
        return super().extra_repr() + (f", variant=LSTMVariant({described})" if described else "")

    def _step(self, x, states, layout):
        # The plain cell and the elementwise variants (peepholes, CIFG, removed gates,
        # activations, zoneout): lstm_layer, native where it can; the others the variant kernel.
        h0, c0 = states
        options = _lstm_variant.lstm_layer_options(self.variant, self.training)
        masks = {} if options == {} else _lstm_variant.draw_masks(
            self.variant, self.training, layout, x, h0.shape[1], c0.shape[1], self.backend)
        if options is not None:
            return kernels.lstm_layer(x, h0, c0, **self._weights(), **options, **masks,
                                      layout=layout, backend=self.backend)
        out, h, c, _, _, _ = kernels.lstm_variant_layer(x, h0, c0, self._weights(), masks,
                                                     self.variant, layout=layout,
                                                     backend=self.backend, gates=False)
        return out, h, c


class GRUCell(_CellBase):
    """One GRU step, a drop-in for `torch.nn.GRUCell`: (input, h) -> h'. Gate order r, z, n.

    Same equations as `lstmkit.GRU`; weight_ih (3H, I), weight_hh (3H, H).
    `variant=lstmkit.GRUVariant(...)` selects the same variants as `lstmkit.GRU` (adding ln_*
    parameters for layer norm), except
    recurrent_dropout and weight_drop, whose one-mask-per-sequence a single step cannot keep:
    use `lstmkit.GRU`. Zoneout draws its mask per call in training; in eval it is off (or its
    expectation, with zoneout_eval="expectation").
    """

    _gates = 3

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None, *,
                 reset_after: bool = True, variant: GRUVariant | None = None,
                 backend: str = "auto"):
        # Set first: the initialisation run by the base depends on it.
        self.variant = _gru_variant.check_variant(variant, bias)
        if self.variant.recurrent_dropout or self.variant.weight_drop:
            raise ValueError(f"GRUCell cannot apply recurrent_dropout="
                             f"{self.variant.recurrent_dropout} or weight_drop="
                             f"{self.variant.weight_drop}: they draw one mask per sequence and a "
                             "cell sees one step; use lstmkit.GRU (whose step() also streams)")
        super().__init__(input_size, hidden_size, bias, device, dtype, backend=backend)
        self.reset_after = _checks.flag("reset_after", reset_after)
        # Per training mode: does the plain GRU kernel compute this cell? (As LSTMCell's.)
        self._plain_kernel = {mode: not _gru_variant.uses_variant_kernel(self.variant, mode)
                              for mode in (False, True)}

    def _extra_shapes(self):
        return _gru_variant.extra_shapes(self.variant, self.hidden_size)

    def _native_kind(self):
        if not self._plain_kernel[self.training]:
            return None
        return native.CELL_KINDS[native.gru_cell(self.reset_after)]

    def reset_parameters(self) -> None:
        """torch.nn's initialisation, then the variant's (layer norm, update-gate bias, ...)."""
        super().reset_parameters()
        if self.variant != GRUVariant():
            _gru_variant.initialise(self._weights(), self.variant, self.hidden_size)

    def extra_repr(self) -> str:
        s = super().extra_repr() + ("" if self.reset_after else ", reset_after=False")
        described = self.variant.describe()
        return s + (f", variant=GRUVariant({described})" if described else "")

    def _step(self, x, states, layout):
        # The plain cell, the activations, zoneout: gru_layer, native where it can; layer norm
        # the variant kernel's Function (its step loops native where they can).
        masks = _gru_variant.draw_masks(self.variant, self.training, layout, x,
                                        self.hidden_size, self.backend) \
            if _gru_variant.uses_variant_kernel(self.variant, self.training) else {}
        options = _gru_variant.gru_layer_options(self.variant)
        if options is not None:
            return kernels.gru_layer(x, *states, **self._weights(), **masks, **options,
                                     layout=layout, reset_after=self.reset_after,
                                     backend=self.backend)
        out, h, _ = kernels.gru_variant_layer(x, *states, self._weights(), masks, self.variant,
                                              layout=layout, reset_after=self.reset_after,
                                              backend=self.backend, gates=False)
        return out, h


class RNNCell(_CellBase):
    """One Elman RNN step, a drop-in for `torch.nn.RNNCell`: (input, h) -> h'."""

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None,
                 dtype=None, *, backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, device, dtype, backend=backend)
        self.nonlinearity = _checks.choice("nonlinearity", nonlinearity, kernels.NONLINEARITIES)

    def _native_kind(self):
        return native.CELL_KINDS.get(native.rnn_cell(self.nonlinearity))

    def extra_repr(self) -> str:
        tail = "" if self.nonlinearity == "tanh" else f", nonlinearity={self.nonlinearity!r}"
        return super().extra_repr() + tail

    def _step(self, x, states, layout):
        return kernels.rnn_layer(x, *states, **self._weights(), layout=layout,
                                 nonlinearity=self.nonlinearity, backend=self.backend)
