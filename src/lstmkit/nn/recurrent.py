"""Multi-layer LSTM, GRU and RNN modules with torch.nn's API, parameters and initialisation.

The modules are thin: they check arguments, lay out the input for the kernels (time-major,
flat, see `lstmkit.kernels.layout`), stack layers and directions, and apply dropout between
layers. All recurrent arithmetic happens in `lstmkit.kernels`.

Shape key: T time, B batch, I input_size, H hidden_size, P = proj_size or H,
L num_layers, D = 2 if bidirectional else 1.
"""

import math
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import kernels
from ..kernels import StepLayout
from ..reference.variant import GRUVariant, LSTMVariant
from . import _checks, _gru_variant, _lstm_variant
from ._autocast import outside_autocast
from ._lstm_variant import KERNEL_ARGUMENT as _KERNEL_ARGUMENT
from .introspection import GateTrace


class _RecurrentBase(nn.Module):
    """Shared body of LSTM, GRU and RNN. Subclasses set `_gates` and implement `_run_layer`."""

    _gates: int = 1

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__()
        self.backend = _checks.choice("backend", backend, kernels.BACKENDS)
        self.input_size = _checks.positive_int("input_size", input_size)
        self.hidden_size = _checks.positive_int("hidden_size", hidden_size)
        self.num_layers = _checks.positive_int("num_layers", num_layers)
        self.bias = _checks.flag("bias", bias)
        self.batch_first = _checks.flag("batch_first", batch_first)
        self.dropout = _checks.probability("dropout", dropout)
        self.bidirectional = _checks.flag("bidirectional", bidirectional)
        proj_size = _checks.integer("proj_size", proj_size)
        if proj_size < 0:
            raise ValueError(f"proj_size must be a non-negative int, got {proj_size}")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size ({hidden_size}), "
                             f"got {proj_size}")
        self.proj_size = proj_size
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"dropout={dropout} acts between layers and num_layers=1: it has no "
                          "effect", UserWarning, stacklevel=2)
        factory = {"device": device, "dtype": dtype}
        out_size = proj_size or hidden_size
        self._weight_names: list[dict[str, str]] = []   # kernel argument -> parameter name
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else out_size * self.num_directions
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                shapes = [("weight_ih", (self._gates * hidden_size, layer_input)),
                          ("weight_hh", (self._gates * hidden_size, out_size))]
                if bias:
                    shapes += [("bias_ih", (self._gates * hidden_size,)),
                               ("bias_hh", (self._gates * hidden_size,))]
                if proj_size:
                    shapes.append(("weight_hr", (proj_size, hidden_size)))
                shapes += self._extra_shapes()
                for stem, size in shapes:
                    self.register_parameter(stem + suffix,
                                            nn.Parameter(torch.empty(size, **factory)))
                self._weight_names.append({_KERNEL_ARGUMENT[stem]: stem + suffix
                                           for stem, _ in shapes})
        self.reset_parameters()

    def _extra_shapes(self) -> list:
        """(stem, shape) of parameters a subclass adds to each layer and direction."""
        return []

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Parameters per layer and direction, in torch.nn's order."""
        return [[getattr(self, name) for name in names.values()] for names in self._weight_names]

    # torch.nn.RNNBase's bookkeeping attributes, which code written for torch.nn reads
    # (weight-drop wrappers, pruning, export helpers).
    @property
    def _all_weights(self) -> list[list[str]]:
        return [list(names.values()) for names in self._weight_names]

    @property
    def _flat_weights_names(self) -> list[str]:
        return [name for names in self._all_weights for name in names]

    @property
    def _flat_weights(self) -> list[nn.Parameter]:
        return [getattr(self, name) for name in self._flat_weights_names]

    def reset_parameters(self) -> None:
        """U(-1/sqrt(H), 1/sqrt(H)) for every parameter, in registration order, as torch.nn."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op, kept so code written for torch.nn (which packs weights for cuDNN) runs as is."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        defaults = {"num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0,
                    "bidirectional": False, "proj_size": 0, "backend": "auto"}
        for name, default in defaults.items():
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s

    # -- forward -----------------------------------------------------------------------------

    def _state_sizes(self) -> tuple[int, ...]:
        """Feature size of each state tensor: (P,) for h, plus (H,) for the LSTM's c."""
        return (self.proj_size or self.hidden_size,)

    def _describe_state(self) -> str:
        return type(self).__name__

    def _layer_weights(self, index: int) -> dict:
        """Keyword arguments of the kernel for one layer and direction: w_ih, w_hh, ..."""
        # From _parameters where they are (nn.Module's __getattr__ costs about 1 us a name,
        # and every forward call asks); getattr for anything else, such as a parametrization.
        parameters = self._parameters
        return {arg: parameters[name] if name in parameters else getattr(self, name)
                for arg, name in self._weight_names[index].items()}

    def _flat_input(self, input):
        """Return (x (N, I), layout, batched, packed info or None) for any accepted input form."""
        if isinstance(input, PackedSequence):
            data = _checks.floating_tensor("input.data", input.data, self.weight_ih_l0,
                                           "the parameters")
            if data.dim() != 2 or data.shape[1] != self.input_size:
                raise ValueError(f"PackedSequence data must have shape (N, {self.input_size}), "
                                 f"got {tuple(data.shape)}")
            return data, StepLayout.packed(input.batch_sizes.tolist()), True, input
        x = _checks.floating_tensor("input", input, self.weight_ih_l0, "the parameters")
        if x.dim() not in (2, 3):
            raise ValueError(f"input must be 3-D (batched) or 2-D (unbatched), got {x.dim()}-D "
                             f"with shape {tuple(x.shape)}")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"input must have {self.input_size} features in its last dimension "
                             f"(input_size), got shape {tuple(x.shape)}")
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(1)                       # (T, I) -> (T, 1, I)
        elif self.batch_first:
            x = x.transpose(0, 1)                    # (B, T, I) -> (T, B, I)
        steps, batch = x.shape[0], x.shape[1]
        if steps == 0 or batch == 0:
            raise ValueError(f"input must have at least one time step and one sequence, "
                             f"got shape {tuple(input.shape)}")
        layout = StepLayout.padded(steps, batch)
        return x.reshape(steps * batch, self.input_size), layout, batched, None

    def _initial_states(self, hx, x, batch, batched, packed):
        """Return the initial states per layer and direction: [[h0 (B, P), c0 (B, H)], ...] for
        the LSTM, in the kernels' batch order."""
        count = self.num_layers * self.num_directions
        sizes = self._state_sizes()
        if hx is None:
            if count == 1:
                return [[x.new_zeros(batch, size) for size in sizes]]
            return list(zip(*(x.new_zeros(count, batch, size).unbind(0) for size in sizes),
                            strict=True))
        names = ("h_0", "c_0", "q_0")[:len(sizes)]
        if len(sizes) > 1:
            if not isinstance(hx, (tuple, list)) or len(hx) != len(sizes):
                described = (f"a {type(hx).__name__} of {len(hx)} tensors"
                             if isinstance(hx, (tuple, list)) else type(hx).__name__)
                raise TypeError(f"hx must be a tuple ({', '.join(names)}) for "
                                f"{self._describe_state()}, got {described}")
            states = list(hx)
        else:
            states = [hx]
        result = []
        for name, state, size in zip(names, states, sizes, strict=True):
            _checks.floating_tensor(name, state, like=x)
            if batched:
                _checks.shape(name, state, (count, batch, size))
            else:
                _checks.shape(name, state, (count, size))
                state = state.unsqueeze(1)
            if packed is not None and packed.sorted_indices is not None:
                state = state.index_select(1, packed.sorted_indices)
            result.append(state.unbind(0))
        return list(zip(*result, strict=True))

    @outside_autocast
    def forward(self, input, hx=None, *, lengths=None, return_gates: bool = False):
        """Run the stack over a sequence.

        Args:
            input: (T, B, I), or (B, T, I) with batch_first, or unbatched (T, I),
                or a PackedSequence of (N, I) rows.
            hx: initial state(s) shaped (L*D, B, P) (and (L*D, B, H) for the LSTM's c),
                (L*D, P) for unbatched input, in the caller's batch order; zeros when None.
                Passing the final state of the previous chunk continues a long sequence
                exactly (streaming); see `step` and `lstmkit.detach_state`.
            lengths: optional, for batched padded input only (not in torch.nn): the true length
                of each sequence (B,), each in [1, T]. Steps past a sequence's length are not
                computed; its output there is zero and its final state is the one at its
                last step. Saves the pack_padded_sequence / pad_packed_sequence round trip.
            return_gates: also return a `GateTrace` with every layer's and direction's
                per-step gates and states (LSTM and GRU only); with lengths, zero past
                each sequence's length.
        Returns:
            output (same form as the input, with D*P features) and the final state(s), shaped
            like hx; and the GateTrace when return_gates. Under `torch.autocast` they are in
            the parameters' dtype: the kernels keep float32 state themselves (see _autocast.py).
        """
        _checks.flag("return_gates", return_gates)
        if lengths is not None:
            return self._forward_with_lengths(input, hx, lengths, return_gates)
        x, layout, batched, packed = self._flat_input(input)
        states = self._initial_states(hx, x, layout.batch, batched, packed)
        finals = [[] for _ in states[0]]
        records = {}
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                out, state_T, trace = self._run_layer(
                    layer_input, states[index], self._layer_weights(index),
                    layout, reverse=direction == 1, return_gates=return_gates)
                outputs.append(out)
                for collected, s in zip(finals, state_T, strict=True):
                    collected.append(s)
                if return_gates:
                    records[layer, ("forward", "reverse")[direction]] = {
                        name: self._like_output(t, layout, batched, packed)
                        for name, t in trace.items()}
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = kernels.native.dropout(layer_input, self.dropout, self.backend)
        if self.num_directions == 1 and layer_input.requires_grad:
            # A copy where the kernel saved this tensor for its backward pass, so that in-place
            # edits of the output (out += residual) work as they do with torch.nn.
            layer_input = kernels.caller_output(layer_input, self.backend)
        finals = [f[0].unsqueeze(0) if len(f) == 1 else torch.stack(f) for f in finals]
        if packed is not None:
            if packed.unsorted_indices is not None:
                finals = [f.index_select(1, packed.unsorted_indices) for f in finals]
            output = PackedSequence(layer_input, packed.batch_sizes, packed.sorted_indices,
                                    packed.unsorted_indices)
        else:
            output = layer_input.view(layout.steps, layout.batch, -1)
            if not batched:
                output = output.squeeze(1)
                finals = [f.squeeze(1) for f in finals]
            elif self.batch_first:
                output = output.transpose(0, 1)
        state = tuple(finals) if len(finals) > 1 else finals[0]
        if return_gates:
            return output, state, GateTrace(type(self).__name__, records)
        return output, state

    def _like_output(self, flat, layout, batched, packed):
        """A traced (N, F) tensor in the layout of the module's output."""
        if packed is not None:
            return PackedSequence(flat, packed.batch_sizes, packed.sorted_indices,
                                  packed.unsorted_indices)
        t = flat.view(layout.steps, layout.batch, -1)
        if not batched:
            return t.squeeze(1)
        return t.transpose(0, 1) if self.batch_first else t

    def _forward_with_lengths(self, input, hx, lengths, return_gates=False):
        if isinstance(input, PackedSequence) or not torch.is_tensor(input) or input.dim() != 3:
            raise ValueError("lengths is only for batched padded input (a 3-D tensor), got "
                             + (type(input).__name__ if not torch.is_tensor(input)
                                else f"a {input.dim()}-D tensor"))
        self._flat_input(input)                      # the input's own checks, before packing
        steps, batch = (input.shape[1], input.shape[0]) if self.batch_first else input.shape[:2]
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"lengths must be a sequence or tensor of ints, got "
                            f"{type(lengths).__name__} {lengths!r}") from None
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must hold integers, got dtype {lengths.dtype}")
        if lengths.shape != (batch,):
            raise ValueError(f"lengths must have shape ({batch},) (one per sequence), "
                             f"got {tuple(lengths.shape)}")
        bad = ((lengths < 1) | (lengths > steps)).nonzero()
        if len(bad):
            b = int(bad[0])
            raise ValueError(f"lengths must be in [1, {steps}] (the padded length), got "
                             f"{int(lengths[b])} for sequence {b}")
        packed = pack_padded_sequence(input, lengths.cpu(), batch_first=self.batch_first,
                                      enforce_sorted=False)
        output, state, *trace = self.forward(packed, hx, return_gates=return_gates)

        def pad(sequence):
            return pad_packed_sequence(sequence, batch_first=self.batch_first,
                                       total_length=steps)[0]

        if return_gates:
            records = {key: {name: pad(t) for name, t in record.items()}
                       for key, record in trace[0].items()}
            return pad(output), state, GateTrace(trace[0].family, records)
        return pad(output), state

    def _run_layer(self, x, states, weights, layout, reverse, return_gates):
        """One layer and direction -> (out (N, P), [final states], {name: (N, F)} or None)."""
        raise NotImplementedError

    def _native_kind(self):
        """The native single-step kernel's cell (a CELL_KINDS value) for every layer of this
        stack as it is now, or None where a step must take forward's path (a variant, a
        projection)."""
        return None

    def _native_step(self, x, hx):
        """step() through the native single-step kernel, layer after layer (the cells' fast
        path), or None where the call does not fit it as it is, and step takes forward's path,
        whose checks word the errors: no gradient, a batched (B, I) input, no state or states
        (L, B, H) the kernel takes (checked in C++, see native.step_if_fits), every layer a
        cell the kernel computes (see _native_kind), no dropout between layers in training. At
        batch 1 / hidden 64 forward's path cost about 20 us a step around a 6 us kernel."""
        kind = self._native_kind()
        if kind is None or self.backend == "portable" or torch.is_grad_enabled() \
                or (self.training and self.dropout) or type(x) is not torch.Tensor \
                or x.dim() != 2:
            return None
        lstm = kind == kernels.native.CELL_KINDS["lstm"]
        shape = (self.num_layers, x.shape[0], self.hidden_size)
        if hx is None:
            h_all = c_all = x.new_zeros(shape)       # read only by the kernel
        elif lstm:
            if not isinstance(hx, tuple) or len(hx) != 2:
                return None
            h_all, c_all = hx
        else:
            h_all = c_all = hx
        if not (type(h_all) is torch.Tensor and type(c_all) is torch.Tensor
                and h_all.shape == shape and c_all.shape == shape):
            return None
        parameters = self._parameters
        hs, cs = [], []
        layer_input = x
        h_layers = h_all.unbind(0)                   # one call for all layers' views
        c_layers = c_all.unbind(0) if lstm else h_layers
        for layer, names in enumerate(self._weight_names):
            weights = []
            for arg in ("w_ih", "w_hh", "b_ih", "b_hh"):
                name = names.get(arg)                # no bias: None, as the kernels take it
                weight = None if name is None else parameters.get(name)
                if weight is None and name is not None:
                    return None                      # a parametrization: forward's path
                weights.append(weight)
            state = (h_layers[layer], c_layers[layer]) if lstm else h_layers[layer]
            new = kernels.native.step_if_fits(kind, layer_input, state, *weights)
            if new is None:
                return None
            h, c = new if lstm else (new, None)
            hs.append(h)
            cs.append(c)
            layer_input = h
        h_n = torch.stack(hs)
        return hs[-1], ((h_n, torch.stack(cs)) if lstm else h_n)

    def _check_streamable(self) -> None:
        """Raise unless a step-by-step run equals a run over the whole sequence."""
        if self.bidirectional:
            raise ValueError(f"{type(self).__name__}.step needs bidirectional=False: the reverse "
                             "direction reads the sequence from its end, so it cannot run "
                             "online one step at a time")

    def step(self, input, hx=None, *, return_gates: bool = False):
        """Advance the stack by one time step: the cost of one step, not a re-run.

        Args:
            input: (B, I) one step of a batch, or (I,) unbatched (batch_first does not matter).
            hx: the state returned by the previous call (or by `forward`), zeros when None.
            return_gates: also return this step's gates, trace[layer, "forward"][name] (B, H).
        Returns:
            output (B, P) (or (P,)) of the last layer, and the new state, shaped as forward's;
            and the GateTrace of this step when return_gates.

        Example::

            >>> lstm = lstmkit.LSTM(3, 8, num_layers=2).eval()
            >>> state = None
            >>> for x_t in torch.randn(5, 1, 3):           # arrives one step at a time
            ...     y_t, state = lstm.step(x_t, state)
        """
        self._check_streamable()
        if not return_gates:
            stepped = self._native_step(input, hx)
            if stepped is not None:
                return stepped
        x = _checks.floating_tensor("input", input, self.weight_ih_l0, "the parameters")
        if x.dim() not in (1, 2) or x.shape[-1] != self.input_size:
            raise ValueError(f"step input must have shape (B, {self.input_size}) or "
                             f"({self.input_size},), got {tuple(x.shape)}")
        if x.dim() == 2:
            sequence = x.unsqueeze(1) if self.batch_first else x.unsqueeze(0)
        else:
            sequence = x.unsqueeze(0)                # (1, I): one unbatched step
        output, state, *trace = self.forward(sequence, hx, return_gates=return_gates)
        time_dim = 1 if x.dim() == 2 and self.batch_first else 0
        output = output.squeeze(time_dim)
        if return_gates:
            records = {key: {name: t.squeeze(time_dim) for name, t in record.items()}
                       for key, record in trace[0].items()}
            return output, state, GateTrace(trace[0].family, records)
        return output, state


class LSTM(_RecurrentBase):
    r"""Long short-term memory, a drop-in for `torch.nn.LSTM` (same arguments, weights, outputs).

    For each layer, direction and step (gate order i, f, g, o in the stacked weights)::

        i_t = sigma(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)      input gate
        f_t = sigma(W_if x_t + b_if + W_hf h_{t-1} + b_hf)      forget gate
        g_t = tanh (W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)      candidate memory
        o_t = sigma(W_io x_t + b_io + W_ho h_{t-1} + b_ho)      output gate
        c_t = f_t * c_{t-1} + i_t * g_t                         cell state
        h_t = o_t * tanh(c_t)            (times W_hr when proj_size > 0)

    Parameters per layer k: weight_ih_lk (4H, I or D*P), weight_hh_lk (4H, P), bias_ih_lk,
    bias_hh_lk (4H), weight_hr_lk (P, H) with proj_size; `_reverse` for the second direction.

    `variant=lstmkit.LSTMVariant(...)` changes the cell (peepholes, CIFG, Greff's ablations,
    activations, layer norm, zoneout, recurrent dropout, DropConnect, initialisation); see
    `LSTMVariant` and docs/variants.md. It adds parameters only where the equations need them:
    weight_peephole_lk (3H) = [p_i | p_f | p_o]; ln_ih_weight/bias_lk, ln_hh_weight/bias_lk
    (4H), ln_cell_weight/bias_lk (H) for layer norm; weight_gate_lk (3H, 3H) for full gate
    recurrence, whose state is then (h, c, q) with q (L*D, B, 3H) the last step's [i | f | o].
    With no variant (or the default one) the module is torch.nn.LSTM: same parameters,
    initialisation and results.

    `forward(..., return_gates=True)` also returns a `GateTrace` of every gate at every step;
    `step(x_t, state)` advances one step for online use.

    Example::

        >>> import torch, lstmkit
        >>> lstm = lstmkit.LSTM(10, 20, num_layers=2, batch_first=True)
        >>> output, (h_n, c_n) = lstm(torch.randn(3, 5, 10))
        >>> output.shape, h_n.shape, c_n.shape
        (torch.Size([3, 5, 20]), torch.Size([2, 3, 20]), torch.Size([2, 3, 20]))
        >>> peephole = lstmkit.LSTM(10, 20, variant=lstmkit.LSTMVariant(peepholes=True))
    """

    _gates = 4
    mode = "LSTM"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None, *,
                 variant: LSTMVariant | None = None, backend: str = "auto"):
        # Set first: the parameters registered (and initialised) by the base depend on it.
        self.variant = _lstm_variant.check_variant(variant, bias)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype, backend=backend)
        # Per training mode (False, True): does the plain kernel run with the weights as they
        # are? Not with DropConnect in training, which masks W_hh first (see _run_layer).
        self._plain_cell = {mode: not _lstm_variant.uses_variant_kernel(self.variant, mode)
                            and not (mode and self.variant.weight_drop)
                            for mode in (False, True)}

    def _native_kind(self):
        if self.proj_size or not self._plain_cell[self.training]:
            return None
        return kernels.native.CELL_KINDS["lstm"]

    def forward(self, input, hx=None, *, lengths=None, return_gates: bool = False):
        if lengths is None and not return_gates and self._runs_directly(input, hx):
            return self._direct_call(input, hx)
        return super().forward(input, hx, lengths=lengths, return_gates=return_gates)

    forward.__doc__ = _RecurrentBase.forward.__doc__

    def _runs_directly(self, x, hx) -> bool:
        """True for a call the native sequence kernel can take as it is: one layer and direction
        without projection, the plain cell on its weights as they are (no DropConnect in
        training), no autocast, a 3-D CPU tensor of the parameters' dtype (one the native kernels
        take: float32, float64, float16, bfloat16), and no state or (h_0, c_0) of the right
        shapes and dtype; with or without gradients.
        Anything else, every error included, takes the general path, whose Python costs 15-27
        us more in inference (8% of a forward at batch 1 / hidden 128, length 100, 14% at hidden
        64) and about 45 us more in a training step (10% at batch 1 / hidden 64). Every test
        here is cheap."""
        if self.num_layers != 1 or self.bidirectional \
                or self.proj_size or self.backend == "portable" \
                or not self._plain_cell[self.training]:
            return False
        p = self._parameters
        w = p.get("weight_ih_l0")
        if not (type(x) is torch.Tensor and w is not None and "weight_hh_l0" in p
                and x.dtype == w.dtype and w.dtype in kernels.native.INPUT_DTYPES
                and x.is_cpu and w.is_cpu and x.dim() == 3 and x.shape[2] == self.input_size
                and not torch.is_autocast_enabled("cpu")):
            return False
        if x.shape[0] == 0 or x.shape[1] == 0:
            return False
        batch = x.shape[0] if self.batch_first else x.shape[1]
        if hx is not None:
            if not isinstance(hx, tuple) or len(hx) != 2:
                return False
            shape = (1, batch, self.hidden_size)
            if not all(type(s) is torch.Tensor and s.dtype == w.dtype and s.is_cpu
                       and s.shape == shape for s in hx):
                return False
        return kernels.native.available()

    def _direct_call(self, x, hx):
        """forward() for a call `_runs_directly` accepts: the native call the general path makes
        (the same kernels, so the same numbers and gradients), with the reshapes around it in
        C++ (kernels.native.lstm_module), inside the autograd node in training. Inference over
        one step takes the general path's single-step kernel."""
        p = self._parameters
        train = kernels.native.needs_autograd((x, *p.values(), *(hx or ())))
        if train or (x.shape[1] if self.batch_first else x.shape[0]) > 1:
            return kernels.native.lstm_module(
                x, hx, p["weight_ih_l0"], p["weight_hh_l0"], p.get("bias_ih_l0"),
                p.get("bias_hh_l0"), self.batch_first, self.hidden_size, train)
        x = x.reshape(x.shape[0] * x.shape[1], self.input_size)   # one step: (B, I)
        if hx is None:
            h0 = c0 = x.new_zeros(x.shape[0], self.hidden_size)   # read only by the kernel
        else:
            h0, c0 = hx[0][0], hx[1][0]
        h_1, _, c_1 = kernels.native.NativeLSTMFunction.apply(
            x, h0, c0, p["weight_ih_l0"], p["weight_hh_l0"], p.get("bias_ih_l0"),
            p.get("bias_hh_l0"), None, StepLayout.padded(1, x.shape[0]), False)
        output = h_1.unsqueeze(1 if self.batch_first else 0)
        return output, (h_1.unsqueeze(0), c_1.unsqueeze(0))

    def _extra_shapes(self):
        return _lstm_variant.extra_shapes(self.variant, self.hidden_size)

    def reset_parameters(self) -> None:
        """torch.nn's initialisation, then the variant's (layer-norm gains, biases, ...)."""
        super().reset_parameters()
        if self.variant != LSTMVariant():
            for index in range(len(self._weight_names)):
                _lstm_variant.initialise(self._layer_weights(index), self.variant,
                                         self.hidden_size)

    def extra_repr(self) -> str:
        described = self.variant.describe()
        return super().extra_repr() + (f", variant=LSTMVariant({described})" if described else "")

    def _state_sizes(self):
        sizes = (self.proj_size or self.hidden_size, self.hidden_size)
        if self.variant.full_gate_recurrence:        # q: the previous step's [i | f | o]
            return (*sizes, 3 * self.hidden_size)
        return sizes

    def _describe_state(self) -> str:
        if self.variant.full_gate_recurrence:
            return "LSTM with full_gate_recurrence (the previous gates are a third state)"
        return "LSTM"

    def _check_streamable(self) -> None:
        super()._check_streamable()
        v = self.variant
        if self.training and (v.recurrent_dropout or v.weight_drop):
            raise ValueError(f"LSTM.step in training mode with recurrent_dropout="
                             f"{v.recurrent_dropout} and weight_drop={v.weight_drop}: each draws "
                             "one mask per sequence, which separate steps cannot share; call "
                             ".eval() for online inference, or train on whole chunks with forward")

    def _run_layer(self, x, states, weights, layout, reverse, return_gates):
        h0, c0, *q0 = states
        v = self.variant
        if v.weight_drop and self.training:         # DropConnect: one mask per call
            weights = {**weights, "w_hh": _lstm_variant.drop_connect(weights["w_hh"],
                                                                     v.weight_drop, self.backend)}
        q_T = None
        options = _lstm_variant.lstm_layer_options(v, self.training)
        masks = {} if options == {} else _lstm_variant.draw_masks(
            v, self.training, layout, x, h0.shape[1], c0.shape[1], self.backend)
        if not return_gates and options is not None:
            out, h_T, c_T = kernels.lstm_layer(x, h0, c0, **weights, **options, **masks,
                                               layout=layout, reverse=reverse,
                                               backend=self.backend)
            return out, (h_T, c_T), None
        if options == {}:                           # the plain cell
            out, h_T, c_T, gates, cells = kernels.lstm_layer_with_gates(
                x, h0, c0, **weights, layout=layout, reverse=reverse, backend=self.backend)
        else:
            out, h_T, c_T, q_T, gates, cells = kernels.lstm_variant_layer(
                x, h0, c0, weights, masks, v, q0=q0[0] if q0 else None, layout=layout,
                reverse=reverse, backend=self.backend, gates=return_gates)
        trace = None
        if return_gates:
            i, f, g, o = gates.chunk(4, 1)
            trace = {"i": i, "f": f, "g": g, "o": o, "c": cells, "h": out.detach()}
        return out, (h_T, c_T) if q_T is None else (h_T, c_T, q_T), trace


class GRU(_RecurrentBase):
    r"""Gated recurrent unit, a drop-in for `torch.nn.GRU` (same arguments, weights, outputs).

    Gate order r, z, n in the stacked weights::

        r_t = sigma(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)            reset gate
        z_t = sigma(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)            update gate
        n_t = tanh (W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))    new memory
        h_t = (1 - z_t) * n_t + z_t * h_{t-1}

    With `reset_after=False` the reset gate acts before the product, as in Cho et al. (2014):
    n_t = tanh(W_in x_t + b_in + W_hn (r_t * h_{t-1}) + b_hn). torch.nn has only the default
    (as cuDNN and Keras's `reset_after=True`); the textbook form is what Keras calls
    `reset_after=False`. Same parameters either way, so weights load into both.

    Parameters per layer k: weight_ih_lk (3H, I or D*H), weight_hh_lk (3H, H), bias_ih_lk,
    bias_hh_lk (3H); `_reverse` for the second direction.

    `variant=lstmkit.GRUVariant(...)` changes the cell (gate and candidate activations, layer
    norm, zoneout, recurrent dropout, DropConnect, update-gate bias, orthogonal
    initialisation); see `GRUVariant` and docs/variants.md. It adds parameters only for layer
    norm: ln_ih_weight/bias_lk, ln_hh_weight/bias_lk (3H) = [rz | n]. With no variant (or the
    default one) the module is torch.nn.GRU: same parameters, initialisation and results.

    `forward(..., return_gates=True)` also returns a `GateTrace` of r, z, n and h at every
    step; `step(x_t, h)` advances one step for online use.

    Example::

        >>> import torch, lstmkit
        >>> gru = lstmkit.GRU(10, 20, variant=lstmkit.GRUVariant(zoneout_h=0.1, update_bias=1.0))
        >>> output, h_n = gru(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([1, 3, 20]))
    """

    _gates = 3
    mode = "GRU"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, *,
                 reset_after: bool = True, variant: GRUVariant | None = None,
                 backend: str = "auto"):
        # Set first: the initialisation run by the base depends on it.
        self.variant = _gru_variant.check_variant(variant, bias)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype, backend=backend)
        self.reset_after = _checks.flag("reset_after", reset_after)
        # Per training mode: does the plain kernel run with the weights as they are? (As the
        # LSTM's: not with DropConnect in training.)
        self._plain_cell = {mode: not _gru_variant.uses_variant_kernel(self.variant, mode)
                            and not (mode and self.variant.weight_drop)
                            for mode in (False, True)}

    def _native_kind(self):
        if not self._plain_cell[self.training]:
            return None
        return kernels.native.CELL_KINDS[kernels.native.gru_cell(self.reset_after)]

    def _extra_shapes(self):
        return _gru_variant.extra_shapes(self.variant, self.hidden_size)

    def reset_parameters(self) -> None:
        """torch.nn's initialisation, then the variant's (layer norm, update-gate bias, ...)."""
        super().reset_parameters()
        if self.variant != GRUVariant():
            for index in range(len(self._weight_names)):
                _gru_variant.initialise(self._layer_weights(index), self.variant,
                                        self.hidden_size)

    def extra_repr(self) -> str:
        s = super().extra_repr() + ("" if self.reset_after else ", reset_after=False")
        described = self.variant.describe()
        return s + (f", variant=GRUVariant({described})" if described else "")

    def _check_streamable(self) -> None:
        super()._check_streamable()
        v = self.variant
        if self.training and (v.recurrent_dropout or v.weight_drop):
            raise ValueError(f"GRU.step in training mode with recurrent_dropout="
                             f"{v.recurrent_dropout} and weight_drop={v.weight_drop}: each draws "
                             "one mask per sequence, which separate steps cannot share; call "
                             ".eval() for online inference, or train on whole chunks with forward")

    def _run_layer(self, x, states, weights, layout, reverse, return_gates):
        v = self.variant
        if v.weight_drop and self.training:         # DropConnect: one mask per call
            weights = {**weights, "w_hh": _lstm_variant.drop_connect(weights["w_hh"],
                                                                     v.weight_drop, self.backend)}
        varied = _gru_variant.uses_variant_kernel(v, self.training)
        masks = _gru_variant.draw_masks(v, self.training, layout, x, self.hidden_size,
                                        self.backend) \
            if varied else {}
        options = _gru_variant.gru_layer_options(v)
        if not return_gates and options is not None:
            out, h_T = kernels.gru_layer(x, states[0], **weights, **masks, **options,
                                         layout=layout, reverse=reverse,
                                         reset_after=self.reset_after, backend=self.backend)
            return out, (h_T,), None
        if varied:
            out, h_T, gates = kernels.gru_variant_layer(
                x, states[0], weights, masks, v, layout=layout, reverse=reverse,
                reset_after=self.reset_after, backend=self.backend, gates=return_gates)
        else:
            out, h_T, gates = kernels.gru_layer_with_gates(
                x, states[0], **weights, layout=layout, reverse=reverse,
                reset_after=self.reset_after, backend=self.backend)
        if not return_gates:
            return out, (h_T,), None
        r, z, n = gates.chunk(3, 1)
        return out, (h_T,), {"r": r, "z": z, "n": n, "h": out.detach()}


class RNN(_RecurrentBase):
    r"""Elman RNN, a drop-in for `torch.nn.RNN`: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
    with act = tanh (default) or relu (`nonlinearity="relu"`)."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None,
                 *, backend: str = "auto"):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype, backend=backend)
        self.nonlinearity = _checks.choice("nonlinearity", nonlinearity, kernels.NONLINEARITIES)

    @property
    def mode(self) -> str:
        """torch.nn.RNN's mode string: "RNN_TANH" or "RNN_RELU"."""
        return f"RNN_{self.nonlinearity.upper()}"

    def extra_repr(self) -> str:
        tail = "" if self.nonlinearity == "tanh" else f", nonlinearity={self.nonlinearity!r}"
        return super().extra_repr() + tail

    def _native_kind(self):
        return kernels.native.CELL_KINDS.get(kernels.native.rnn_cell(self.nonlinearity))

    def _run_layer(self, x, states, weights, layout, reverse, return_gates):
        if return_gates:
            raise ValueError("return_gates=True: the Elman RNN has no gates (LSTM and GRU do); "
                             "its hidden states are its output")
        out, h_T = kernels.rnn_layer(x, states[0], **weights, layout=layout, reverse=reverse,
                                     nonlinearity=self.nonlinearity, backend=self.backend)
        return out, (h_T,), None
