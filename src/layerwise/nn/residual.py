"""Residual schemes: how sublayer outputs flow along depth. Selected by `ModelConfig.residual`.

A scheme threads a *depth state* through the layers: `start(h)` from the embedding output, `step(state, i,
layer, ctx)` for the layer at execution position i (which it records as `ctx.position`, the layer's KV-cache
slot: under a layer program one stored layer runs at several positions), and `readout(state)`, the hidden
state the final norm would read if the layers stopped here. `forward` is just that loop. The state is what
must be kept to continue from layer i: the stream h for the standard scheme, the list of depth sources under
AttnRes. Steps never modify a state in place, so diagnostics can cache every layer's state and resume from
any of them with layers skipped.

The standard scheme lets each layer's placement do the residual add; the AttnRes schemes call each
sublayer's `branch` (its output before any residual add) and route the inputs themselves.
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Iterator, NamedTuple

import torch
from torch import nn

from .hooks import HookPoint
from ..kernels import attnres as kernel
from ..numerics import at_least_float32
from .norms import RMSNorm
from .registry import Registry, Variant, fail, variant_of

RESIDUALS: Registry["ResidualScheme"] = Registry("residual scheme", "residual")


def sublayers(layers) -> Iterator[nn.Module]:
    """Attention and MLP sublayers in execution order: layer 0 attn, layer 0 mlp, layer 1 attn, ..."""
    for layer in layers:
        yield layer.attn
        yield layer.mlp


class DepthAttention(nn.Module):
    """Softmax attention over depth (Kimi Team, arXiv 2603.15031): sum_i softmax_i(w . RMSNorm(v_i)) v_i.

    The pseudo-query w is input-independent and zero at init, so a fresh mixer is the uniform mean of its
    sources. Keys are normalised, values are the raw sources; there is no 1/sqrt(d) temperature.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim))
        self.key_norm = RMSNorm(dim, eps=eps)
        self.hook_sources = HookPoint()  # sees the stacked [S, B, T, d] sources
        self.hook_weights = HookPoint()  # sees the [S, B, T] depth-attention weights

    def weights(self, sources: torch.Tensor) -> torch.Tensor:
        """Depth-attention weights [S, B, T] for stacked sources [S, B, T, d], softmax over S in float32."""
        # Keys normalised in float32 at least, as the fast path's logits are: in bf16 the two would differ by the
        # rounding of every key, and a model's output would depend on which path its batch size picked.
        return kernel.reference_weights(self.key_norm(at_least_float32(sources)), self.query)

    def forward(self, sources: list[torch.Tensor]) -> torch.Tensor:
        """The reference path (`layerwise.kernels.attnres`); the schemes' fast path bypasses it and its hooks."""
        return self.mix_and_weights(sources)[0]

    def mix_and_weights(self, sources: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture and its depth weights [S, B, T] (Delta AttnRes's entropy bonus reads the weights)."""
        v = self.hook_sources(torch.stack(sources))
        w = self.hook_weights(self.weights(v))
        return kernel.reference_mix(w, v), w


def watched(module: nn.Module) -> bool:
    """Whether a hook is attached to any hook point inside `module`."""
    return any(p._forward_hooks or p._forward_pre_hooks for p in module.modules() if isinstance(p, HookPoint))


class ResidualScheme(Variant, nn.Module):
    """Base class: the state is the stream h unless a scheme says otherwise."""

    # The scheme forms each sublayer's input itself from `branch` outputs, so it needs an additive placement.
    routes_sublayer_inputs: bool = False
    # The stream, and every sublayer input, is the plain sum of the embedding and the sublayer outputs, so
    # removing the mean from each writer removes it from the stream (Pre-LN -> Pre-RMSNorm needs this).
    sums_writers: bool = True

    @classmethod
    def validate(cls, cfg):
        from .placement import PLACEMENTS

        if cls.routes_sublayer_inputs and not variant_of(cfg, "norm_placement").additive:
            able = " or ".join(p.registered_name for p in PLACEMENTS.classes() if p.additive)
            fail("residual", cfg.residual, f"routes sublayer inputs and needs an additive placement ({able}), "
                 f"not norm_placement={cfg.norm_placement!r}")

    def start(self, h):
        return h

    def step(self, state, i: int, layer, ctx):
        raise NotImplementedError

    def readout(self, state) -> torch.Tensor:
        return state

    def auxiliary_loss(self, ctx) -> torch.Tensor | None:
        """The scheme's term of the training objective from the forward that filled `ctx` (None: it adds none)."""
        return None

    def forward(self, h, layers, ctx):
        """`layers`: the layer of each execution position, in order (`LayerwiseModel.positions`)."""
        state = self.start(h)
        for i, layer in enumerate(layers):
            state = self.step(state, i, layer, ctx)
        return self.readout(state)


@RESIDUALS.register("standard")
class StandardResidual(ResidualScheme):
    """The additive residual stream (He et al., 2016); each layer's placement applies the add."""

    def __init__(self, cfg):
        super().__init__()

    def step(self, h, i, layer, ctx):
        ctx.position = i
        return layer(h, ctx)


class DepthRoutedScheme(ResidualScheme):
    """Base of the AttnRes schemes: a depth-attention mixer per sublayer, indexed by the sublayer's position."""

    routes_sublayer_inputs = True
    sums_writers = False  # sublayers read depth-softmax mixtures weighted by RMS-normalised keys of the sources
    drop_safe = False
    drop_hazard = ("AttnRes keeps a depth-attention mixer per sublayer and routes over block boundaries counted in "
                   "sublayers, so deleting a layer would shift every later mixer and block")
    repeat_safe = False
    repeat_hazard = ("AttnRes keeps a trained depth-attention mixer per sublayer position, so a repeated layer "
                     "would need mixers its training never made")
    depth_dependent = True
    depth_dependence = "routes each sublayer over the sources before it, counted by position"


class BlockState(NamedTuple):
    """Block AttnRes depth state: the completed block sums and the running partial sum, plus what the fast path
    caches (see `layerwise.kernels.attnres`): each block's logits for every mixer [B, T, mixers], the
    effective queries, and phase 1 of the current block (first mixer, the mixture of the completed blocks for
    each of its mixers, their depth weights, and their softmax max and sum). The reference path ignores and drops
    the caches."""

    blocks: list
    partial: torch.Tensor | None
    block_logits: tuple | None = None
    queries: torch.Tensor | None = None
    phase1: tuple | None = None
    path: str | None = None  # the kernel path that made it; None at start


def _promoted_dtype(tensors) -> torch.dtype:
    return reduce(torch.promote_types, (t.dtype for t in tensors))


@RESIDUALS.register("block_attnres")
class BlockAttnRes(DepthRoutedScheme):
    """Block AttnRes (Kimi Team, arXiv 2603.15031): each sublayer reads a depth-softmax over block sums.

    Sublayers are split into N blocks of S = 2L/N. Sources for a sublayer are the completed block sums
    [b_0 = embedding, b_1, ...] plus the running partial sum of its own block; the partial sum starts empty
    at every block boundary (0-based: sublayer j with j % S == 0), checked after that sublayer's input is
    formed. The output is one more depth-softmax over all blocks and the last partial sum.

    Computed by the fast path of `layerwise.kernels.attnres` (per-block logits cached, two phases; see there
    for when it runs), or by the reference path through `DepthAttention` when that is chosen, when a hook is attached to any hook point of
    a depth mixer or of the layer being run, and from then on for the states that path made. So whatever
    observes the forward (capture, telemetry, diagnostics, which read states out and resume them after their
    capture ends) sees the reference's stacked sources, its weights and its exact numbers in every dtype.
    """

    config_fields = ("attnres_blocks",)
    depth_dependence = "puts block boundaries every 2L/N sublayers"

    def __init__(self, cfg):
        super().__init__()
        n_sub = 2 * cfg.n_layers
        self.block_size = n_sub // self.n_blocks(cfg)
        self.mixers = nn.ModuleList(DepthAttention(cfg.d_model, cfg.norm_eps) for _ in range(n_sub))
        self.final_mixer = DepthAttention(cfg.d_model, cfg.norm_eps)

    @staticmethod
    def n_blocks(cfg) -> int:
        return cfg.attnres_blocks

    @classmethod
    def validate(cls, cfg):
        super().validate(cfg)
        n_sub, n = 2 * cfg.n_layers, cls.n_blocks(cfg)
        if not 1 <= n <= n_sub:
            fail("attnres_blocks", n, f"exceeds the {n_sub} sublayers of a {cfg.n_layers}-layer model; use 1..{n_sub}")
        # Blocks hold whole layers (the boundary test is on layers, `layer % (S/2) == 0`), except S = 1: one
        # sublayer per block is Full AttnRes, the limit the paper names.
        valid = [d for d in range(1, n_sub + 1) if n_sub % d == 0 and (d == n_sub or (n_sub // d) % 2 == 0)]
        if n_sub % n:
            fail("attnres_blocks", n, f"must divide the {n_sub} sublayers into equal blocks; valid: {valid}")
        if n not in valid:
            fail("attnres_blocks", n, f"gives blocks of {n_sub // n} sublayers, which split a layer; blocks hold "
                  f"whole layers (or one sublayer each, Full AttnRes); valid: {valid}")

    def source_count_at_output(self, n_layers: int) -> int:
        return (2 * n_layers - 1) // self.block_size + 2

    def start(self, h):
        return BlockState([], h)  # the first boundary records the embedding as b_0

    def fast_path(self, state, layer=None) -> bool:
        """Whether the fast kernel may continue `state` (see the class docstring for when it may not)."""
        partial = state.partial if state.partial is not None else state.blocks[-1]
        return state.path != "reference" and kernel.fast_path_for(partial.numel() // partial.shape[-1]) \
            and not watched(self) and not (layer is not None and watched(layer))

    def step(self, state, i, layer, ctx):
        ctx.position = i
        fast = self.fast_path(state, layer)
        blocks, partial, block_logits, queries, phase1, _ = state if fast else (state.blocks, state.partial,
                                                                                 None, None, None, None)
        for j, sub in ((2 * i, layer.attn), (2 * i + 1, layer.mlp)):
            if fast:
                x, blocks, block_logits, queries, phase1 = self._fast_input(j, blocks, partial, block_logits,
                                                                            queries, phase1)
            else:
                x = self.mixers[j](blocks + [partial])
            if j % self.block_size == 0:
                blocks, partial = (blocks if fast else blocks + [partial]), None
            out = sub.branch(x, ctx)
            partial = out if partial is None else partial + out
        return BlockState(blocks, partial, block_logits, queries, phase1, "fast" if fast else "reference")

    def readout(self, state):
        if not self.fast_path(state):
            return self.final_mixer(state.blocks + [state.partial])
        blocks, partial, block_logits, queries, phase1, _ = state
        if not blocks:
            return partial
        final = len(self.mixers)
        queries, block_logits = self._caches(blocks, block_logits, queries)
        if not self._covers(phase1, final, len(blocks)):
            phase1 = self._phase1(final, final + 1, blocks, block_logits)
        return self._merge(final, phase1, blocks, partial, queries)

    # ---- the fast path -----------------------------------------------------------------------------------------

    def _caches(self, blocks, block_logits, queries):
        """The effective queries and every completed block's logits, computing whatever the state lacks."""
        if queries is None:
            mixers = [*self.mixers, self.final_mixer]
            queries = kernel.effective_queries([m.query for m in mixers], [m.key_norm.weight for m in mixers])
        known = block_logits or ()
        eps = self.final_mixer.key_norm.eps
        return queries, known + tuple(kernel.source_logits(b, queries, eps) for b in blocks[len(known):])

    def _phase1(self, first, end, blocks, block_logits):
        """Phase 1 for mixers first..end-1: their softmax over the completed blocks, normalised mixture and stats."""
        weights, top, total = kernel.depth_softmax(torch.stack([lg[..., first:end] for lg in block_logits]))
        weights = weights.movedim(-1, 0)  # [mixers, blocks, B, T]
        mixed = kernel.depth_mix(weights, blocks)  # [mixers, B, T, d], differentiated by `kernel.mixer_input`
        return first, len(blocks), mixed, weights, top.movedim(-1, 0), total.movedim(-1, 0)

    @staticmethod
    def _covers(phase1, j, n_blocks) -> bool:
        """Phase 1 serves mixer j over these blocks (after skipped layers it may belong to another block)."""
        return phase1 is not None and phase1[1] == n_blocks and phase1[0] <= j < phase1[0] + phase1[2].shape[0]

    def _merge(self, j, phase1, blocks, partial, queries):
        """Phase 2: mixer j's input, phase 1's mixture merged with the partial sum by online softmax."""
        first, _, mixed, weights, top, total = phase1
        k = j - first
        partial_logit = kernel.source_logits(partial, queries[:, j:j + 1], self.final_mixer.key_norm.eps)[..., 0]
        x = kernel.mixer_input(mixed[k], weights[k], blocks, kernel.merge_share(top[k], total[k], partial_logit),
                               partial)
        return x.to(_promoted_dtype([*blocks, partial]))

    def _fast_input(self, j, blocks, partial, block_logits, queries, phase1):
        """Sublayer j's input and the state's caches after it; at a boundary the partial becomes a block first."""
        n_sub = len(self.mixers)
        if j % self.block_size == 0:
            blocks = blocks + [partial]
        elif not blocks:  # only after skipped layers: the partial is the only source
            return partial, blocks, block_logits, queries, phase1
        queries, block_logits = self._caches(blocks, block_logits, queries)
        block_end = min((j // self.block_size + 1) * self.block_size, n_sub)
        if j % self.block_size == 0 or not self._covers(phase1, j, len(blocks)):
            # The last block's phase 1 serves the final mixer too (the column after the last sublayer's).
            phase1 = self._phase1(j, block_end + (block_end == n_sub), blocks, block_logits)
        if j % self.block_size == 0:
            first, _, mixed, weights, _, _ = phase1
            x = kernel.mixer_input(mixed[j - first], weights[j - first], blocks)
            return x.to(_promoted_dtype(blocks)), blocks, block_logits, queries, phase1
        return self._merge(j, phase1, blocks, partial, queries), blocks, block_logits, queries, phase1


@RESIDUALS.register("full_attnres")
class FullAttnRes(BlockAttnRes):
    """Full AttnRes (Kimi Team, arXiv 2603.15031): each sublayer reads a depth-softmax over all earlier outputs.

    Exactly Block AttnRes with one sublayer per block; `attnres_blocks` is ignored.
    """

    config_fields = ()
    depth_dependence = DepthRoutedScheme.depth_dependence

    @staticmethod
    def n_blocks(cfg) -> int:
        return 2 * cfg.n_layers


def depth_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of -sum_i a_i log a_i for depth weights [S, B, T] (Delta AttnRes's entropy bonus)."""
    # log of the weights clamped to the smallest normal number: a weight that underflowed to 0 adds 0 and a finite
    # gradient, where log(0) would make it NaN (the released code adds 1e-8 instead, which biases small weights).
    return -(weights * weights.clamp_min(torch.finfo(weights.dtype).tiny).log()).sum(0).mean()


class DeltaGate(nn.Module):
    """Base of the Delta AttnRes gates (Luo, Cai, Hu): sublayer input u = h + g * mix. The released code writes
    (1 - g) h + g (h + mix), the same sum."""

    def forward(self, h: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        return h + self.gate(h) * mixed

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SigmoidScalarGate(DeltaGate):
    """g = sigmoid(a), one learnable logit per sublayer, init -2 (g = 0.12): routing starts as a small addition."""

    logit_init = -2.0

    def __init__(self, dim: int):
        super().__init__()
        self.logit = nn.Parameter(torch.full((1,), self.logit_init))

    def gate(self, h):
        return torch.sigmoid(self.logit)


class SigmoidVectorGate(DeltaGate):
    """g = sigmoid(W h + b) per token and channel, read from the stream h; W init 0 and b init -2, so every
    channel starts at g = 0.12 and the stream learns which channels take the mixture."""

    bias_init = -2.0

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=True)

    def gate(self, h):
        return torch.sigmoid(self.proj(h))


class LearnableAlphaGate(DeltaGate):
    """g = alpha, one learnable scalar per sublayer, init 0: the model starts as the plain residual stream."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))

    def gate(self, h):
        return self.alpha


# ModelConfig.delta_gate -> gate class; "none" adds the mixture whole (the released code's default, "bias").
DELTA_GATES: dict[str, type[DeltaGate] | None] = {
    "none": None, "sigmoid_scalar": SigmoidScalarGate, "sigmoid_vector": SigmoidVectorGate,
    "learnable_alpha": LearnableAlphaGate,
}
# ModelConfig.delta_block_sources: the corrected block deltas, or the released code's alternating sums.
DELTA_BLOCK_SOURCES = ("deltas", "released")
DEPTH_ENTROPIES = "delta_attnres_depth_entropies"  # the ForwardContext.extras key the routed sublayers fill


class DeltaRoutedScheme(DepthRoutedScheme):
    """Base of the Delta AttnRes schemes (Luo, Cai, Hu): the residual stream h stays, and each sublayer reads
    u = h + g * sum_i softmax_i(w . RMSNorm(v_i)) v_i over its sources, with g from `delta_gate` (1 by default).

    `delta_null_source` prepends to every sublayer's sources a learnable vector, zero at init; the first sublayer
    then routes too. A zero source does not make the input the stream alone: with w = 0 the softmax is uniform
    over the n + 1 sources, so u = h + (sum of the n others) / (n + 1). Only `learnable_alpha` starts exactly at h.
    `delta_entropy_bonus` = lambda_H subtracts lambda_H times the mean, over the sublayers that routed, of the
    depth-softmax entropy (mean over tokens) from the training loss (`auxiliary_loss`).
    """

    config_fields = ("delta_gate", "delta_null_source", "delta_entropy_bonus")

    def __init__(self, cfg):
        super().__init__()
        n_sub, d = 2 * cfg.n_layers, cfg.d_model
        # Without a null source sublayer 0 has no sources, so it has no mixer (an unused parameter troubles DDP).
        self.first_routed = 0 if cfg.delta_null_source else 1
        n_mixers = n_sub - self.first_routed
        self.mixers = nn.ModuleList(DepthAttention(d, cfg.norm_eps) for _ in range(n_mixers))
        gate = DELTA_GATES[cfg.delta_gate]
        self.gates = nn.ModuleList(gate(d) for _ in range(n_mixers)) if gate is not None else None
        self.null_sources = nn.Parameter(torch.zeros(n_mixers, d)) if cfg.delta_null_source else None
        self.entropy_bonus = cfg.delta_entropy_bonus

    def route(self, j: int, h: torch.Tensor, sources: list[torch.Tensor], ctx) -> torch.Tensor:
        """Sublayer j's input: the stream plus its gated depth mixture (the stream alone when it has no sources)."""
        k = j - self.first_routed
        if self.null_sources is not None:
            sources = [self.null_sources[k].to(h.dtype).expand_as(h)] + sources
        if not sources:
            return h
        if self.entropy_bonus:
            mixed, weights = self.mixers[k].mix_and_weights(sources)
            ctx.extras.setdefault(DEPTH_ENTROPIES, []).append(depth_entropy(weights))
        else:
            mixed = self.mixers[k](sources)
        return h + mixed if self.gates is None else self.gates[k](h, mixed)

    def auxiliary_loss(self, ctx):
        entropies = ctx.extras.get(DEPTH_ENTROPIES)
        if not entropies:
            return None
        return -self.entropy_bonus * torch.stack(entropies).mean()

    def readout(self, state):
        return state[0]  # no final routing: the stream already carries the full sum


@RESIDUALS.register("delta_attnres")
class DeltaAttnRes(DeltaRoutedScheme):
    """Delta AttnRes (Luo, Cai, Hu): the residual stream stays; each sublayer input adds a depth-softmax over
    the embedding and every earlier sublayer output (the per-sublayer deltas h_{i+1} - h_i).

    The first sublayer has no sources and reads the stream alone (unless a null source is on). There is no final
    routing.
    """

    def start(self, h):
        return h, []  # (stream, sources)

    def step(self, state, i, layer, ctx):
        ctx.position = i
        h, sources = state
        for j, sub in ((2 * i, layer.attn), (2 * i + 1, layer.mlp)):
            out = sub.branch(self.route(j, h, sources, ctx), ctx)
            if j == 0:
                sources = sources + [h]  # the embedding becomes the first source once sublayer 0 has read it
            sources = sources + [out]
            h = h + out
        return h, sources


@RESIDUALS.register("delta_block_attnres")
class DeltaBlockAttnRes(DeltaRoutedScheme):
    """Delta Block AttnRes (Luo, Cai, Hu): Delta AttnRes whose sources are the embedding and per-block deltas.

    Layers are grouped in blocks of ceil(L/N). At the first layer of each block, after its attention input is
    formed, the source Delta_k = h_now - h_at_previous_block_start is appended (the embedding at layer 0).
    The released code appends h_now - sources[-1] instead, which yields alternating sums [e, D0, e+D1, D0+D2, ...];
    `delta_block_sources: released` selects that, for the A/B against the intended block deltas (the default).
    """

    config_fields = (*DeltaRoutedScheme.config_fields, "attnres_blocks", "delta_block_sources")
    depth_dependence = "groups layers in blocks of ceil(L/N)"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.layers_per_block = math.ceil(cfg.n_layers / cfg.attnres_blocks)
        self.released_sources = cfg.delta_block_sources == "released"

    @classmethod
    def validate(cls, cfg):
        super().validate(cfg)
        if not 1 <= cfg.attnres_blocks <= cfg.n_layers:
            fail("attnres_blocks", cfg.attnres_blocks,
                  f"exceeds the {cfg.n_layers} layers that delta_block_attnres groups; use 1..{cfg.n_layers}")

    def start(self, h):
        return h, [], None  # (stream, sources, stream at the current block's start)

    def block_source(self, h, sources, block_start):
        """The source a block start appends: the stream (the embedding at layer 0), then its change over the block
        just ended; the released code subtracts the previous source instead of the previous block start."""
        if block_start is None:
            return h
        return h - (sources[-1] if self.released_sources else block_start)

    def step(self, state, i, layer, ctx):
        ctx.position = i
        h, sources, block_start = state
        for is_attention, j, sub in ((True, 2 * i, layer.attn), (False, 2 * i + 1, layer.mlp)):
            out = sub.branch(self.route(j, h, sources, ctx), ctx)
            if is_attention and i % self.layers_per_block == 0:
                sources = sources + [self.block_source(h, sources, block_start)]
                block_start = h
            h = h + out
        return h, sources, block_start


def build_residual(cfg) -> nn.Module:
    return RESIDUALS.get(cfg.residual)(cfg)
