"""How many bits each decoder layer gets: a `BitPlan` from a per-layer importance and a target average width.

Layer-wise quantization (Dumitru et al., "Variable Layerwise Quantization", Findings of ACL 2025) ranks the
layers and gives the least important ones the lower of two widths so that the average bits per weight lands on
a fractional target (3.5 = half the layers at 3 bits, half at 4). Importance, higher = keep more bits:
  lim         Layer Input Modification, -cos(h_l, h_{l+1}) of the layer's input and output hidden states per
              token, averaged over the calibration tokens: a layer that turns its input more matters more.
              This is ShortGPT's Block Influence minus one (`block_influence` of `diagnose`, reused here), so it
              ranks layers exactly as Block Influence does. A third-party implementation of the paper flattens
              the whole batch into one vector each and takes a single cosine, which weights tokens by their
              norms; we average the per-token cosines, as Block Influence does.
  zd          Z-score Distribution: per linear weight W of the layer, z = (W - mean W) / std W over that matrix
              (population std), ZD = the fraction of entries with |z| > 1; the layer's ZD is the mean over its
              attention and MLP linears (a fused qkv or gate_up matrix counts once). Importance = -ZD. The
              paper's abstract says "smaller is better" without the direction of the ranking; we read it this
              way: a heavier-tailed matrix has FEWER entries beyond one std (Gaussian 0.317, Laplace 0.243),
              and heavy tails (outliers that stretch the quantization grid) are what quantizes badly, so a low
              ZD marks a layer that needs more bits.
  zd-inverse  the other reading, importance = +ZD, so a study can test both.
  removal     `removal_delta_loss` of `diagnose`: the calibration loss with the layer skipped minus the full
              model's; the dearer a layer is to lose, the more bits it keeps.
  random      a random permutation from `seed` (the control), the same for the same seed.
Layers are the stored layers, the ones the `quantize=` step addresses; on a layerwise model whose
`layer_order` runs a stored layer at several positions, its importance is the largest over those positions
(its one width serves all of them). Embeddings, the LM head and norms are not planned: they stay in floating
point, and the average counts only the decoder layers' linear weights (biases stay in floating point too).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from ..arch import model_map
from ..errors import UserError
from .metrics import diagnose

ORDERS = ("lim", "zd", "removal", "random", "zd-inverse")
WIDTHS = (2, 3, 4, 8)
# The sublayer linears that `quantize=` quantizes (a layerwise value-residual gate lives outside the layer).
_QUANTIZED_GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


def check_bit_request(avg_bits, widths, order) -> None:
    """Refuse an unknown order, widths outside WIDTHS, or a target the widths cannot reach, naming the option."""
    if order not in ORDERS:
        raise UserError(f"--order {order!r}: use one of {', '.join(ORDERS)}")
    _check_target(avg_bits, widths)


def _check_target(avg_bits, widths) -> None:
    widths = list(widths)
    if not widths or any(isinstance(w, bool) or w not in WIDTHS for w in widths) or len(set(widths)) < len(widths):
        raise UserError(f"--widths {','.join(map(str, widths)) or '(none)'}: give distinct widths from "
                        f"{','.join(map(str, WIDTHS))} (HQQ's packed widths), e.g. --widths 2,3,4,8")
    if not isinstance(avg_bits, (int, float)) or not min(widths) <= avg_bits <= max(widths):
        raise UserError(f"--avg-bits {avg_bits}: the widths {','.join(map(str, sorted(widths)))} reach only "
                        f"{min(widths)}..{max(widths)} bits per weight; pick a target in that range or widen --widths")


def stored_layer_linears(model) -> list[list[torch.nn.Module]]:
    """Each stored decoder layer's attention and MLP linears (nn.Linear, or GPT-2's Conv1D)."""
    return [[lin for group in _QUANTIZED_GROUPS for lin in layer.linears[group]] for layer in model_map(model).layers]


def layer_linear_weights(model) -> list[int]:
    """Weights per stored decoder layer in the linears `quantize=` quantizes."""
    return [sum(lin.weight.numel() for lin in linears) for linears in stored_layer_linears(model)]


def z_score_distribution(weight: torch.Tensor) -> float:
    """The fraction of a matrix's entries more than one (population) standard deviation from its mean."""
    w = weight.detach().double()
    z = (w - w.mean()) / w.std(correction=0)
    return (z.abs() > 1).double().mean().item()


def layer_importance(model, view, batches, order: str, seed: int = 0) -> list[float]:
    """One importance per stored decoder layer (higher = keep more bits) by `order`, see the module docstring.

    `view` is `depth_view(model)`; lim and removal run `batches` of token ids [B, T], zd and random read none."""
    if order not in ORDERS:
        raise UserError(f"--order {order!r}: use one of {', '.join(ORDERS)}")
    n_stored = len(model_map(model).layers)
    if order == "random":
        generator = torch.Generator().manual_seed(seed)
        return [float(rank) for rank in torch.randperm(n_stored, generator=generator).tolist()]
    if order in ("zd", "zd-inverse"):
        sign = -1.0 if order == "zd" else 1.0
        return [sign * sum(map(z_score_distribution, (lin.weight for lin in linears))) / len(linears)
                for linears in stored_layer_linears(model)]
    per_position = _measured(model, view, batches, order)
    # HF models run each stored layer once, in order; a layerwise model says which stored layer each position runs.
    execution = model.config.execution_order if view.family == "layerwise" else list(range(n_stored))
    return [max(v for p, v in enumerate(per_position) if execution[p] == k) for k in range(n_stored)]


@torch.no_grad()
def _measured(model, view, batches, order: str) -> list[float]:
    """LIM or removal_delta_loss per execution position, reduced by `diagnose`'s own metric code."""
    batches = list(batches)
    if not batches:
        raise ValueError(f"no calibration batches to measure --order {order} on")
    result = diagnose(model, batches, n_span=1, removal=order == "removal", attention_entropy=False,
                      logit_lens=False)
    if order == "lim":
        return (result["block_influence"] - 1).tolist()  # 1 - mean cos, minus one: -mean cos
    return result["removal_delta_loss"].tolist()


def allocate_bits(importance: Sequence[float], layer_params: Sequence[int], avg_bits: float,
                  widths: Sequence[int]) -> list[int]:
    """Each layer's width: the paper's two-width rule over the pair of `widths` that brackets `avg_bits`.

    With lo <= avg_bits <= hi the nearest widths around the target (every layer at a width the target equals),
    layers start at hi and the least important go to lo one at a time (ties in importance: the lower layer
    index first) until the parameter-weighted average is at or below the target: the fewest layers that get
    there, so the average never exceeds the target and falls short of it by less than the last layer's share,
    layer_params[i] * (hi - lo) / sum(layer_params). Exact in rational arithmetic. With equal parameter counts
    this is k = ceil(L (hi - avg_bits) / (hi - lo)) layers at lo.
    """
    if len(importance) != len(layer_params):
        raise ValueError(f"{len(importance)} importances for {len(layer_params)} layer parameter counts")
    _check_target(avg_bits, widths)
    target = Fraction(avg_bits)
    if target in widths:
        return [int(target)] * len(importance)
    lo = max(w for w in widths if w < target)
    hi = min(w for w in widths if w > target)
    bits = [hi] * len(importance)
    total, weighted = sum(layer_params), hi * sum(layer_params)
    for i in sorted(range(len(importance)), key=lambda i: (importance[i], i)):
        if weighted <= target * total:
            break
        bits[i] = lo
        weighted -= (hi - lo) * layer_params[i]
    return bits


def _ranges(layers: list[int]) -> str:
    """Sorted layer indices as a layer list with inclusive ranges: [0, 1, 2, 3, 7] -> "0-3,7"."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass
class BitPlan:
    order: str
    target_bits: float
    widths: list[int]
    importance: list[float]  # per stored layer, higher = more bits
    layer_params: list[int]  # weights of each stored layer's quantized linears
    bits: list[int]

    @property
    def avg_bits(self) -> float:
        """Bits per weight over the decoder layers' linears (embeddings, head and norms are not counted)."""
        return sum(b * p for b, p in zip(self.bits, self.layer_params)) / sum(self.layer_params)

    def step(self) -> str:
        """The `quantize=` step text: the most common width as the default (a tie: the wider one), then each
        other width, narrowest first, with its layers, e.g. "quantize=4/3:0-3,7"."""
        counts = Counter(self.bits)
        default = max(counts, key=lambda w: (counts[w], w))
        rest = [f"/{w}:{_ranges([i for i, b in enumerate(self.bits) if b == w])}"
                for w in sorted(counts) if w != default]
        return f"quantize={default}{''.join(rest)}"

    def to_json(self) -> dict:
        return {"order": self.order, "target_bits": self.target_bits, "avg_bits": self.avg_bits,
                "widths": self.widths, "step": self.step(),
                "scope": "decoder-layer linear weights; embeddings, LM head, norms and biases stay floating point",
                "layers": [{"layer": i, "importance": v, "bits": b, "params": p}
                           for i, (v, b, p) in enumerate(zip(self.importance, self.bits, self.layer_params))]}


def plan_bits(model, view, batches, *, avg_bits: float, widths: Sequence[int], order: str, seed: int = 0) -> BitPlan:
    """Measure `order` on `batches` (token ids [B, T]; read by lim and removal only) and allocate widths.

    Example: `plan_bits(model, depth_view(model), list(token_batches(ids, 512, 2, 4096)), avg_bits=3.5,
    widths=(2, 3, 4, 8), order="lim")`."""
    check_bit_request(avg_bits, widths, order)
    importance = layer_importance(model, view, batches, order, seed)
    params = layer_linear_weights(model)
    bits = allocate_bits(importance, params, avg_bits, widths)
    return BitPlan(order, float(avg_bits), sorted(widths), importance, params, bits)
