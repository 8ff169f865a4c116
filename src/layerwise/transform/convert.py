"""Steps that change what a model is, not what it computes: `to-layerwise` (a Llama-family or GPT-2 HF model as
a `LayerwiseForCausalLM`, the same logits) and `to-hf` (back to an HF family). The tables live in
`layerwise.arch.state_dict`; these steps refuse, with the reason, what a family cannot express.
"""

from __future__ import annotations

import yaml

from ..arch.state_dict import GPT2_FAMILY, LLAMA_FAMILIES, hf_config, hf_to_layerwise, layerwise_config, layerwise_to_hf
from ..errors import UserError
from .steps import Step, register_step, save_refusal

_FAMILIES = (*LLAMA_FAMILIES, GPT2_FAMILY)


def _is_layerwise(model) -> bool:
    return getattr(model.config, "model_type", None) == "layerwise"


@register_step("to-layerwise")
class ToLayerwise(Step):
    """An HF model as a layerwise model with the same logits; `to-layerwise=FIELD=VALUE,...` also sets layerwise
    fields the family lacks (new tensors at their init; the function then changes, and a warning says so)."""

    argument = "optional"
    argument_help = ("layerwise fields to set for continued training, "
                     'e.g. "layernorm_scaling=true,residual=block_attnres"')
    summary = (f"convert a {', '.join(_FAMILIES)} model to a layerwise model with the same logits; "
               "with FIELD=VALUE,... start layerwise variants from its weights")

    def parse(self, value):
        self.overrides = {}
        for item in (value.split(",") if value else []):
            field, eq, text = item.partition("=")
            if not eq or not field.strip() or not text.strip():
                self.refuse(f"{item!r} is not FIELD=VALUE ({self.argument_help})")
            self.overrides[field.strip()] = yaml.safe_load(text.strip())

    def check(self, model):
        family = getattr(model.config, "model_type", None)
        if _is_layerwise(model):
            self.refuse("the model is already a layerwise model")
        if save_refusal(model) is not None:  # tied occurrences would become copies without a word
            self.refuse(f"convert before reshaping: {save_refusal(model)}; write to-layerwise before layers=...:tie")
        if family == GPT2_FAMILY:
            return  # its adapter checks as it converts
        try:
            layerwise_config(model.config, **self.overrides)
        except ValueError as err:  # UserError, and ModelConfig's unknown-field error
            self.refuse(str(err))

    def apply(self, model):
        try:
            return hf_to_layerwise(model, **self.overrides)
        except UserError as err:
            self.refuse(str(err))


@register_step("to-hf")
class ToHF(Step):
    """A layerwise model as an HF model of a family (default: the one it was converted from, else llama)."""

    argument = "optional"
    argument_help = f"the Hugging Face family: {', '.join(_FAMILIES)} (default: the family it came from, else llama)"
    summary = "convert a layerwise model to a Hugging Face family with the same logits, when the family can express it"

    def parse(self, value):
        self.family = value.strip() if value else None
        if self.family is not None and self.family not in _FAMILIES:
            self.refuse(f"unknown family {self.family!r}; choose one of {', '.join(_FAMILIES)}")

    def check(self, model):
        if not _is_layerwise(model):
            self.refuse(f"the model is a {getattr(model.config, 'model_type', type(model).__name__)!r} model, not a "
                        "layerwise one; to-hf converts layerwise models")
        family = self.family or model.config.layerwise_hf_family or "llama"
        if family == GPT2_FAMILY:
            return  # its adapter checks as it converts
        try:
            hf_config(model.config, family)
        except UserError as err:
            self.refuse(str(err))

    def apply(self, model):
        try:
            return layerwise_to_hf(model, self.family)
        except UserError as err:
            self.refuse(str(err))
