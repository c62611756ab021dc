"""What the GRU modules do for a `GRUVariant` besides calling the kernels: the extra
parameters it needs, their initialisation, and the random masks of its regularisers
(DropConnect is `_lstm_variant.drop_connect`).

Masks come from torch's global generator (as `torch.nn.functional.dropout`), so
`torch.manual_seed` makes a training run reproducible: for a layer on the native backend
through one seed for the native module's counter-based draw (`kernels.native.bernoulli_mask`),
else torch.bernoulli.
"""

import torch
from torch import nn

from ..kernels import StepLayout, native
from ..reference.variant import GRUVariant


def check_variant(variant, bias: bool) -> GRUVariant:
    """The module's variant (the plain GRU for None), checked against its bias argument."""
    if variant is None:
        return GRUVariant()
    if not isinstance(variant, GRUVariant):
        raise TypeError(f"variant must be an lstmkit.GRUVariant or None, got "
                        f"{type(variant).__name__} {variant!r}")
    if variant.update_bias is not None and not bias:
        raise ValueError(f"update_bias={variant.update_bias} initialises the update-gate bias, "
                         "which bias=False removes")
    return variant


def extra_shapes(variant: GRUVariant, hidden_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """(parameter stem, shape) of the parameters the variant adds to each layer and direction:
    layer norm's gains and biases, [rz | n] (3H) for x W_ih^T and for the recurrent products."""
    if not variant.layer_norm:
        return []
    H = hidden_size
    return [("ln_ih_weight", (3 * H,)), ("ln_ih_bias", (3 * H,)),
            ("ln_hh_weight", (3 * H,)), ("ln_hh_bias", (3 * H,))]


@torch.no_grad()
def initialise(weights: dict, variant: GRUVariant, hidden_size: int) -> None:
    """Apply the variant's initialisation to one layer's parameters (kernel-argument keys),
    after the torch.nn uniform initialisation of everything."""
    H = hidden_size
    for name in ("ln_ih_weight", "ln_hh_weight"):
        if weights.get(name) is not None:
            weights[name].fill_(1.0)
    for name in ("ln_ih_bias", "ln_hh_bias"):
        if weights.get(name) is not None:
            weights[name].zero_()
    if variant.orthogonal_init:
        for k in range(3):                                  # each gate's (H, H) block
            nn.init.orthogonal_(weights["w_hh"][k * H:(k + 1) * H])
    b_ih, b_hh = weights.get("b_ih"), weights.get("b_hh")
    if variant.update_bias is not None and b_ih is not None and b_hh is not None:
        # The sum b_ih + b_hh is what the gate sees: put the value in b_ih, zero b_hh's part.
        b_ih[H:2 * H] = float(variant.update_bias)
        b_hh[H:2 * H] = 0.0


def draw_masks(variant: GRUVariant, training: bool, layout: StepLayout, like: torch.Tensor,
               hidden_size: int, backend: str = "auto") -> dict:
    """Masks for one layer and direction: zoneout_h (N, H), recurrent (B, H).

    In eval, zoneout is off, or with zoneout_eval="expectation" uses its expectation, a
    (1, H) tensor filled with the rate (Krueger et al. 2016); recurrent dropout is off.
    """
    masks = {}
    rate = variant.zoneout_h
    if rate and training:
        masks["zoneout_h"] = native.bernoulli_mask(layout.rows, hidden_size, rate, like, backend)
    elif rate and variant.zoneout_eval == "expectation":
        masks["zoneout_h"] = torch.full((1, hidden_size), rate, dtype=like.dtype,
                                        device=like.device)
    if variant.recurrent_dropout and training:
        keep = 1.0 - variant.recurrent_dropout
        masks["recurrent"] = native.bernoulli_mask(layout.batch, hidden_size, keep, like,
                                                   backend).div_(keep)
    return masks


def uses_variant_kernel(variant: GRUVariant, training: bool) -> bool:
    """True when the plain GRU kernel cannot compute this variant (DropConnect alone can:
    it only changes the weight the kernel receives)."""
    masked = variant.recurrent_dropout or variant.zoneout_h
    return variant.changes_equations or bool(training and masked)


def gru_layer_options(variant: GRUVariant) -> dict | None:
    """Keyword arguments of `kernels.gru_layer` for this variant (besides `draw_masks`'s
    masks), or None when only the variant kernel computes it: gru_layer runs the plain cell,
    the activations, zoneout (in training or its expectation in eval) and recurrent dropout,
    natively where it can; not layer norm, which the variant kernel's Function computes
    (kernels.gru_variant_layer, whose step loops are native too)."""
    if variant.layer_norm:
        return None
    if not variant.changes_equations:          # the plain cell's activations
        return {}
    return {"gate_activation": variant.gate_activation,
            "candidate_activation": variant.candidate_activation}
