"""GRU kernel that also returns its gate activations, for introspection.

# N rows (time-major, see layout.py), B batch, H hidden.

The portable GRU forward already stores [r | z | n (| gh_n)] (N, 3H or 4H) for its backward;
this Function returns that stash as a third, non-differentiable output. Its arithmetic and
backward are GRUFunction's own; only the plain path's Function signature is left untouched.
"""

import torch

from ._precision import cast_like, compute_dtype, dtypes_of, upcast
from .gru import GRUFunction, gru_forward


class GRUTraceFunction(torch.autograd.Function):
    """GRUFunction plus its gates: apply(same arguments) -> out (N, H), h_T (B, H),
    gates (N, 3H) = [r | z | n] as applied at each step."""

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, reset_after):
        originals = (x, h0, w_ih, w_hh, b_ih, b_hh)
        x, h0, w_ih, w_hh, b_ih, b_hh = upcast(originals, compute_dtype(x.dtype))
        out, h_T, stash = gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, layout, reverse, reset_after)
        ctx.save_for_backward(x, h0, w_ih, w_hh, out, stash)
        ctx.layout, ctx.reverse, ctx.reset_after = layout, reverse, reset_after
        ctx.dtypes = dtypes_of(originals)
        H = w_hh.shape[0] // 3
        like = (originals[0], originals[1], originals[0])
        results = cast_like((out, h_T, stash[:, :3 * H]), like)
        ctx.mark_non_differentiable(results[2])
        return tuple(results)

    @staticmethod
    def backward(ctx, d_out, d_hT, _d_gates):
        return GRUFunction.backward(ctx, d_out, d_hT)
