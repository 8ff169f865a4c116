"""Named observation points (TransformerLens-style): identity modules that forward hooks attach to.

Every per-layer quantity has one stable name, e.g. `model.layers.3.attn.hook_in`, so telemetry and
diagnostics never depend on how a variant computes it. Without hooks they cost one identity call.
"""

from torch import nn


class HookPoint(nn.Identity):
    """Returns its input unchanged; register forward hooks on it to observe the tensor that passes."""
