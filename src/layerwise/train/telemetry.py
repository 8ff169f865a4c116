"""Depth telemetry: the per-layer numbers that show whether depth is used or wasted (the curse of depth).

Measured on one batch every `telemetry_every` steps through the model's hook points, so the training step
itself carries no hooks (and stays compilable):
  hidden_rms[i], hidden_var[i]  the tensor layer i reads at its boundary, plus the final norm's input at i = L.
                                Under the standard scheme this is the residual stream; under AttnRes it is the
                                routed input of layer i's attention sublayer (there is no single stream).
  attn_ratio[i], mlp_ratio[i]   mean over tokens of ||sublayer output|| / ||sublayer input||
  grad_norm[i]                  L2 norm of all gradients of layer i's parameters (from the training step)
  depth_weights[name]           AttnRes: mean depth-attention weight per source, for every mixer
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..nn.block import Sublayer
from ..nn.residual import DepthAttention


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def layer_grad_norms(model: nn.Module) -> list[float]:
    layers = _unwrap(model).model.layers
    norms = []
    for layer in layers:
        squares = [p.grad.detach().float().pow(2).sum() for p in layer.parameters() if p.grad is not None]
        norms.append(torch.stack(squares).sum().sqrt().item() if squares else 0.0)
    return norms


class DepthProbe:
    """Collects boundary statistics and sublayer ratios during one forward, through hooks."""

    def __init__(self, model: nn.Module):
        self.model = _unwrap(model)
        self.records: dict[str, list] = {}

    @staticmethod
    def _stats(x: torch.Tensor) -> tuple[float, float]:
        xf = x.detach().float()
        return xf.pow(2).mean().sqrt().item(), xf.var(dim=-1, unbiased=False).mean().item()

    @contextmanager
    def capture(self):
        handles, rec = [], {"hidden_rms": [], "hidden_var": [], "attn_ratio": [], "mlp_ratio": [],
                            "depth_weights": {}}
        inputs: dict[Sublayer, torch.Tensor] = {}

        def on_in(sub, kind, is_boundary):
            def hook(module, args, output):
                inputs[sub] = output.detach()
                if is_boundary:
                    rms, var = self._stats(output)
                    rec["hidden_rms"].append(rms)
                    rec["hidden_var"].append(var)
            return hook

        def on_out(sub, kind):
            def hook(module, args, output):
                x = inputs.pop(sub).float()
                ratio = output.detach().float().norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
                rec[f"{kind}_ratio"].append(ratio.mean().item())
            return hook

        for layer in self.model.model.layers:
            for kind, sub in (("attn", layer.attn), ("mlp", layer.mlp)):
                handles.append(sub.hook_in.register_forward_hook(on_in(sub, kind, kind == "attn")))
                handles.append(sub.hook_out.register_forward_hook(on_out(sub, kind)))

        def on_final(module, args):
            rms, var = self._stats(args[0])
            rec["hidden_rms"].append(rms)
            rec["hidden_var"].append(var)

        handles.append(self.model.model.norm.register_forward_pre_hook(on_final))
        for name, module in self.model.named_modules():
            if isinstance(module, DepthAttention):
                def on_weights(module, args, output, name=name):
                    rec["depth_weights"][name] = output.detach().float().mean(dim=(1, 2)).tolist()
                handles.append(module.hook_weights.register_forward_hook(on_weights))
        try:
            yield rec
        finally:
            for handle in handles:
                handle.remove()
            self.records = rec


@torch.no_grad()
def measure_depth(model: nn.Module, input_ids: torch.Tensor, autocast_ctx) -> dict:
    """One hooked forward on `input_ids`; returns the boundary and sublayer statistics."""
    probe = DepthProbe(model)
    inner = probe.model
    was_training = inner.training
    inner.eval()
    with probe.capture() as rec, autocast_ctx:
        inner(input_ids=input_ids)
    inner.train(was_training)
    if not rec["depth_weights"]:
        del rec["depth_weights"]
    return rec
