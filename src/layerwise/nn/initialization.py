"""Initialization: every parameter and buffer of a layerwise model belongs to exactly one named group.

`parameter_groups(model)` is the whole recipe in one list. `attach_init(model)` records each tensor's init on
the module that holds it (and raises if a tensor is in no group or in two); `init_weights(module)` applies a
module's records and is what Hugging Face's `_init_weights` calls, module by module, so its guards keep loaded
weights (`from_pretrained` initialises only missing tensors) and random draws happen in module order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .attention import CausalSelfAttention
from .block import BHyTParallelLayer
from .mlp import MLP
from .norms import (BetaVarianceApproximation, BHyT, DyT, EtaVarianceApproximation, FrozenScaleNorm, Norm, PRepBN,
                    ReaderGainLinear, ResidualAwareVarianceApproximation, SeeDNorm, TrackedStd)
from .positions import LearnedPositions
from .registry import variant_of
from .running_norms import RunningStatisticsNorm, UnifiedNorm
from .residual import DeltaRoutedScheme, DepthAttention, LearnableAlphaGate, SigmoidScalarGate, SigmoidVectorGate
from .value_residual import ResFormer, SATFormer

# The attribute under which a module records the init of each of its own tensors.
INIT_RECORD = "layerwise_init"


@dataclass(frozen=True)
class Normal:
    """N(0, std^2)."""

    std: float

    def __call__(self, module: nn.Module, tensor: torch.Tensor) -> None:
        nn.init.normal_(tensor, mean=0.0, std=self.std)


@dataclass(frozen=True)
class Constant:
    """A constant: a number, or the name of the module attribute that holds it (values that differ by role)."""

    value: float | str

    def __call__(self, module: nn.Module, tensor: torch.Tensor) -> None:
        nn.init.constant_(tensor, getattr(module, self.value) if isinstance(self.value, str) else self.value)


@dataclass(frozen=True)
class InitGroup:
    name: str
    members: list[tuple[nn.Module, str]]  # (module, attribute) of each tensor in the group
    init: Callable[[nn.Module, torch.Tensor], None]


def parameter_groups(model: nn.Module) -> list[InitGroup]:
    """Every tensor group of a `LayerwiseModel` (or a `LayerwiseForCausalLM`, which adds the head) with its init."""
    base = getattr(model, "model", model)
    cfg = base.config
    # DeepNorm divides v, o and the MLP weights by (8N)^(1/4); scaled init (GPT-2 / Megatron) divides the output
    # projections by sqrt(2L).
    divisor = variant_of(cfg, "norm_placement")().branch_init_divisor(cfg)
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_init else cfg.init_std
    modules = list(base.modules())

    def of(kind):
        return [m for m in modules if isinstance(m, kind)]

    attns, mlps = of(CausalSelfAttention), of(MLP)
    projections = [p for a in attns for p in (*a.input_projections(), a.output_projection())]
    projections += [p for m in mlps for p in (*m.input_projections(), m.output_projection())]
    groups = [
        InitGroup("token embedding", [(base.embed_tokens, "weight")], Normal(cfg.init_std)),
        InitGroup("position embedding", [(p, "weight") for p in of(LearnedPositions)], Normal(cfg.init_std)),
        InitGroup("query and key projections", [(p, "weight") for a in attns for p in (a.q_proj, a.k_proj)],
                  Normal(cfg.init_std)),
        InitGroup("value projections", [(a.v_proj, "weight") for a in attns], Normal(cfg.init_std / divisor)),
        InitGroup("attention output projections", [(a.o_proj, "weight") for a in attns], Normal(out_std / divisor)),
        InitGroup("MLP input projections", [(p, "weight") for m in mlps for p in m.input_projections()],
                  Normal(cfg.init_std / divisor)),
        InitGroup("MLP output projections", [(m.output_projection(), "weight") for m in mlps],
                  Normal(out_std / divisor)),
        InitGroup("projection biases", [(p, "bias") for p in projections if p.bias is not None], Constant(0.0)),
        InitGroup("norm gains", [(n, "weight") for n in of(Norm) if hasattr(n, "weight")], Constant(1.0)),
        InitGroup("HG reader gains", [(p, "input_gain") for p in of(ReaderGainLinear)], Constant(1.0)),
        InitGroup("norm biases", [(n, "bias") for n in of(Norm) if getattr(n, "bias", None) is not None],
                  Constant(0.0)),
        InitGroup("DyT alpha", [(n, "alpha") for n in of(DyT)], Constant("alpha0")),
        InitGroup("BHyT lambda", [(n, "lam") for n in of(BHyT)], Constant("lambda0")),
        # NaN marks c as not yet computed from the weights (see BHyTParallelLayer).
        InitGroup("BHyT attention-output gain c", [(layer, "attn_gain") for layer in of(BHyTParallelLayer)],
                  Constant(float("nan"))),
        # The released code's inits: each approximation starts as the default v + c lambda^2 / kappa^2, except eta
        # (v alone).
        InitGroup("BHyT variance beta", [(m, "beta") for m in of(BetaVarianceApproximation)], Constant(1.0)),
        InitGroup("BHyT variance eta", [(m, "eta") for m in of(EtaVarianceApproximation)], Constant(0.0)),
        InitGroup("BHyT residual-aware alpha", [(m, "alpha") for m in of(ResidualAwareVarianceApproximation)],
                  Constant(1.0)),
        InitGroup("BHyT residual-aware beta", [(m, "beta") for m in of(ResidualAwareVarianceApproximation)],
                  Constant(0.0)),
        InitGroup("SeeDNorm alpha", [(n, "alpha") for n in of(SeeDNorm)], Constant("alpha0")),
        InitGroup("SeeDNorm beta", [(n, "beta") for n in of(SeeDNorm)], Constant(0.0)),  # SeeDNorm == RMSNorm
        InitGroup("PRepBN BatchNorm gains", [(n, "bn_weight") for n in of(PRepBN)], Constant(1.0)),
        InitGroup("PRepBN BatchNorm biases", [(n, "bn_bias") for n in of(PRepBN)], Constant(0.0)),
        InitGroup("PRepBN eta", [(n, "eta") for n in of(PRepBN)], Constant(1.0)),  # RepBN = BN(x) + x at init
        InitGroup("PRepBN running means", [(n, "running_mean") for n in of(PRepBN)], Constant(0.0)),
        InitGroup("PRepBN running variances", [(n, "running_var") for n in of(PRepBN)], Constant(1.0)),
        InitGroup("PRepBN LN weight lambda", [(n, "lam") for n in of(PRepBN)], Constant(1.0)),  # pure LN at step 0
        InitGroup("frozen norm scale sigma", [(n, "sigma") for n in of(FrozenScaleNorm)], Constant("sigma0")),
        # NaN: no std measured yet; the first training forward starts the EMA from its measurement.
        InitGroup("FakeLN tracked stds", [(t, name) for t in of(TrackedStd) for name in ("std", "std_bos")],
                  Constant(float("nan"))),
        InitGroup("FakeLN switches off", [(t, "is_fake") for t in of(TrackedStd)], Constant(False)),
        InitGroup("FakeLN special positions on", [(t, name) for t in of(TrackedStd)
                                                  for name in ("bos_is_special", "eot_is_special")], Constant(True)),
        # The released inits: running psi^2 1 (UN's window too, until it fills), the EMAs of g z 0, warm-up on.
        InitGroup("running psi^2", [(n, "running_var") for n in of(RunningStatisticsNorm)], Constant(1.0)),
        InitGroup("running g z EMAs", [(n, "ema_gz") for n in of(RunningStatisticsNorm)], Constant(0.0)),
        InitGroup("running-statistics warm-up on", [(n, "in_warmup") for n in of(RunningStatisticsNorm)],
                  Constant(True)),
        InitGroup("UN psi^2 window", [(n, "window") for n in of(UnifiedNorm)], Constant(1.0)),
        InitGroup("UN g z windows and fill counts", [(n, name) for n in of(UnifiedNorm)
                                                     for name in ("gz_window", "gz_filled", "window_filled")],
                  Constant(0.0)),
        InitGroup("UN gradient compensation off", [(n, "compensated") for n in of(UnifiedNorm)], Constant(False)),
        InitGroup("AttnRes pseudo-queries", [(m, "query") for m in of(DepthAttention)], Constant(0.0)),
        # Delta AttnRes's optional gates and null sources (the released code's inits).
        InitGroup("Delta AttnRes null sources", [(m, "null_sources") for m in of(DeltaRoutedScheme)
                                                 if m.null_sources is not None], Constant(0.0)),
        InitGroup("Delta AttnRes sigmoid gate logits", [(g, "logit") for g in of(SigmoidScalarGate)],
                  Constant(SigmoidScalarGate.logit_init)),
        InitGroup("Delta AttnRes vector gate weights", [(g.proj, "weight") for g in of(SigmoidVectorGate)],
                  Constant(0.0)),
        InitGroup("Delta AttnRes vector gate biases", [(g.proj, "bias") for g in of(SigmoidVectorGate)],
                  Constant(SigmoidVectorGate.bias_init)),
        InitGroup("Delta AttnRes gate alphas", [(g, "alpha") for g in of(LearnableAlphaGate)], Constant(0.0)),
        InitGroup("ResFormer lambda logits", [(m, "lambda_logits") for m in of(ResFormer)], Constant(0.0)),
        InitGroup("ResFormer lambda scale", [(m, "lambda_scale") for m in of(ResFormer)],
                  Constant(float(cfg.n_layers))),
        InitGroup("ResFormer self weights", [(m, "lambda_self") for m in of(ResFormer)], Constant(0.5)),
        InitGroup("SATFormer gates", [(g, "weight") for m in of(SATFormer) for g in m.gates], Normal(cfg.init_std)),
        # DyT's LLaMA recipe: a learnable scalar on the embedding output, init sqrt(d).
        InitGroup("embedding multiplier", [(base, "embedding_multiplier")] if cfg.embedding_scale else [],
                  Constant(math.sqrt(cfg.d_model))),
    ]
    if model is not base:
        groups.append(InitGroup("LM head", [(model.lm_head, "weight")], Normal(cfg.init_std)))
        if model.lm_head.bias is not None:
            groups.append(InitGroup("LM head bias", [(model.lm_head, "bias")], Constant(0.0)))
    return groups


def attach_init(model: nn.Module) -> None:
    """Record on each module the init of its tensors; raise naming any tensor in no group or in several."""
    seen: dict[int, list[str]] = {}
    for group in parameter_groups(model):
        for module, attr in group.members:
            seen.setdefault(id(getattr(module, attr)), []).append(group.name)
            module.__dict__.setdefault(INIT_RECORD, {})[attr] = group.init
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    problems = [f"{name} is in {len(seen.get(id(t), []))} groups ({', '.join(seen.get(id(t), [])) or 'none'})"
                for name, t in tensors.items() if len(seen.get(id(t), [])) != 1]
    if problems:
        raise RuntimeError(f"every tensor needs exactly one init group in layerwise.nn.initialization: "
                           f"{'; '.join(problems)}")


def init_weights(module: nn.Module) -> None:
    """Initialise the module's own parameters and buffers (not its children's) as `attach_init` recorded."""
    record = module.__dict__.get(INIT_RECORD, {})
    for attr, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if attr not in record:
            raise RuntimeError(f"{type(module).__name__}.{attr} has no init group; add it to "
                               "layerwise.nn.initialization.parameter_groups")
        record[attr](module, tensor)


def init_of(module: nn.Module, attr: str = "weight") -> Callable[[nn.Module, torch.Tensor], None]:
    """The init recorded for `module.<attr>`, e.g. `init_of(layer.attn.fn.o_proj) == Normal(0.02 / sqrt(2L))`."""
    return module.__dict__[INIT_RECORD][attr]
