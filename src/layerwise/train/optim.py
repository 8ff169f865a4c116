"""AdamW with parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm gains, biases, scalars, embeddings and AttnRes pseudo-queries are not decayed by default:
    decaying them pulls gains toward 0 and queries toward uniform routing, which is not regularisation."""
    return param.ndim < 2 or "embed_tokens" in name or "position_embedding" in name or name.endswith(".query")


def declared_decayed(model: nn.Module) -> set[int]:
    """ids of the parameters whose module lists them in its `decayed_parameters`: a module whose paper
    prescribes weight decay on a vector (SeeDNorm's alpha and beta, an Input-Norm's gain under IWD) says so."""
    return {id(getattr(module, name)) for module in model.modules()
            for name in getattr(module, "decayed_parameters", ())
            if getattr(module, name, None) is not None}


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    decay, keep = [], []
    seen = set()
    declared = declared_decayed(model)
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        exempt = not decay_all and id(p) not in declared and no_decay(name, p)
        (keep if exempt else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=keep, weight_decay=0.0)]


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.decay_all), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        eps=cfg.adam_eps, fused=device.type == "cuda",
    )


def warmup_steps(cfg, total: int) -> int:
    return int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)


def lr_at(step: int, cfg, total: int) -> float:
    """Linear warmup, then cosine to min_lr, WSD (constant, then linear decay over the last
    decay_fraction of steps) or constant."""
    warm, peak, floor = warmup_steps(cfg, total), cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = total - max(1, int(cfg.decay_fraction * total))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return peak + (floor - peak) * progress
