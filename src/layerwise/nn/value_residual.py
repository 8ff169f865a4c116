"""Value residuals: later layers read layer 0's attention values. Selected by `ModelConfig.value_residual`.

Layer 0 exports its raw value projection V_1 ([B, T, H_kv, d_head], no RoPE); layer n >= 1 replaces its
values V_n by a mix before attention. The mix is per token, so a KV cache of the mixed values stays exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry, Variant, fail

VALUE_RESIDUALS: Registry[Variant] = Registry("value residual", "value_residual")


class ValueResidual(Variant, nn.Module):
    """Base: records layer 0's values and hands later layers' values to `mix`."""

    mixes_values = True  # the model holds one of these and every attention calls it
    config_fields = ("value_residual_last_k",)
    depth_dependent = True
    depth_dependence = "treats layer 0 as the source and sizes its per-layer parameters from the depth"
    drop_safe = False
    drop_hazard = ("every layer mixes in layer 0's values through per-layer parameters indexed by layer position, "
                   "held outside the layers")
    repeat_safe = False
    repeat_hazard = ("the value mix has trained parameters per layer position, so a repeated layer would run "
                     "with another position's parameters")

    def __init__(self, cfg):
        super().__init__()
        self.n_layers = cfg.n_layers
        k = cfg.value_residual_last_k
        self.first_mixed_layer = 1 if k is None else cfg.n_layers - k

    def forward(self, layer_idx: int, v: torch.Tensor, x: torch.Tensor, ctx) -> torch.Tensor:
        if layer_idx == 0:
            ctx.v_first = v
            return v
        if layer_idx < self.first_mixed_layer:
            return v
        return self.mix(layer_idx, v, ctx.v_first, x)

    def mix(self, layer_idx, v, v_first, x):
        raise NotImplementedError


@VALUE_RESIDUALS.register("none")
class NoValueResidual(Variant):
    """No value residual: each layer uses its own values, and the model holds no value-residual module."""

    mixes_values = False


@VALUE_RESIDUALS.register("resformer")
class ResFormer(ValueResidual):
    """ResFormer (Zhou et al., 2024; SATFormer repo): V'_n = lambda1_n V_1 + lambda2_n V_n, static per layer.

    lambda1_n = lambda_scale * softmax(logits)_n over layers 1..L-1 (scale init L, logits init 0);
    lambda2_n is a scalar per layer, init 0.5.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        n = max(cfg.n_layers - 1, 1)
        self.lambda_logits = nn.Parameter(torch.zeros(n))
        self.lambda_scale = nn.Parameter(torch.full((1,), float(cfg.n_layers)))
        self.lambda_self = nn.Parameter(torch.full((n,), 0.5))

    def mix(self, layer_idx, v, v_first, x):
        lambda_first = self.lambda_scale * torch.softmax(self.lambda_logits, dim=0)[layer_idx - 1]
        return (lambda_first * v_first + self.lambda_self[layer_idx - 1] * v).to(v.dtype)


def softmax_gate(logits: torch.Tensor) -> torch.Tensor:
    """SATFormer's softmax gate: H_kv * softmax over the KV heads, so a token's gates average 1."""
    return logits.shape[-1] * torch.softmax(logits, dim=-1)


def softmax_sigmoid_gate(logits: torch.Tensor) -> torch.Tensor:
    """SATFormer's softmax-sigmoid gate: the softmax gate times each head's own sigmoid."""
    return softmax_gate(logits) * torch.sigmoid(logits)


_GATES = {"relu": F.relu, "sigmoid": torch.sigmoid, "softmax": softmax_gate, "softmax_sigmoid": softmax_sigmoid_gate,
          "tanh": torch.tanh, "identity": lambda z: z}
SATFORMER_GATES = tuple(_GATES)  # the valid values of ModelConfig.value_residual_gate
# Gates that compete across KV heads: with one KV head the softmax is the constant 1.
_ACROSS_HEAD_GATES = {"softmax": "the constant 1, so V_1 is added unweighted", "softmax_sigmoid": "the sigmoid gate"}


@VALUE_RESIDUALS.register("satformer")
class SATFormer(ValueResidual):
    """SATFormer (Gunasekaran et al., arXiv 2605.03953): V'_n = V_n + phi(W_alpha x_n) * V_1, a gate per KV head.

    x_n is the layer's normed attention input; W_alpha in R^{H_kv x d} has no bias and init N(0, init_std).
    phi is `value_residual_gate`: relu (the paper's default), sigmoid, tanh, identity, or the across-head
    softmax and softmax_sigmoid gates, scaled by H_kv so that the mean gate over heads is 1 (softmax) or below.
    """

    config_fields = ("value_residual_gate", "value_residual_last_k")

    @classmethod
    def validate(cls, cfg):
        if cfg.value_residual_gate in _ACROSS_HEAD_GATES and cfg.n_kv_heads == 1:
            fail("value_residual_gate", cfg.value_residual_gate,
                 f"normalises across KV heads; with n_kv_heads=1 it is {_ACROSS_HEAD_GATES[cfg.value_residual_gate]}: "
                 "use sigmoid or relu, or more KV heads")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gate_fn = _GATES[cfg.value_residual_gate]
        self.gates = nn.ModuleList(
            nn.Linear(cfg.d_model, cfg.n_kv_heads, bias=False) for _ in range(self.first_mixed_layer, cfg.n_layers)
        )

    def mix(self, layer_idx, v, v_first, x):
        # Cast back: a gate computed in a wider dtype would widen V', and with it the KV cache.
        g = self.gate_fn(self.gates[layer_idx - self.first_mixed_layer](x)).to(v.dtype)  # [B, T, H_kv]
        return v + g[..., None] * v_first


def build_value_residual(cfg) -> nn.Module | None:
    """The model's value-residual module, or None when each layer keeps its own values."""
    scheme = VALUE_RESIDUALS.get(cfg.value_residual)
    return scheme(cfg) if scheme.mixes_values else None
