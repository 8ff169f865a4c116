"""Training memory of the fast AttnRes path (`layerwise.kernels.attnres`): beyond what the standard residual
stream keeps for backward, Block AttnRes keeps its depth sources and per-token scalars, never a phase-1 mixture
[mixers, B, T, d]."""

import pytest
import torch
from conftest import tiny_model

from layerwise.kernels import attnres as kernel


def saved_bytes(model, ids, path: str) -> int:
    """Bytes autograd keeps for backward of one forward, each storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with kernel.use(path), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False).logits.sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("n_blocks", [1, 2])
def test_block_attnres_saves_only_its_sources_beyond_the_standard_stream(n_blocks):
    n_layers = 4
    # Wide enough that the per-token scalars (about 140 at 4 layers) stay well under one d-wide stream.
    standard = tiny_model(n_layers=n_layers, d_model=512, dtype=torch.float64)
    routed = tiny_model(n_layers=n_layers, d_model=512, residual="block_attnres", attnres_blocks=n_blocks,
                        dtype=torch.float64, random_queries=True)
    ids = torch.randint(0, 256, (2, 16))
    stream = ids.numel() * standard.config.d_model * 8  # one [B, T, d] float64 tensor
    extra = saved_bytes(routed, ids, "fast") - saved_bytes(standard, ids, "fast")
    # The depth sources are the embedding and the partial sum after each sublayer: 2L + 1 streams. What else
    # the fast path saves is per-token scalars (logits, weights, softmax statistics, inverse RMS), well under
    # one more stream; a phase-1 mixture kept for backward would add (mixers per block) streams per block.
    sources = (2 * n_layers + 1) * stream
    assert sources <= extra < sources + stream
    assert saved_bytes(routed, ids, "fast") < saved_bytes(routed, ids, "reference")


def test_mixer_input_differentiates_like_one_softmax_over_all_sources():
    """The mixture is never saved, so backward rebuilds its part from the sources: the gradients of the logits,
    the blocks and the partial equal those of the plain softmax-weighted sum."""
    torch.manual_seed(0)
    n, shape, d = 3, (2, 5), 8
    logits = (torch.randn(n + 1, *shape, dtype=torch.float64) * 5).requires_grad_()
    sources = [(torch.randn(*shape, d, dtype=torch.float64) * s).requires_grad_() for s in (1.0, 20.0, 0.3, 4.0)]
    probe = torch.randn(*shape, d, dtype=torch.float64)

    def grads(mix):
        return torch.autograd.grad((mix() * probe).sum(), [logits, *sources])

    def two_phase():
        weights, top, total = kernel.depth_softmax(logits[:n])
        mixed = kernel.depth_mix(weights[None], sources[:n])[0]
        share = kernel.merge_share(top, total, logits[n])
        return kernel.mixer_input(mixed, weights, sources[:n], share, sources[n])

    def one_softmax():
        return sum(a[..., None] * v for a, v in zip(logits.softmax(0), sources))

    for fast, ref in zip(grads(two_phase), grads(one_softmax)):
        torch.testing.assert_close(fast, ref, atol=1e-12, rtol=0)
