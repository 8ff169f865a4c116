"""A transformer layer: an attention sublayer then an MLP sublayer, each wrapped by its placement's norms."""

from __future__ import annotations

import torch
from torch import nn

from .attention import CausalSelfAttention
from .hooks import HookPoint
from .mlp import build_mlp
from .norms import (BHYT_VARIANCE_APPROXIMATIONS, BHyT, attention_output_gain, build_norm, give_readers_own_gains,
                    lns_scale, mean_square)
from .placement import SublayerLayout, layer_layouts
from .registry import variant_of


class Sublayer(nn.Module):
    """One sublayer F with the norms its layout asks for.

    `branch(x)` = Norm_out(F(s * Norm_in(x))) is what the sublayer contributes (absent norms are identities,
    s is the LNS depth scale); `forward(x)` applies the layout's residual update. `hook_in` sees what the
    sublayer reads (the stream, or the routed input under AttnRes), `hook_out` what it contributes.
    """

    def __init__(self, fn: nn.Module, layout: SublayerLayout, norm_in, norm_out, depth_scale: float = 1.0):
        super().__init__()
        self.layout = layout
        self.norm_in = norm_in if norm_in is not None else nn.Identity()
        self.fn = fn
        self.norm_out = norm_out if norm_out is not None else nn.Identity()
        self.depth_scale = depth_scale
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()

    def scaled(self, h):
        return h * self.depth_scale if self.depth_scale != 1.0 else h

    def branch(self, x, ctx):
        x = self.hook_in(x)
        return self.hook_out(self.norm_out(self.fn(self.scaled(self.norm_in(x)), ctx)))

    def forward(self, x, ctx):
        if self.layout.post_add:
            x = self.hook_in(x)
            skip = x if self.layout.skip_weight == 1.0 else self.layout.skip_weight * x
            return self.norm_out(skip + self.hook_out(self.fn(x, ctx)))
        return x + self.branch(x, ctx)


class Layer(nn.Module):
    """Stored layer i: attention then MLP, with norms and scaling from the config's placement.

    Under a layer program (`ModelConfig.layer_order`) one stored layer may run at several execution positions;
    the residual scheme tells it the position it runs at (`ctx.position`: its KV-cache slot). `layer_idx` is
    its first position, the slot it uses when run outside a scheme.
    """

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = position = cfg.first_position(layer_idx)
        layout = layer_layouts(cfg)[position]
        # LNS scales only norms that feed a sublayer (pre-sublayer norms); post-add layers have none. The index
        # is the layer's origin, so a dropped, repeated or reordered layer keeps its scale.
        scale = lns_scale(cfg.depth_index(layer_idx)) if cfg.layernorm_scaling and layout.norm_in else 1.0
        self.attn = self._sublayer(cfg, CausalSelfAttention(cfg, position), layout, "attn", scale)
        self.mlp = self._sublayer(cfg, build_mlp(cfg), layout, "mlp", scale)

    @staticmethod
    def _sublayer(cfg, fn, layout, kind, scale):
        norm_in = build_norm(cfg, f"{kind}_in") if layout.norm_in else None
        norm_out = build_norm(cfg, f"{kind}_out") if layout.norm_out else None
        if cfg.heterogeneous_gains and norm_in is not None:
            give_readers_own_gains(fn, cfg)
        return Sublayer(fn, layout, norm_in, norm_out, depth_scale=scale)

    def forward(self, x, ctx):
        return self.mlp(self.attn(x, ctx), ctx)


class BHyTParallelLayer(Layer):
    """A Pre-LN layer with BHyT's default "parallel" form (Byun et al., arXiv 2601.09719).

    The block computes one exact statistic, v = mean_d(h^2). The MLP-input norm uses the approximation
    v + c * lambda_in^2 / kappa^2 instead of a second reduction, where c = ||W_V^T W_O^T||_F^2 / (T d) is
    computed from the weights. As in the released code the trainer refreshes c during training
    (`refresh_attention_gains`, with T = the training sequence length). A layer whose c was never set
    computes it at its first forward with T = `max_seq_len`, so c never depends on that forward's length.

    `bhyt_var_approx` picks the approximation (`layerwise.nn.norms.VarianceApproximation`); the first
    `bhyt_var_approx_exact_layers` layers of the original model compute the second statistic exactly instead.
    """

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.register_buffer("attn_gain", torch.tensor(float("nan")))  # c; NaN until first computed
        self.default_gain_seq_len = cfg.max_seq_len
        self._gain_ready = False
        # By origin index, like LNS, so a layer program or a pruned reload keeps each layer's rule.
        exact = cfg.depth_index(layer_idx) < cfg.bhyt_var_approx_exact_layers
        self.variance_approximation = None if exact else BHYT_VARIANCE_APPROXIMATIONS.get(cfg.bhyt_var_approx)()

    @torch.no_grad()
    def refresh_attention_gain(self, seq_len: int):
        """c from the current v/o weights, for sequences of `seq_len` tokens."""
        attn = self.attn.fn
        # Under FSDP2 the weights are sharded DTensors outside the attention's own forward (an all-gather:
        # every process must call this together).
        v, o = (getattr(w, "full_tensor", lambda w=w: w)() for w in (attn.v_proj.weight, attn.o_proj.weight))
        self.attn_gain.copy_(attention_output_gain(v, o, attn.n_heads, seq_len))
        self._gain_ready = True

    def _ensure_gain(self):
        if self._gain_ready:
            return
        if not torch.isfinite(self.attn_gain):  # one host sync per layer, on the first forward only
            self.refresh_attention_gain(self.default_gain_seq_len)
        self._gain_ready = True  # a loaded checkpoint's c is kept

    def forward(self, x, ctx):
        self._ensure_gain()
        attn, mlp = self.attn, self.mlp
        assert isinstance(attn.norm_in, BHyT) and isinstance(mlp.norm_in, BHyT)
        x = attn.hook_in(x)
        ms = mean_square(x)
        x = x + attn.hook_out(attn.fn(attn.scaled(attn.norm_in(x, ms)), ctx))
        if self.variance_approximation is None:
            ms_hat = mean_square(x)
        else:
            ms_hat = self.variance_approximation(ms, self.attn_gain, attn.norm_in.lam, attn.norm_in.kappa)
        x = mlp.hook_in(x)
        return x + mlp.hook_out(mlp.fn(mlp.scaled(mlp.norm_in(x, ms_hat)), ctx))


class FakeLNLayer(Layer):
    """A Pre-LN layer whose attention-input norm (a `FakeLayerNorm`) is read twice, by queries and keys
    (its "qk" use) and by values (its "v" use), so the two can lose their data-dependent scale at different
    steps of the removal (Baroni et al., arXiv 2507.02559). With both uses live it is the Pre-LN layer. The
    end-of-text tokens (`fakeln_eot_token_id`) are marked for the value use, which may give them the first
    position's std."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.eot_token_id = cfg.fakeln_eot_token_id

    @property
    def continues_from_cache(self) -> bool:
        """Whether a forward may continue a KV cache: not while the first position has its own std."""
        return not bool(self.attn.norm_in.uses["qk"].bos_is_special)

    def _check_cached_decoding(self, ctx) -> None:
        # The norms take the first token of what they are given as the first position; a chunk that continues
        # a cache does not start at it. Only a model still mid-removal has that position special.
        if ctx.cache is None or ctx.cache.get_seq_length(self.layer_idx if ctx.position is None else ctx.position) == 0:
            return
        if not self.continues_from_cache:
            raise ValueError("a model mid-removal whose first position still has its own std decodes only "
                             "without a KV cache (generate(..., use_cache=False)); the exported model has none")

    def eot_mask(self, ctx) -> torch.Tensor | None:
        if self.eot_token_id is None or ctx.input_ids is None:
            return None
        return ctx.input_ids == self.eot_token_id

    def forward(self, x, ctx):
        attn = self.attn
        self._check_cached_decoding(ctx)
        x = attn.hook_in(x)
        values = attn.norm_in(x, "v", self.eot_mask(ctx))
        x = x + attn.hook_out(attn.fn(attn.norm_in(x, "qk"), ctx, value_input=values))
        return self.mlp(x, ctx)


def build_layer(cfg, layer_idx: int) -> Layer:
    return variant_of(cfg, "norm").layer_class(cfg)(cfg, layer_idx)


def refresh_attention_gains(model: nn.Module, seq_len: int) -> None:
    """Recompute BHyT's c in every parallel-form layer of `model` from its current weights."""
    for module in model.modules():
        if isinstance(module, BHyTParallelLayer):
            module.refresh_attention_gain(seq_len)
