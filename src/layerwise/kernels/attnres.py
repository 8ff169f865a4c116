"""Depth mixing for Attention Residuals (Kimi Team, arXiv 2603.15031): h = sum_i softmax_i(w . RMSNorm(v_i)) v_i.

Two paths compute it, chosen at run time (never stored in a checkpoint or config) by the setting "auto" (the
default), "fast" or "reference", from `use(...)` or else the environment variable LAYERWISE_ATTNRES_KERNEL:

- **reference**: stack the sources, RMS-normalise every key, dot with the pseudo-query, softmax over depth in
  float32, weighted sum. It is what `DepthAttention.forward` does, with its hook points in between. The
  residual schemes take it when forced (`use("reference")` or `LAYERWISE_ATTNRES_KERNEL=reference`) and whenever
  a hook is attached to any depth mixer's hook point, so `hook_sources` / `hook_weights` see the stacked
  sources and the weights.
- **fast** (forced by "fast"; under "auto", whenever nothing forces the reference and the forward has at least
  `FAST_MIN_TOKENS` tokens or runs under torch.compile): with RMSNorm(v) = gamma * v * rsqrt(mean(v^2) + eps),
  w . RMSNorm(v) = rsqrt(mean(v^2) + eps) * (v . (gamma * w)). So each source is read once for its inverse RMS
  and its dot products with the effective queries gamma_l * w_l of every mixer (`source_logits`, one
  [tokens, d] x [d, mixers] product in float32), and no key is normalised again. Block AttnRes then runs the
  paper's two phases: once per block, `depth_softmax` + `depth_mix` combine the completed blocks for all of the
  block's mixers; per sublayer, `merge_share` gives the running partial sum's weight by an online-softmax merge
  and `mixer_input` adds it. Full AttnRes is the one-sublayer-per-block case. `depth_mix` sums the sources one
  by one (no stacked copy) outside autograd, and `mixer_input` saves only per-token weights and references to
  the sources, so training keeps no [mixers, B, T, d] mixture for backward. Eager decoding (T = 1, a few
  tokens) is launch-bound, and the fast path's extra small ops made it slower there (CPU, d = 384, batch 8: 11.9
  vs 10.6 ms per token, bench/inference.py), hence the token threshold.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from ..errors import UserError
from ..numerics import at_least_float32

PATHS = ("auto", "fast", "reference")
ENV_VAR = "LAYERWISE_ATTNRES_KERNEL"
FAST_MIN_TOKENS = 256
_forced: str | None = None


def _checked(name: str, where: str) -> str:
    if name not in PATHS:
        raise UserError(f"{where}={name!r} is not an AttnRes kernel path; use one of {', '.join(PATHS)}")
    return name


def active_path() -> str:
    """The setting `use` gives, else the one `LAYERWISE_ATTNRES_KERNEL` names, else "auto"."""
    if _forced is not None:
        return _forced
    return _checked(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def fast_path_for(tokens: int) -> bool:
    """Whether the active setting runs the fast path on a forward of `tokens` tokens (hooks aside)."""
    path = active_path()
    if path == "auto":
        return tokens >= FAST_MIN_TOKENS or torch.compiler.is_compiling()
    return path == "fast"


@contextmanager
def use(path: str) -> Iterator[None]:
    """Apply `path` ("auto", "fast" or "reference") to every AttnRes forward inside the block."""
    global _forced
    previous, _forced = _forced, _checked(path, "kernels.attnres.use(path)")
    try:
        yield
    finally:
        _forced = previous


# ---- reference ------------------------------------------------------------------------------------------------

def reference_weights(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Depth-attention weights [S, ...] for normalised keys [S, ..., d]: softmax over S of w . k in float32."""
    # Elementwise product + sum, not a matmul: autocast would run a matmul in bf16.
    return (at_least_float32(keys) * at_least_float32(query)).sum(-1).softmax(dim=0)


def reference_mix(weights: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """sum_S weights[S, ...] * sources[S, ..., d] in float32, in the sources' dtype."""
    return (weights.unsqueeze(-1) * at_least_float32(sources)).sum(0).to(sources.dtype)


# ---- fast: per-source logits, two-phase softmax ---------------------------------------------------------------

def effective_queries(queries: Sequence[torch.Tensor], key_gains: Sequence[torch.Tensor]) -> torch.Tensor:
    """[d, mixers] matrix of gamma_l * w_l, at least float32: the key-norm gain folded into each pseudo-query."""
    return torch.stack([at_least_float32(g) * at_least_float32(w) for w, g in zip(queries, key_gains)], dim=-1)


def source_logits(source: torch.Tensor, queries: torch.Tensor, eps: float) -> torch.Tensor:
    """w_l . RMSNorm_l(v) for every mixer l at once: [..., mixers] from v [..., d] and `effective_queries`."""
    # Autocast off: the logits feed an exponential, and a bf16 matmul would round them before it.
    with torch.autocast(source.device.type, enabled=False):
        v = at_least_float32(source)
        inverse_rms = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
        return (v @ queries.to(v.dtype)) * inverse_rms


def depth_softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over depth (dim 0) of logits [n, ...] with its statistics: (weights, max, sum of exp(l - max))."""
    top = logits.amax(0)
    e = torch.exp(logits - top)
    total = e.sum(0)
    return e / total, top, total


def depth_mix(weights: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """[mixers, ..., d] = sum_k weights[mixers, k, ...] * sources[k] in the weights' dtype (at least float32),
    summed source by source (no stacked copy) and outside autograd: `mixer_input` differentiates each row."""
    with torch.no_grad():
        out = weights[:, 0, ..., None] * at_least_float32(sources[0])
        for k in range(1, len(sources)):
            out.addcmul_(weights[:, k, ..., None], sources[k])
    return out


def merge_share(top: torch.Tensor, total: torch.Tensor, partial_logit: torch.Tensor) -> torch.Tensor:
    """The partial source's softmax weight c among [sources..., partial], from the sources' max logit `top` and
    sum of exp(l - top) `total` (online softmax): c = b / (a + b), never a difference of exponentials."""
    new_top = torch.maximum(top, partial_logit)
    a = total * torch.exp(top - new_top)
    b = torch.exp(partial_logit - new_top)
    return b / (a + b)


class _MixerInput(torch.autograd.Function):
    """x = (1 - c) * mixed + c * partial, with mixed = sum_k weights[k] * blocks[k] given by phase 1.

    Saved for backward: the depth weights [n, ...] and the share c [...] (per-token float32 scalars) and
    references to the blocks and the partial, which `source_logits` keeps anyway; never `mixed`, so a block's
    phase-1 mixtures [mixers, ..., d] are freed once its forward is done. Backward does not rebuild `mixed`
    either: it enters only as g . mixed = sum_k weights[k] (g . blocks[k]), from the same per-block dot
    products that give the weights' gradient. Without a partial (c = 0) x is a copy of `mixed`, so that what
    saves x keeps one [..., d] tensor, not the whole phase-1 buffer it is a view of.
    """

    @staticmethod
    def forward(ctx, mixed, weights, share, partial, *blocks):
        ctx.save_for_backward(weights, share, partial, *blocks)
        if partial is None:
            return mixed.clone()
        return torch.lerp(mixed, at_least_float32(partial), share[..., None])

    @staticmethod
    def backward(ctx, grad):
        weights, share, partial, *blocks = ctx.saved_tensors
        need_weights, need_share, need_partial = ctx.needs_input_grad[1:4]
        keep = 1 if share is None else 1 - share  # the completed blocks' total weight
        dots = torch.stack([(grad * b).sum(-1) for b in blocks]) if need_weights or need_share else None
        grad_blocks = [(keep * weights[k])[..., None].mul(grad).to(b.dtype) if ctx.needs_input_grad[4 + k] else None
                       for k, b in enumerate(blocks)]
        grad_share = (grad * partial).sum(-1) - (weights * dots).sum(0) if need_share else None
        grad_partial = (share[..., None] * grad).to(partial.dtype) if need_partial else None
        return None, keep * dots if need_weights else None, grad_share, grad_partial, *grad_blocks


def mixer_input(mixed: torch.Tensor, weights: torch.Tensor, blocks: Sequence[torch.Tensor],
                share: torch.Tensor | None = None, partial: torch.Tensor | None = None) -> torch.Tensor:
    """One mixer's output from phase 1's mixture `mixed` of `blocks` under `weights` [n, ...] (computed without
    autograd, see `_MixerInput`) and, if given, the partial source with its share c from `merge_share`."""
    return _MixerInput.apply(mixed, weights, share, partial, *blocks)
