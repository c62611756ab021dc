"""NumPy float64 reference: the oracle every kernel is tested against, and the teaching text.

Imports numpy only. Each cell family has a forward over a batch of sequences (time-major,
one layer, one direction) and a hand-derived backward through time.
"""

from .gru import gru_backward, gru_forward
from .gru_variants import gru_variant_backward, gru_variant_forward
from .lstm import lstm_backward, lstm_forward
from .lstm_variants import lstm_variant_backward, lstm_variant_forward
from .rnn import rnn_backward, rnn_forward
from .variant import GRUVariant, LSTMVariant

__all__ = [
    "GRUVariant", "LSTMVariant",
    "gru_backward", "gru_forward",
    "gru_variant_backward", "gru_variant_forward",
    "lstm_backward", "lstm_forward",
    "lstm_variant_backward", "lstm_variant_forward",
    "rnn_backward", "rnn_forward",
]
