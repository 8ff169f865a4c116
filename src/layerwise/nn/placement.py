"""Where the norms sit around each sublayer, selected by `ModelConfig.norm_placement`.

A placement answers one question per layer: what is the layout of its two sublayers? `Sublayer` (in
`layerwise.nn.block`) then applies that layout:

    additive   (pre, peri):       x <- x + Norm_out(F(s * Norm_in(x)))    absent norms are the identity
    post-add   (post, deepnorm):  x <- Norm(alpha * x + F(x))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .registry import Registry, Variant

PLACEMENTS: Registry["Placement"] = Registry("norm placement", "norm_placement")
register_placement = PLACEMENTS.register


@dataclass(frozen=True)
class SublayerLayout:
    norm_in: bool  # a norm on the sublayer input (Pre-LN's norm)
    norm_out: bool  # a norm on the sublayer output (Peri-LN), or after the add when post_add
    post_add: bool = False  # the norm comes after the residual add (Post-LN, DeepNorm)
    skip_weight: float = 1.0  # alpha on the skip branch inside a post-add norm (DeepNorm)


class Placement(Variant):
    """Base class. `layout(cfg, i)` gives the layout of both sublayers of 0-based layer i."""

    # Every layer updates the stream additively, x <- x + branch(x), so a scheme may route the branch inputs.
    additive: bool = False
    # Every layer adds its raw sublayer output to the stream, x <- x + F(Norm(x)) (Pre-LN).
    adds_raw_branch: bool = False
    # Some layer has a norm on a sublayer input, which LayerNorm Scaling scales.
    pre_sublayer_norms: bool = False

    def layout(self, cfg, layer_idx: int) -> SublayerLayout:
        raise NotImplementedError

    def branch_init_divisor(self, cfg) -> float:
        """Divisor applied to the init std of v/o/MLP weights (DeepNorm's 1/beta); 1 for other placements."""
        return 1.0


@register_placement("pre")
class PreLN(Placement):
    """Pre-LN (Xiong et al., ICML 2020): x <- x + F(Norm(x)); a final norm precedes the head."""

    additive = adds_raw_branch = pre_sublayer_norms = True

    def layout(self, cfg, layer_idx):
        return SublayerLayout(norm_in=True, norm_out=False)


@register_placement("post")
class PostLN(Placement):
    """Post-LN (Vaswani et al., NeurIPS 2017): x <- Norm(x + F(x)).

    As in the Mix-LN/LNS repositories a final norm is still applied before the head.
    """

    def layout(self, cfg, layer_idx):
        return SublayerLayout(norm_in=False, norm_out=True, post_add=True)


@register_placement("peri")
class PeriLN(Placement):
    """Peri-LN (Kim et al., ICML 2025) = Sandwich-LN (CogView): x <- x + Norm_out(F(Norm_in(x)))."""

    additive = pre_sublayer_norms = True

    def layout(self, cfg, layer_idx):
        return SublayerLayout(norm_in=True, norm_out=True)


@register_placement("mixln")
class MixLN(Placement):
    """Mix-LN (Li, Yin, Liu; ICLR 2025): Post-LN on the first floor(ratio * L) layers, Pre-LN on the rest."""

    config_fields = ("mixln_ratio",)
    pre_sublayer_norms = True
    depth_dependent = True
    depth_dependence = "takes the number of Post-LN layers from the depth"

    @staticmethod
    def post_ln_layers(cfg) -> int:
        # The paper's floor(alpha * L) Post-LN layers and ceil((1 - alpha) * L) Pre-LN ones; the 1e-9 keeps a
        # product that is whole on paper (0.29 * 100 = 28.999...) from losing a layer to float rounding.
        return math.floor(cfg.mixln_ratio * cfg.n_layers + 1e-9)

    def layout(self, cfg, layer_idx):
        if layer_idx < self.post_ln_layers(cfg):
            return PostLN().layout(cfg, layer_idx)
        return PreLN().layout(cfg, layer_idx)


@register_placement("deepnorm")
class DeepNorm(Placement):
    """DeepNorm (Wang et al., DeepNet 2022): x <- Norm(alpha * x + F(x)), alpha = (2N)^(1/4).

    Init: v, o and MLP weights are *divided* by (8N)^(1/4) (torchscale), not multiplied as in the Mix-LN repo.
    """

    depth_dependent = True
    depth_dependence = "takes its skip weight alpha and its init from the depth"

    @staticmethod
    def alpha(n_layers: int) -> float:
        return (2 * n_layers) ** 0.25

    @staticmethod
    def beta(n_layers: int) -> float:
        return (8 * n_layers) ** -0.25

    def layout(self, cfg, layer_idx):
        return SublayerLayout(norm_in=False, norm_out=True, post_add=True, skip_weight=self.alpha(cfg.n_layers))

    def branch_init_divisor(self, cfg):
        return 1.0 / self.beta(cfg.n_layers)


def layer_layouts(cfg) -> list[SublayerLayout]:
    """The layout of every layer of a config, in order."""
    placement = PLACEMENTS.get(cfg.norm_placement)()
    return [placement.layout(cfg, i) for i in range(cfg.n_layers)]

