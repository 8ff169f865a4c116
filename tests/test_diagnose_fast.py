"""The chunked vocabulary pass of `diagnose`: every chunk size gives the metrics of a plain float64 computation over
whole [B, T, V] tensors, and no tensor over the vocabulary outside the model's own forward exceeds chunk x V."""

import pytest
import torch
import torch.nn.functional as F
from conftest import HF_FAMILIES, hf_model, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from layerwise.diagnose import depth_view, diagnose
from layerwise.diagnose import metrics as metrics_module
from layerwise.diagnose.trace import trace
from layerwise.errors import UserError

VOCAB_METRICS = ("loss", "logit_lens_kl", "logit_lens_top1", "logit_lens_top5", "logit_lens_loss",
                 "removal_delta_loss", "removal_kl", "span_removal_delta_loss", "span_removal_kl")
# 2 x 5 = 10 tokens: 1 and 3 leave a partial last chunk, 20 and 40 put 2 and 4 states in one head matmul
# (the lens's and the removal's groups then end part-full too), 10**6 takes everything at once.
CHUNKS = (1, 3, 10, 20, 40, 10**6)


@torch.no_grad()
def plain_vocab_metrics(model, ids: torch.Tensor, n_span: int) -> dict[str, torch.Tensor]:
    """The definitions in metrics.py's docstring, over whole [B, T, V] tensors, in float64."""
    view = depth_view(model)
    t = trace(model, view, ids)
    L = len(t.hidden) - 1
    targets = ids[:, 1:].flatten()

    def head(h):
        return view.unembed(h).double()

    def loss(z):
        return F.cross_entropy(z[:, :-1].flatten(0, 1), targets)

    final = t.logits.double()  # the forward's own (eager attention: HF's softmax there is float32 even in float64)
    log_final = final.log_softmax(-1)
    out = {"loss": loss(final).reshape(1)}
    lens = [head(h) for h in t.hidden[1:]]
    out["logit_lens_kl"] = torch.stack([(z.softmax(-1) * (z.log_softmax(-1) - log_final)).sum(-1).mean()
                                        for z in lens])
    out["logit_lens_top1"] = torch.stack([(z.argmax(-1) == final.argmax(-1)).double().mean() for z in lens])
    out["logit_lens_top5"] = torch.stack([
        torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 5
                      for a, b in zip(z.topk(5, -1).indices.flatten(0, 1), final.topk(5, -1).indices.flatten(0, 1))],
                     dtype=torch.float64).mean() for z in lens])
    out["logit_lens_loss"] = torch.stack([loss(z) for z in lens])
    for name, count, starts in (("removal", 1, range(L)), ("span_removal", n_span, range(L - n_span + 1))):
        removed = [head(t.resume(s, count)[-1]) for s in starts]
        out[f"{name}_delta_loss"] = torch.stack([loss(z) - out["loss"][0] for z in removed])
        out[f"{name}_kl"] = torch.stack([(log_final.exp() * (log_final - z.log_softmax(-1))).sum(-1).mean()
                                         for z in removed])
    return out


def assert_chunks_match_plain(model, ids, n_span=2):
    expected = plain_vocab_metrics(model, ids, n_span)
    baseline = None
    for chunk in CHUNKS:
        m = diagnose(model, [ids], n_span=n_span, vocab_chunk=chunk).metrics()
        for name in VOCAB_METRICS:
            torch.testing.assert_close(m[name], expected[name], rtol=0, atol=1e-10, msg=f"{name}, chunk {chunk}")
        if baseline is None:
            baseline = m
        for name in baseline:  # the metrics that never touch the vocabulary do not depend on the chunk either
            torch.testing.assert_close(m[name], baseline[name], rtol=0, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_every_chunk_size_gives_the_plain_metrics_on_every_hf_family(family):
    assert_chunks_match_plain(hf_model(family).double(), torch.randint(0, 128, (2, 5)))


@pytest.mark.parametrize("preset, overrides", [
    ("pre-rmsnorm", {}),
    ("attnres", {}),
    ("block-attnres", {}),
    ("pre-rmsnorm", {"n_layers": 6, "layer_order": [0, 1, 2, 1, 2, 3]}),  # a layer program: a tied layer runs twice
])
def test_every_chunk_size_gives_the_plain_metrics_on_layerwise_models(preset, overrides):
    model = tiny_model(preset, dtype=torch.float64, random_queries=True, **overrides)
    assert_chunks_match_plain(model, torch.randint(1, model.config.vocab_size, (2, 5)), n_span=3)


class _LargestVocabTensor(TorchDispatchMode):
    """The largest op output whose last dimension is the vocabulary, counted only while `counting`; views (an
    output in an input's storage) allocate nothing and are not counted."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.counting, self.largest = vocab, True, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.counting:
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if (isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab
                        and t.untyped_storage().data_ptr() not in inputs):
                    self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk", [1, 6, 64])
def test_vocabulary_tensors_are_at_most_chunk_rows_whatever_the_batch(chunk, monkeypatch):
    model = hf_model("llama").double()
    V, ids = model.config.vocab_size, torch.randint(0, 128, (3, 16))
    mode = _LargestVocabTensor(V)

    def trace_uncounted(*args, **kwargs):  # the model's forward (its [B, T, V] logits too, were they kept)
        mode.counting = False
        try:
            return trace(*args, **kwargs)
        finally:
            mode.counting = True

    monkeypatch.setattr(metrics_module, "trace", trace_uncounted)
    with mode:
        diagnose(model, [ids], n_span=2, vocab_chunk=chunk)
    # The top-5 comparison is [rows, 5, 5], not over V; every vocabulary-sized tensor is one chunk or less.
    assert 0 < mode.largest <= chunk * V
    assert mode.largest >= min(chunk, ids.numel()) * V  # the bound is met by chunking, not by skipping work


def test_vocab_chunk_below_one_is_refused_with_the_field_named():
    with pytest.raises(UserError, match="vocab_chunk=0"):
        diagnose(hf_model("llama"), [torch.randint(0, 128, (1, 4))], vocab_chunk=0)


def test_progress_moves_within_each_batch_and_adds_up_to_the_tokens():
    model = tiny_model("pre-rmsnorm", dtype=torch.float64)
    batches = [torch.randint(0, model.config.vocab_size, (2, 8)) for _ in range(2)]
    steps = []
    diagnose(model, batches, n_span=2, progress=steps.append)
    L = model.config.n_layers
    per_batch = 1 + L + (L - 1) + 1  # the forward, L single and L - 1 span re-runs, the vocabulary pass
    assert len(steps) == 2 * per_batch
    assert sum(steps) == pytest.approx(2 * 16)
    assert sum(steps[:per_batch]) == pytest.approx(16)  # the first batch is whole before the second starts
    steps.clear()
    diagnose(model, batches, removal=False, progress=steps.append)
    assert len(steps) == 2 * 2 and sum(steps) == pytest.approx(32)
