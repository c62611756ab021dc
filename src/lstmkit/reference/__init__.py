"""NumPy float64 reference: the oracle every kernel is tested against, and the teaching text.

Imports numpy only. Each cell family has a forward over a batch of sequences (time-major,
one layer, one direction) and a hand-derived backward through time.
"""

from .gru import gru_backward, gru_forward
from .lstm import lstm_backward, lstm_forward
from .rnn import rnn_backward, rnn_forward

__all__ = [
    "gru_backward", "gru_forward",
    "lstm_backward", "lstm_forward",
    "rnn_backward", "rnn_forward",
]
