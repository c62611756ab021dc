"""torch.nn-compatible modules. Same constructor arguments, parameter names, shapes,
initialisation, forward signature and outputs as torch.nn's recurrent modules."""

from .cells import GRUCell, LSTMCell, RNNCell
from .recurrent import GRU, LSTM, RNN

__all__ = ["GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell"]
