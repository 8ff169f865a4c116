"""Causal self-attention with RoPE, GQA, optional QK-norm, a KV cache and a value-residual hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import HookPoint
from .norms import RMSNorm


@dataclass
class ForwardContext:
    """What every sublayer of one forward pass shares: positions, mask, cache and layer 0's values."""

    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin: [B or 1, T, head_dim]; None: no RoPE
    attn_mask: torch.Tensor | None = None  # bool [B or 1, 1, T, T_total], True = attend; None = use is_causal
    is_causal: bool = True
    cache: Any = None  # a transformers Cache, or None
    value_residual: Any = None  # the model's value-residual module
    v_first: torch.Tensor | None = None  # layer 0's raw values, set by layer 0 when a value residual is on
    # The execution position of the layer running now, set by the residual scheme before each layer: its
    # KV-cache slot and its value-residual index. A layer program runs one stored layer at several positions.
    position: int | None = None
    input_ids: torch.Tensor | None = None  # [B, T] the tokens of this pass; None when called with embeddings
    extras: dict = field(default_factory=dict)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (Su et al., 2021) tables for integer positions [B or 1, T], in float32, rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, hd] by the position tables [B or 1, T, hd]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotated * sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on PyTorch's fused scaled_dot_product_attention."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        # Queries and keys as SDPA receives them ([B, H, T, hd], keys after the cache update), so analysis can
        # recompute the attention pattern that the fused kernel never materialises.
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()

    def input_projections(self):
        return (self.q_proj, self.k_proj, self.v_proj)

    def output_projection(self):
        return self.o_proj

    def forward(self, x: torch.Tensor, ctx: ForwardContext, value_input: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of x; values are read from `value_input` when given (a norm split into its Q/K and V
        uses, `FakeLNLayer`), else from x."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x if value_input is None else value_input).view(B, T, self.n_kv_heads, self.head_dim)
        position = self.layer_idx if ctx.position is None else ctx.position
        if ctx.value_residual is not None:
            # Mixed before the cache update, so the cache holds V' and decoding matches a full forward.
            v = ctx.value_residual(position, v, x, ctx)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        if ctx.cache is not None:
            k, v = ctx.cache.update(k, v, position)
        q, k = self.hook_q(q), self.hook_k(k)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.attn_mask, is_causal=ctx.is_causal and ctx.attn_mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
