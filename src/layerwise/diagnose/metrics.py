"""One streaming pass of depth metrics (shared/spec/diagnostics.md §2), memory independent of the token count.

Per batch, hooks record each layer's call (input and arguments) and output; the metrics are reduced into
running sums and the batch's hidden states are dropped. Notation: h_l enters layer l, h_{l+1} leaves it.
  angular_distance[l]             mean_t arccos(cos(h_l, h_{l+1})) / pi
  block_influence[l]              1 - mean_t cos(h_l, h_{l+1})                      (ShortGPT)
  span_angular_distance_last[l]   arccos(cos(h_l, h_{l+n}))/pi at each sequence's last token (Gromov et al.)
  span_angular_distance_all[l]    the same over all tokens
  hidden_rms[l], hidden_var[l]    RMS and per-token variance over d of h_l, l = 0..L
  layer_contribution[l]           mean_t ||h_{l+1} - h_l|| / ||h_l||                 (Csordas et al.)
  attn_contribution[l], mlp_contribution[l]
                                  ||a_l|| / ||h_l|| and ||m_l|| / ||h_l + a_l||, from the mid-layer residual
                                  h_l + a_l (absent for parallel-residual layers such as GPT-NeoX's)
  logit_lens_*[l]                 head(final_norm(h_{l+1})) vs the model's logits: KL(p_l || p_final),
                                  top-1 agreement, top-5 overlap, next-token loss. The final norm is applied
                                  to the raw layer output (HF's last hidden state is already normed).
  removal_delta_loss[l], removal_kl[l]
                                  loss change and KL(p_full || p_without_l) when layer l is skipped,
                                  re-running only layers l+1.. from the cached input of layer l.
  span_removal_delta_loss[l], span_removal_kl[l]
                                  the same for the contiguous span l..l+n-1 (n = n_span)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F

from .adapters import depth_view


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)


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

    def to_json(self) -> dict:
        return {"family": self.family, "n_layers": self.n_layers, "n_span": self.n_span, "tokens": self.tokens,
                "metrics": {name: value.tolist() for name, value in self.metrics().items()}}


class _Recorder:
    """Hooks that keep one batch's layer calls (args, kwargs) and outputs."""

    def __init__(self, layers, mid_residual):
        self.layers, self.mid_residual = layers, mid_residual
        self.calls, self.outputs, self.mids, self.handles = {}, {}, {}, []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            mid = self.mid_residual(layer)
            if mid is not None:
                self.handles.append(mid.register_forward_pre_hook(
                    lambda m, args, i=i: self.mids.__setitem__(i, args[0])))
            self.handles.append(layer.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: self.calls.__setitem__(i, (args, kwargs)), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(
                lambda m, args, out, i=i: self.outputs.__setitem__(i, _hidden(out))))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def input(self, i: int) -> torch.Tensor:
        args, kwargs = self.calls[i]
        return args[0] if args else kwargs["hidden_states"]

    def rerun(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer i on a different input, with the exact other arguments it got in the recorded pass."""
        args, kwargs = self.calls[i]
        if args:
            return _hidden(self.layers[i](hidden, *args[1:], **kwargs))
        return _hidden(self.layers[i](*args, **{**kwargs, "hidden_states": hidden}))


@torch.no_grad()
def diagnose(model, batches: Iterable[torch.Tensor], n_span: int = 4, removal: bool = True) -> DepthDiagnosis:
    """Stream `batches` of token ids [B, T] through `model` once and reduce every per-layer metric."""
    view = depth_view(model)
    L = len(view.layers)
    if not 1 <= n_span <= L:
        raise ValueError(f"n_span={n_span} must be in 1..{L} (the model has {L} layers)")
    model.eval()
    result = DepthDiagnosis(view.family, L, n_span)
    for ids in batches:
        with _Recorder(view.layers, view.mid_residual) as rec:
            logits = model(input_ids=ids, use_cache=False).logits.float()
        B, T = ids.shape
        n_tok = B * T
        result.tokens += n_tok
        states = [rec.input(i) for i in range(L)] + [rec.outputs[L - 1]]
        cos = torch.stack([_cos(states[i], states[i + 1]).sum() for i in range(L)])
        result.add("angular_distance",
                   torch.stack([torch.arccos(_cos(states[i], states[i + 1])).sum() / math.pi for i in range(L)]), n_tok)
        result.add("block_influence", n_tok - cos, n_tok)
        span = [_cos(states[i], states[i + n_span]) for i in range(L - n_span + 1)]
        result.add("span_angular_distance_all", torch.stack([torch.arccos(c).sum() / math.pi for c in span]), n_tok)
        result.add("span_angular_distance_last",
                   torch.stack([torch.arccos(c[:, -1]).sum() / math.pi for c in span]), B)
        result.add("hidden_rms", torch.stack([s.double().pow(2).mean(-1).sqrt().sum() for s in states]), n_tok)
        result.add("hidden_var", torch.stack([s.double().var(-1, unbiased=False).sum() for s in states]), n_tok)

        def ratio(num, den):
            return (num.double().norm(dim=-1) / den.double().norm(dim=-1).clamp_min(1e-12)).sum()

        result.add("layer_contribution", torch.stack([ratio(states[i + 1] - states[i], states[i]) for i in range(L)]),
                   n_tok)
        if len(rec.mids) == L:
            mids = [rec.mids[i] for i in range(L)]
            result.add("attn_contribution", torch.stack([ratio(mids[i] - states[i], states[i]) for i in range(L)]), n_tok)
            result.add("mlp_contribution", torch.stack([ratio(states[i + 1] - mids[i], mids[i]) for i in range(L)]),
                       n_tok)

        targets = ids[:, 1:].reshape(-1)
        log_final = logits.log_softmax(-1)
        top5_final = logits.topk(5, dim=-1).indices
        loss_full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets, reduction="sum")
        result.add("loss", loss_full.reshape(1), targets.numel())
        lens = {"logit_lens_kl": [], "logit_lens_top1": [], "logit_lens_top5": [], "logit_lens_loss": []}
        for i in range(L):
            z = view.head(view.final_norm(states[i + 1])).float()
            log_p = z.log_softmax(-1)
            lens["logit_lens_kl"].append((log_p.exp() * (log_p - log_final)).sum())
            lens["logit_lens_top1"].append((z.argmax(-1) == logits.argmax(-1)).sum())
            top5 = z.topk(5, dim=-1).indices
            lens["logit_lens_top5"].append((top5[..., :, None] == top5_final[..., None, :]).any(-1).sum() / 5)
            lens["logit_lens_loss"].append(
                F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), targets, reduction="sum"))
        for name, values in lens.items():
            result.add(name, torch.stack(values), targets.numel() if name == "logit_lens_loss" else n_tok)

        if removal:
            p_full = log_final.exp()

            def without(first: int, count: int):
                """Loss change and KL when layers first..first+count-1 are skipped: the input of `first` goes
                straight to layer first+count, and only the layers after the gap are re-run."""
                h = states[first]
                for j in range(first + count, L):
                    h = rec.rerun(j, h)
                z = view.head(view.final_norm(h)).float()
                loss = F.cross_entropy(z[:, :-1].reshape(-1, z.shape[-1]), targets, reduction="sum")
                return loss - loss_full, (p_full * (log_final - z.log_softmax(-1))).sum()

            for name, count in (("removal", 1), ("span_removal", n_span)):
                if name == "span_removal" and n_span == 1:
                    continue
                delta, kl = zip(*(without(s, count) for s in range(L - count + 1)))
                result.add(f"{name}_delta_loss", torch.stack(delta), targets.numel())
                result.add(f"{name}_kl", torch.stack(kl), n_tok)
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
