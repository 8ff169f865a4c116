"""Saving a transformed model: weights (safetensors), config, tokenizer and model card, in one atomic write."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..arch.quantized import is_quantized, save_quantized_weights
from ..errors import UserError
from ..loading import forget_dequantized_gguf
from ..outputs import write_model_folder
from .card import model_card
from .steps import save_refusal


def save_transformed(model: nn.Module, tokenizer, out_dir: str | Path, overwrite: bool = False,
                     extra_files: dict[str, str] | None = None, card_facts: list[tuple[str, str]] = (),
                     evaluation: dict[str, float] | None = None, evaluation_note: str = "") -> Path:
    """Write `model` (safetensors), `tokenizer` (if not None), a README.md model card and `extra_files`
    ({name: text}, e.g. a prune plan) to `out_dir`; `card_facts`, `evaluation` and `evaluation_note` go on the
    card (`transform.card.model_card`): what the caller knows of how the model was made and measured. The
    folder loads with `AutoModelForCausalLM.from_pretrained(out_dir)` (after `import layerwise` for layerwise
    models) or `layerwise.loading.load_model(out_dir)`.

    The folder is written whole or not at all (`layerwise.outputs.write_model_folder`); a non-empty `out_dir`
    is refused unless `overwrite`, so a model never ends up beside another model's or run's files. A model read
    from a GGUF file loses its quantization bookkeeping first (its weights are floats already), so the folder is
    an ordinary float checkpoint. A quantized model (the `quantize` step) is written as config.json and
    quantized.safetensors, which only `load_model` reads (docs/quantization.md). A model a step marked
    unsaveable (tied layers in an HF family) is refused before anything is written.
    """
    why = save_refusal(model)
    if why is not None:
        raise UserError(f"cannot save this model to {out_dir}: {why}")
    forget_dequantized_gguf(model, f"--out {out_dir}")

    def save(folder: Path) -> None:
        if is_quantized(model):  # our own format (layerwise.arch.quantized): config.json + quantized.safetensors
            model.config.save_pretrained(folder)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(folder)
            save_quantized_weights(model, folder)
        else:
            model.save_pretrained(folder)  # transformers 5 always writes safetensors
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / "README.md").write_text(model_card(model, card_facts, evaluation, evaluation_note))
        for name, text in (extra_files or {}).items():
            (folder / name).write_text(text)

    return write_model_folder(out_dir, save, overwrite)
