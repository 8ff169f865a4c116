"""One batch through a model, seen layer by layer: the `DepthTrace` that every depth metric is computed from.

A trace holds, for one batch of token ids, the hidden states h_0..h_L at the layer boundaries (h_l enters
layer l, h_{l+1} leaves it; nothing final-normed), what each sublayer read and added, the logits, each
layer's attention entropy, and `resume(first, count)`: the boundary states that follow when layers
first..first+count-1 are skipped, computed by running only the layers after the gap from the cached state;
`resume_skipping(layers)` does the same for any set of skipped layers (greedy pruning skips several apart).

Two ways to build one:
  Hugging Face families  forward hooks record each decoder layer's call (input, other arguments) and output;
                         resuming re-calls the later layers with the recorded arguments on the new input.
  layerwise models       the residual scheme's own steps (`start` / `step` / `readout`, see
                         `layerwise.nn.residual`), observed through `layerwise.nn.hooks.capture`, so every
                         scheme works, AttnRes included. There h_l is
                         `readout(state_l)`: the hidden state the final norm would read if the network stopped
                         before layer l (for the standard scheme, the residual stream itself; under AttnRes,
                         the final depth-attention over the sources that exist at that point). Skipping a layer
                         means its sublayers neither run nor add sources; every other sublayer keeps its own
                         depth-attention query.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Collection

import torch

from ..arch import DepthView, depth_view
from ..nn.hooks import capture
from ..numerics import at_least_float32


class SublayerIO:
    """What a layer's attention and MLP sublayers read (before any norm) and what they added.

    Where the additions are differences of the stream (HF layers, read at the residual's mid-point: the MLP reads
    h + a and the layer returns h + a + m), give `layer_out` instead of the two additions: they are computed
    when read, so a trace does not hold two more [B, T, d] tensors per layer."""

    def __init__(self, attn_in: torch.Tensor, attn_out: torch.Tensor | None, mlp_in: torch.Tensor,
                 mlp_out: torch.Tensor | None, layer_out: torch.Tensor | None = None):
        if (attn_out is None or mlp_out is None) and layer_out is None:
            raise ValueError("SublayerIO needs the sublayers' additions or the layer's output to compute them")
        self.attn_in, self.mlp_in = attn_in, mlp_in
        self._attn_out, self._mlp_out, self._layer_out = attn_out, mlp_out, layer_out

    @property
    def attn_out(self) -> torch.Tensor:
        return self._attn_out if self._attn_out is not None else self.mlp_in - self.attn_in

    @property
    def mlp_out(self) -> torch.Tensor:
        return self._mlp_out if self._mlp_out is not None else self._layer_out - self.mlp_in


@dataclass
class DepthTrace:
    hidden: list[torch.Tensor]  # h_0..h_L, [B, T, d] each
    logits: torch.Tensor | None  # [B, T, V], float32; None from trace(..., logits=False)
    # Rows [n, d] of h_L -> the model's logits there [n, V] (float32 or wider): any part of `logits` on demand.
    final_logits: Callable[[torch.Tensor], torch.Tensor]
    sublayers: list[SublayerIO] | None  # None where a layer has no mid-point (parallel attention + MLP)
    attention_entropy: torch.Tensor | None  # [L]: sum over batch and positions of the head-mean entropy (nats)
    resume: Callable[[int, int], list[torch.Tensor]]  # (first, count) -> h'_{first+count}, ..., h'_L
    # (skipped layers) -> h_first, then h' after each later layer that runs, ending with h'_L (first = min skipped)
    resume_skipping: Callable[[Collection[int]], list[torch.Tensor]]


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Sum over batch and query positions of the head-mean entropy -sum_k p log p of [B, H, Tq, Tk] weights."""
    probs = at_least_float32(probs)
    return -torch.special.xlogy(probs, probs).sum(-1).mean(1).sum()


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def eager_attention(model):
    """Run an HF model with eager attention, whose modules return their attention weights (SDPA's do not)."""
    original = model.config._attn_implementation
    if original == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(original)


class _LayerCalls:
    """Hooks that keep one batch's decoder-layer calls (args, kwargs), outputs, mid-residuals and entropies."""

    def __init__(self, view: DepthView, entropy: bool):
        self.view, self.entropy = view, entropy
        self.calls, self.outputs, self.mids, self.entropies, self.handles = {}, {}, {}, {}, []

    def __enter__(self):
        for i, layer in enumerate(self.view.layers):
            mid = self.view.mid_residual(layer)
            if mid is not None:
                self.handles.append(mid.register_forward_pre_hook(
                    lambda m, args, i=i: self.mids.__setitem__(i, args[0])))
            if self.entropy:
                self.handles.append(self.view.attention(layer).register_forward_hook(
                    lambda m, args, out, i=i: self.entropies.__setitem__(i, attention_entropy(out[1]))))
            self.handles.append(layer.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: self.calls.__setitem__(i, (args, kwargs)), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(
                lambda m, args, out, i=i: self.outputs.__setitem__(i, _hidden(out))))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def input(self, i: int) -> torch.Tensor:
        args, kwargs = self.calls[i]
        return args[0] if args else kwargs["hidden_states"]

    def rerun(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer i on a different input, with the exact other arguments it got in the recorded pass."""
        args, kwargs = self.calls[i]
        if args:
            return _hidden(self.view.layers[i](hidden, *args[1:], **kwargs))
        return _hidden(self.view.layers[i](*args, **{**kwargs, "hidden_states": hidden}))


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without an introspectable signature
        return False


def hf_trace(model, view: DepthView, ids: torch.Tensor, entropy: bool = True, logits: bool = True) -> DepthTrace:
    L = len(view.layers)
    # The forward's [B, T, V] logits would be the largest tensor; final_logits gives any rows of them on demand.
    keep = {} if logits or not _accepts_logits_to_keep(model) else {"logits_to_keep": 1}
    with eager_attention(model) if entropy else nullcontext(), _LayerCalls(view, entropy) as rec:
        out = model(input_ids=ids, use_cache=False, **keep).logits
    logits = at_least_float32(out) if logits else None
    final_logits = view.unembed

    hidden = [rec.input(i) for i in range(L)] + [rec.outputs[L - 1]]
    sublayers = None
    if len(rec.mids) == L:
        sublayers = [SublayerIO(hidden[i], None, rec.mids[i], None, layer_out=hidden[i + 1])
                     for i in range(L)]

    def resume_skipping(skipped: Collection[int]) -> list[torch.Tensor]:
        first = min(skipped)
        h, out = hidden[first], [hidden[first]]
        for j in range(first + 1, L):
            if j not in skipped:
                h = rec.rerun(j, h)
                out.append(h)
        return out

    entropies = torch.stack([rec.entropies[i] for i in range(L)]) if entropy else None
    return DepthTrace(hidden, logits, final_logits, sublayers, entropies, _contiguous(resume_skipping),
                      resume_skipping)


def _causal_attention_entropy(attn, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Attention entropy of layerwise attention from the queries/keys SDPA received (causal, no padding)."""
    q = at_least_float32(q)
    k = at_least_float32(k).repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    T = scores.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    return attention_entropy(scores.masked_fill(~causal, float("-inf")).softmax(-1))


def layerwise_trace(model, ids: torch.Tensor, entropy: bool = True, logits: bool = True) -> DepthTrace:
    inner = model.model
    scheme, layers = inner.residual, inner.positions
    L = len(layers)
    order = inner.config.execution_order

    def at(p: int, point: str) -> torch.Tensor:
        # Hook points are named by stored layer; a tied layer's points fire once per position it runs at.
        k = order[p]
        return seen.calls(f"model.layers.{k}.{point}")[order[:p].count(k)]

    names = ["model.layers.*.hook_in", "model.layers.*.hook_out"]
    if entropy:
        names += ["model.layers.*.attn.fn.hook_q", "model.layers.*.attn.fn.hook_k"]
    with capture(model, names) as seen:
        h, ctx = inner.embed(input_ids=ids)
        states = [scheme.start(h)]
        for i, layer in enumerate(layers):
            states.append(scheme.step(states[-1], i, layer, ctx))
    hidden = [scheme.readout(state) for state in states]

    final_logits = depth_view(model).unembed
    logits = final_logits(hidden[-1]) if logits else None
    points = ("attn.hook_in", "attn.hook_out", "mlp.hook_in", "mlp.hook_out")
    sublayers = [SublayerIO(*(at(i, point) for point in points)) for i in range(L)]
    entropies = None
    if entropy:
        entropies = torch.stack([_causal_attention_entropy(layers[i].attn.fn, at(i, "attn.fn.hook_q"),
                                                           at(i, "attn.fn.hook_k"))
                                 for i in range(L)])

    def resume_skipping(skipped: Collection[int]) -> list[torch.Tensor]:
        first = min(skipped)
        state, out = states[first], [hidden[first]]
        for j in range(first + 1, L):
            if j not in skipped:
                state = scheme.step(state, j, layers[j], ctx)
                out.append(scheme.readout(state))
        return out

    return DepthTrace(hidden, logits, final_logits, sublayers, entropies, _contiguous(resume_skipping),
                      resume_skipping)


def _contiguous(resume_skipping):
    """`resume(first, count)`: the span first..first+count-1 as one case of `resume_skipping`."""
    return lambda first, count: resume_skipping(range(first, first + count))


def trace(model, view: DepthView, ids: torch.Tensor, entropy: bool = True, logits: bool = True) -> DepthTrace:
    """`logits=False` leaves `logits` None (the forward keeps the last position's only): `final_logits` gives
    them a chunk of rows at a time."""
    if view.family == "layerwise":
        return layerwise_trace(model, ids, entropy, logits)
    return hf_trace(model, view, ids, entropy, logits)
