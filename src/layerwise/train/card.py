"""What a training run says on the model cards of the folders it writes: each checkpoint (a loadable HF
folder, the last one the run's final model) and a remove-norms export. Laid out by `layerwise.model_card`."""

from __future__ import annotations

import math

from ..model_card import code, escaped, hf_loading, render_card
from .checkpoint import LORA_MARK
from .config import TrainConfig


def training_facts(cfg: TrainConfig, step: int) -> list[tuple[str, str]]:
    """Base model, recipe, data and tokens of `cfg`'s run after `step` optimizer steps, as card facts."""
    if cfg.init_from is not None:
        base = code(cfg.init_from) + (f", LoRA rank {cfg.lora_rank} adapters merged in" if cfg.lora_rank else "")
    else:
        fields = ", ".join(f"{escaped(k)}={code(v)}" for k, v in cfg.model.items() if k not in ("preset", "size"))
        base = (f"none (trained from scratch): preset {code(cfg.model['preset'])} at size {code(cfg.model['size'])}"
                + (f" with {fields}" if fields else ""))
    warmup = f"{cfg.warmup:g} of the steps" if cfg.warmup < 1 else f"{int(cfg.warmup)} step" + "s" * (cfg.warmup != 1)
    recipe = (f"AdamW (betas {cfg.beta1:g}, {cfg.beta2:g}; weight decay {cfg.weight_decay:g}), lr {cfg.lr:g} "
              f"with a {escaped(cfg.schedule)} schedule (warmup {warmup}, floor {cfg.min_lr_ratio:g} x lr), "
              f"gradient clip {cfg.grad_clip:g}, batch {cfg.batch_size} x {cfg.seq_len} tokens, seed {cfg.seed}")
    data = code(cfg.data) if cfg.data is not None else \
        f"the embedded Shakespeare, tokenized by a BPE of {cfg.tokenizer_vocab_size} tokens trained on it"
    return [("base model", base), ("recipe", recipe), ("data", data),
            ("tokens trained", f"{step * cfg.tokens_per_step:,} ({step} of {cfg.total_steps} steps)")]


def held_out_evaluation(val_loss: float) -> dict[str, float]:
    return {"held-out loss": val_loss, "held-out perplexity": math.exp(min(val_loss, 50))}


def held_out_note(step: int, windows: int | None, seq_len: int) -> str:
    """`windows`: how many the evaluation read, when known (at most eval_batches x batch_size)."""
    how_many = f"the first {windows}" if windows is not None else "the first (at most eval_batches x batch_size)"
    return (f"Mean next-token loss at step {step} on {how_many} windows of {seq_len} tokens of the data's "
            "validation split (the run's own evaluation; metrics.jsonl has every one).")


def checkpoint_card(cfg: TrainConfig, model, step: int, val_loss: float | None, eval_windows: int) -> str:
    """The card of checkpoint `step`; `val_loss` is the held-out loss measured at that step, if it was."""
    config = model.config
    family = getattr(config, "model_type", "?")
    # A LoRA run's checkpoint holds the adapters merged in: its model has the base model's parameters.
    n_params = sum(p.numel() for name, p in model.named_parameters() if LORA_MARK not in name)
    facts = [*training_facts(cfg, step), ("layers", f"{config.num_hidden_layers}; parameters: {n_params:,}")]
    verb = "fine-tuned" if cfg.init_from is not None else "trained"
    evaluation = held_out_evaluation(val_loss) if val_loss is not None else None
    loading = [*hf_loading(family), "",
               "This folder is a checkpoint of a layerwise run (two levels up: train.yaml, metrics.jsonl); "
               "`layerwise train --resume auto --out RUN` continues it."]
    return render_card(f"A {escaped(family)} model {verb} by layerwise (step {step})", facts, evaluation,
                       held_out_note(step, eval_windows, cfg.seq_len), loading)
