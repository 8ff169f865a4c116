"""Depth telemetry: the per-layer numbers that show whether depth is used or wasted (the curse of depth).

Measured on one batch every `telemetry_every` steps, through `capture` on the model's hook points, so the
training step itself carries no hooks (and stays compilable). The names and definitions are those of
`layerwise.depth_metrics`, the same numbers `layerwise diagnose` reports under the same names:
  hidden_rms[l], hidden_var[l]    of h_l, l = 0..L (h_L = the final norm's input; under AttnRes the readout)
  layer_contribution[l]           ||h_{l+1} - h_l|| / ||h_l||
  attn_contribution[l], mlp_contribution[l]
                                  ||sublayer output|| / ||sublayer input||
  routed_input_rms[l]             AttnRes: RMS of what layer l's attention sublayer reads
  depth_weights[name]             AttnRes: mean depth-attention weight per source, for every mixer
  grad_norm_layers[l]             L2 norm of all gradients of layer l's parameters (from the training step)
All but the last are means over the batch's tokens. A Hugging Face model (`train --init-from`) has no hook
points: it reports grad_norm_layers alone (its layers found by `layerwise.arch.depth_view`), and nothing for
a family the adapters do not know.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import depth_view
from ..depth_metrics import contribution, token_norm, token_rms, token_var
from ..nn.hooks import capture, hook_points, unwrap


def layer_grad_norms(model: nn.Module) -> list[float]:
    layers = depth_view(unwrap(model)).layers
    norms = []
    for layer in layers:
        squares = [p.grad.detach().float().pow(2).sum() for p in layer.parameters() if p.grad is not None]
        norms.append(torch.stack(squares).sum().sqrt().item() if squares else 0.0)
    return norms


def _mean_weights(w: torch.Tensor) -> torch.Tensor:
    return w.double().mean(dim=(1, 2))  # [S, B, T] -> one mean weight per source


@torch.no_grad()
def measure_depth(model: nn.Module, input_ids: torch.Tensor, autocast_ctx) -> dict:
    """One observed pass on `input_ids`, layer by layer through the residual scheme's steps (as diagnose does,
    so h_l under AttnRes is the readout); returns the metrics above as lists of floats."""
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    decoder = inner.model
    scheme, layers = decoder.residual, decoder.positions
    order = decoder.config.execution_order

    def at(cache, p: int, point: str):
        # Hook points are named by stored layer; a tied layer's points fire once per position it runs at.
        return cache.calls(f"model.layers.{order[p]}.{point}")[order[:p].count(order[p])]
    mixers = [name for name in hook_points(inner) if name.endswith(".hook_weights")]
    boundary = {"hidden_rms": [], "hidden_var": [], "layer_contribution": []}

    def observe(h, previous):
        boundary["hidden_rms"].append(token_rms(h).mean())
        boundary["hidden_var"].append(token_var(h).mean())
        if previous is not None:
            boundary["layer_contribution"].append(contribution(token_norm(h - previous), token_norm(previous)).mean())
        return h

    try:
        with (capture(inner, ["model.layers.*.hook_in", "model.layers.*.hook_out"], reduce=token_norm) as norms,
              capture(inner, mixers or [], reduce=_mean_weights) as weights,
              capture(inner, "model.layers.*.attn.hook_in" if mixers else [], reduce=token_rms) as routed,
              autocast_ctx):
            h, ctx = decoder.embed(input_ids=input_ids)
            state = scheme.start(h)
            h = observe(scheme.readout(state), None)
            for i, layer in enumerate(layers):
                state = scheme.step(state, i, layer, ctx)
                h = observe(scheme.readout(state), h)
    finally:
        inner.train(was_training)
    rec = {name: torch.stack(values).tolist() for name, values in boundary.items()}
    for kind in ("attn", "mlp"):
        rec[f"{kind}_contribution"] = [
            contribution(at(norms, i, f"{kind}.hook_out"), at(norms, i, f"{kind}.hook_in"))
            .mean().item() for i in range(len(layers))]
    if mixers:
        rec["routed_input_rms"] = [at(routed, i, "attn.hook_in").mean().item() for i in range(len(layers))]
        # The final mixer also ran at every boundary's readout above; its last call is the model's own output.
        rec["depth_weights"] = {name.removesuffix(".hook_weights"): weights.calls(name)[-1].tolist()
                                for name in mixers}
    return rec
