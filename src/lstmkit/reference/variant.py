"""`LSTMVariant`: one frozen, validated description of an LSTM that differs from torch.nn's.

It lives beside the reference because it *is* a description of the equations: the reference
and the kernels read its equation fields, the modules read its regularisation and
initialisation fields. Every default reproduces torch.nn.LSTM exactly. See docs/variants.md
for each option's equations and source.
"""

import math
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Literal

GATE_ACTIVATIONS = ("sigmoid", "hard_sigmoid")
CELL_ACTIVATIONS = ("tanh", "softsign", "hardtanh", "identity")

# Why each squashing function that is not in GATE_ACTIVATIONS cannot act as a gate (seed 002 §7):
# a gate multiplies a signal by a fraction, so it must map into [0, 1] and saturate at both ends.
_WHY_NOT_A_GATE = {
    "tanh": "its range (-1, 1) is not a fraction: a negative gate flips the sign of what it passes",
    "softsign": "its range (-1, 1) is not a fraction: a negative gate flips the sign of what it "
                "passes",
    "hardtanh": "its range [-1, 1] is not a fraction: a negative gate flips the sign of what it "
                "passes",
    "relu": "it is unbounded above: it cannot close to a fraction of the signal and would amplify "
            "the cell state without limit instead of letting part of it through",
    "identity": "it is unbounded in both directions, so it neither opens, closes nor saturates",
}

# Greff et al. (2015), "LSTM: A Search Space Odyssey": their vanilla LSTM has peepholes; each
# variant changes one thing.
GREFF_VARIANTS = ("V", "NIG", "NFG", "NOG", "NIAF", "NOAF", "NP", "CIFG", "FGR")


def _check_rate(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__} {value!r}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _check_optional_float(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite float or None, got {value!r}")


def _check_common(variant) -> None:
    """The checks LSTMVariant and GRUVariant share: gate activation, zoneout_eval, eps."""
    if variant.gate_activation not in GATE_ACTIVATIONS:
        why = _WHY_NOT_A_GATE.get(variant.gate_activation)
        if why is not None:
            raise ValueError(f"gate_activation={variant.gate_activation!r} cannot gate: {why}; "
                             f"use one of {GATE_ACTIVATIONS}")
        raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, "
                         f"got {variant.gate_activation!r}")
    if variant.zoneout_eval not in ("expectation", "off"):
        raise ValueError(f"zoneout_eval must be 'off' or 'expectation', got "
                         f"{variant.zoneout_eval!r}")
    eps = variant.layer_norm_eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"layer_norm_eps must be a positive float, got {eps!r}")


# The options that change the cell only elementwise, unit by unit (the native kernels compute
# these, see LSTMVariant.changes_only_elementwise): peepholes, which add a parameter, and the
# cell's form (kernels.lstm_layer's arguments of these names).
CELL_FORM_FIELDS = ("cifg", "input_gate", "forget_gate", "output_gate", "gate_activation",
                    "cell_activation", "output_activation")
_ELEMENTWISE_FIELDS = ("peepholes", *CELL_FORM_FIELDS)
# The options that change the cell's equations in eval mode (the others are training-time
# regularisers or initialisations).
_EQUATION_FIELDS = (*_ELEMENTWISE_FIELDS, "full_gate_recurrence", "layer_norm")


@dataclass(frozen=True, repr=False)
class LSTMVariant:
    """Options of an LSTM layer or cell; the defaults are exactly torch.nn.LSTM.

    Equations (each field's effect; seed notation, per step t):
        peepholes:        a_i += p_i * c_{t-1}, a_f += p_f * c_{t-1}, a_o += p_o * c_t
        cifg:             f_t = 1 - i_t                          (coupled input-forget gate)
        input_gate=False: i_t = 1;  forget_gate=False: f_t = 1;  output_gate=False: o_t = 1
        full_gate_recurrence: [a_i, a_f, a_o] += [i, f, o]_{t-1} W_gg^T (Greff's FGR); the
                          previous gates q = [i, f, o]_{t-1} become a third state beside h, c
        gate_activation:  sigma in i, f, o ("sigmoid" or "hard_sigmoid" = clip(a/6 + 1/2, 0, 1))
        cell_activation:  phi in g_t = phi(a_g) ("identity" is Greff's NIAF)
        output_activation: psi in h_t = o_t * psi(c_t) ("identity" is Greff's NOAF)
        layer_norm:       a = LN(x W_ih^T) + LN(h W_hh^T) + b, h_t = o_t * psi(LN(c_t)),
                          each LN with a learnable gain (init 1) and bias (init 0)
        zoneout_h, zoneout_c: rates; in training each unit keeps its previous value with that
                          probability each step
        zoneout_eval:     "off" (default): in eval zoneout does nothing, like every regulariser
                          here; "expectation" (Krueger et al.): in eval each unit moves by
                          (1 - rate) of its update
        recurrent_dropout: rate of one dropout mask per sequence on h_{t-1} in h W_hh^T (training)
        weight_drop:      DropConnect rate on weight_hh, one mask per forward call (training)
        forget_bias:      initial forget-gate bias (e.g. 1.0)
        chrono_init:      T_max for chrono initialisation: b_f ~ log U(1, T_max - 1), b_i = -b_f
        orthogonal_init:  each gate's block of weight_hh initialised (semi-)orthogonal
    """

    peepholes: bool = False
    cifg: bool = False
    input_gate: bool = True
    forget_gate: bool = True
    output_gate: bool = True
    full_gate_recurrence: bool = False
    gate_activation: Literal["sigmoid", "hard_sigmoid"] = "sigmoid"
    cell_activation: Literal["tanh", "softsign", "hardtanh", "identity"] = "tanh"
    output_activation: Literal["tanh", "softsign", "hardtanh", "identity"] = "tanh"
    layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    zoneout_h: float = 0.0
    zoneout_c: float = 0.0
    zoneout_eval: Literal["off", "expectation"] = "off"
    recurrent_dropout: float = 0.0
    weight_drop: float = 0.0
    forget_bias: float | None = None
    chrono_init: int | None = None
    orthogonal_init: bool = False

    def __post_init__(self):
        for name in ("peepholes", "cifg", "input_gate", "forget_gate", "output_gate",
                     "full_gate_recurrence", "layer_norm", "orthogonal_init"):
            _check_flag(name, getattr(self, name))
        _check_common(self)
        for name in ("cell_activation", "output_activation"):
            if getattr(self, name) not in CELL_ACTIVATIONS:
                raise ValueError(f"{name} must be one of {CELL_ACTIVATIONS}, "
                                 f"got {getattr(self, name)!r}")
        for name in ("zoneout_h", "zoneout_c", "recurrent_dropout", "weight_drop"):
            _check_rate(name, getattr(self, name))
        if self.cifg and not self.input_gate:
            raise ValueError("cifg=True computes the forget gate from the input gate (f = 1 - i), "
                             "so it cannot be combined with input_gate=False")
        if self.cifg and not self.forget_gate:
            raise ValueError("cifg=True replaces the forget gate by 1 - i, and forget_gate=False "
                             "replaces it by 1: choose one of them")
        _check_optional_float("forget_bias", self.forget_bias)
        if self.forget_bias is not None:
            fb = self.forget_bias
            if self.chrono_init is not None:
                raise ValueError(f"forget_bias={fb} and chrono_init={self.chrono_init} both set "
                                 "the forget-gate bias: choose one of them")
            if not self.forget_gate:
                raise ValueError(f"forget_bias={fb} initialises the forget gate, which "
                                 "forget_gate=False removes")
        if self.chrono_init is not None:
            t_max = self.chrono_init
            if isinstance(t_max, bool) or not isinstance(t_max, int) or t_max < 3:
                raise ValueError("chrono_init must be the expected dependency length, an int >= 3 "
                                 f"(biases are drawn from log U(1, T_max - 1)), got {t_max!r}")
            if not self.forget_gate:
                raise ValueError(f"chrono_init={t_max} initialises the forget gate, which "
                                 "forget_gate=False removes")

    @classmethod
    def greff(cls, name: str, **overrides) -> "LSTMVariant":
        """One of the variants of Greff et al. (2015), whose vanilla LSTM ("V") has peepholes.

        NIG/NFG/NOG: no input/forget/output gate; NIAF/NOAF: no input/output activation
        (identity); NP: no peepholes (torch.nn's LSTM); CIFG: coupled input and forget gate;
        FGR: full gate recurrence.
        """
        changes = {"V": {}, "NIG": {"input_gate": False}, "NFG": {"forget_gate": False},
                   "NOG": {"output_gate": False}, "NIAF": {"cell_activation": "identity"},
                   "NOAF": {"output_activation": "identity"}, "NP": {"peepholes": False},
                   "CIFG": {"cifg": True}, "FGR": {"full_gate_recurrence": True}}
        if name not in changes:
            raise ValueError(f"Greff variant must be one of {GREFF_VARIANTS}, got {name!r}")
        return cls(**{"peepholes": True, **changes[name], **overrides})

    # -- what the equations need ----------------------------------------------------------

    @cached_property
    def changes_equations(self) -> bool:
        """True when the cell differs from torch.nn's in eval mode (needs the variant kernel)."""
        # Asked on every forward call (the single-step API pays for each microsecond): cached,
        # which a frozen instance allows (cached_property writes the instance's __dict__).
        fields = self.__dataclass_fields__
        return (any(getattr(self, f) != fields[f].default for f in _EQUATION_FIELDS)
                or self.zoneout_in_eval())

    @cached_property
    def changes_only_elementwise(self) -> bool:
        """True when the eval-mode equations differ from torch.nn's only elementwise, unit by
        unit: peepholes, CIFG, removed gates, activations, zoneout's expectation (the native
        kernels compute those; not layer norm, which mixes units, nor full gate recurrence, a
        matrix product)."""
        fields = self.__dataclass_fields__
        return (self.changes_equations
                and all(getattr(self, f) == fields[f].default
                        for f in _EQUATION_FIELDS if f not in _ELEMENTWISE_FIELDS))

    def zoneout_in_eval(self) -> bool:
        """True when zoneout changes the eval-mode equations (its expectation)."""
        return bool(self.zoneout_eval == "expectation" and (self.zoneout_h or self.zoneout_c))

    @property
    def stochastic(self) -> bool:
        """True when training draws random masks (zoneout, recurrent dropout, DropConnect)."""
        return bool(self.zoneout_h or self.zoneout_c or self.recurrent_dropout or self.weight_drop)

    def __repr__(self) -> str:
        return f"LSTMVariant({self.describe()})"

    def describe(self) -> str:
        """The fields that differ from the defaults, as `name=value, ...` (for repr)."""
        plain = LSTMVariant()
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                         if getattr(self, f.name) != getattr(plain, f.name))


# -- GRU -------------------------------------------------------------------------------------

CANDIDATE_ACTIVATIONS = ("tanh", "softsign", "hardtanh")
_GRU_EQUATION_FIELDS = ("gate_activation", "candidate_activation", "layer_norm")


@dataclass(frozen=True, repr=False)
class GRUVariant:
    """Options of a GRU layer or cell; the defaults are exactly torch.nn.GRU.

    Equations (each field's effect; gate order [r | z | n] as torch.nn, per step t; the
    reset-after / reset-before choice stays the module's `reset_after` argument):
        gate_activation:  sigma in r and z ("sigmoid" or "hard_sigmoid" = clip(a/6 + 1/2, 0, 1))
        candidate_activation: phi in n_t = phi(a_n) ("tanh", "softsign" or "hardtanh")
        layer_norm:       x W_ih^T and the recurrent products normalised before the biases, each
                          in two blocks, [r | z] (2H) and n (H) (Ba et al.'s layer-normalised
                          GRU), with learnable gains (init 1) and biases (init 0)
        zoneout_h:        rate; in training each unit keeps its previous value with that
                          probability each step
        zoneout_eval:     "off" (default): in eval zoneout does nothing; "expectation"
                          (Krueger et al.): in eval each unit moves by (1 - rate) of its update
        recurrent_dropout: rate of one dropout mask per sequence on h_{t-1} in every recurrent
                          product (training)
        weight_drop:      DropConnect rate on weight_hh, one mask per forward call (training)
        update_bias:      initial update-gate bias b_z (e.g. 1.0: z ~ 0.73, so each unit starts
                          by mostly keeping h_{t-1}); the GRU's forget_bias
        orthogonal_init:  each gate's (H, H) block of weight_hh initialised orthogonal
    """

    gate_activation: Literal["sigmoid", "hard_sigmoid"] = "sigmoid"
    candidate_activation: Literal["tanh", "softsign", "hardtanh"] = "tanh"
    layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    zoneout_h: float = 0.0
    zoneout_eval: Literal["off", "expectation"] = "off"
    recurrent_dropout: float = 0.0
    weight_drop: float = 0.0
    update_bias: float | None = None
    orthogonal_init: bool = False

    def __post_init__(self):
        for name in ("layer_norm", "orthogonal_init"):
            _check_flag(name, getattr(self, name))
        _check_common(self)
        if self.candidate_activation not in CANDIDATE_ACTIVATIONS:
            raise ValueError(f"candidate_activation must be one of {CANDIDATE_ACTIVATIONS}, "
                             f"got {self.candidate_activation!r}")
        for name in ("zoneout_h", "recurrent_dropout", "weight_drop"):
            _check_rate(name, getattr(self, name))
        _check_optional_float("update_bias", self.update_bias)

    @cached_property
    def changes_equations(self) -> bool:
        """True when the cell differs from torch.nn's in eval mode (needs the variant kernel)."""
        fields = self.__dataclass_fields__
        return (any(getattr(self, f) != fields[f].default for f in _GRU_EQUATION_FIELDS)
                or self.zoneout_in_eval())

    def zoneout_in_eval(self) -> bool:
        """True when zoneout changes the eval-mode equations (its expectation)."""
        return bool(self.zoneout_eval == "expectation" and self.zoneout_h)

    @property
    def stochastic(self) -> bool:
        """True when training draws random masks (zoneout, recurrent dropout, DropConnect)."""
        return bool(self.zoneout_h or self.recurrent_dropout or self.weight_drop)

    def __repr__(self) -> str:
        return f"GRUVariant({self.describe()})"

    def describe(self) -> str:
        """The fields that differ from the defaults, as `name=value, ...` (for repr)."""
        plain = GRUVariant()
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                         if getattr(self, f.name) != getattr(plain, f.name))
