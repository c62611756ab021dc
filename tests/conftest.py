"""Shared test helpers: one comparison function with tolerances derived per dtype, a native
kernel setting set for a block, and an interrupted forecaster training run."""

import contextlib

import numpy as np
import pytest
import torch

import lstmkit.kernels

# Relative tolerances per dtype: float64 is exact to rounding over the short sequences used
# here; float32 accumulates ~1e-7 per operation over a few hundred operations per value.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}

BACKENDS = [b for b in lstmkit.kernels.BACKENDS if b != "auto"]


def assert_close(actual, expected, dtype=None, name=""):
    """Compare tensors/arrays with the dtype's relative tolerance, scaled by the values' size.

    atol = rtol * max(1, max|expected|): an entry that is ~0 by cancellation is held to the
    precision of the largest entry, not to its own (unrepresentable) relative precision.
    """
    actual = torch.as_tensor(np.asarray(actual) if not torch.is_tensor(actual) else actual)
    expected = torch.as_tensor(np.asarray(expected) if not torch.is_tensor(expected) else expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    dtype = dtype or actual.dtype
    rtol = RTOL[dtype]
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().to(torch.float64), expected.detach().to(torch.float64),
                               rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name}: {m}")


@contextlib.contextmanager
def native_setting(name, *value):
    """The native module's test setting `name` (its set_<name>) at `value` inside the block,
    restored after; a value of None leaves the setting as it is."""
    if value == (None,):
        yield
        return
    setter = getattr(lstmkit.kernels.native.module(), f"set_{name}")
    previous = setter(*value)
    try:
        yield
    finally:
        setter(*previous) if isinstance(previous, tuple) else setter(previous)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def same_masks(monkeypatch):
    """Layers on every backend draw their masks with torch.bernoulli (on the native backend
    they draw them natively, from another stream): a native and a portable module given the
    same seed then run on the same masks."""
    monkeypatch.setattr(lstmkit.kernels.native, "NATIVE_MASKS", False)


def interrupt_forecaster_training(monkeypatch, epoch):
    """Make the forecaster's training loop raise KeyboardInterrupt (as Ctrl-C would) when
    `epoch` ends. Returns a function that puts the real loop back."""
    import lstmkit.tasks.forecasting.estimator as estimator

    real_loop = estimator.train_loop

    def interrupted(*args, **kwargs):
        def stop(done, record):
            if done == epoch:
                raise KeyboardInterrupt
        return real_loop(*args, **kwargs, on_epoch_end=stop)

    monkeypatch.setattr(estimator, "train_loop", interrupted)
    return lambda: monkeypatch.setattr(estimator, "train_loop", real_loop)
