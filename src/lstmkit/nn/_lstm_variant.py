"""What the LSTM modules do for an `LSTMVariant` besides calling the kernels: the extra
parameters it needs, their initialisation, and the random masks of its regularisers.

Masks come from torch's global generator (as `torch.nn.functional.dropout`), so
`torch.manual_seed` makes a training run reproducible: for a layer on the native backend
through one seed for the native module's counter-based draw (`kernels.native.bernoulli_mask`),
else torch.bernoulli.
"""

import torch
from torch import nn

from ..kernels import StepLayout, native
from ..reference.variant import CELL_FORM_FIELDS, LSTMVariant


def check_variant(variant, bias: bool) -> LSTMVariant:
    """The module's variant (the plain LSTM for None), checked against its bias argument."""
    if variant is None:
        return LSTMVariant()
    if not isinstance(variant, LSTMVariant):
        raise TypeError(f"variant must be an lstmkit.LSTMVariant or None, got "
                        f"{type(variant).__name__} {variant!r}")
    for name in ("forget_bias", "chrono_init"):
        if getattr(variant, name) is not None and not bias:
            raise ValueError(f"{name}={getattr(variant, name)} initialises gate biases, which "
                             "bias=False removes")
    return variant


def extra_shapes(variant: LSTMVariant, hidden_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(parameter stem, shape) of the parameters the variant adds to each layer and direction."""
    H = hidden_size
    shapes = []
    if variant.peepholes:
        shapes.append(("weight_peephole", (3 * H,)))          # [p_i | p_f | p_o]
    if variant.full_gate_recurrence:
        shapes.append(("weight_gate", (3 * H, 3 * H)))        # [i | f | o]_{t-1} -> a_{i,f,o}
    if variant.layer_norm:
        shapes += [("ln_ih_weight", (4 * H,)), ("ln_ih_bias", (4 * H,)),
                   ("ln_hh_weight", (4 * H,)), ("ln_hh_bias", (4 * H,)),
                   ("ln_cell_weight", (H,)), ("ln_cell_bias", (H,))]
    return shapes


# parameter stem -> keyword argument of the kernels
KERNEL_ARGUMENT = {"weight_ih": "w_ih", "weight_hh": "w_hh", "bias_ih": "b_ih", "bias_hh": "b_hh",
                   "weight_hr": "w_hr", "weight_peephole": "w_peephole", "weight_gate": "w_gate",
                   "ln_ih_weight": "ln_ih_weight", "ln_ih_bias": "ln_ih_bias",
                   "ln_hh_weight": "ln_hh_weight", "ln_hh_bias": "ln_hh_bias",
                   "ln_cell_weight": "ln_cell_weight", "ln_cell_bias": "ln_cell_bias"}


@torch.no_grad()
def initialise(weights: dict, variant: LSTMVariant, hidden_size: int) -> None:
    """Apply the variant's initialisation to one layer's parameters (kernel-argument keys),
    after the torch.nn uniform initialisation of everything."""
    H = hidden_size
    for name in ("ln_ih_weight", "ln_hh_weight", "ln_cell_weight"):
        if weights.get(name) is not None:
            weights[name].fill_(1.0)
    for name in ("ln_ih_bias", "ln_hh_bias", "ln_cell_bias"):
        if weights.get(name) is not None:
            weights[name].zero_()
    if variant.orthogonal_init:
        for k in range(4):                                  # each gate's (H, P) block
            nn.init.orthogonal_(weights["w_hh"][k * H:(k + 1) * H])
    b_ih, b_hh = weights.get("b_ih"), weights.get("b_hh")
    if b_ih is None or b_hh is None:
        return
    if variant.forget_bias is not None:
        forget = torch.full_like(b_ih[:H], float(variant.forget_bias))
    elif variant.chrono_init is not None:                   # Tallec & Ollivier 2018
        forget = torch.empty_like(b_ih[:H]).uniform_(1.0, variant.chrono_init - 1.0).log_()
    else:
        return
    # The sum b_ih + b_hh is what the gate sees: put the value in b_ih and zero b_hh's part.
    if variant.cifg:                      # f = 1 - sigma(a_i) = sigma(-a_i): bias the input gate
        b_ih[:H] = -forget
        b_hh[:H] = 0.0
        return
    b_ih[H:2 * H] = forget
    b_hh[H:2 * H] = 0.0
    if variant.chrono_init is not None:   # chrono also sets b_i = -b_f
        b_ih[:H] = -forget
        b_hh[:H] = 0.0


def drop_connect(w_hh: torch.Tensor, rate: float, backend: str = "auto") -> torch.Tensor:
    """W_hh * D / (1 - rate), D ~ Bernoulli(1 - rate) per weight (Merity et al. 2017), drawn as
    the layer's other masks (see draw_masks)."""
    return native.dropout(w_hh, rate, backend)


def draw_masks(variant: LSTMVariant, training: bool, layout: StepLayout, like: torch.Tensor,
               out_size: int, hidden_size: int, backend: str = "auto") -> dict:
    """Masks for one layer and direction: zoneout_h (N, P), zoneout_c (N, H), recurrent (B, P).

    In eval, zoneout is off, or with zoneout_eval="expectation" uses its expectation, a
    (1, F) tensor filled with the rate (Krueger et al. 2016); recurrent dropout is off.
    """
    masks = {}
    for name, rate, size in (("zoneout_h", variant.zoneout_h, out_size),
                             ("zoneout_c", variant.zoneout_c, hidden_size)):
        if rate and training:
            masks[name] = native.bernoulli_mask(layout.rows, size, rate, like, backend)
        elif rate and variant.zoneout_eval == "expectation":
            masks[name] = torch.full((1, size), rate, dtype=like.dtype, device=like.device)
    if variant.recurrent_dropout and training:
        keep = 1.0 - variant.recurrent_dropout
        masks["recurrent"] = native.bernoulli_mask(layout.batch, out_size, keep, like,
                                                   backend).div_(keep)
    return masks


def _masked(variant: LSTMVariant, training: bool) -> bool:
    return bool(training and (variant.recurrent_dropout or variant.zoneout_h or variant.zoneout_c))


def uses_variant_kernel(variant: LSTMVariant, training: bool) -> bool:
    """True when the plain LSTM kernel cannot compute this variant (DropConnect alone can:
    it only changes the weight the kernel receives)."""
    return variant.changes_equations or _masked(variant, training)


def lstm_layer_options(variant: LSTMVariant, training: bool) -> dict | None:
    """Keyword arguments of `kernels.lstm_layer` for this variant (with the layer's weights,
    which hold w_peephole when there are peepholes, and `draw_masks`'s masks), or None when
    only the variant kernel computes it. lstm_layer runs the plain cell, the variants that
    change it only elementwise (peepholes, CIFG, removed gates, activations, zoneout) and
    recurrent dropout natively where it can."""
    if not uses_variant_kernel(variant, training):
        return {}
    if variant.changes_equations and not variant.changes_only_elementwise:
        return None
    return {name: getattr(variant, name) for name in CELL_FORM_FIELDS}


