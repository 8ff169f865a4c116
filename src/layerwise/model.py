"""`LayerwiseForCausalLM`: one decoder LM in which every depth variant is a config option.

Read top to bottom: embed -> (optional embedding scale and norm) -> the residual scheme runs the layers ->
final norm -> head. The variants live in `layerwise.nn`; this file wires them and follows the Hugging Face
`PreTrainedModel` conventions so that save/load, `generate` and the Auto classes work unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .config import ModelConfig
from .nn.attention import ForwardContext
from .nn.block import build_layer
from .nn.hooks import HookPoint
from .nn.initialization import attach_init, init_weights
from .nn.norms import build_norm
from .nn.positions import build_position_embedding
from .nn.residual import build_residual
from .nn.value_residual import build_value_residual


@dataclass
class LayerwiseModelOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus `residual_loss`: the residual scheme's term of the training objective (Delta
    AttnRes's entropy bonus), already scaled; None when the scheme adds none."""

    residual_loss: torch.Tensor | None = None


@dataclass
class LayerwiseCausalLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `residual_loss` (see `LayerwiseModelOutput`); `loss` includes it."""

    residual_loss: torch.Tensor | None = None


class LayerwisePreTrainedModel(PreTrainedModel):
    config_class = ModelConfig
    config: ModelConfig
    base_model_prefix = "model"
    _no_split_modules = ["Layer", "BHyTParallelLayer", "FakeLNLayer"]
    _supports_sdpa = True
    _skip_keys_device_placement = ["past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module):
        # The groups in layerwise.nn.initialization say how each tensor starts; transformers calls this per module
        # and guards nn.init, so weights loaded by from_pretrained are left as they are.
        init_weights(module)


def attention_mask_for(attention_mask, past: int, T: int, device) -> tuple[torch.Tensor | None, bool]:
    """(mask, is_causal) for SDPA. The common cases need no mask tensor: a fresh causal pass uses
    is_causal=True, one decoded token attends to everything cached. Padding or chunked prefill builds one."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded:
        if past == 0:
            return None, True
        if T == 1:
            return None, False
    q_pos = past + torch.arange(T, device=device)
    k_pos = torch.arange(past + T, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, T, past+T]
    if padded:
        mask = mask & attention_mask[:, None, None, -(past + T):].bool()
        # A padded query would see nothing and give NaN; let it see itself (its output is ignored anyway).
        mask = mask | (k_pos[None, :] == q_pos[:, None])[None, None]
    return mask, False


class LayerwiseModel(LayerwisePreTrainedModel):
    """The decoder without the head: returns the final-normed hidden states."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = build_position_embedding(config)  # RoPE (no parameters) or GPT-2's table
        # DyT's LLaMA recipe: a learnable scalar on the embedding output, init sqrt(d).
        self.embedding_multiplier = (
            nn.Parameter(torch.full((1,), math.sqrt(config.d_model))) if config.embedding_scale else None
        )
        self.embedding_norm = build_norm(config, "embedding") if config.embedding_norm else None
        # The stored layers, each once (so the state dict and the optimizer see every weight once); `positions`
        # says which one each execution position runs.
        self.layers = nn.ModuleList(build_layer(config, i) for i in range(config.n_stored_layers))
        self.residual = build_residual(config)
        self.value_residual = build_value_residual(config)
        self.norm = build_norm(config, "final")
        self.hook_final_norm_in = HookPoint()  # h_L, what the final norm reads (no parameters, no state-dict key)
        attach_init(self)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @property
    def positions(self) -> list[nn.Module] | nn.ModuleList:
        """The layer each execution position runs, in order: `layers` itself without a layer program, else
        `layers[layer_order[p]]` for each position p (a tied layer appears once per position it runs at)."""
        if self.config.layer_order is None:
            return self.layers
        return [self.layers[stored] for stored in self.config.layer_order]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> LayerwiseModelOutput:
        h, ctx = self.embed(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache)
        h = self.residual(h, self.positions, ctx)
        return LayerwiseModelOutput(last_hidden_state=self.norm(self.hook_final_norm_in(h)),
                                    past_key_values=ctx.cache, residual_loss=self.residual.auxiliary_loss(ctx))

    def embed(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
              inputs_embeds=None, use_cache=None) -> tuple[torch.Tensor, ForwardContext]:
        """(what the first layer receives, the context every sublayer shares): token embedding (plus learned
        position embeddings) with its optional scale and norm, positions, mask and cache. Diagnostics run the
        layers from here themselves."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        T = h.shape[1]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds ModelConfig.max_seq_len={self.config.max_seq_len}")
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=h.device)[None]
        mask, is_causal = attention_mask_for(attention_mask, past, T, h.device)
        h, rope = self.position_embedding(h, position_ids)
        ctx = ForwardContext(
            rope=rope, attn_mask=mask, is_causal=is_causal, cache=past_key_values, value_residual=self.value_residual,
            input_ids=input_ids,
        )
        if self.embedding_multiplier is not None:
            h = h * self.embedding_multiplier
        if self.embedding_norm is not None:
            h = self.embedding_norm(h)
        return h, ctx


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy with HF's convention (labels = input ids; -100 ignored). The labels are shifted,
    not the logits, so the [B, T, V] logits are never copied."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


class LayerwiseForCausalLM(LayerwisePreTrainedModel, GenerationMixin):
    """Causal LM head on `LayerwiseModel`; HF-compatible (save_pretrained, from_pretrained, generate)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = LayerwiseModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)
        attach_init(self)
        self.post_init()

    @property
    def continues_from_cache(self) -> bool:
        """Whether a forward may continue a KV cache (scorers that reuse a context's cache ask; generate with
        use_cache=False works either way). Only a model mid-LayerNorm-removal says no."""
        return all(getattr(layer, "continues_from_cache", True) for layer in self.model.layers)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                **kwargs) -> LayerwiseCausalLMOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        if loss is not None and out.residual_loss is not None:
            loss = loss + out.residual_loss
        return LayerwiseCausalLMOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                       residual_loss=out.residual_loss)


# Importing the model registers it, so `AutoModelForCausalLM.from_pretrained(folder)` loads layerwise
# checkpoints without trust_remote_code.
AutoConfig.register(ModelConfig.model_type, ModelConfig, exist_ok=True)
AutoModel.register(ModelConfig, LayerwiseModel, exist_ok=True)
AutoModelForCausalLM.register(ModelConfig, LayerwiseForCausalLM, exist_ok=True)
