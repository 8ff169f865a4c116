"""`TrainConfig`: everything a training run needs besides the model config, from YAML and CLI overrides."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError

SCHEDULES = ("cosine", "wsd", "constant")
WANDB_MODES = ("off", "offline", "online")
DEFAULT_MODEL = {"preset": "pre-rmsnorm", "size": "tiny"}
# Fields that change where a run is written, how often it reports or how it is executed, but not the model
# it trains: a resume or a reused `compare` run may differ in these and nothing else.
BOOKKEEPING_FIELDS = frozenset({"out", "resume", "overwrite", "log_every", "eval_every", "telemetry_every",
                                "ckpt_every", "keep_checkpoints", "max_bad_steps", "device", "compile", "fsdp",
                                "tensorboard", "wandb", "threads"})
# How the model is named: the resolved model config is compared instead (one model can be named by a preset or
# by explicit fields), and an init_from model by the content fingerprint of its files (it can move or be
# named by a relative path).
MODEL_INPUT_FIELDS = frozenset({"model", "init_from"})


def parse_count(value: int | float | str) -> int:
    """'2M' -> 2_000_000, '500k' -> 500_000, '1.5B' -> 1_500_000_000; plain numbers pass through."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", value)
    if not match:
        raise UserError(f"cannot read {value!r} as a count; use e.g. 2000000, 500k, 2M or 1.5B")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


@dataclass
class TrainConfig:
    # Model: `preset` at `size`, then any ModelConfig fields on top; or, instead, `init_from`.
    model: dict[str, Any] = field(default_factory=dict)
    # Continue training this model (an HF folder, a .gguf file, a layerwise run or checkpoint) instead of a new
    # one from `model`; the data is then tokenized with its tokenizer.
    init_from: str | None = None
    lora_rank: int = 0  # with init_from: train LoRA adapters of this rank (peft) instead of all weights; 0 = all
    # Data: a built corpus folder, llm.c shards, a text file/folder or a datasets folder; None = Shakespeare.
    data: str | None = None
    tokenizer_vocab_size: int = 4096  # BPE vocabulary when layerwise builds the default corpus (not the model's)
    out: str = "runs/run"
    # Budget and batch: the global batch stays fixed across world sizes (accumulation absorbs the rest).
    max_tokens: int = 2_000_000
    batch_size: int = 16  # sequences per optimizer step, over all processes
    micro_batch_size: int | None = None  # sequences per forward per process; None = batch_size / world size
    seq_len: int = 256
    # Optimizer and schedule
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.05  # a fraction of the steps if < 1, else a step count
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr
    weight_decay: float = 0.1
    decay_all: bool = False  # also decay norms, biases, embeddings and AttnRes pseudo-queries
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # Evaluation, telemetry, checkpoints
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 16
    telemetry_every: int = 50
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    resume: str = "none"  # none | auto | a checkpoint folder
    overwrite: bool = False  # a fresh run into an existing run folder moves the old run aside to <out>.old-<time>
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    # Execution
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on GPU, float32 on CPU) | float32 | bfloat16
    compile: bool = False
    fsdp: bool = False  # FSDP2 instead of DDP when launched with torchrun
    tensorboard: bool = True
    wandb: str = "off"  # off | offline (RUN/wandb/, no network) | online: also log to Weights & Biases
    threads: int = 0  # CPU threads for torch; 0 = torch's default

    def __post_init__(self):
        if self.init_from is None:
            self.model = model_mapping(self.model)
        elif self.model:
            raise UserError(f"TrainConfig.model={self.model!r} cannot be combined with init_from={self.init_from!r} "
                            "(the model comes from init_from); remove model: (and --preset, --size, --set model.*)")
        if isinstance(self.max_tokens, (str, int, float)) and not isinstance(self.max_tokens, bool):
            self.max_tokens = parse_count(self.max_tokens)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # YAML 1.1 reads "3e-4" as a string; accept it wherever the field is a float.
            if hints[f.name] is float and isinstance(value, (str, int)) and not isinstance(value, bool):
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    raise UserError(f"TrainConfig.{f.name}={value!r} is not a number") from None
            self._check_type(f.name, hints[f.name])
        self.validate()

    def _check_type(self, name: str, hint) -> None:
        """Exact types: bool("no") is True and int(True) is 1, so neither a string nor a bool may stand in."""
        value = getattr(self, name)
        allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        for kind in allowed:
            kind = typing.get_origin(kind) or kind
            if kind is type(None) and value is None:
                return
            if kind is bool and isinstance(value, bool):
                return
            if kind in (int, float, str, dict) and isinstance(value, kind) and not isinstance(value, bool):
                return
        words = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                 dict: "a mapping of field: value", type(None): "null"}
        expected = " or ".join(words[typing.get_origin(k) or k] for k in allowed)
        raise UserError(f"TrainConfig.{name}={value!r} must be {expected}")

    def validate(self) -> None:
        def fail(name, why):
            raise UserError(f"TrainConfig.{name}={getattr(self, name)!r} {why}")

        for name in ("max_tokens", "batch_size", "seq_len", "eval_batches", "log_every", "eval_every",
                     "telemetry_every", "ckpt_every", "keep_checkpoints", "max_bad_steps", "tokenizer_vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be a positive integer")
        if self.lora_rank < 0:
            fail("lora_rank", "must be >= 0 (0 trains all weights)")
        if self.lora_rank and self.init_from is None:
            fail("lora_rank", "needs init_from: LoRA adapts a trained model (pass --init-from MODEL)")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            fail("micro_batch_size", "must be a positive integer or None")
        if self.threads < 0:
            fail("threads", "must be >= 0 (0 = torch's default)")
        if not self.lr > 0:
            fail("lr", "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", "must lie in [0, 1]")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"is not one of {', '.join(SCHEDULES)}")
        if self.wandb not in WANDB_MODES:
            fail("wandb", f"is not one of {', '.join(WANDB_MODES)}")
        if not 0 < self.decay_fraction <= 1:
            fail("decay_fraction", "must lie in (0, 1]")
        if self.warmup < 0:
            fail("warmup", "must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            fail("device", "is not one of auto, cpu, cuda")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            fail("dtype", "is not one of auto, float32, bfloat16")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        return -(-self.max_tokens // self.tokens_per_step)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        for name in unknown:
            if name in MOVED:
                raise UserError(f"TrainConfig.{name} is now {MOVED[name]}")
        if unknown:
            raise UserError(f"TrainConfig got unknown field(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise UserError(f"{path}:{_where(err)} is not valid YAML ({getattr(err, 'problem', None) or err}); "
                                "fix the file (fields are `name: value`, one per line)") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of TrainConfig fields")
        if LEGACY_MODEL_KEYS & set(data):
            data = convert_legacy(data)
        return cls.from_dict({**data, **overrides})

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def result_fields(self) -> dict[str, Any]:
        """The training fields that change the trained model (the model itself is compared resolved)."""
        return {k: v for k, v in self.to_dict().items() if k not in BOOKKEEPING_FIELDS | MODEL_INPUT_FIELDS}


def _where(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f"{mark.line + 1}:{mark.column + 1}:" if mark is not None else ""


def model_mapping(model: Any) -> dict[str, Any]:
    """`model:` with its preset and size filled in; its other keys must be ModelConfig fields."""
    from ..config import field_names
    from ..presets import PRESETS, SIZES

    if not isinstance(model, dict):
        raise UserError(f"TrainConfig.model={model!r} must be a mapping, e.g. model: {{preset: lns, size: tiny}}")
    model = {**DEFAULT_MODEL, **model}
    if model["preset"] not in PRESETS:
        raise UserError(f"TrainConfig.model.preset={model['preset']!r} is not a preset; valid: {', '.join(PRESETS)}")
    if model["size"] not in SIZES:
        raise UserError(f"TrainConfig.model.size={model['size']!r} is not a size; valid: {', '.join(SIZES)}")
    unknown = sorted(set(model) - set(DEFAULT_MODEL) - set(field_names()))
    if unknown:
        raise UserError(f"TrainConfig.model got unknown field(s) {', '.join(unknown)}; it takes preset, size and "
                        "ModelConfig fields (`layerwise train --dry-run` prints them)")
    return model


MOVED = {
    "vocab_size": "tokenizer_vocab_size (the BPE vocabulary of the default corpus); the model's is model.vocab_size",
    "preset": "model.preset (e.g. model: {preset: lns, size: tiny}, or --preset lns)",
    "size": "model.size (e.g. model: {preset: lns, size: tiny}, or --size tiny)",
    "model_config": "the model: mapping (preset, size and ModelConfig fields)",
}
# Before the `model:` mapping, train.yaml (and every run folder's copy) gave the model at the top level.
LEGACY_MODEL_KEYS = {"preset", "size", "model_config"}


def convert_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """A train.yaml written before the `model:` mapping, in today's form. It had `preset`/`size` at the top
    level, `model:` as ModelConfig overrides, `model_config:` as a model YAML that replaced preset and size,
    and `vocab_size` for the BPE vocabulary."""
    data = dict(data)
    model = {"preset": data.pop("preset", DEFAULT_MODEL["preset"]), "size": data.pop("size", DEFAULT_MODEL["size"])}
    model_file = data.pop("model_config", None)
    if model_file is not None:
        with open(model_file) as f:
            fields = yaml.safe_load(f) or {}
        # ModelConfig.from_yaml read a file without `preset` as plain fields over ModelConfig's defaults,
        # which are pre-rmsnorm at 124m.
        preset = fields.pop("preset", None)
        model = {"preset": preset or "pre-rmsnorm", "size": fields.pop("size", "tiny" if preset else "124m"),
                 **fields}
    data["model"] = {**model, **(data.get("model") or {})}
    return with_current_names(data)


# Fields renamed since a train.yaml or a checkpoint's trainer state could have been written.
RENAMED = {"vocab_size": "tokenizer_vocab_size"}


def with_current_names(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (TrainConfig fields as once saved) with renamed fields under their current names."""
    return {RENAMED.get(name, name): value for name, value in data.items()}


def _scalar(raw: str):
    value = yaml.safe_load(raw)
    if isinstance(value, str) and re.fullmatch(r"[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?", value):
        return float(value)  # YAML 1.1 leaves 3e-4 a string
    return value


def apply_overrides(cfg: TrainConfig, assignments: list[str]) -> TrainConfig:
    """`key=value` overrides, YAML-typed; `model.<key>=value` sets model.preset, model.size or a ModelConfig
    field."""
    data = cfg.to_dict()
    for item in assignments:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. lr=3e-4 or model.n_layers=6)")
        key, raw = item.split("=", 1)
        try:
            value = _scalar(raw)
        except yaml.YAMLError:
            raise UserError(f"--set {item}: cannot read {raw!r} as a YAML value; quote strings") from None
        if key.startswith("model."):
            data["model"] = {**data["model"], key[len("model."):]: value}
        else:
            data[key] = value
    return TrainConfig.from_dict(data)
