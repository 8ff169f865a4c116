"""The per-layer metric vocabulary shared by training telemetry and `layerwise diagnose`: one function per
quantity, so a name means one number wherever it is logged.

Each function returns one value per token ([B, T], float64); a metric is its mean over tokens (telemetry takes
it on one batch, diagnose streams it over many). Notation: h_l is the hidden state entering layer l (h_L the
final norm's input), under AttnRes the readout the final norm would see if the network stopped before layer l;
x_l is what a sublayer reads (the stream, or under AttnRes its routed input); a_l and m_l are what layer l's
attention and MLP sublayers add.

  hidden_rms[l]          token_rms(h_l), l = 0..L
  hidden_var[l]          token_var(h_l), l = 0..L
  routed_input_rms[l]    token_rms(x_l) of layer l's attention sublayer; only for depth-routed schemes
                         (AttnRes), where it differs from hidden_rms
  layer_contribution[l]  contribution(token_norm(h_{l+1} - h_l), token_norm(h_l))            (Csordas et al.)
  attn_contribution[l]   contribution(token_norm(a_l), token_norm(x_l)) for the attention sublayer
  mlp_contribution[l]    the same for the MLP sublayer

Names that changed in telemetry (metrics.jsonl written before them): `attn_ratio` / `mlp_ratio` are now
`attn_contribution` / `mlp_contribution`; `hidden_rms` was one RMS over all values of the tensor (and under
AttnRes of the routed input, now `routed_input_rms`) and is now the mean of per-token RMS of h_l.
"""

from __future__ import annotations

import torch


def token_rms(x: torch.Tensor) -> torch.Tensor:
    """sqrt(mean_d x^2) of each token: the RMS the norms divide by (computed in float64)."""
    return x.double().pow(2).mean(-1).sqrt()


def token_var(x: torch.Tensor) -> torch.Tensor:
    """Population variance over d of each token: what LayerNorm divides by."""
    return x.double().var(-1, unbiased=False)


def token_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm over d of each token, in float64."""
    return x.double().norm(dim=-1)


def contribution(added_norm: torch.Tensor, read_norm: torch.Tensor) -> torch.Tensor:
    """||added|| / ||read|| per token, from their `token_norm`s: the size of an update relative to what it reads
    (norms rather than tensors, so telemetry keeps [B, T] norms instead of whole activations)."""
    return added_norm / read_norm.clamp_min(1e-12)
