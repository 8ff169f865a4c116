"""Normalization layers. Each maps [..., d] -> [..., d] per token and is selected by `ModelConfig.norm`.

A norm is built for a *role* (where it sits): "attn_in", "attn_out", "mlp_in", "mlp_out", "final" or
"embedding". Most norms ignore the role; DyT and BHyT take role-specific initial values from the config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics import at_least_float32
from .registry import Registry, Variant, fail, variant_of
from .schedule import steps_of

NORMS: Registry["Norm"] = Registry("norm", "norm")
register_norm = NORMS.register


class Norm(Variant, nn.Module):
    """Base of the norms: a per-token map [..., d] -> [..., d]. Its parameters are initialised by the groups in
    `layerwise.nn.initialization`."""

    # The output is weight * f(x) (+ bias) with f free of both, so weight and bias fold into the linears that
    # read the norm (`layerwise.transform.norms`); SeeDNorm's gain depends on x and does not.
    affine_output: bool = True
    # Parameters that weight decay applies to although they are vectors (the optimizer exempts vectors by
    # default); a class lists its paper's choice, and `build_norm` adds the gain of an Input-Norm under IWD.
    decayed_parameters: tuple[str, ...] = ()
    # Training-mode outputs depend on statistics over the batch (BatchNorm-like norms): they then depend on how
    # the batch is split over ranks and micro-batches, and positions see each other (future tokens included).
    batch_statistics: bool = False

    @classmethod
    def layer_class(cls, cfg) -> type[nn.Module]:
        """The layer class that wires this norm; a norm whose layer computes shared statistics overrides it."""
        from .block import Layer

        return Layer


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean_d(x^2) + eps) with the mean of squares in float32, cast back (the LLaMA convention)."""
    xf = at_least_float32(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """mean_d(x^2) in float32, keepdim; the one statistic RMS-based norms need."""
    return at_least_float32(x).pow(2).mean(-1, keepdim=True)


class GainFreeRMSNorm(Norm):
    """x / sqrt(mean(x^2) + eps): a pre-sublayer RMSNorm under HG (Wang et al., arXiv 2605.26895), whose gain
    each of its readers holds as its own `ReaderGainLinear.input_gain`."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return rms_normalize(x, self.eps)


class ReaderGainLinear(nn.Linear):
    """HG (Wang et al., arXiv 2605.26895): a linear that reads a gain-free norm through its own gain, W (g * x) + b.

    The q, k, v (gate, up) projections then each hold a gamma instead of sharing the norm's: the same function
    class (each g folds into its W), a different optimisation. Under IWD the gain is decayed like an Input-Norm's.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, decayed: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.input_gain = nn.Parameter(torch.ones(in_features))
        self.decayed_parameters = ("input_gain",) if decayed else ()

    def forward(self, x):
        return super().forward(self.input_gain * x)


def give_readers_own_gains(fn: nn.Module, cfg) -> None:
    """Replace each input projection of sublayer `fn` by a `ReaderGainLinear` of the same shape (HG)."""
    readers = {id(p) for p in fn.input_projections()}
    for name, child in list(fn.named_children()):
        if id(child) in readers:
            setattr(fn, name, ReaderGainLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                               decayed=cfg.norm_gain_decay == "input"))


# The roles whose output a linear map reads directly (the sublayer's input projections, the head): Wang et al.'s
# "Input-Norms". The others (after a sublayer, on the embedding) and QK-norm are their "Output-Norms".
INPUT_NORM_ROLES = ("attn_in", "mlp_in", "final")


def build_norm(cfg, role: str, dim: int | None = None) -> nn.Module:
    """The norm named by `cfg.norm` for `role`; BHyT's final norm may fall back to RMSNorm (see BHyT).

    Under `norm_gain_decay="input"` (IWD, Wang et al., arXiv 2605.26895) the gain of an Input-Norm is decayed
    and an Output-Norm's is not: only an Input-Norm's gain could be absorbed into the linear that reads it."""
    if cfg.heterogeneous_gains and role in ("attn_in", "mlp_in"):
        return GainFreeRMSNorm(dim or cfg.d_model, eps=cfg.norm_eps)  # its readers hold the gains
    norm = NORMS.get(cfg.norm).from_config(dim or cfg.d_model, cfg, role)
    if cfg.norm_gain_decay == "input" and role in INPUT_NORM_ROLES:
        norm.decayed_parameters = (*norm.decayed_parameters, "weight")
    return norm


def per_role(cfg, role: str, prefix: str):
    """The config value `<prefix>_final`, `<prefix>_attn` (attention-side and embedding norms) or
    `<prefix>_mlp` for a norm in `role`: DyT and BHyT initialise each position differently."""
    if role == "final":
        return getattr(cfg, f"{prefix}_final")
    side = "attn" if role.startswith("attn") or role == "embedding" else "mlp"
    return getattr(cfg, f"{prefix}_{side}")


@register_norm("layernorm")
class LayerNorm(Norm):
    """LayerNorm (Ba et al., 2016): gamma * (x - mean) / sqrt(var + eps) + beta."""

    config_fields = ("norm_bias",)

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    @classmethod
    def from_config(cls, dim, cfg, role):
        return cls(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


@register_norm("rmsnorm")
class RMSNorm(Norm):
    """RMSNorm (Zhang & Sennrich, 2019): gamma * x / sqrt(mean(x^2) + eps)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    @classmethod
    def from_config(cls, dim, cfg, role):
        return cls(dim, eps=cfg.norm_eps)

    def forward(self, x):
        return self.weight * rms_normalize(x, self.eps)


@register_norm("ssrmsnorm")
class SingleScaleRMSNorm(RMSNorm):
    """Single-Scale RMSNorm (Park et al., ACL 2025, Outlier-Safe Pre-Training): s * x / sqrt(mean(x^2) + eps).

    One learnable scalar s (init 1, the "norm gains" init) instead of RMSNorm's per-channel gamma: a
    per-channel gain, under Adam above all, lets privileged channels grow the activation outliers that break
    low-bit quantization. Stored 1-D, shape (1,), so FSDP2 can shard it and folding broadcasts it.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps)
        self.weight = nn.Parameter(torch.ones(1))


@register_norm("crmsnorm")
class CRMSNorm(RMSNorm):
    """Compressed RMSNorm (Jiang et al., NeurIPS 2023) on the first d-1 coordinates z of a zero-mean x in R^d:
    gamma * z / sqrt((sum z^2 + (sum z)^2) / d + eps), which is RMSNorm(x) without its last coordinate, since
    x_d = -sum z. The width d of the uncompressed stream is the input width plus one. (RMSNorm's parameters
    and construction; only the statistic differs.)"""

    def forward(self, x):
        xf = at_least_float32(x)
        square = (xf.pow(2).sum(-1, keepdim=True) + xf.sum(-1, keepdim=True).pow(2)) / (x.shape[-1] + 1)
        return self.weight * (xf * torch.rsqrt(square + self.eps)).to(x.dtype)


@register_norm("dyt")
class DyT(Norm):
    """Dynamic Tanh (Zhu, Chen, He, LeCun, Liu; CVPR 2025): gamma * tanh(alpha * x) + beta, no statistics."""

    config_fields = ("norm_bias", "dyt_alpha_attn", "dyt_alpha_mlp", "dyt_alpha_final")

    def __init__(self, dim: int, alpha0: float = 0.5, bias: bool = True):
        super().__init__()
        self.alpha0 = alpha0
        self.alpha = nn.Parameter(torch.full((1,), float(alpha0)))  # 1-D: FSDP2 cannot shard 0-d tensors
        self.weight = nn.Parameter(torch.ones(dim))
        # The LLaMA recipe drops beta, mirroring RMSNorm's bias-free form.
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    @classmethod
    def from_config(cls, dim, cfg, role):
        return cls(dim, alpha0=per_role(cfg, role, "dyt_alpha"), bias=cfg.norm_bias)

    def forward(self, x):
        y = self.weight * torch.tanh(self.alpha * x)
        return y + self.bias if self.bias is not None else y


@register_norm("bhyt")
class BHyT(Norm):
    """Bounded hyperbolic tangent (Byun et al., arXiv 2601.09719): gamma * tanh(lambda * x / (kappa * RMS(x))).

    Called with `mean_square` it uses that statistic instead of computing one: this is how the default
    "parallel" form feeds the MLP-input norm an approximated variance (see `approximate_mean_square`).
    Without it, it is the exact BHyT* form.
    """

    config_fields = ("bhyt_kappa", "bhyt_lambda_attn", "bhyt_lambda_mlp", "bhyt_lambda_final", "bhyt_exact",
                     "bhyt_var_approx", "bhyt_var_approx_exact_layers")

    @classmethod
    def validate(cls, cfg):
        placement, residual = variant_of(cfg, "norm_placement"), variant_of(cfg, "residual")
        if not cfg.bhyt_exact and not (placement.adds_raw_branch and not residual.routes_sublayer_inputs):
            fail("bhyt_exact", False, "(the parallel BHyT form) approximates the MLP-input variance from a Pre-LN "
                 "residual add; with norm_placement={!r}, residual={!r} set bhyt_exact=True (BHyT*)".format(
                     cfg.norm_placement, cfg.residual))
        if cfg.bhyt_exact:
            for field, default in (("bhyt_var_approx", "baseline"), ("bhyt_var_approx_exact_layers", 0)):
                if getattr(cfg, field) != default:
                    fail(field, getattr(cfg, field), "shapes the parallel form's approximate MLP-input variance, "
                         f"but bhyt_exact=True (BHyT*) computes it exactly: set {field}={default!r} or "
                         "bhyt_exact=False")

    @classmethod
    def layer_class(cls, cfg):
        from .block import BHyTParallelLayer, Layer

        return Layer if cfg.bhyt_exact else BHyTParallelLayer

    def __init__(self, dim: int, lambda0: float = 1.0, kappa: float = 10.0):
        super().__init__()
        self.lambda0 = lambda0
        self.kappa = kappa
        self.lam = nn.Parameter(torch.full((1,), float(lambda0)))
        self.weight = nn.Parameter(torch.ones(dim))

    @classmethod
    def from_config(cls, dim, cfg, role):
        if role == "final" and cfg.bhyt_lambda_final <= 0:
            # The paper's recommended configs (lambda_final = 0) keep a plain RMSNorm before the head.
            return RMSNorm(dim, eps=cfg.norm_eps)
        return cls(dim, lambda0=per_role(cfg, role, "bhyt_lambda"), kappa=cfg.bhyt_kappa)

    def forward(self, x, mean_square_of_x: torch.Tensor | None = None):
        ms = mean_square(x) if mean_square_of_x is None else mean_square_of_x
        r = torch.rsqrt(ms + 1e-6) / self.kappa
        return self.weight * torch.tanh(self.lam * r * at_least_float32(x)).to(x.dtype)


def attention_variance_term(gain: torch.Tensor, lam_in: torch.Tensor, kappa: float) -> torch.Tensor:
    """BHyT's estimate of mean_d(a^2) for the attention output a: c * lambda_in^2 / kappa^2, lambda_in detached."""
    return gain * lam_in.detach().pow(2) / kappa**2


def approximate_mean_square(ms_before: torch.Tensor, gain: torch.Tensor, lam_in: torch.Tensor, kappa: float):
    """BHyT parallel form: mean_d((h + a)^2) ~= mean_d(h^2) + c * lambda_in^2 / kappa^2, lambda_in detached."""
    return ms_before + attention_variance_term(gain, lam_in, kappa)


BHYT_VARIANCE_APPROXIMATIONS: Registry["VarianceApproximation"] = Registry("BHyT variance approximation",
                                                                            "bhyt_var_approx")


class VarianceApproximation(Variant, nn.Module):
    """Base: how BHyT's parallel form estimates the MLP-input mean square mean_d((h + a)^2) from v = mean_d(h^2),
    the block's one exact statistic, and the weights' c. Each layer holds its own; the learnable scalars are
    trained (only lambda_in is detached) and are 1-D because FSDP2 cannot shard 0-d tensors."""

    def forward(self, ms_before, gain, lam_in, kappa):
        raise NotImplementedError


@BHYT_VARIANCE_APPROXIMATIONS.register("baseline")
class AdditiveVarianceApproximation(VarianceApproximation):
    """BHyT (Byun et al., arXiv 2601.09719), the default: v + c lambda_in^2 / kappa^2."""

    def forward(self, ms_before, gain, lam_in, kappa):
        return approximate_mean_square(ms_before, gain, lam_in, kappa)


@BHYT_VARIANCE_APPROXIMATIONS.register("beta")
class BetaVarianceApproximation(VarianceApproximation):
    """BHyT (Byun et al., arXiv 2601.09719), `beta`: v + beta c lambda_in^2 / kappa^2, beta init 1 (the default)."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1))

    def forward(self, ms_before, gain, lam_in, kappa):
        return ms_before + self.beta * attention_variance_term(gain, lam_in, kappa)


@BHYT_VARIANCE_APPROXIMATIONS.register("eta")
class EtaVarianceApproximation(VarianceApproximation):
    """BHyT (Byun et al., arXiv 2601.09719), `eta`: v (1 + eta), eta init 0; c is not read, so at init the MLP
    norm sees the attention input's own mean square."""

    def __init__(self):
        super().__init__()
        self.eta = nn.Parameter(torch.zeros(1))

    def forward(self, ms_before, gain, lam_in, kappa):
        return ms_before * (1 + self.eta)


@BHYT_VARIANCE_APPROXIMATIONS.register("residual_aware")
class ResidualAwareVarianceApproximation(VarianceApproximation):
    """BHyT (Byun et al., arXiv 2601.09719), `residual_aware`: v (1 + beta) + alpha c lambda_in^2 / kappa^2, with
    alpha init 1 and beta init 0 (the default); beta absorbs the cross term 2 mean_d(h a) the default drops."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, ms_before, gain, lam_in, kappa):
        return ms_before * (1 + self.beta) + self.alpha * attention_variance_term(gain, lam_in, kappa)


@torch.no_grad()
def attention_output_gain(v_weight: torch.Tensor, o_weight: torch.Tensor, n_heads: int, seq_len: int) -> torch.Tensor:
    """BHyT's c = ||W_V^T W_O^T||_F^2 / (T d), with W_V expanded to every query head (GQA)."""
    d = o_weight.shape[0]
    head_dim = o_weight.shape[1] // n_heads
    n_kv = v_weight.shape[0] // head_dim
    wv = at_least_float32(v_weight).view(n_kv, head_dim, -1).repeat_interleave(n_heads // n_kv, dim=0).reshape(-1, d)
    return (at_least_float32(o_weight) @ wv).pow(2).sum() / (seq_len * d)


@register_norm("seednorm")
class SeeDNorm(Norm):
    """SeeDNorm (Cai et al., ICLR 2026): RMSNorm whose gain is rescaled per token by tanh(<x, beta>).

    The paper applies weight decay to alpha and beta (gamma follows the baseline's norm-gain policy), so they
    are listed in `decayed_parameters`, which the optimizer's parameter groups read.
    """

    decayed_parameters = ("alpha", "beta")
    affine_output = False  # the gain is weight + alpha * s(x)

    config_fields = ("seednorm_heads", "seednorm_alpha")

    def __init__(self, dim: int, eps: float = 1e-6, heads: int = 1, alpha0: float = 1.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"SeeDNorm heads={heads} must divide the width {dim}")
        self.eps, self.heads, self.alpha0 = eps, heads, alpha0
        self.weight = nn.Parameter(torch.ones(dim))  # gamma
        self.alpha = nn.Parameter(torch.full((dim,), float(alpha0)))
        self.beta = nn.Parameter(torch.zeros(dim))  # zero: SeeDNorm == RMSNorm at init

    @classmethod
    def from_config(cls, dim, cfg, role):
        return cls(dim, eps=cfg.norm_eps, heads=cfg.seednorm_heads, alpha0=cfg.seednorm_alpha)

    def forward(self, x):
        # The dot product uses the un-normalised x: that is how the input norm survives normalisation.
        xf = at_least_float32(x)
        chunks = xf.unflatten(-1, (self.heads, -1)) * at_least_float32(self.beta).view(self.heads, -1)
        # s in the activation dtype, as RMSNorm returns it: a float32 s would leak float32 into a bf16 model.
        s = torch.tanh(chunks.sum(-1)).repeat_interleave(x.shape[-1] // self.heads, dim=-1).to(x.dtype)
        return (self.weight + self.alpha * s) * rms_normalize(x, self.eps)


def repbn(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
          eta: torch.Tensor, eps: float) -> torch.Tensor:
    """RepBN (Guo et al., ICML 2024, SLAB): BN(x) + eta x, BN normalising each channel by the given statistics."""
    xf = at_least_float32(x)
    bn = gamma * (xf - mean) * torch.rsqrt(var + eps) + beta
    return (bn + eta * xf).to(x.dtype)


def prepbn_lambda(step: int, warmup_steps: int, decay_steps: int) -> float:
    """PRepBN's LN weight (Guo et al., ICML 2024, SLAB): 1 during the warm-up, then linear to 0 over the decay."""
    if step < warmup_steps:
        return 1.0
    if decay_steps == 0:
        return 0.0
    return max(0.0, 1.0 - (step - warmup_steps) / decay_steps)


@register_norm("prepbn")
class PRepBN(Norm):
    """Progressive re-parameterised BatchNorm (Guo, Chen, Tang, Wang; ICML 2024, SLAB):
    lambda LN(x) + (1 - lambda) RepBN(x), lambda decaying from 1 to 0 with the training step.

    RepBN(x) = BN(x) + eta x: BatchNorm over channels with statistics over every token of the batch, in
    float32; running mean and unbiased variance are kept like `nn.BatchNorm1d` (momentum 0.1) on training
    forwards. Training normalises by the batch statistics, which mix positions, future tokens included, so a
    training-mode forward is not causal; eval uses the running statistics, per channel, so no token sees
    another and once lambda = 0 the norm is the per-channel affine map `eval_affine` returns, which the
    `fold-prepbn` transform folds into its readers. lambda is a persistent buffer set by `set_training_step`
    (the trainer calls it per optimizer step, so gradient accumulation does not speed the decay up), so a
    checkpoint saved mid-decay reloads as the model it was. Under DDP the batch statistics are each rank's own,
    as with `nn.BatchNorm1d` without SyncBatchNorm. Not as released: eval mid-decay is the trained mixture with
    running statistics (the released code runs RepBN alone at inference whatever lambda is), so validation
    measures the model being trained; the BN branch runs and its statistics move during the pure-LN warm-up
    too, so they are warm when the decay starts. Casting the model (bf16) casts the running buffers too.
    """

    affine_output = False  # the LN gain multiplies only the lambda part
    batch_statistics = True
    repeat_safe = False
    repeat_hazard = "a norm run at two positions pushes both positions' batch statistics into one running statistic"
    config_fields = ("norm_bias", "prepbn_decay_steps", "prepbn_warmup_steps")
    momentum = 0.1

    @classmethod
    def validate(cls, cfg):
        if cfg.heterogeneous_gains:
            fail("heterogeneous_gains", True, "replaces the pre-sublayer norms by gain-free RMSNorms, so norm='prepbn' "
                 "would only be the final norm: set heterogeneous_gains=False")

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, decay_steps: float = 0.16,
                 warmup_steps: float = 0.0):
        super().__init__()
        self.eps, self.decay_steps, self.warmup_steps = eps, decay_steps, warmup_steps
        self.weight = nn.Parameter(torch.ones(dim))  # the LayerNorm's
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.bn_weight = nn.Parameter(torch.ones(dim))
        self.bn_bias = nn.Parameter(torch.zeros(dim))
        self.eta = nn.Parameter(torch.ones(1))  # 1-D: FSDP2 cannot shard 0-d tensors
        self.register_buffer("running_mean", torch.zeros(dim, dtype=torch.float32))
        self.register_buffer("running_var", torch.ones(dim, dtype=torch.float32))
        self.register_buffer("lam", torch.tensor(1.0, dtype=torch.float32))

    @classmethod
    def from_config(cls, dim, cfg, role):
        return cls(dim, eps=cfg.norm_eps, bias=cfg.norm_bias, decay_steps=cfg.prepbn_decay_steps,
                   warmup_steps=cfg.prepbn_warmup_steps)

    def set_training_step(self, step: int, total_steps: int) -> None:
        self.lam.fill_(prepbn_lambda(step, steps_of(self.warmup_steps, total_steps),
                                     steps_of(self.decay_steps, total_steps)))

    def forward(self, x):
        if self.training:
            xf = at_least_float32(x).reshape(-1, x.shape[-1])
            mean, var = xf.mean(0), xf.var(0, unbiased=False)
            if torch.is_grad_enabled():  # training forwards only, not telemetry
                with torch.no_grad():
                    n = xf.shape[0]
                    m = self.momentum
                    self.running_mean.mul_(1 - m).add_(m * mean)
                    self.running_var.mul_(1 - m).add_(m * var * n / max(n - 1, 1))
        else:
            mean, var = self.running_mean, self.running_var
        bn = repbn(x, mean, var, self.bn_weight, self.bn_bias, self.eta, self.eps)
        ln = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        lam = self.lam.to(x.dtype)
        return lam * ln + (1 - lam) * bn

    @torch.no_grad()
    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, c) of the eval map at lambda = 0, a x + c, in float32 or wider: a = gamma / sqrt(var + eps) + eta,
        c = beta - gamma mean / sqrt(var + eps) over the running statistics."""
        inv = torch.rsqrt(at_least_float32(self.running_var) + self.eps)
        gamma = at_least_float32(self.bn_weight)
        return gamma * inv + self.eta, self.bn_bias - gamma * self.running_mean * inv


@register_norm("identity")
class IdentityNorm(Norm):
    """No norm: x. What a folded PRepBN computes once its affine map is in its readers (`fold-prepbn`)."""

    def __init__(self, dim: int):
        super().__init__()

    @classmethod
    def from_config(cls, dim, cfg, role):
        return cls(dim)

    def forward(self, x):
        return x


@register_norm("frozen")
class FrozenScaleNorm(Norm):
    """LN with a fixed scale (Baroni et al., arXiv 2507.02559 "FakeLN"): gamma * (x - mean) / sigma + beta.

    sigma is a persistent buffer, not learned: the map is affine, so it can be folded into its neighbours.
    """

    config_fields = ("norm_bias", "frozen_norm_sigma")

    def __init__(self, dim: int, sigma: float = 1.0, bias: bool = True):
        super().__init__()
        self.sigma0 = sigma
        self.register_buffer("sigma", torch.tensor(float(sigma)))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    @classmethod
    def from_config(cls, dim, cfg, role):
        return cls(dim, sigma=cfg.frozen_norm_sigma, bias=cfg.norm_bias)

    def forward(self, x):
        y = self.weight * (x - x.mean(-1, keepdim=True)) / self.sigma
        return y + self.bias if self.bias is not None else y


class TrackedStd(nn.Module):
    """The per-token std one use of a FakeLN divides by: measured while live, a tracked constant once fake.

    While live and training, `track` keeps an EMA (momentum m: std <- m std + (1 - m) measured) of the
    per-token sqrt(var + eps), averaged over the batch, separately for the first position of the sequence
    (`std_bos`: it is an attention sink with an atypical norm) and for the others (`std`); NaN until the first
    measurement, which the EMA then starts from. The switches, set by the removal schedule
    (`layerwise.train.norm_removal`): `fake` (divide by the constants), `bos_special` (the first position uses
    `std_bos`), `eot_special` (tokens the caller marks, end-of-text on the value path, use `std_bos` too).
    Stds and switches are persistent buffers, so a checkpoint saved mid-removal reloads as the model it was;
    the forward selects with `torch.where` rather than reading a switch on the host.
    """

    def __init__(self, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("std", torch.tensor(float("nan")))
        self.register_buffer("std_bos", torch.tensor(float("nan")))
        self.register_buffer("is_fake", torch.tensor(False))
        self.register_buffer("bos_is_special", torch.tensor(True))
        self.register_buffer("eot_is_special", torch.tensor(True))

    fake = property(lambda self: bool(self.is_fake), lambda self, on: self.is_fake.fill_(on))
    bos_special = property(lambda self: bool(self.bos_is_special), lambda self, on: self.bos_is_special.fill_(on))
    eot_special = property(lambda self: bool(self.eot_is_special), lambda self, on: self.eot_is_special.fill_(on))

    @torch.no_grad()
    def track(self, x: torch.Tensor, eps: float) -> None:
        """Update the EMAs from x [..., T, d], unless fake (then the constants stay as they are)."""
        per_token = (at_least_float32(x).var(-1, unbiased=False) + eps).sqrt().reshape(-1, x.shape[-2])  # [B, T]
        self._update(self.std_bos, per_token[:, 0].mean())
        if per_token.shape[1] > 1:
            self._update(self.std, per_token[:, 1:].mean())

    def _update(self, buffer: torch.Tensor, measured: torch.Tensor) -> None:
        m = self.momentum
        updated = torch.where(buffer.isnan(), measured, m * buffer + (1 - m) * measured)
        buffer.copy_(torch.where(self.is_fake, buffer, updated))

    def per_token(self, x: torch.Tensor, eot: torch.Tensor | None) -> torch.Tensor:
        """The constant std of each token of x [..., T, d], shaped [..., T, 1]; 1 where none is tracked yet,
        so the unselected branch of a live norm stays finite (NaN would reach the gradients through where)."""
        first = torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        first[..., 0] = True
        special = first & self.bos_is_special
        if eot is not None:
            special = special | (eot & self.eot_is_special)
        std = torch.where(special, self.std_bos, self.std)
        return torch.where(std.isnan(), 1.0, std).unsqueeze(-1).to(x.dtype)


@register_norm("fakeln")
class FakeLayerNorm(LayerNorm):
    """LayerNorm whose per-token std can be swapped for a tracked constant (Baroni et al., arXiv 2507.02559,
    "FakeLayerNorm"): live it is exactly `F.layer_norm`; fake it is gamma * (x - mean) / sigma_t + beta with
    sigma_t a constant per position class (see `TrackedStd`), an affine map once no position is special.

    One gamma/beta may serve several uses, each with its own `TrackedStd` in `uses`: the attention-input norm
    has "qk" (what queries and keys read) and "v" (what values read), so the two can go fake at different
    steps; every other norm has the one use "x". The last step of the removal exports these as
    `FrozenScaleNorm` (`layerwise.train.norm_removal`).
    """

    config_fields = ("norm_bias", "fakeln_momentum", "fakeln_eot_token_id")

    @classmethod
    def validate(cls, cfg):
        if variant_of(cfg, "norm_placement").registered_name != "pre":
            fail("norm", "fakeln", f"splits the Pre-LN attention-input norm; norm_placement={cfg.norm_placement!r} "
                 "has none to split: use norm_placement='pre'")
        for field, plain in (("residual", "standard"), ("value_residual", "none"), ("layernorm_scaling", False)):
            if getattr(cfg, field) != plain:
                fail("norm", "fakeln", f"is wired for {field}={plain!r}, not {getattr(cfg, field)!r}")

    @classmethod
    def layer_class(cls, cfg):
        from .block import FakeLNLayer

        return FakeLNLayer

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, momentum: float = 0.9,
                 uses: tuple[str, ...] = ("x",)):
        super().__init__(dim, eps=eps, bias=bias)
        self.uses = nn.ModuleDict({use: TrackedStd(momentum) for use in uses})

    @classmethod
    def from_config(cls, dim, cfg, role):
        uses = ("qk", "v") if role == "attn_in" else ("x",)
        return cls(dim, eps=cfg.norm_eps, bias=cfg.norm_bias, momentum=cfg.fakeln_momentum, uses=uses)

    def forward(self, x, use: str = "x", eot: torch.Tensor | None = None):
        scale = self.uses[use]
        if self.training and torch.is_grad_enabled():  # training forwards only: not eval, not telemetry
            scale.track(x, self.eps)
        fixed = self.weight * (x - x.mean(-1, keepdim=True)) / scale.per_token(x, eot)
        fixed = fixed + self.bias if self.bias is not None else fixed
        return torch.where(scale.is_fake, fixed, super().forward(x))


def lns_scale(layer_idx: int) -> float:
    """LayerNorm Scaling (Sun et al., NeurIPS 2025): 1/sqrt(i+1) for 0-based layer i, a Python float.

    A float rather than a buffer on purpose: OLMo-core PR #698 lost a buffer-held scale to re-initialisation.
    """
    return 1.0 / math.sqrt(layer_idx + 1)


class LayerNormScaling(Variant):
    """LayerNorm Scaling (Sun et al., NeurIPS 2025), on when `ModelConfig.layernorm_scaling`: the outputs of the
    norms that feed layer i's sublayers are scaled by `lns_scale(i)`. Not a registered name but a switch on top
    of the placement, so it carries its own rules."""

    kind = "depth scaling"
    selector_field = "layernorm_scaling"
    registered_name = "layernorm_scaling"
    # Layer i's scale 1/sqrt(i+1) reads i = the layer's index in the original model (`ModelConfig.depth_index`),
    # recorded in `layer_origin`, so a dropped, repeated or reordered LNS layer rebuilds with its own scale.
    depth_dependent = False

    @classmethod
    def validate(cls, cfg):
        from .placement import PLACEMENTS

        if not variant_of(cfg, "norm_placement").pre_sublayer_norms:
            able = [p.registered_name for p in PLACEMENTS.classes() if p.pre_sublayer_norms]
            fail("layernorm_scaling", True, f"scales pre-sublayer norms, which norm_placement="
                 f"{cfg.norm_placement!r} does not have; use {', '.join(able[:-1])} or {able[-1]}")
        if cfg.scaled_init:
            fail("layernorm_scaling", True, "must not be combined with scaled_init=True: the LNS paper reports "
                 "that depth-scaled init diminishes its effect; set scaled_init=False")
