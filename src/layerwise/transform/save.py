"""Saving a transformed model: weights (safetensors), config, tokenizer and model card, in one atomic write."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UserError
from ..outputs import write_model_folder
from .card import model_card
from .steps import save_refusal


def save_transformed(model: nn.Module, tokenizer, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `model`, `tokenizer` (if not None) and a README.md model card to `out_dir`, loadable with
    `AutoModelForCausalLM.from_pretrained(out_dir)` (after `import layerwise` for layerwise models).

    The folder is written whole or not at all (`layerwise.outputs.write_model_folder`); a non-empty `out_dir`
    is refused unless `overwrite`. A model a step marked as unsaveable is refused before anything is written.
    """
    why = save_refusal(model)
    if why is not None:
        raise UserError(f"cannot save this model: {why}")
    if getattr(model, "hf_quantizer", None) is not None:
        from .prune import _forget_dequantized_gguf

        _forget_dequantized_gguf(model)

    def save(folder: Path) -> None:
        model.save_pretrained(folder)  # transformers 5 always writes safetensors
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        (folder / "README.md").write_text(model_card(model))

    return write_model_folder(out_dir, save, overwrite)
