"""One streaming pass of depth metrics, memory independent of the token count.

Each batch becomes a `DepthTrace` (see `trace.py`: boundary states, sublayer inputs/outputs, logits and a way
to resume with layers skipped); the metrics are reduced into running sums and the batch is dropped.
Notation: h_l enters layer l, h_{l+1} leaves it (never final-normed); means are over tokens unless noted.
  angular_distance[l]             arccos(cos(h_l, h_{l+1})) / pi
  block_influence[l]              1 - cos(h_l, h_{l+1})                                     (ShortGPT)
  span_angular_distance_last[l]   arccos(cos(h_l, h_{l+n}))/pi at each sequence's last token (Gromov et al.)
  span_angular_distance_all[l]    the same over all tokens
  hidden_rms[l], hidden_var[l]    per-token RMS and variance over d of h_l, l = 0..L
  layer_contribution[l]           ||h_{l+1} - h_l|| / ||h_l||                               (Csordas et al.)
  attn_contribution[l], mlp_contribution[l]
                                  ||a_l|| / ||h_l|| and ||m_l|| / ||h_l + a_l||: what each sublayer adds over
                                  what it reads (absent for parallel-residual layers such as GPT-NeoX's)
  attention_entropy[l]            -sum_k p_k log p_k of each query's attention, mean over heads and positions
  logit_lens_*[l]                 head(final_norm(h_{l+1})) vs the model's logits: KL(p_l || p_final),
                                  top-1 agreement, top-5 overlap, next-token loss. The final norm is applied
                                  to the raw layer output (HF's last hidden state is already normed), and
                                  Gemma's logit softcap after the head, as in the model's own logits.
  removal_delta_loss[l], removal_kl[l]
                                  loss change and KL(p_full || p_without_l) when layer l is skipped,
                                  re-running only layers l+1.. from the cached input of layer l.
  span_removal_delta_loss[l], span_removal_kl[l]
                                  the same for the contiguous span l..l+n-1 (n = n_span)
  skip_effect[s][l]               ||Delta_l - Delta'_l|| / ||Delta_l|| for later layers l > s, where
                                  Delta_l = h_{l+1} - h_l is layer l's contribution and Delta'_l the same with
                                  layer s skipped (Csordas et al.'s effect on later computation, at all
                                  positions; NaN for l <= s)
and, over layers, `rank_correlation()`: Spearman's rho of each similarity metric with removal_delta_loss
(cosine is not importance: arXiv 2605.14075).
The quantities training telemetry also logs (hidden_*, *_contribution) are defined once, in
`layerwise.depth_metrics`, and mean the same number in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..arch import depth_view
from ..depth_metrics import contribution, token_norm, token_rms, token_var
from ..errors import UserError
from .trace import DepthTrace, trace

# Metrics compared with removal_delta_loss by `rank_correlation` (all grow with a layer's change of h).
SIMILARITY_METRICS = ("angular_distance", "block_influence", "layer_contribution")
# Rows (tokens x scored states) per vocabulary-sized tensor: 64 x 49,152 float32 is 12.6 MB. On one CPU thread the
# head matmul, log_softmax and KL over SmolLM2's 512 x 49,152 were as fast in chunks of 64 or 128 rows and 4% and
# 29% slower in chunks of 256 and 512 (the chunk stops fitting in cache).
VOCAB_CHUNK = 64


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


def _vocab_pass(view, t: DepthTrace, targets: torch.Tensor, lens: list[torch.Tensor], removed: list[torch.Tensor],
                chunk: int) -> dict[str, torch.Tensor]:
    """Every quantity over the vocabulary, with no tensor over it larger than `chunk` x V.

    `lens` and `removed` are states [B, T, d] the head would read (after the final norm); the model's own logits
    come from `t.final_logits`, a chunk at a time; `targets` [B*T] the next token at each position, -1 where a
    sequence ends. Summed over
    tokens: for each lens state, KL(p || p_final), top-1 and top-5 agreement and the loss; for each removed
    state, KL(p_final || p) and the loss; and the model's loss. Tokens go in chunks of c = min(chunk, B*T) and
    chunk // c states share one head matmul, so short batches still give the head a full-sized matrix. Each
    logits chunk gets one log_softmax, which serves its KL, loss and agreement."""
    N = targets.numel()
    c = min(chunk, N)
    per_matmul = max(1, chunk // c)
    final = t.hidden[-1].flatten(0, 1)
    sums = {name: torch.zeros(n, dtype=torch.float64, device=t.hidden[-1].device)
            for name, n in (("lens_kl", len(lens)), ("lens_top1", len(lens)), ("lens_top5", len(lens)),
                            ("lens_loss", len(lens)), ("removed_kl", len(removed)), ("removed_loss", len(removed)),
                            ("loss", 1))}
    lens, removed = [h.flatten(0, 1) for h in lens], [h.flatten(0, 1) for h in removed]
    for a in range(0, N, c):
        b = min(a + c, N)
        has_target = targets[a:b] >= 0
        at_target = targets[a:b].clamp_min(0)[:, None]

        def loss(log_p: torch.Tensor) -> torch.Tensor:  # [k, c, V] -> summed next-token loss of each of the k
            # Summed over tokens in float64: float32 sums of ~40-nat early-lens losses drift by ~1e-6 per token.
            picked = log_p.gather(-1, at_target.expand(log_p.shape[0], -1, -1))[..., 0]
            return -(picked * has_target).double().sum(-1)

        z_final = t.final_logits(final[a:b])
        log_final = z_final.log_softmax(-1)
        sums["loss"] += loss(log_final[None])
        top1_final, top5_final = z_final.argmax(-1), z_final.topk(5, dim=-1).indices
        p_final = log_final.exp() if removed else None
        for states, kind in ((lens, "lens"), (removed, "removed")):
            for g in range(0, len(states), per_matmul):
                group = states[g:g + per_matmul]
                rows = torch.cat([h[a:b] for h in group]) if len(group) > 1 else group[0][a:b]
                z = view.unembed(rows).view(len(group), b - a, -1)
                at = slice(g, g + len(group))
                if kind == "lens":
                    sums["lens_top1"][at] += (z.argmax(-1) == top1_final).sum(-1).double()
                    top5 = z.topk(5, dim=-1).indices[..., :, None] == top5_final[..., None, :]
                    sums["lens_top5"][at] += top5.any(-1).sum((1, 2)).double() / 5
                log_p = z.log_softmax(-1)
                del z  # at most three chunk x V tensors of a group alive at once, with the final chunk's two
                sums[f"{kind}_loss"][at] += loss(log_p)
                if kind == "lens":
                    sums["lens_kl"][at] += (log_p - log_final).mul_(log_p.exp()).sum(-1).double().sum(-1)
                else:
                    sums["removed_kl"][at] += (log_final - log_p).mul_(p_final).sum(-1).double().sum(-1)
                del log_p  # freed before the next group's head matmul, not after it
    return sums


def _removal_states(t: DepthTrace, n_span: int, done: Callable[[], None]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The last state without each layer, then without each n-span (n_span > 1), and the skip-effect matrix;
    `done()` after each re-run."""
    L = len(t.hidden) - 1
    contributions = [t.hidden[i + 1] - t.hidden[i] for i in range(L)]
    finals = []
    effect = torch.full((L, L), float("nan"), dtype=torch.float64)
    for s in range(L):
        resumed = t.resume(s, 1)  # h'_{s+1} (= h_s), h'_{s+2}, ..., h'_L
        finals.append(resumed[-1])
        done()
        for later in range(s + 1, L):
            changed = resumed[later - s] - resumed[later - s - 1]
            effect[s, later] = _norm_ratio(contributions[later] - changed, contributions[later]).sum()
    if n_span > 1:
        for s in range(L - n_span + 1):
            finals.append(t.resume(s, n_span)[-1])
            done()
    return finals, effect


@torch.no_grad()
def diagnose(model, batches: Iterable[torch.Tensor], n_span: int = 4, removal: bool = True,
             attention_entropy: bool = True, vocab_chunk: int = VOCAB_CHUNK, logit_lens: bool = True,
             progress: Callable[[float], None] | None = None) -> DepthDiagnosis:
    """Stream `batches` of token ids [B, T] through `model` once and reduce every per-layer metric.

    `removal` adds the removal effects and the skip-effect matrix (about L/2 more layer evaluations per layer);
    `attention_entropy` runs HF models with eager attention, whose weights the fused kernels do not return;
    `logit_lens=False` leaves out the logit lens (a head projection per layer) when only other metrics are read.
    `progress(tokens)` is called as each batch's work goes on (after its forward, each removal re-run and its
    vocabulary pass), with the share of the batch's tokens that part stands for; a batch adds up to B x T.
    `vocab_chunk` bounds the vocabulary-sized tensors of the logit lens and the removal scores to
    vocab_chunk x V each (a few are alive at once), whatever the batch's tokens."""
    view = depth_view(model)
    L = len(view.layers)
    if not 1 <= n_span <= L:
        raise ValueError(f"n_span={n_span} must be in 1..{L} (the model has {L} layers)")
    if vocab_chunk < 1:
        raise UserError(f"vocab_chunk={vocab_chunk} must be at least 1 (rows per vocabulary-sized tensor)")
    model.eval()
    result = DepthDiagnosis(view.family, L, n_span)
    n_reruns = (L + max(0, L - n_span + 1) * (n_span > 1)) if removal else 0
    for ids in batches:
        B, T = ids.shape
        share = B * T / (n_reruns + 2)  # the forward, each removal re-run and the vocabulary pass

        def done(share=share):
            if progress is not None:
                progress(share)

        t = trace(model, view, ids, entropy=attention_entropy, logits=False)
        done()
        result.tokens += B * T
        # The next token of each position, -1 at each sequence's end: the loss counts B x (T - 1) positions.
        targets = torch.cat([ids[:, 1:], ids.new_full((B, 1), -1)], 1).flatten()
        n_targets = B * (T - 1)
        _geometry(result, t, n_span, B * T, B)
        t.sublayers = None  # read by the geometry alone: freed before the removal states are made (peak memory)
        removed, effect = _removal_states(t, n_span, done) if removal else ([], None)
        v = _vocab_pass(view, t, targets, t.hidden[1:] if logit_lens else [], removed, vocab_chunk)
        done()
        result.add("loss", v["loss"], n_targets)
        if logit_lens:
            for name in ("kl", "top1", "top5"):
                result.add(f"logit_lens_{name}", v[f"lens_{name}"], B * T)
            result.add("logit_lens_loss", v["lens_loss"], n_targets)
        if removal:
            result.add("removal_delta_loss", v["removed_loss"][:L] - v["loss"], n_targets)
            result.add("removal_kl", v["removed_kl"][:L], B * T)
            result.add("skip_effect", effect, B * T)
            if n_span > 1:
                result.add("span_removal_delta_loss", v["removed_loss"][L:] - v["loss"], n_targets)
                result.add("span_removal_kl", v["removed_kl"][L:], B * T)
        del t, removed  # this batch's states go before the next forward, not after it (peak memory)
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
