"""Argument checks shared by the modules: each error names the bad value and what was expected."""

import numbers

import torch


def integer(name: str, value) -> int:
    """An int (Python or NumPy, not bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def positive_int(name: str, value) -> int:
    value = integer(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__} {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def choice(name: str, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def floating_tensor(name: str, value, like: torch.Tensor | None = None,
                    like_name: str = "the input") -> torch.Tensor:
    """A floating-point tensor; with `like`, also of like's dtype and device."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if like is not None:
        if value.dtype != like.dtype:
            raise TypeError(f"{name} must have dtype {like.dtype} (as {like_name}), "
                            f"got {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name} must be on device {like.device} (as {like_name}), "
                             f"got {value.device}")
    return value


def shape(name: str, value: torch.Tensor, expected: tuple) -> torch.Tensor:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(value.shape)}")
    return value
