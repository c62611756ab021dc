"""lstmkit: LSTM, GRU and RNN from first principles, a drop-in for torch.nn.

How its speed compares with torch.nn, shape by shape, is measured in docs/performance.md
(`lstmkit bench`).

    >>> import torch, lstmkit
    >>> lstm = lstmkit.LSTM(input_size=8, hidden_size=16, batch_first=True)
    >>> output, (h_n, c_n) = lstm(torch.randn(4, 10, 8))
"""

from .nn import (
    GRU,
    LSTM,
    RNN,
    GateTrace,
    GRUCell,
    GRUVariant,
    LSTMCell,
    LSTMVariant,
    RNNCell,
    detach_state,
    gate_saturation,
)

__version__ = "0.1.0"
__all__ = ["GRU", "GRUCell", "GRUVariant", "GateTrace", "LSTM", "LSTMCell", "LSTMVariant",
           "RNN", "RNNCell", "__version__", "detach_state", "gate_saturation"]
