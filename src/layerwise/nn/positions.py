"""Position information, selected by `ModelConfig.position_embedding`.

A scheme maps (token embeddings, integer positions) to (what the first layer receives, the RoPE tables the
attention rotates queries and keys by, or None). The positions are the ones `LayerwiseModel.embed` computes
(past the KV-cache offset, counting only real tokens under left padding), so every scheme follows the cache and
padding the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import rope_cos_sin
from .registry import Registry, Variant, fail

POSITION_EMBEDDINGS: Registry["PositionEmbedding"] = Registry("position embedding", "position_embedding")


class PositionEmbedding(Variant, nn.Module):
    """Base of the position schemes; parameters (if any) are initialised by `layerwise.nn.initialization`."""

    def forward(self, h: torch.Tensor, positions: torch.Tensor):
        raise NotImplementedError


@POSITION_EMBEDDINGS.register("rope")
class RotaryPositions(PositionEmbedding):
    """RoPE (Su et al., 2021): no parameters; queries and keys are rotated by their position in every layer."""

    config_fields = ("rope_theta",)

    def __init__(self, cfg):
        super().__init__()
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta

    @classmethod
    def validate(cls, cfg) -> None:
        if cfg.head_dim % 2:
            fail("head_dim", cfg.head_dim, "is odd; RoPE needs an even head_dim (choose n_heads or head_dim so it "
                 "is, or position_embedding='learned')")

    def forward(self, h, positions):
        return h, rope_cos_sin(positions, self.head_dim, self.theta)


@POSITION_EMBEDDINGS.register("learned")
class LearnedPositions(PositionEmbedding):
    """Learned absolute position embeddings (GPT-2; Radford et al., 2019): a table of max_seq_len vectors added
    to the token embedding; attention sees no positions of its own."""

    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.d_model))

    def forward(self, h, positions):
        return h + nn.functional.embedding(positions, self.weight), None


def build_position_embedding(cfg) -> PositionEmbedding:
    return POSITION_EMBEDDINGS.get(cfg.position_embedding)(cfg)
