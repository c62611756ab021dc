"""How the modules behave under `torch.autocast`.

The kernels do their own precision management (float16/bfloat16 run with float32 state and
accumulation, see `kernels/_precision.py`), so autocast's per-op casting inside them would only
mix dtypes half-way through a recurrence. Under autocast a module therefore casts its input and
states to its parameters' dtype and runs the kernels with autocast off; its outputs are in that
dtype, and autocast's lower precision applies to the layers around it.
"""

import functools

import torch
from torch.nn.utils.rnn import PackedSequence


def _cast(value, dtype):
    """A tensor, PackedSequence or tuple of them with floating tensors cast to `dtype`."""
    if isinstance(value, PackedSequence):
        return value._replace(data=_cast(value.data, dtype))
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    return value


def outside_autocast(forward):
    """Decorate a module's `forward(self, input, hx=None, ...)` to run as described above."""

    @functools.wraps(forward)
    def wrapper(self, input, hx=None, *args, **kwargs):
        data = input.data if isinstance(input, PackedSequence) else input
        if not torch.is_tensor(data) or not torch.is_autocast_enabled(data.device.type):
            return forward(self, input, hx, *args, **kwargs)
        dtype = next(self.parameters()).dtype
        with torch.autocast(data.device.type, enabled=False):
            return forward(self, _cast(input, dtype), _cast(hx, dtype), *args, **kwargs)

    return wrapper
