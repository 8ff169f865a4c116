"""Reference computations written straight from the formulas: no caching, streaming or fused kernels.

The tests check layerwise's own code against these, and `bench/diagnose.py` measures them as the naive way, so
each formula is written once, here. They compute in the dtype they are given: the tests pass float64, so that an
agreement to 1e-9 or better means the same mathematics rather than the same rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .arch import depth_view
from .nn.residual import sublayers


# ---- norms ----------------------------------------------------------------------------------------------------

def root_mean_square(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """sqrt(mean_d x^2 + eps) over the last dimension, kept for broadcasting."""
    return torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: gamma * x / sqrt(mean_d x^2 + eps)."""
    return gamma * x / root_mean_square(x, eps)


# ---- depth metrics between two hidden states, over all tokens --------------------------------------------------

def mean_token_rms(h: torch.Tensor) -> torch.Tensor:
    """`hidden_rms`: each token's RMS over d, then the mean over tokens (not one RMS over all values)."""
    return h.pow(2).mean(-1).sqrt().mean()


def _token_cosines(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    # Rounding can put a cosine a hair outside [-1, 1], where arccos is NaN.
    return F.cosine_similarity(h_in, h_out, dim=-1).clamp(-1, 1)


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """ShortGPT's block influence: 1 - the mean over tokens of cos(h_in, h_out)."""
    return 1 - _token_cosines(h_in, h_out).mean()


def angular_distance(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Gromov et al.'s angular distance: the mean over tokens of arccos(cos(h_in, h_out)) / pi, in [0, 1]."""
    return (torch.arccos(_token_cosines(h_in, h_out)) / math.pi).mean()


# ---- removing layers ------------------------------------------------------------------------------------------

@contextmanager
def skipping(model, layers: Sequence[int]) -> Iterator:
    """The model with `layers` (0-based) replaced by the identity: each returns its input hidden states.

    A forward hook swaps each skipped layer's output for its input, so the layers stay in place with their own
    indices and attention types (Qwen2 and Gemma pick each layer's mask by its type) and every family works
    alike; the skipped layers still run, so a timed forward costs all L layers."""
    def identity(module, args, kwargs, out):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    stack = depth_view(model).layers
    handles = [stack[i].register_forward_hook(identity, with_kwargs=True) for i in layers]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


# ---- Attention Residuals (Kimi Team, arXiv 2603.15031) -----------------------------------------------------------

def depth_attention(mixer, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """alpha_i = softmax_i(w . RMSNorm(v_i)); h = sum_i alpha_i v_i, written out source by source, with the mixer's
    pseudo-query w and key-norm gain."""
    logits = [(rms_norm(v, mixer.key_norm.weight, mixer.key_norm.eps) * mixer.query).sum(-1) for v in sources]
    alpha = torch.softmax(torch.stack(logits), dim=0)
    return sum(a[..., None] * v for a, v in zip(alpha, sources))


def full_attnres_logits(model, ids: torch.Tensor, skipped: set[int] = frozenset()) -> torch.Tensor:
    """Full AttnRes: sublayer l reads depth attention over [embedding, every earlier sublayer output]; so does the
    final norm. With layers `skipped`, their two sublayers neither run nor become sources, and every other
    sublayer keeps its own pseudo-query (removal as the diagnostics define it for routed residuals)."""
    e, ctx = model.model.embed(input_ids=ids)
    scheme = model.model.residual
    sources = [e]
    for j, sub in enumerate(sublayers(model.model.layers)):
        if j // 2 not in skipped:
            sources.append(sub.branch(depth_attention(scheme.mixers[j], sources), ctx))
    return model.lm_head(model.model.norm(depth_attention(scheme.final_mixer, sources)))


def block_attnres_logits(model, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block AttnRes with explicit block indices (block_size sublayers per block): b_0 = embedding, b_n = the sum
    of block n's sublayer outputs; the i-th sublayer of block n reads [b_0..b_{n-1}] plus, if i > 0, the sum of
    its block's first i outputs; the final norm reads depth attention over every completed block."""
    e, ctx = model.model.embed(input_ids=ids)
    scheme = model.model.residual
    outputs = []
    for j, sub in enumerate(sublayers(model.model.layers)):
        n, i = j // block_size + 1, j % block_size
        completed = [e] + [sum(outputs[(m - 1) * block_size: m * block_size]) for m in range(1, n)]
        partial = [sum(outputs[(n - 1) * block_size: j])] if i > 0 else []
        outputs.append(sub.branch(depth_attention(scheme.mixers[j], completed + partial), ctx))
    n_blocks = len(outputs) // block_size
    final_sources = [e] + [sum(outputs[m * block_size: (m + 1) * block_size]) for m in range(n_blocks)]
    return model.lm_head(model.model.norm(depth_attention(scheme.final_mixer, final_sources)))


def delta_attnres_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Delta AttnRes: h stays a residual stream; sublayer j >= 1 reads h plus depth attention (mixer j - 1) over
    [embedding, the stream's change from each earlier sublayer]; the final norm reads the stream."""
    e, ctx = model.model.embed(input_ids=ids)
    mixers = model.model.residual.mixers
    h, deltas = e, []
    for j, sub in enumerate(sublayers(model.model.layers)):
        x = h if j == 0 else h + depth_attention(mixers[j - 1], [e] + deltas)
        h_next = h + sub.branch(x, ctx)
        deltas.append(h_next - h)
        h = h_next
    return model.lm_head(model.model.norm(h))
