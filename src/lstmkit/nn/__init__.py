"""torch.nn-compatible modules. Same constructor arguments, parameter names, shapes,
initialisation, forward signature and outputs as torch.nn's recurrent modules."""

from ..reference.variant import GRUVariant, LSTMVariant
from .cells import GRUCell, LSTMCell, RNNCell
from .introspection import GateTrace, gate_saturation
from .recurrent import GRU, LSTM, RNN
from .streaming import detach_state

__all__ = ["GRU", "GRUCell", "GRUVariant", "GateTrace", "LSTM", "LSTMCell", "LSTMVariant",
           "RNN", "RNNCell", "detach_state", "gate_saturation"]
