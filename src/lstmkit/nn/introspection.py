"""Per-step gates and states of a recurrent stack, and gate saturation statistics.

`lstmkit.LSTM(...)(x, return_gates=True)` and `lstmkit.GRU(...)(x, return_gates=True)` return
a `GateTrace` as third result. The values are the ones the kernels store for their backward
anyway: asking for them costs no extra arithmetic; not asking costs nothing at all.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import PackedSequence

# Names and meaning of the traced quantities, per family (gate order as in the weights).
TRACED = {
    "LSTM": {"i": "input gate", "f": "forget gate", "g": "candidate memory",
             "o": "output gate", "c": "cell state c_t", "h": "hidden state h_t"},
    "GRU": {"r": "reset gate", "z": "update gate", "n": "new memory", "h": "hidden state h_t"},
}
# Gates that squash into [0, 1] and so can saturate open or shut.
SIGMOID_GATES = {"LSTM": ("i", "f", "o"), "GRU": ("r", "z")}


@dataclass(frozen=True)
class GateTrace:
    """Gate activations and states of every layer and direction, at every step.

    `trace[layer, direction]` (direction "forward" or "reverse") is a dict name -> tensor;
    names are in `trace.names` (LSTM: i, f, g, o, c, h; GRU: r, z, n, h). Each tensor has
    the layout of the module's output with that direction's features: (T, B, H), or
    (B, T, H) with batch_first, (T, H) unbatched, or a PackedSequence for packed input.
    h has P features for an LSTM with projection. Values carry no gradient.
    """

    family: str
    records: dict

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(TRACED[self.family])

    def __getitem__(self, key) -> dict:
        if key not in self.records:
            raise KeyError(f"no trace for {key!r}; available (layer, direction) keys: "
                           f"{list(self.records)}")
        return self.records[key]

    def __iter__(self) -> Iterator:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def keys(self):
        return self.records.keys()

    def items(self):
        return self.records.items()


def _values(t) -> torch.Tensor:
    """All valid steps of a traced tensor as (rows, H): padding-free for PackedSequence."""
    data = t.data if isinstance(t, PackedSequence) else t
    return data.detach().reshape(-1, data.shape[-1])


def gate_saturation(trace: GateTrace, low: float = 0.1, high: float = 0.9) -> dict:
    """Fraction of steps each unit's gates are shut (< low) or open (> high).

    Karpathy, Johnson & Fei-Fei (2015), "Visualizing and Understanding Recurrent Networks":
    a gate is left-saturated when its activation is below 0.1 and right-saturated above 0.9.
    Counted over every valid step and sequence (padding excluded for packed input).

    Returns {(layer, direction): {gate: {"low": ndarray (H,), "high": ndarray (H,)}}} for
    the sigmoid gates (LSTM i, f, o; GRU r, z); e.g. scatter "low" against "high" per gate.
    """
    if not isinstance(trace, GateTrace):
        raise TypeError(f"trace must be a GateTrace (from return_gates=True), got "
                        f"{type(trace).__name__}")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"thresholds must satisfy 0 <= low < high <= 1, got low={low}, "
                         f"high={high}")
    result = {}
    for key, record in trace.items():
        per_gate = {}
        for gate in SIGMOID_GATES[trace.family]:
            values = _values(record[gate])
            per_gate[gate] = {
                "low": (values < low).double().mean(0).cpu().numpy().astype(np.float64),
                "high": (values > high).double().mean(0).cpu().numpy().astype(np.float64),
            }
        result[key] = per_gate
    return result
