"""The running-statistics norms: Unified Normalization (`un`) and PowerNorm (`powernorm`).

Both divide each channel by a quadratic mean over the batch, psi^2_c = mean of x_c^2 over every token of the
batch (all dims but the last; our training batches have no padding, so every token counts), computed in
float32, and keep running statistics for eval. What follows from that:

- In training the statistic mixes the batch's positions, future tokens included, so a training-mode forward
  is not causal and cached incremental decoding in training mode differs from a full forward. In eval each
  layer is a per-channel affine map of its input (PowerNorm: after its per-token GroupScaling), so eval mixes
  no tokens and cached decoding equals the full forward.
- The phase (warm-up or not; UN's gradient compensation on or off) is a function of the optimizer step the
  trainer sets through `set_training_step` (`layerwise.nn.schedule`), held in persistent buffers; forward
  calls do not advance it, so gradient accumulation does not shorten a warm-up. Outside the trainer nothing
  sets the step and a module keeps the phase its buffers hold (a fresh one: warm-up).
- The running statistics, the window of recent batch statistics and the backward's EMAs are state of the
  forward and backward calls, not of the step: they are persistent buffers, so checkpoints and HF save/load
  keep them and a resumed run continues them exactly. Each micro-batch updates them, as in the released code,
  but in the custom Functions' backwards, so a compiled backward reads the buffers as the forward did; a
  forward without a backward through the norm (telemetry, eval) updates nothing.
- Under data parallelism the batch statistics are each rank's own, like nn.BatchNorm1d without SyncBatchNorm.
  DDP (its default broadcast_buffers) starts every forward from rank 0's buffers, so the running statistics
  and EMAs that persist are rank 0's; under FSDP each rank keeps its own.
- The backward of each is the paper's approximate one (a custom autograd Function), not the gradient of the
  forward; gamma and beta sit outside the Function and get their exact gradients.
"""

from __future__ import annotations

import torch
from torch import nn

from ..numerics import at_least_float32
from .norms import Norm, register_norm
from .schedule import steps_of

MOMENTUM = 0.9  # both papers' EMA momentum, on the old value: ema <- 0.9 ema + 0.1 new
UN_WINDOW = 4  # UN: batch statistics in the window whose geometric mean normalises after warm-up
UN_UNCOMPENSATED_STEPS = 1000  # UN: r = 1 for the first max(1000, warm-up) steps
UN_R_BOUND = 5.0  # UN: r is clamped to [1/5, 5]


def batch_quadratic_mean(x: torch.Tensor) -> torch.Tensor:
    """psi^2: the per-channel mean of x^2 over every token of the batch, float32, shape [d]."""
    return at_least_float32(x).detach().pow(2).reshape(-1, x.shape[-1]).mean(0)


def mean_over_tokens(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).mean(0)


def geometric_mean(window: torch.Tensor) -> torch.Tensor:
    """The per-channel geometric mean of the rows of `window` [W, d], through logs (no overflow of a product)."""
    return window.log().mean(0).exp()


def un_backward(g: torch.Tensor, z: torch.Tensor, var: torch.Tensor, eps: float, ema_gz: torch.Tensor) -> torch.Tensor:
    """Unified Normalization (Yang et al., ACM MM 2022) backward: dL/dx = (g - m z) / sqrt(psi^2 + eps)."""
    return (g - ema_gz * z) * torch.rsqrt(var + eps)


def powernorm_backward(g: torch.Tensor, z: torch.Tensor, batch_var: torch.Tensor, eps: float,
                       ema_gz: torch.Tensor) -> torch.Tensor:
    """PowerNorm (Shen et al., ICML 2020) backward: dL/dx = (g - (1 - a_bkw) ema_gz z) / sqrt(psi^2_batch + eps)."""
    return (g - (1 - MOMENTUM) * ema_gz * z) * torch.rsqrt(batch_var + eps)


class UNNormalize(torch.autograd.Function):
    """z = x / sqrt(var + eps) forward; UN's compensated backward, which also advances the gz window and EMA,
    pushes this batch's psi^2 into the window and moves the running psi^2 towards `var`.

    g = r dL/dz (dL/dz = gamma dL/dy); gz = mean over tokens of g z enters a window of the last W; m is the EMA
    (momentum 0.9) of the window's mean once `use_window`, of gz itself before; then `un_backward` with the
    updated m. The released code also scales gamma's gradient by r; here gamma is outside and gets dL/dy z.
    """

    @staticmethod
    def forward(ctx, x, var, r, eps, ema_gz, gz_window, gz_filled, use_window, running_var, window, window_filled,
                psi2):
        ctx.eps = eps
        ctx.save_for_backward(x, var, r, ema_gz, gz_window, gz_filled, use_window, running_var, window,
                              window_filled, psi2)
        return x * torch.rsqrt(var + eps)

    @staticmethod
    def backward(ctx, grad_z):
        (x, var, r, ema_gz, gz_window, gz_filled, use_window, running_var, window_of_psi2, window_filled,
         psi2) = ctx.saved_tensors
        z = x * torch.rsqrt(var + ctx.eps)
        g = grad_z * r
        gz = mean_over_tokens(g * z)
        window = torch.cat([gz_window[1:], gz[None]])
        filled = torch.clamp(gz_filled + 1, max=UN_WINDOW)
        m = torch.where(use_window & (filled >= UN_WINDOW), window.mean(0), gz)
        gz_window.copy_(window)
        gz_filled.copy_(filled)
        ema_gz.copy_(MOMENTUM * ema_gz + (1 - MOMENTUM) * m)
        # Here, not in the forward: r and var are functions of the buffers before this batch, and torch.compile's
        # partitioner may recompute them in the backward from the buffers; a forward-side update would have
        # changed them by then (compiled dL/dx off by up to 2.6 on one norm). Eager values are the same either way.
        window_of_psi2.copy_(torch.cat([window_of_psi2[1:], psi2[None]]))
        window_filled.copy_(torch.clamp(window_filled + 1, max=UN_WINDOW))
        running_var.copy_(MOMENTUM * running_var + (1 - MOMENTUM) * var)
        return (un_backward(g, z, var, ctx.eps, ema_gz), None, None, None, None, None, None, None, None, None, None,
                None)


class PowerNormalize(torch.autograd.Function):
    """z = x / sqrt(var + eps) forward (var: the batch psi^2 in warm-up, the running one after); PowerNorm's
    backward, which divides by the batch psi^2 in both phases and then adds mean over tokens of (its g - (1 -
    a_bkw) ema_gz z) times z to ema_gz, an undecayed sum as released (with mean z^2 ~ 1 it acts as an EMA),
    and moves the running psi^2 towards the batch's."""

    @staticmethod
    def forward(ctx, x, var, batch_var, eps, ema_gz, running_var):
        ctx.eps = eps
        ctx.save_for_backward(x, var, batch_var, ema_gz, running_var)
        return x * torch.rsqrt(var + eps)

    @staticmethod
    def backward(ctx, grad_z):
        x, var, batch_var, ema_gz, running_var = ctx.saved_tensors
        z = x * torch.rsqrt(var + ctx.eps)
        approximate = grad_z - (1 - MOMENTUM) * ema_gz * z
        grad_x = powernorm_backward(grad_z, z, batch_var, ctx.eps, ema_gz)
        ema_gz.add_(mean_over_tokens(approximate * z))
        # Here, not in the forward, for the reason given in `UNNormalize.backward`: after warm-up `var` is the
        # running psi^2, which the compiled backward may read from the buffer.
        running_var.copy_(MOMENTUM * running_var + (1 - MOMENTUM) * batch_var)
        return grad_x, None, None, None, None, None


class RunningStatisticsNorm(Norm):
    """Base of the two: gamma, beta, the running psi^2 (init 1, as released) and the warm-up flag."""

    warmup_field = ""
    default_warmup = 0.0
    batch_statistics = True
    repeat_safe = False
    repeat_hazard = ("a norm run at two positions pushes both positions' batch statistics into one running "
                     "statistic and window")

    @classmethod
    def from_config(cls, dim, cfg, role):
        return cls(dim, eps=cfg.norm_eps, warmup=getattr(cfg, cls.warmup_field))

    def __init__(self, dim: int, eps: float = 1e-5, warmup: float | None = None):
        super().__init__()
        self.eps = eps
        self.warmup = self.default_warmup if warmup is None else warmup
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("ema_gz", torch.zeros(dim))
        self.register_buffer("in_warmup", torch.tensor(True))

    def set_training_step(self, step: int, total_steps: int) -> None:
        self.in_warmup.fill_(step < steps_of(self.warmup, total_steps))

    def affine(self, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.weight * z.to(dtype) + self.bias


@register_norm("un")
class UnifiedNorm(RunningStatisticsNorm):
    """Unified Normalization (Yang et al., ACM MM 2022): gamma x / sqrt(psi^2 + eps) + beta, psi^2 per channel.

    Training: psi^2 is the batch's during warm-up (`un_warmup_steps`); after it, once the window of the last
    W = 4 batch statistics is full, their geometric mean. The running psi^2 is the EMA (0.9 on the old value)
    of the psi^2 used; eval divides by it. The backward is `UNNormalize`, with gradient compensation
    r = clamp(sqrt((psi^2 + eps) / (running + eps)), 1/5, 5) (running before this batch's update), r = 1 for the
    first max(1000, warm-up) steps. The released outlier filtration (recommended for CV, off for NLP) is not
    implemented. Statistics, window and EMAs: see `layerwise.nn.running_norms`.
    """

    config_fields = ("un_warmup_steps",)
    warmup_field = "un_warmup_steps"
    default_warmup = 4000

    def __init__(self, dim: int, eps: float = 1e-5, warmup: float | None = None):
        super().__init__(dim, eps=eps, warmup=warmup)
        self.register_buffer("window", torch.ones(UN_WINDOW, dim))
        self.register_buffer("window_filled", torch.tensor(0))
        self.register_buffer("gz_window", torch.zeros(UN_WINDOW, dim))
        self.register_buffer("gz_filled", torch.tensor(0))
        self.register_buffer("compensated", torch.tensor(False))

    def set_training_step(self, step: int, total_steps: int) -> None:
        super().set_training_step(step, total_steps)
        self.compensated.fill_(step >= max(UN_UNCOMPENSATED_STEPS, steps_of(self.warmup, total_steps)))

    def forward(self, x):
        xf = at_least_float32(x)
        if not self.training:
            return self.affine(xf * torch.rsqrt(self.running_var + self.eps), x.dtype)
        psi2 = batch_quadratic_mean(x)
        window = torch.cat([self.window[1:], psi2[None]])
        filled = torch.clamp(self.window_filled + 1, max=UN_WINDOW)
        use_window = ~self.in_warmup & (filled >= UN_WINDOW)
        var = torch.where(use_window, geometric_mean(window), psi2)
        ratio = torch.sqrt((var + self.eps) / (self.running_var + self.eps))
        r = torch.where(self.compensated, ratio.clamp(1 / UN_R_BOUND, UN_R_BOUND), torch.ones_like(ratio))
        z = UNNormalize.apply(xf, var, r, self.eps, self.ema_gz, self.gz_window, self.gz_filled, ~self.in_warmup,
                              self.running_var, self.window, self.window_filled, psi2)
        return self.affine(z, x.dtype)


@register_norm("powernorm")
class PowerNorm(RunningStatisticsNorm):
    """PowerNorm (Shen et al., ICML 2020): GroupScaling s = x / sqrt(mean_d(x^2) + eps) per token (one group,
    parameter-free), then gamma s / sqrt(psi^2 + eps) + beta with psi^2 per channel of s.

    Training: psi^2 is the batch's during warm-up (`powernorm_warmup_steps`) and the running one after it;
    the running psi^2 is the EMA (alpha_fwd 0.9 on the old value) of the batch psi^2 and eval divides by it.
    The backward is `PowerNormalize` (alpha_bkw 0.9). The released code also replaces the running psi^2 by a
    cumulative mean of the batch statistics before each EMA update during warm-up; that is not copied (its
    lasting effect is only the EMA's starting value). Statistics and EMAs: see `layerwise.nn.running_norms`.
    """

    config_fields = ("powernorm_warmup_steps",)
    warmup_field = "powernorm_warmup_steps"
    default_warmup = 10000

    def group_scaling(self, x: torch.Tensor) -> torch.Tensor:
        xf = at_least_float32(x)
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        s = self.group_scaling(x)
        if not self.training:
            return self.affine(s * torch.rsqrt(self.running_var + self.eps), x.dtype)
        psi2 = batch_quadratic_mean(s)
        var = torch.where(self.in_warmup, psi2, self.running_var)
        z = PowerNormalize.apply(s, var, psi2, self.eps, self.ema_gz, self.running_var)
        return self.affine(z, x.dtype)
