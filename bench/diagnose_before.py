"""Frozen: `layerwise.diagnose.diagnose` as of commit a6ccfcb, before the chunked vocabulary pass (issue 12), kept so
that bench/diagnose.py can time the two side by side and check that they agree. Not part of the package.

Its original module docstring, which defines every metric, now lives in src/layerwise/diagnose/metrics.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F

from layerwise.arch import depth_view
from layerwise.depth_metrics import contribution, token_norm, token_rms, token_var
from layerwise.numerics import at_least_float32
from layerwise.diagnose.trace import DepthTrace, trace

# Metrics compared with removal_delta_loss by `rank_correlation` (all grow with a layer's change of h).
SIMILARITY_METRICS = ("angular_distance", "block_influence", "layer_contribution")


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)


def _norm_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Per-token ||num|| / ||den||, [B, T] in float64."""
    return contribution(token_norm(num), token_norm(den))


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation (ties broken by order: per-layer float metrics have none in practice)."""
    rx, ry = (v.double().argsort().argsort().double() for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12))


@dataclass
class DepthDiagnosis:
    family: str
    n_layers: int
    n_span: int
    tokens: int = 0
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def add(self, name: str, values: torch.Tensor, count: int) -> None:
        values = values.detach().double().cpu()
        self.sums[name] = self.sums.get(name, 0) + values
        self.counts[name] = self.counts.get(name, 0) + count

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.counts[name]

    def metrics(self) -> dict[str, torch.Tensor]:
        return {name: self[name] for name in self.sums}

    def rank_correlation(self) -> dict[str, float]:
        if "removal_delta_loss" not in self.sums:
            return {}
        removal = self["removal_delta_loss"]
        return {name: spearman(self[name], removal) for name in SIMILARITY_METRICS if name in self.sums}

    def to_json(self) -> dict:
        def plain(value: torch.Tensor):
            return [plain(v) for v in value] if value.dim() else (None if math.isnan(value) else value.item())

        return {"family": self.family, "n_layers": self.n_layers, "n_span": self.n_span, "tokens": self.tokens,
                "metrics": {name: plain(value) for name, value in self.metrics().items()},
                "rank_correlation": self.rank_correlation()}


def _geometry(result: DepthDiagnosis, t: DepthTrace, n_span: int, n_tok: int, n_seq: int) -> None:
    h, L = t.hidden, len(t.hidden) - 1
    cos = [_cos(h[i], h[i + 1]) for i in range(L)]
    result.add("angular_distance", torch.stack([torch.arccos(c).sum() / math.pi for c in cos]), n_tok)
    result.add("block_influence", torch.stack([(1 - c).sum() for c in cos]), n_tok)
    span = [_cos(h[i], h[i + n_span]) for i in range(L - n_span + 1)]
    result.add("span_angular_distance_all", torch.stack([torch.arccos(c).sum() / math.pi for c in span]), n_tok)
    result.add("span_angular_distance_last", torch.stack([torch.arccos(c[:, -1]).sum() / math.pi for c in span]),
               n_seq)
    result.add("hidden_rms", torch.stack([token_rms(s).sum() for s in h]), n_tok)
    result.add("hidden_var", torch.stack([token_var(s).sum() for s in h]), n_tok)
    result.add("layer_contribution", torch.stack([_norm_ratio(h[i + 1] - h[i], h[i]).sum() for i in range(L)]),
               n_tok)
    if t.sublayers is not None:
        result.add("attn_contribution", torch.stack([_norm_ratio(s.attn_out, s.attn_in).sum() for s in t.sublayers]),
                   n_tok)
        result.add("mlp_contribution", torch.stack([_norm_ratio(s.mlp_out, s.mlp_in).sum() for s in t.sublayers]),
                   n_tok)
    if t.attention_entropy is not None:
        result.add("attention_entropy", t.attention_entropy, n_tok)


def _logit_lens(result: DepthDiagnosis, t: DepthTrace, view, targets: torch.Tensor, n_tok: int) -> None:
    # One layer's [B, T, V] logits at a time, reduced at once: L x B x T x V would not fit for a real vocabulary.
    log_final = t.logits.log_softmax(-1)
    top1_final, top5_final = t.logits.argmax(-1), t.logits.topk(5, dim=-1).indices
    kl, top1, top5, loss = [], [], [], []
    for h in t.hidden[1:]:
        z = at_least_float32(view.head(view.final_norm(h)))
        log_p = z.log_softmax(-1)
        kl.append((log_p.exp() * (log_p - log_final)).sum())
        top1.append((z.argmax(-1) == top1_final).sum())
        top5.append((z.topk(5, dim=-1).indices[..., :, None] == top5_final[..., None, :]).any(-1).sum() / 5)
        loss.append(F.cross_entropy(z[:, :-1].flatten(0, 1), targets, reduction="sum"))
    for name, values in (("kl", kl), ("top1", top1), ("top5", top5)):
        result.add(f"logit_lens_{name}", torch.stack(values), n_tok)
    result.add("logit_lens_loss", torch.stack(loss), targets.numel())


def _removal(result: DepthDiagnosis, t: DepthTrace, view, targets: torch.Tensor, n_span: int, n_tok: int) -> None:
    L = len(t.hidden) - 1
    log_final = t.logits.log_softmax(-1)
    p_full = log_final.exp()
    loss_full = F.cross_entropy(t.logits[:, :-1].flatten(0, 1), targets, reduction="sum")

    def score(resumed: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z = at_least_float32(view.head(view.final_norm(resumed[-1])))
        loss = F.cross_entropy(z[:, :-1].flatten(0, 1), targets, reduction="sum")
        return loss - loss_full, (p_full * (log_final - z.log_softmax(-1))).sum()

    contributions = [t.hidden[i + 1] - t.hidden[i] for i in range(L)]
    delta, kl = [], []
    effect = torch.full((L, L), float("nan"), dtype=torch.float64)
    for s in range(L):
        resumed = t.resume(s, 1)  # h'_{s+1} (= h_s), h'_{s+2}, ..., h'_L
        d, k = score(resumed)
        delta.append(d)
        kl.append(k)
        for later in range(s + 1, L):
            changed = resumed[later - s] - resumed[later - s - 1]
            effect[s, later] = _norm_ratio(contributions[later] - changed, contributions[later]).sum()
    result.add("removal_delta_loss", torch.stack(delta), targets.numel())
    result.add("removal_kl", torch.stack(kl), n_tok)
    result.add("skip_effect", effect, n_tok)
    if n_span > 1:
        spans = [score(t.resume(s, n_span)) for s in range(L - n_span + 1)]
        result.add("span_removal_delta_loss", torch.stack([d for d, _ in spans]), targets.numel())
        result.add("span_removal_kl", torch.stack([k for _, k in spans]), n_tok)


@torch.no_grad()
def diagnose(model, batches: Iterable[torch.Tensor], n_span: int = 4, removal: bool = True,
             attention_entropy: bool = True) -> DepthDiagnosis:
    """Stream `batches` of token ids [B, T] through `model` once and reduce every per-layer metric.

    `removal` adds the removal effects and the skip-effect matrix (about L/2 more layer evaluations per layer);
    `attention_entropy` runs HF models with eager attention, whose weights the fused kernels do not return."""
    view = depth_view(model)
    L = len(view.layers)
    if not 1 <= n_span <= L:
        raise ValueError(f"n_span={n_span} must be in 1..{L} (the model has {L} layers)")
    model.eval()
    result = DepthDiagnosis(view.family, L, n_span)
    for ids in batches:
        t = trace(model, view, ids, entropy=attention_entropy)
        B, T = ids.shape
        result.tokens += B * T
        targets = ids[:, 1:].flatten()
        loss = F.cross_entropy(t.logits[:, :-1].flatten(0, 1), targets, reduction="sum")
        result.add("loss", loss.reshape(1), targets.numel())
        _geometry(result, t, n_span, B * T, B)
        _logit_lens(result, t, view, targets, B * T)
        if removal:
            _removal(result, t, view, targets, n_span, B * T)
        del t  # this batch's states and logits go before the next forward, not after it (peak memory)
    if result.tokens == 0:
        raise ValueError("no batches to diagnose")
    return result


def token_batches(tokens, seq_len: int, batch_size: int, n_tokens: int) -> Iterable[torch.Tensor]:
    """Consecutive non-overlapping windows of `seq_len` tokens, `batch_size` at a time, up to `n_tokens`."""
    n_windows = min(n_tokens // seq_len, len(tokens) // seq_len)
    if n_windows == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens, have {len(tokens)}")
    for start in range(0, n_windows, batch_size):
        rows = [torch.as_tensor(tokens[w * seq_len:(w + 1) * seq_len].astype("int64"))
                for w in range(start, min(start + batch_size, n_windows))]
        yield torch.stack(rows)
