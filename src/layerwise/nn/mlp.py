"""Position-wise MLPs, selected by `ModelConfig.mlp`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import Registry, Variant

MLPS: Registry["MLP"] = Registry("MLP", "mlp")


class MLP(Variant, nn.Module):
    """Base of the position-wise MLPs: `input_projections()` read the sublayer input, `output_projection()`
    writes its output (what scaled init and DeepNorm rescale)."""

    def input_projections(self) -> tuple[nn.Linear, ...]:
        raise NotImplementedError

    def output_projection(self) -> nn.Linear:
        raise NotImplementedError


@MLPS.register("swiglu")
class SwiGLU(MLP):
    """SwiGLU MLP (Shazeer, 2020; LLaMA): down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def input_projections(self):
        return (self.gate_proj, self.up_proj)

    def output_projection(self):
        return self.down_proj

    def forward(self, x, ctx=None):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@MLPS.register("gelu")
class GeluMLP(MLP):
    """GELU MLP (GPT-2): proj(gelu(fc(x)))."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff, bias=bias)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)

    def input_projections(self):
        return (self.fc,)

    def output_projection(self):
        return self.proj

    def forward(self, x, ctx=None):
        return self.proj(F.gelu(self.fc(x)))


@MLPS.register("gelu_tanh")
class GeluTanhMLP(GeluMLP):
    """GELU MLP with GELU's tanh approximation (GPT-2's `gelu_new`; Hendrycks & Gimpel, 2016):
    proj(gelu_tanh(fc(x))). The released GPT-2 weights were trained with it, so loading them needs it."""

    def forward(self, x, ctx=None):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def build_mlp(cfg) -> nn.Module:
    return MLPS.get(cfg.mlp)(cfg.d_model, cfg.d_ff, bias=cfg.bias)
