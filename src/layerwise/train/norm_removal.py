"""LayerNorm removal by fine-tuning (Heimersheim 2024; Baroni et al., arXiv 2507.02559): a Pre-LN model's norms
lose their data-dependent scale one at a time while the model trains on, until none is left.

Each LayerNorm becomes a `FakeLayerNorm` (norm="fakeln"), which tracks its per-token std while live and divides
by the tracked constant once switched. The schedule switches, in order: every MLP-input norm (ln_2) one layer
at a time, then the attention-input norm's query/key use (ln_1 Q/K) per layer, then its value use (ln_1 V) per
layer, then the final norm, then stops giving end-of-text tokens (value use) the first position's std, then
stops giving the first position its own std. `NormRemoval` applies it through the trainer's callbacks; `freeze`
turns the result into a norm="frozen" model, which `as_gpt2_layernorm` can write as a stock GPT-2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserError
from ..model import LayerwiseForCausalLM
from ..nn.norms import NORMS, FrozenScaleNorm, Norm, TrackedStd
from .trainer import TrainerCallback


@dataclass(frozen=True)
class ReferenceSchedule:
    """A published schedule as fractions of its run, scaled to any run length and depth by `events`.

    In the reference run of `steps` steps on a `layers`-layer model, the per-layer events fill the steps from
    `start` to `final` (the final norm's step), each layer's ln_2, ln_1 Q/K and ln_1 V taking `gaps` steps;
    end-of-text and first-position special stds are dropped at `eot` and `bos`.
    """

    name: str
    steps: int
    layers: int
    start: int
    gaps: tuple[int, int, int]  # ln_2, ln_1 Q/K, ln_1 V
    final: int
    eot: int
    bos: int
    source: str
    training: dict  # the reference's optimisation, as TrainConfig fields (warmup as a fraction of the run)

    def events(self, total_steps: int, n_layers: int, tokens_per_step: int | None = None) -> list[tuple[int, str]]:
        """(step, what) for a run of `total_steps` on `n_layers` layers, in removal order. The start, final-norm,
        EOT and BOS events keep their fraction of the run; between start and the final norm each per-layer event
        takes its phase's gap, shrunk or stretched so the phases fill the same fraction. At the reference length
        and depth this is the reference schedule, step for step. Every event gets its own step, else UserError
        (with the run length that would give them their own steps)."""
        events = self._placed(total_steps, n_layers)
        if not self._separate(events, total_steps):
            needed = next(t for t in range(total_steps + 1, 100 * total_steps + 10**4)
                          if self._separate(self._placed(t, n_layers), t))
            tokens = f" = {needed * tokens_per_step:,} tokens" if tokens_per_step else ""
            raise UserError(f"the {self.name} schedule needs a step of its own for each of its {len(events)} "
                            f"removal events on {n_layers} layers, which {total_steps} steps do not give; raise "
                            f"--max-tokens to at least {needed} steps{tokens}")
        return events

    def _placed(self, total_steps: int, n_layers: int) -> list[tuple[int, str]]:
        scale = total_steps / self.steps
        start, final = self.start * scale, self.final * scale
        names = [f"{phase}.{i}" for phase in ("ln2", "ln1qk", "ln1v") for i in range(n_layers)]
        weights = [gap for gap in self.gaps for _ in range(n_layers)]
        steps, done = [], 0
        for w in weights:
            steps.append(start + (final - start) * done / sum(weights))
            done += w
        steps += [final, self.eot * scale, self.bos * scale]
        # The 1e-9 keeps a step that is whole on paper (20 + 84 * 7/84) from losing one to float rounding.
        return [(math.floor(s + 1e-9), what) for s, what in zip(steps, [*names, "final", "eot", "bos"])]

    @staticmethod
    def _separate(events: list[tuple[int, str]], total_steps: int) -> bool:
        taken = [s for s, _ in events]
        return len(set(taken)) == len(taken) and taken[-1] < total_steps


SCHEDULES = {
    s.name: s for s in (
        # config.py "standard" GPT-2 small: ln_2 at 20 + 2i, ln_1 Q/K at 44 + 2i, ln_1 V at 68 + 3i, ln_f at 104.
        ReferenceSchedule("baroni", 300, 12, 20, (2, 2, 3), 104, 106, 116, "Baroni et al. 2025, GPT-2 small",
                          dict(lr=6e-4, min_lr_ratio=0.5, warmup=20 / 300, weight_decay=0.01)),
        # ln2_i at 200 + 20i, ln1QK_i at 440 + 20i, ln1V_i at 680 + 30i, ln_f at 1040, EOT 1060, BOS 1160.
        ReferenceSchedule("heimersheim", 2000, 12, 200, (20, 20, 30), 1040, 1060, 1160, "Heimersheim 2024",
                          dict(lr=6e-4, min_lr_ratio=0.1, warmup=100 / 2000, weight_decay=0.1)),
    )
}


def schedule(name: str) -> ReferenceSchedule:
    if name not in SCHEDULES:
        raise UserError(f"--schedule {name!r} is not one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def _decoder(model: nn.Module):
    return getattr(model, "model", model)


def tracked_stds(model: nn.Module) -> dict[str, TrackedStd]:
    """Every use of every FakeLN by the name the schedule gives it: ln2.i, ln1qk.i, ln1v.i, final."""
    decoder = _decoder(model)
    uses = {"final": decoder.norm.uses["x"]}
    for i, layer in enumerate(decoder.layers):
        uses[f"ln2.{i}"] = layer.mlp.norm_in.uses["x"]
        uses[f"ln1qk.{i}"] = layer.attn.norm_in.uses["qk"]
        uses[f"ln1v.{i}"] = layer.attn.norm_in.uses["v"]
    return uses


def set_removal_state(model: nn.Module, events: list[tuple[int, str]], step: int) -> None:
    """The switches of every FakeLN as they are at `step`: an event on step s applies from step s on. A
    function of the step alone: a resumed run sets the ones its checkpoint holds again."""
    uses = tracked_stds(model)
    for at, what in events:
        happened = step >= at
        if what == "eot":
            for scale in uses.values():
                scale.eot_special = not happened
        elif what == "bos":
            for scale in uses.values():
                scale.bos_special = not happened
        else:
            uses[what].fake = happened


def check_removable(config) -> None:
    """UserError naming what a model has that the removal does not handle; it takes Pre-LN LayerNorm models."""
    wrong = [(field, getattr(config, field), want) for field, want in (
        ("norm", "layernorm"), ("norm_placement", "pre"), ("residual", "standard"), ("value_residual", "none"),
        ("layernorm_scaling", False), ("qk_norm", False), ("embedding_norm", False), ("layer_order", None))
        if getattr(config, field) != want]
    if wrong:
        field, value, want = wrong[0]
        raise UserError(f"remove-norms takes Pre-LN LayerNorm models; ModelConfig.{field}={value!r} is not "
                        f"supported (it needs {field}={want!r})")


def with_fake_norms(model: LayerwiseForCausalLM, eot_token_id: int | None = None) -> LayerwiseForCausalLM:
    """The Pre-LN LayerNorm `model` with every norm a live FakeLN: the same function, the same tensors
    (copied), plus the tracked stds."""
    check_removable(model.config)
    config = _with_norm(model.config, "fakeln", fakeln_eot_token_id=eot_token_id)
    fake = LayerwiseForCausalLM(config).to(next(model.parameters()).dtype)
    missing, unexpected = fake.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".uses." in key for key in missing), (missing, unexpected)
    fake.generation_config = model.generation_config
    return fake.train(model.training)


def _with_norm(config, norm: str, **changes) -> ModelConfig:
    """`config` with norm=`norm` and `changes`; the fields only the old norm reads go back to their defaults
    (a field no selected variant reads draws a warning)."""
    keep = set(ModelConfig.__dataclass_fields__) - {"transformers_version", "architectures"}
    fields = {k: v for k, v in config.to_dict().items() if k in keep}
    for field in set(NORMS.get(config.norm).config_fields) - set(NORMS.get(norm).config_fields):
        fields[field] = ModelConfig.__dataclass_fields__[field].default
    return ModelConfig(**{**fields, "norm": norm, **changes})


class NormRemoval(TrainerCallback):
    """The trainer callback that runs a removal schedule: `prepare` makes the model's norms FakeLNs (an HF
    GPT-2 is converted to layerwise first), `on_step_start` sets their switches for the step."""

    def __init__(self, name: str, eot_token_id: int | None = None):
        self.schedule = schedule(name)
        self.eot_token_id = eot_token_id
        self.events: list[tuple[int, str]] = []

    def prepare(self, model: nn.Module, train_config) -> nn.Module:
        if getattr(model.config, "model_type", None) == "gpt2":
            from ..arch.state_dict import hf_to_layerwise

            model = hf_to_layerwise(model)
        if not isinstance(model, LayerwiseForCausalLM):
            raise UserError(f"remove-norms takes layerwise Pre-LN models and GPT-2, not "
                            f"{getattr(model.config, 'model_type', type(model).__name__)!r}")
        model = with_fake_norms(model, self.eot_token_id)
        self.events = self.schedule.events(train_config.total_steps, model.config.n_layers,
                                           train_config.tokens_per_step)
        return model

    def on_step_start(self, step: int, model: nn.Module) -> None:
        set_removal_state(model, self.events, step)


@torch.no_grad()
def freeze(model: LayerwiseForCausalLM) -> LayerwiseForCausalLM:
    """The FakeLN `model` with every norm switched (no special positions) as a norm="frozen" model computing
    the same function: each norm's sigma is its tracked std (ln_1's is the Q/K use's). The value use's own std
    is folded into v_proj: with s = sigma_qk / sigma_v, W' = s W and b' = b + (1 - s) W beta, adding a value
    bias (qkv_bias, the query and key biases zero) when the model has none."""
    live = [name for name, scale in tracked_stds(model).items()
            if not scale.fake or scale.bos_special or scale.eot_special]
    if live:
        raise ValueError(f"freeze needs every FakeLN use switched and no special position; not yet: {live}")
    cfg = model.config
    add_value_bias = cfg.norm_bias and not (cfg.bias or cfg.qkv_bias)
    frozen = LayerwiseForCausalLM(_with_norm(cfg, "frozen", qkv_bias=cfg.qkv_bias or add_value_bias))
    frozen.to(next(model.parameters()).dtype)
    added = {".sigma"} | ({"q_proj.bias", "k_proj.bias", "v_proj.bias"} if add_value_bias else set())
    missing, unexpected = frozen.load_state_dict(
        {k: v for k, v in model.state_dict().items() if ".uses." not in k}, strict=False)
    assert not unexpected and all(key.endswith(tuple(added)) for key in missing), (missing, unexpected)
    source, target = _decoder(model), _decoder(frozen)
    target.norm.sigma.copy_(source.norm.uses["x"].std)
    for layer, new in zip(source.layers, target.layers):
        new.mlp.norm_in.sigma.copy_(layer.mlp.norm_in.uses["x"].std)
        ln_1 = layer.attn.norm_in
        new.attn.norm_in.sigma.copy_(ln_1.uses["qk"].std)
        s = ln_1.uses["qk"].std / ln_1.uses["v"].std
        v, new_v = layer.attn.fn.v_proj, new.attn.fn.v_proj
        new_v.weight.copy_(s * v.weight)
        if add_value_bias:
            new.attn.fn.q_proj.bias.zero_()
            new.attn.fn.k_proj.bias.zero_()
            new_v.bias.zero_()
        if ln_1.bias is not None:
            new_v.bias.add_((1 - s) * (v.weight @ ln_1.bias))
    frozen.generation_config = model.generation_config
    return frozen.eval()


def data_dependent_norms(model: nn.Module) -> list[str]:
    """The names of the modules of `model` that normalise by a statistic of their input, by type: every
    layerwise norm but `FrozenScaleNorm`, and any torch or HF LayerNorm/RMSNorm class (so the stock GPT-2 of
    `as_gpt2_layernorm` counts: its eps of 1e12 only makes the statistic negligible)."""
    return [name for name, m in model.named_modules()
            if (isinstance(m, Norm) and not isinstance(m, FrozenScaleNorm))
            or (not isinstance(m, Norm) and ("LayerNorm" in type(m).__name__ or "RMSNorm" in type(m).__name__))]


@torch.no_grad()
def as_gpt2_layernorm(frozen: LayerwiseForCausalLM, eps: float = 1e12) -> LayerwiseForCausalLM:
    """The frozen model as a norm="layernorm" model that a stock GPT-2 can hold, by the released checkpoints'
    trick: every LayerNorm gets eps = 1e12 and gamma * sqrt(eps) / sigma, so (x - mean) / sqrt(var + eps)
    ~= (x - mean) / sqrt(eps), relative error var / (2 eps) (5e-9 for a std of 100)."""
    model = LayerwiseForCausalLM(_with_norm(frozen.config, "layernorm", norm_eps=eps))
    model.to(next(frozen.parameters()).dtype)
    model.load_state_dict({k: v for k, v in frozen.state_dict().items() if not k.endswith(".sigma")})
    for (_, norm), (_, new) in zip(_norms(frozen), _norms(model)):
        new.weight.copy_(norm.weight * math.sqrt(eps) / norm.sigma)
    model.generation_config = frozen.generation_config
    return model.eval()


def _norms(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Norm)]
