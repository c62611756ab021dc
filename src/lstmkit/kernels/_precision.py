"""Compute-dtype policy shared by the portable kernels.

float32 and float64 run as they are. float16 and bfloat16 are upcast to float32 for the whole
recurrence (the cell state accumulates over thousands of steps and must not round at 8 bits of
mantissa), and results are cast back to the caller's dtype.
"""

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel computes in for inputs of `dtype`."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


# Each helper leaves a tensor already in the wanted dtype alone without calling `.to` (about
# 1 us per call, and a layer makes a dozen of them on the usual float32 path).

def _to(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)


def upcast(tensors, dtype):
    """Each tensor in `dtype` (None stays None)."""
    return [_to(t, dtype) for t in tensors]


def cast_like(tensors, like):
    """Each result in the dtype of the input it corresponds to (the caller's dtype)."""
    return [_to(t, ref.dtype) for t, ref in zip(tensors, like)]


def dtypes_of(tensors):
    """The inputs' dtypes, for `cast_to` in the backward pass."""
    return [None if t is None else t.dtype for t in tensors]


def cast_to(tensors, dtypes):
    """Cast each gradient to its input's dtype; None where there is no input or no gradient."""
    return [None if d is None else _to(t, d) for t, d in zip(tensors, dtypes)]
