"""The adapter for layerwise models: read from each layer's own layout, since placements differ per layer
(Mix-LN) and norms, QK-norm, LNS and value-residual gates are config options."""

from __future__ import annotations

from torch import nn

from .maps import LINEAR_GROUPS, DepthView, LayerMap, ModelMap, NormSite


def _present(module: nn.Module | None) -> bool:
    return module is not None and not isinstance(module, nn.Identity)


def _value_gate(model: nn.Module, stored: int) -> tuple[nn.Module, ...]:
    """SATFormer's W_alpha of every position that runs stored layer `stored`: a gate reads the attention
    input, so it reads the attention-input norm. Gates are per position; a tied layer has one per run."""
    gates = getattr(model.model.value_residual, "gates", None)
    if gates is None:
        return ()
    first = model.model.value_residual.first_mixed_layer
    runs = [p for p, k in enumerate(model.config.execution_order) if k == stored]
    return tuple(gates[p - first] for p in runs if p >= first)


def _sublayer_norms(kind: str, sub: nn.Module, readers: tuple[nn.Module, ...]) -> list[NormSite]:
    sites = []
    if _present(sub.norm_in):
        sites.append(NormSite(f"{kind}_in", sub.norm_in, "linears", readers, scale=sub.depth_scale))
    if _present(sub.norm_out):
        # After the add the norm's output replaces the stream; before it, the output is added to the stream.
        sites.append(NormSite(f"{kind}_out", sub.norm_out, "stream" if sub.layout.post_add else "residual"))
    return sites


def _layer_map(model: nn.Module, i: int, layer: nn.Module) -> LayerMap:
    attn, mlp = _attention(layer), layer.mlp.fn
    linears = dict.fromkeys(LINEAR_GROUPS, ())
    linears.update(attn_in=tuple(attn.input_projections()), attn_out=(attn.output_projection(),),
                   mlp_in=tuple(mlp.input_projections()), mlp_out=(mlp.output_projection(),),
                   value_gate=_value_gate(model, i))
    norms = _sublayer_norms("attn", layer.attn, linears["attn_in"] + linears["value_gate"])
    if attn.q_norm is not None:
        norms += [NormSite("q_norm", attn.q_norm, "scores"), NormSite("k_norm", attn.k_norm, "scores")]
    norms += _sublayer_norms("mlp", layer.mlp, linears["mlp_in"])
    return LayerMap(i, layer, tuple(norms), linears, attn, _mid_residual(layer))


def _mid_residual(layer: nn.Module) -> nn.Module:
    # The MLP's hook_in sees h + a (the stream under a standard residual, the routed input under AttnRes).
    return layer.mlp.hook_in


def _attention(layer: nn.Module) -> nn.Module:
    return layer.attn.fn


def layerwise_model_map(model: nn.Module) -> ModelMap:
    """Layers are the stored layers, each once (a norm of a tied layer is one module, folded once)."""
    inner = model.model
    layers = tuple(_layer_map(model, i, layer) for i, layer in enumerate(inner.layers))
    extra = []
    if inner.embedding_norm is not None:
        extra.append(NormSite("embedding", inner.embedding_norm, "stream"))
    # AttnRes depth mixers normalise their keys only; the sources themselves are mixed un-normalised.
    mixers = [*getattr(inner.residual, "mixers", ()), *filter(None, [getattr(inner.residual, "final_mixer", None)])]
    extra += [NormSite("depth_key", mixer.key_norm, "scores") for mixer in mixers]
    final = NormSite("final", inner.norm, "linears", (model.lm_head,))
    table = inner.position_embedding if getattr(inner.position_embedding, "weight", None) is not None else None
    return ModelMap("layerwise", inner.embed_tokens, layers, final, model.lm_head, tuple(extra), table)


def layerwise_depth_view(model: nn.Module) -> DepthView:
    """Layers are the execution positions (`LayerwiseModel.positions`): a tied layer appears at each position."""
    inner = model.model
    return DepthView("layerwise", inner.positions, inner.norm, model.lm_head, inner.embed_tokens,
                     mid_residual=_mid_residual, attention=_attention)
