"""Exact norm rewrites: fold norm gains into linears, Pre-LN -> Pre-RMSNorm, and its d-1 compression.

Steps:
- `fold-norms`: every norm that feeds only linears (pre-sublayer norms, the final norm) hands its gain, and a
  LayerNorm / DyT its bias, to the linears that read it, and is left with unit gain and no bias. Norms whose
  output enters the residual stream, is the stream, or enters attention scores (Peri-LN and Gemma 2 output
  norms, Post-LN norms, embedding norms, QK-norm, AttnRes keys) keep their gains: no linear alone reads them.
- `fold-prepbn`: a PRepBN model whose decay is done (lambda = 0) hands each norm's eval map a x + c, running
  statistics and eta included, to the linears that read it; the norms become `identity` (SLAB's inference model).
- `pre-rmsnorm` (Jiang et al., NeurIPS 2023): a Pre-LN LayerNorm layerwise model (or HF GPT-2, first made the
  equivalent layerwise model, since GPT-2's classes have no RMSNorm) becomes a Pre-RMSNorm one
  computing the same function: fold the norms, remove the mean from everything that writes the residual
  stream (embedding and position-table rows, attention and MLP output projections and their biases) so the
  stream is zero-mean,
  where LayerNorm and RMSNorm agree (eps included: the variance is then the mean square).
- `pre-crmsnorm`: after `pre-rmsnorm` the stream's last coordinate is minus the sum of the others, so it is
  dropped: writers lose their last output row, readers W become W[:, :-1] - W[:, -1:], and the norms become
  CRMSNorm. The stream has d_model - 1 coordinates; head_dim and d_ff stay as they were.

The math of a fold, for a reader y = W u + b of a norm output u = s * (gamma * n(x) + beta) (s: LayerNorm
Scaling's depth scale, else 1): W' = W diag(gamma), b' = b + s W beta. A reader without a bias gets one where
the model can still load it (layerwise models: `bias` / `lm_head_bias` in the config); where it cannot (GPT-2's
lm_head), the norm keeps beta as beta / gamma under a unit gain, gamma * (n + beta / gamma) being the same map,
which needs a gamma without zeros.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..arch import model_map
from ..arch.maps import ModelMap, NormSite
from ..errors import UserError
from .steps import Step, register_step


def fold_norms(model: nn.Module) -> nn.Module:
    """Fold the gain (and bias) of every norm that only linears read into those linears, in place; the logits
    are unchanged. A head tied to the embedding is untied first (`tie_word_embeddings=False`)."""
    refusal = fold_norms_refusal(model)
    if refusal:
        raise UserError(f"fold-norms: {refusal}")
    mapped = model_map(model)
    if any(_reader_of_head(site, mapped) for site in _foldable(mapped)) and mapped.tied_head:
        _untie_head(model, mapped)
    layerwise = mapped.family == "layerwise"
    biases_before = sum(getattr(m, "bias", None) is not None for m in model.modules())
    for site in _foldable(mapped):
        _fold(site, can_add_bias=layerwise, model=model, mapped=mapped)
    if layerwise and sum(getattr(m, "bias", None) is not None for m in model.modules()) != biases_before:
        _refresh_init_records(model)
    return model


def fold_norms_refusal(model: nn.Module) -> str | None:
    """Why some norm of `model` cannot be folded, or None; asked before any weight changes."""
    for site in _foldable(model_map(model)):
        keeps_beta = getattr(site.norm, "bias", None) is not None and not all(
            _can_take_bias(r, model) for r in site.readers)
        if keeps_beta and bool(((site.norm.weight + site.gain_offset) == 0).any()):
            return (f"the {site.role} norm has a zero gain and a reader that cannot take a bias (its family has no "
                    "config field for one), so its bias cannot move into the readers nor stay as bias / gain")
    return None


def pre_rmsnorm(model: nn.Module) -> nn.Module:
    """A Pre-LN (LayerNorm) `LayerwiseForCausalLM` as a Pre-RMSNorm one with the same logits: returns a new
    model whose config reloads it (`norm="rmsnorm"`, `tie_word_embeddings=False`, biases where the LayerNorms
    had betas); the model passed in is consumed (its weights are rewritten)."""
    refusal = pre_rmsnorm_refusal(model)
    if refusal:
        raise UserError(f"pre-rmsnorm: {refusal}")
    cfg = model.config
    with torch.no_grad():
        fold_norms(model)
        mapped = model_map(model)
        if mapped.tied_head:  # recentring the embedding must not move the head
            _untie_head(model, mapped)
        _recentre_writers(mapped)
    new = copy.deepcopy(cfg)
    new.norm = "rmsnorm"
    new.norm_bias = True  # the default: RMSNorm has no bias and does not read the field
    norm_ids = {id(site.norm) for site in model_map(model).norms() if site.feeds == "linears"}
    norms = {f"{name}.bias" for name, module in model.named_modules() if id(module) in norm_ids}
    return _rebuilt(model, new, {k: v for k, v in model.state_dict().items() if k not in norms})


def pre_crmsnorm(model: nn.Module) -> nn.Module:
    """`pre_rmsnorm`, then the lossless compression of the zero-mean stream to d_model - 1 coordinates with
    CRMSNorm; returns a new model of width d_model - 1 (head_dim and d_ff kept) with the same logits."""
    converted = pre_rmsnorm(model)
    mapped = model_map(converted)
    writers = {id(m) for m in _writers(mapped)}
    tables = {id(t) for t in _tables(mapped)}
    readers = {id(r) for site in _foldable(mapped) for r in site.readers}
    names = {id(m): name for name, m in converted.named_modules()}
    state = dict(converted.state_dict())
    with torch.no_grad():
        for module_id in writers:
            module, prefix = _module(converted, names[module_id]), names[module_id]
            # A table keeps one row per token or position, (V, d): the stream is its second dim.
            if module_id in tables:
                state[f"{prefix}.weight"] = module.weight[:, :-1].clone()
            else:
                state[f"{prefix}.weight"] = module.weight[:-1].clone()
                if module.bias is not None:
                    state[f"{prefix}.bias"] = module.bias[:-1].clone()
        for module_id in readers:
            module, prefix = _module(converted, names[module_id]), names[module_id]
            w = module.weight
            state[f"{prefix}.weight"] = (w[:, :-1] - w[:, -1:]).clone()
        for site in _foldable(mapped):
            state[f"{names[id(site.norm)]}.weight"] = site.norm.weight[:-1].clone()
    cfg = copy.deepcopy(converted.config)
    cfg.norm, cfg.d_model = "crmsnorm", cfg.d_model - 1  # head_dim and d_ff are already explicit integers
    return _rebuilt(converted, cfg, state)


def as_layerwise_pre_ln(model: nn.Module) -> nn.Module:
    """HF GPT-2 as the equivalent layerwise model (its RMSNorm form cannot be a GPT-2: GPT-2 has no RMSNorm);
    other models as they are."""
    if getattr(getattr(model, "config", None), "model_type", None) == "gpt2":
        from ..arch.state_dict import hf_to_layerwise

        return hf_to_layerwise(model)
    return model


def pre_rmsnorm_refusal(model: nn.Module) -> str | None:
    """Why `model` cannot be converted exactly to Pre-RMSNorm, or None (HF GPT-2 is asked as its layerwise form)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) == "gpt2":
        from ..arch.gpt2 import gpt2_config_to_layerwise

        try:
            gpt2_config_to_layerwise(cfg)
        except UserError as err:
            return str(err)
        return None
    if getattr(cfg, "model_type", None) != "layerwise":
        return (f"converts layerwise Pre-LN models and HF GPT-2; this is a "
                f"{getattr(cfg, 'model_type', type(model).__name__)!r} model")
    from ..nn.norms import LayerNorm
    from ..nn.registry import selected_variants, variant_of

    if variant_of(cfg, "norm") is not LayerNorm:
        return f"needs a LayerNorm model (norm='layernorm'), not norm={cfg.norm!r}"
    if not variant_of(cfg, "norm_placement").adds_raw_branch:
        return (f"needs Pre-LN (norm_placement='pre'), where the stream is read only through norms; "
                f"norm_placement={cfg.norm_placement!r} puts norms on the stream itself")
    if cfg.embedding_norm:
        return "the embedding norm (embedding_norm=True) writes a LayerNorm output into the stream, not a linear"
    for variant in selected_variants(cfg):
        if not getattr(variant, "sums_writers", True):
            return (f"{variant.selector_field}={getattr(cfg, variant.selector_field)!r} does not make the stream "
                    "a plain sum of its writers, so recentring them would change what its sublayers read")
    if any(getattr(site.norm, "bias", None) is not None for site in _foldable(model_map(model))
           if any(not _can_take_bias(r, model) for r in site.readers)):
        return "a linear that reads a LayerNorm with a bias cannot take a bias (e.g. a SATFormer gate)"
    return None


# ---- folding ---------------------------------------------------------------------------------------------------


def _foldable(mapped: ModelMap) -> list[NormSite]:
    """The norms that only linears read and whose gain is a plain factor on the output, each once (a layer
    program's tied layers list one module at several positions)."""
    sites = {id(site.norm): site for site in mapped.norms()
             if site.feeds == "linears" and site.readers and getattr(site.norm, "weight", None) is not None
             and getattr(type(site.norm), "affine_output", True)}
    return list(sites.values())


def _reader_of_head(site: NormSite, mapped: ModelMap) -> bool:
    return any(reader is mapped.head for reader in site.readers)


def _untie_head(model: nn.Module, mapped: ModelMap) -> None:
    mapped.head.weight = nn.Parameter(mapped.head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    # transformers re-ties on `tie_weights()` from this table when the config says so; the config no longer does.


def _can_take_bias(reader: nn.Module, model: nn.Module) -> bool:
    """A bias on `reader` survives save and reload: it has one, or it is a layerwise projection or head, whose
    biases the config switches on (`bias`, `lm_head_bias`)."""
    if getattr(reader, "bias", None) is not None:
        return True
    if getattr(model.config, "model_type", None) != "layerwise":
        return False
    mapped = model_map(model)
    return reader is mapped.head or any(reader in layer.linears[g] for layer in mapped.layers
                                        for g in ("attn_in", "attn_out", "mlp_in", "mlp_out"))


def _fold(site: NormSite, *, can_add_bias: bool, model: nn.Module, mapped: ModelMap) -> None:
    norm = site.norm
    with torch.no_grad():
        gain = norm.weight + site.gain_offset
        beta = getattr(norm, "bias", None)
        keep_beta = beta is not None and not all(_can_take_bias(r, model) for r in site.readers)
        if beta is not None and not keep_beta:
            if can_add_bias:
                _add_biases(model, mapped, site)
            for reader in site.readers:
                reader.bias.add_(_apply(reader, beta * site.scale))
        for reader in site.readers:
            _scale_inputs(reader, gain)
        if keep_beta:
            beta.copy_(beta / gain)
        elif beta is not None:
            beta.zero_()
        norm.weight.fill_(1.0 - site.gain_offset)


def _add_biases(model: nn.Module, mapped: ModelMap, site: NormSite) -> None:
    """Give the readers biases by turning the config switch that builds them, so the model reloads with them:
    `bias` gives every attention and MLP projection one, `lm_head_bias` the head."""
    if any(r is mapped.head for r in site.readers):
        model.config.lm_head_bias = True
        targets = [mapped.head]
    else:
        model.config.bias = True
        targets = [m for layer in mapped.layers for g in ("attn_in", "attn_out", "mlp_in", "mlp_out")
                   for m in layer.linears[g]]
    for module in targets:
        if module.bias is None:
            module.bias = nn.Parameter(module.weight.new_zeros(module.weight.shape[0]))


def _apply(reader: nn.Module, u: torch.Tensor) -> torch.Tensor:
    """W u for a reader of input u: nn.Linear stores W as (out, in), GPT-2's Conv1D as (in, out)."""
    return u @ reader.weight if isinstance(reader, Conv1D) else reader.weight @ u


def _scale_inputs(reader: nn.Module, gain: torch.Tensor) -> None:
    if isinstance(reader, Conv1D):
        reader.weight.mul_(gain[:, None])
    else:
        reader.weight.mul_(gain[None, :])


def _refresh_init_records(model: nn.Module) -> None:
    # New biases need an init record, so a later `init_weights` or partial load knows how they start.
    from ..nn.initialization import attach_init

    attach_init(model)


# ---- Pre-RMSNorm and Pre-CRMSNorm ---------------------------------------------------------------------------


def _writers(mapped: ModelMap) -> list[nn.Module]:
    """What adds into the residual stream: the embedding (and a learned position table), and each layer's
    attention and MLP output projection."""
    modules = [*_tables(mapped), *(m for layer in mapped.layers for g in ("attn_out", "mlp_out")
                                   for m in layer.linears[g])]
    return list({id(m): m for m in modules}.values())


def _tables(mapped: ModelMap) -> list[nn.Module]:
    """The writers that store one stream vector per row ([V or max_seq_len, d]), unlike a Linear's (d, k)."""
    return [mapped.embed] + ([mapped.position_embed] if mapped.position_embed is not None else [])


def _recentre_writers(mapped: ModelMap) -> None:
    tables = {id(t) for t in _tables(mapped)}
    for module in _writers(mapped):
        if id(module) in tables:  # (V, d): centre each token's (or position's) row
            module.weight.sub_(module.weight.mean(1, keepdim=True))
            continue
        module.weight.sub_(module.weight.mean(0, keepdim=True))  # (d, k): centre each column over the output d
        if module.bias is not None:
            module.bias.sub_(module.bias.mean())


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def _rebuilt(model: nn.Module, cfg, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh model built from `cfg` holding `state`: what `from_pretrained` makes of the saved result."""
    cfg.validate()
    param = next(model.parameters())
    with torch.device(param.device):
        new = type(model)(cfg)
    new.to(param.dtype)
    new.load_state_dict(state, strict=True)
    new.train(model.training)
    return new


# ---- the steps ---------------------------------------------------------------------------------------------------


@register_step("fold-norms")
class FoldNorms(Step):
    """Fold norm gains (and LayerNorm biases) into the linears that read them."""

    summary = "fold each norm's gain and bias into the linears that read it; logits unchanged"

    def check(self, model):
        try:
            refusal = fold_norms_refusal(model)
        except UserError as err:  # a family the adapters do not know
            self.refuse(str(err))
        if refusal:
            self.refuse(f"cannot fold norms: {refusal}")

    def apply(self, model):
        return fold_norms(model)


@register_step("pre-rmsnorm")
class PreRMSNorm(Step):
    """Pre-LN (LayerNorm) -> Pre-RMSNorm, exactly (Jiang et al., NeurIPS 2023)."""

    summary = "Pre-LN LayerNorm -> Pre-RMSNorm with the same logits (recentred writers, folded norms)"
    target = "Pre-RMSNorm"
    convert = staticmethod(pre_rmsnorm)

    def check(self, model):
        refusal = pre_rmsnorm_refusal(model)
        if refusal:
            self.refuse(f"cannot convert to {self.target}: {refusal}")

    def apply(self, model):
        return self.convert(as_layerwise_pre_ln(model))


@register_step("pre-crmsnorm")
class PreCRMSNorm(PreRMSNorm):
    """Pre-LN (LayerNorm) -> Pre-CRMSNorm: Pre-RMSNorm on a stream one coordinate narrower, exactly."""

    summary = "Pre-LN LayerNorm -> Pre-CRMSNorm (d_model - 1 wide) with the same logits"
    target = "Pre-CRMSNorm"
    convert = staticmethod(pre_crmsnorm)


# ---- PRepBN ------------------------------------------------------------------------------------------------------


def fold_prepbn(model: nn.Module) -> nn.Module:
    """A `LayerwiseForCausalLM` whose PRepBNs have finished their decay (lambda = 0) as one with no norm computation
    there and the same eval logits: each PRepBN's eval map a x + c (`PRepBN.eval_affine`) goes into the linears
    that read it, W' = W diag(a), b' = b + s W c (s: LayerNorm Scaling's depth scale), and the norms become
    `identity`. Returns a new model whose config reloads it (`norm="identity"`, `bias` / `lm_head_bias` where
    the readers took c, the head untied); the model passed in is consumed."""
    refusal = fold_prepbn_refusal(model)
    if refusal:
        raise UserError(f"fold-prepbn: {refusal}")
    mapped = model_map(model)
    sites = list({id(site.norm): site for site in mapped.norms() if _is_prepbn(site.norm)}.values())
    with torch.no_grad():
        if mapped.tied_head:
            _untie_head(model, mapped)
        for site in sites:
            a, c = site.norm.eval_affine()
            if any(reader.bias is None for reader in site.readers):
                _add_biases(model, mapped, site)
            for reader in site.readers:
                reader.bias.add_(_apply(reader, (c * site.scale).to(reader.weight.dtype)))
                _scale_inputs(reader, a.to(reader.weight.dtype))
    new = copy.deepcopy(model.config)
    new.norm = "identity"
    defaults = type(new)()
    for field in ("norm_bias", "prepbn_decay_steps", "prepbn_warmup_steps"):  # read by no selected variant now
        setattr(new, field, getattr(defaults, field))
    norms = {name for name, module in model.named_modules() if _is_prepbn(module)}
    state = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in norms}
    return _rebuilt(model, new, state)


def fold_prepbn_refusal(model: nn.Module) -> str | None:
    """Why `model`'s PRepBNs cannot be folded into their readers exactly, or None; asked before any weight changes."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "layerwise" or cfg.norm != "prepbn":
        found = f"norm={cfg.norm!r}" if getattr(cfg, "model_type", None) == "layerwise" else \
            f"a {getattr(cfg, 'model_type', type(model).__name__)!r} model"
        return f"needs a layerwise model with norm='prepbn', not {found}"
    names = {id(module): name for name, module in model.named_modules()}
    for site in model_map(model).norms():
        if not _is_prepbn(site.norm):
            continue
        name = names[id(site.norm)]
        if site.feeds != "linears":
            return (f"the PRepBN {name} feeds the {site.feeds}, not only linears, so no linear can absorb its "
                    "affine map (use a pre placement without embedding_norm)")
        lam = float(site.norm.lam)
        if lam != 0:
            return (f"the PRepBN {name} has lambda={lam:g}, not 0: its LayerNorm part is not affine; lambda reaches "
                    "0 at step prepbn_warmup_steps + prepbn_decay_steps, so train at least one step past it (or "
                    "shorten them)")
        stuck = [type(r).__name__ for r in site.readers if not _can_take_bias(r, model)]
        if stuck:
            return f"the PRepBN {name} is read by a {stuck[0]}, which cannot take the bias its map needs"
    return None


def _is_prepbn(module: nn.Module) -> bool:
    from ..nn.norms import PRepBN

    return isinstance(module, PRepBN)


@register_step("fold-prepbn")
class FoldPRepBN(Step):
    """PRepBN at lambda = 0 -> its per-channel affine map folded into the linears that read it (SLAB's inference
    model, Guo et al., ICML 2024)."""

    summary = "fold each finished PRepBN's eval map a x + c into the linears that read it; norms become identity"

    def check(self, model):
        refusal = fold_prepbn_refusal(model)
        if refusal:
            self.refuse(f"cannot fold PRepBN: {refusal}")

    def apply(self, model):
        return fold_prepbn(model)
