"""What an adapter reports about a model: its norm sites, layers, linears by sublayer, and the depth view.

These types name no module of any family; `layerwise.arch.adapters` fills them in for each family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..numerics import at_least_float32

# Where a norm sits. attn_in/mlp_in: on a sublayer's input; attn_out/mlp_out: on a sublayer's output (Peri-LN,
# Gemma 2's post norms, OLMo 2) or after the residual add (Post-LN, DeepNorm); q_norm/k_norm: QK-norm;
# embedding: on the embedding output; final: before the head; depth_key: the keys of an AttnRes depth mixer.
ROLES = ("embedding", "attn_in", "q_norm", "k_norm", "attn_out", "mlp_in", "mlp_out", "final", "depth_key")
# Where a norm's output goes, which decides what can absorb its gain:
#   linears:  only into `readers` (a gain folds into their input columns);
#   residual: added to the residual stream (a sublayer-output norm);
#   stream:   it *is* the residual stream (a norm after the residual add; the skip carries it onward);
#   scores:   into attention scores (QK-norm after q/k projections, AttnRes keys), never into a linear.
FEEDS = ("linears", "residual", "stream", "scores")
# Groups of a layer's linears. attn_in: q, k, v (or fused qkv); attn_out: o; mlp_in: gate and up (or fused, or
# fc); mlp_out: down; value_gate: a value-residual gate that reads the attention input (SATFormer).
LINEAR_GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out", "value_gate")


@dataclass(frozen=True)
class NormSite:
    """One norm of the model, with its role and the linears that read its output directly."""

    role: str
    norm: nn.Module
    feeds: str
    readers: tuple[nn.Module, ...] = ()  # nn.Linear or GPT-2's Conv1D; non-empty only when feeds == "linears"
    # The readers see `scale * output`: LayerNorm Scaling's 1/sqrt(i+1); 1 elsewhere.
    scale: float = 1.0
    # The norm multiplies by (gain_offset + weight): Gemma stores its RMSNorm gain minus one.
    gain_offset: float = 0.0


@dataclass(frozen=True)
class LayerMap:
    """Layer i: its module, every norm inside it (QK-norms included), and its linears grouped by sublayer."""

    index: int
    module: nn.Module
    norms: tuple[NormSite, ...]
    linears: dict[str, tuple[nn.Module, ...]]  # LINEAR_GROUPS -> modules; absent groups are empty
    attention: nn.Module
    mid_residual: nn.Module | None  # see DepthView.mid_residual

    def norm(self, role: str) -> NormSite | None:
        """The norm in `role`, or None when this layer has none there."""
        return next((site for site in self.norms if site.role == role), None)


@dataclass(frozen=True)
class ModelMap:
    """A whole causal LM: embedding, layers, the final norm (read by the head) and the head."""

    family: str
    embed: nn.Module
    layers: tuple[LayerMap, ...]
    final_norm: NormSite
    head: nn.Module
    # Norms outside the layers: an embedding norm (Peri-LN's optional one) and AttnRes depth-mixer keys.
    extra_norms: tuple[NormSite, ...] = ()
    # A learned absolute position table ([max_seq_len, d] rows added to the stream, GPT-2's wpe); None with RoPE.
    position_embed: nn.Module | None = None

    @property
    def tied_head(self) -> bool:
        """Whether the head shares the embedding's weight, so folding a gain into one changes the other."""
        return getattr(self.head, "weight", None) is getattr(self.embed, "weight", object())

    def norms(self) -> list[NormSite]:
        """Every norm of the model, each once: extra norms, then each layer's in order, then the final norm."""
        return [*self.extra_norms, *(site for layer in self.layers for site in layer.norms), self.final_norm]


@dataclass
class DepthView:
    family: str
    layers: nn.ModuleList | list[nn.Module]  # one per execution position (a tied layer appears at each)
    final_norm: nn.Module
    head: nn.Module
    embed: nn.Module
    # The module of a layer whose input is the residual stream between its attention and MLP sublayers
    # (h + a); None for parallel-residual layers, where there is no such point.
    mid_residual: Callable[[nn.Module], nn.Module | None] = lambda layer: None
    # The self-attention module of a layer (with eager attention its output is (output, weights)).
    attention: Callable[[nn.Module], nn.Module] = lambda layer: layer.self_attn
    # Gemma 2 and 3 squash the head's output: logits = cap * tanh(z / cap).
    logit_softcap: float | None = None

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """The model's logits (at least float32) for hidden states h that the final norm reads: what the model
        outputs for its last layer's output, and the logit lens for any other layer's."""
        z = self.head(self.final_norm(h))
        z = z if self.logit_softcap is None else torch.tanh(z / self.logit_softcap) * self.logit_softcap
        return at_least_float32(z)
