"""Plain LSTM and GRU kernels that also return their gates, for introspection.

# N rows (time-major, see layout.py), B batch, H hidden.

The portable forwards already store, for their backward, the activated gates
(LSTM [i | f | g | o] (N, 4H) and cell states (N, H); GRU [r | z | n (| gh_n)]). These
Functions return them as extra, non-differentiable outputs: no extra arithmetic. Their
forward and backward are LSTMFunction's and GRUFunction's own; those Functions and their
signatures stay untouched for the other backends.
"""

import torch

from ._precision import cast_like
from .gru import GRUFunction
from .gru import forward_and_save as gru_forward_and_save
from .lstm import LSTMFunction
from .lstm import forward_and_save as lstm_forward_and_save


class LSTMTraceFunction(torch.autograd.Function):
    """LSTMFunction plus its gates: apply(same arguments) -> out (N, P), h_T (B, P),
    c_T (B, H), gates (N, 4H) = [i | f | g | o], cells (N, H)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout, reverse):
        out, h_T, c_T, gates, cells, originals = lstm_forward_and_save(
            ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, layout, reverse)
        like = (originals[0], originals[1], originals[2], originals[0], originals[0])
        results = cast_like((out, h_T, c_T, gates, cells), like)
        ctx.mark_non_differentiable(results[3], results[4])
        return tuple(results)

    @staticmethod
    def backward(ctx, d_out, d_hT, d_cT, _d_gates, _d_cells):
        return LSTMFunction.backward(ctx, d_out, d_hT, d_cT)


class GRUTraceFunction(torch.autograd.Function):
    """GRUFunction plus its gates: apply(same arguments) -> out (N, H), h_T (B, H),
    gates (N, 3H) = [r | z | n] as applied at each step."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, reset_after):
        out, h_T, stash, originals = gru_forward_and_save(ctx, x, h0, w_ih, w_hh, b_ih, b_hh,
                                                          layout, reverse, reset_after)
        H = w_hh.shape[0] // 3
        like = (originals[0], originals[1], originals[0])
        results = cast_like((out, h_T, stash[:, :3 * H]), like)
        ctx.mark_non_differentiable(results[2])
        return tuple(results)

    @staticmethod
    def backward(ctx, d_out, d_hT, _d_gates):
        return GRUFunction.backward(ctx, d_out, d_hT)
