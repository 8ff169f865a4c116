"""Which layers to remove: a `PrunePlan` chosen on calibration batches, with every loss it measured.

Three strategies, each choosing `n_remove` layers of an L-layer model (0-based positions in the model given):
  angular  Gromov et al. ("The Unreasonable Ineffectiveness of the Deeper Layers"): the span of n = n_remove
           consecutive layers l..l+n-1 whose input h_l and output h_{l+n} are closest in angle at each
           sequence's last token, arccos(cos(h_l, h_{l+n}))/pi averaged over sequences; one pass.
  removal  one shot: the n_remove layers whose removal alone costs least (`removal_delta_loss`, the loss with
           that one layer skipped minus the full model's loss).
  greedy   SLEB (Song et al., ICML 2024): n_remove rounds; each measures the calibration loss with every
           remaining layer removed in addition to those already chosen and removes the cheapest: about
           n_remove x L evaluations, each re-running only the layers after the first skipped one.
Losses are mean next-token cross-entropy over all calibration targets (nats). Layers are skipped in memory
from each batch's `DepthTrace` (`resume_skipping`), which equals the model rebuilt without them for every
model `layerwise.transform.drop_layers` accepts; nothing here rebuilds or changes the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..arch import depth_view
from ..errors import UserError
from .metrics import _cos
from .trace import trace

STRATEGIES = ("angular", "removal", "greedy")


@dataclass
class PruneRound:
    """One round of choice: each candidate (a tuple of layers) with its measured value, and what it removed."""

    score: str  # what `value` is: "angular_distance_last", "removal_delta_loss" or "loss"
    candidates: list[tuple[tuple[int, ...], float]]
    removed: list[int]

    def to_json(self) -> dict:
        return {"score": self.score, "removed": self.removed,
                "candidates": [{"layers": list(layers), "value": value} for layers, value in self.candidates]}


@dataclass
class PrunePlan:
    strategy: str
    n_remove: int
    n_layers: int
    removed: list[int]  # sorted, 0-based positions in the model the plan was measured on
    full_loss: float
    pruned_loss: float  # the model with `removed` skipped, on the same calibration batches
    tokens: int  # calibration tokens per pass
    rounds: list[PruneRound] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "n_remove": self.n_remove, "n_layers": self.n_layers,
                "removed_layers": self.removed, "full_loss": self.full_loss, "pruned_loss": self.pruned_loss,
                "tokens": self.tokens, "rounds": [r.to_json() for r in self.rounds]}


def check_prune_request(strategy: str, n_remove: int, n_layers: int | None = None) -> None:
    """Refuse an unknown strategy or a count that removes no layer or leaves none, naming the option;
    `n_layers=None` (the model not loaded yet) checks only what needs no model."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if n_remove < 1:
        raise UserError(f"--remove {n_remove}: remove at least 1 layer")
    if n_layers is not None and n_remove >= n_layers:
        raise UserError(f"--remove {n_remove}: the model has {n_layers} layers; remove 1..{n_layers - 1}")


@torch.no_grad()
def plan_pruning(model, batches: Sequence[torch.Tensor], n_remove: int, strategy: str,
                 on_round: Callable[[int, PruneRound], None] | None = None) -> PrunePlan:
    """Choose `n_remove` layers of `model` to remove by `strategy` on `batches` of token ids [B, T].

    `batches` is read twice by the one-shot strategies and `n_remove` times by greedy, one batch's trace in
    memory at a time; `on_round(k, round)` sees greedy round k (from 1) as it ends (each takes minutes on a
    real model).
    Example: `plan_pruning(model, list(token_batches(ids, 512, 2, 4096)), 4, "greedy")`.
    """
    view = depth_view(model)
    L = len(view.layers)
    check_prune_request(strategy, n_remove, L)
    if not batches:
        raise ValueError("no calibration batches to plan pruning on")
    model.eval()
    tokens = sum(ids.numel() for ids in batches)
    if strategy == "angular":
        distances = _span_angular_distance_last(model, view, batches, n_remove)
        first = min(range(len(distances)), key=distances.__getitem__)
        removed = list(range(first, first + n_remove))
        rounds = [PruneRound("angular_distance_last",
                             [(tuple(range(s, s + n_remove)), d) for s, d in enumerate(distances)], removed)]
        full, (pruned,) = _losses(model, view, batches, [removed])
    elif strategy == "removal":
        full, alone = _losses(model, view, batches, [[i] for i in range(L)])
        delta = [loss - full for loss in alone]
        removed = sorted(sorted(range(L), key=delta.__getitem__)[:n_remove])
        rounds = [PruneRound("removal_delta_loss", [((i,), d) for i, d in enumerate(delta)], removed)]
        _, (pruned,) = _losses(model, view, batches, [removed])
    else:
        removed, rounds = [], []
        for _ in range(n_remove):
            remaining = [i for i in range(L) if i not in removed]
            full, losses = _losses(model, view, batches, [sorted(removed + [i]) for i in remaining])
            best = min(range(len(remaining)), key=losses.__getitem__)
            removed = sorted(removed + [remaining[best]])
            pruned = losses[best]
            rounds.append(PruneRound("loss", [((i,), loss) for i, loss in zip(remaining, losses)], [remaining[best]]))
            if on_round is not None:
                on_round(len(rounds), rounds[-1])
    return PrunePlan(strategy, n_remove, L, removed, full, pruned, tokens, rounds)


def _losses(model, view, batches, skip_sets: list[list[int]]) -> tuple[float, list[float]]:
    """The full model's loss and the loss with each set of layers skipped, in one pass over `batches`."""
    full = torch.zeros((), dtype=torch.float64)
    skipped = torch.zeros(len(skip_sets), dtype=torch.float64)
    n_targets = 0
    for ids in batches:
        t = trace(model, view, ids, entropy=False)
        targets = ids[:, 1:].flatten()
        n_targets += targets.numel()
        full += F.cross_entropy(t.logits[:, :-1].flatten(0, 1), targets, reduction="sum").double().cpu()
        for k, layers in enumerate(skip_sets):
            h = t.resume_skipping(frozenset(layers))[-1]
            z = view.unembed(h)
            skipped[k] += F.cross_entropy(z[:, :-1].flatten(0, 1), targets, reduction="sum").double().cpu()
        del t  # one batch's states at a time (peak memory)
    return (full / n_targets).item(), (skipped / n_targets).tolist()


def _span_angular_distance_last(model, view, batches, n: int) -> list[float]:
    """arccos(cos(h_l, h_{l+n}))/pi at each sequence's last token, mean over sequences, for l = 0..L-n (the
    `span_angular_distance_last` of `diagnose` with n_span = n)."""
    sums, n_seq = None, 0
    for ids in batches:
        h = trace(model, view, ids, entropy=False, logits=False).hidden
        last = torch.stack([torch.arccos(_cos(h[i][:, -1], h[i + n][:, -1])).sum() / math.pi
                            for i in range(len(h) - n)]).cpu()
        sums = last if sums is None else sums + last
        n_seq += ids.shape[0]
    return (sums / n_seq).tolist()
