"""The fast AttnRes kernels (`layerwise.kernels.attnres`) compute the reference's mathematics: float64 equality
of logits and every gradient, under KV-cache decoding, resumption after skipped layers, and the hook fallback."""

import pytest
import torch
from conftest import greedy_without_cache, tiny_model

from layerwise.errors import UserError
from layerwise.kernels import attnres as kernel
from layerwise.nn.hooks import capture
from layerwise.nn.residual import DepthAttention
from layerwise.reference import depth_attention

# (residual, n_layers, attnres_blocks): N = 1 and N = 2L (one sublayer per block) are the extremes.
CASES = [("block_attnres", 4, 1), ("block_attnres", 4, 2), ("block_attnres", 4, 4), ("block_attnres", 4, 8),
         ("block_attnres", 3, 3), ("full_attnres", 3, 6)]


def _model(residual, n_layers, n_blocks):
    model = tiny_model(n_layers=n_layers, residual=residual, attnres_blocks=n_blocks, dtype=torch.float64,
                       random_queries=True)
    with torch.no_grad():  # non-unit key-norm gains: the fast path folds them into the queries
        for name, p in model.named_parameters():
            if name.endswith("key_norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _logits_and_grads(model, ids, path):
    model.zero_grad(set_to_none=True)
    with kernel.use(path):
        logits = model(input_ids=ids, use_cache=False).logits
    (logits.pow(2).mean() + logits[:, -1].sum()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def reference_calls(monkeypatch):
    """How many times the reference `DepthAttention.forward` ran."""
    calls = []
    original = DepthAttention.forward
    monkeypatch.setattr(DepthAttention, "forward", lambda self, sources: calls.append(1) or original(self, sources))
    return calls


@pytest.mark.parametrize("residual,n_layers,n_blocks", CASES)
def test_fast_path_equals_the_reference_in_logits_and_every_gradient(residual, n_layers, n_blocks, reference_calls):
    model = _model(residual, n_layers, n_blocks)
    ids = torch.randint(0, 256, (2, 9))
    fast_logits, fast_grads = _logits_and_grads(model, ids, "fast")
    assert reference_calls == []  # the fast path never stacked sources through the reference mixer
    ref_logits, ref_grads = _logits_and_grads(model, ids, "reference")
    assert len(reference_calls) == 2 * n_layers + 1
    torch.testing.assert_close(fast_logits, ref_logits, atol=1e-12, rtol=0)
    assert fast_grads.keys() == ref_grads.keys() == {n for n, _ in model.named_parameters()}
    for name, ref in ref_grads.items():  # 1e-12 of each gradient's scale (the embedding's reaches ~200)
        assert (fast_grads[name] - ref).abs().max() <= 1e-12 * max(1.0, ref.abs().max().item()), name


@pytest.mark.parametrize("residual,n_layers,n_blocks", [CASES[2], CASES[-1]])
def test_fast_kv_cache_decoding_equals_full_forwards(residual, n_layers, n_blocks):
    model = _model(residual, n_layers, n_blocks)
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad(), kernel.use("fast"):  # "auto" would take the reference for so few tokens
        full = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :6], use_cache=True)
        steps = [out.logits]
        for t in range(6, 10):  # T = 1 steps: every source has one token
            out = model(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-12, rtol=0)
    prompt = ids[:, :4]
    with kernel.use("fast"):
        generated = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, greedy_without_cache(model, prompt, 6))


def test_a_hooked_mixer_takes_the_reference_path_and_sees_the_depth_weights(reference_calls):
    model = _model("block_attnres", 4, 4)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad(), kernel.use("fast"):
        plain = model(input_ids=ids, use_cache=False).logits
        assert reference_calls == []
        with capture(model, ["model.residual.mixers.5.hook_sources", "model.residual.mixers.5.hook_weights"]) as seen:
            hooked = model(input_ids=ids, use_cache=False).logits
    assert len(reference_calls) == 2 * 4 + 1  # one hook anywhere sends every mixer down the reference path
    torch.testing.assert_close(hooked, plain, atol=1e-12, rtol=0)
    sources, weights = seen["model.residual.mixers.5.hook_sources"], seen["model.residual.mixers.5.hook_weights"]
    mixer = model.model.residual.mixers[5]
    assert sources.shape[0] == weights.shape[0] == 4  # b_0 (embedding), b_1, b_2 and sublayer 4 as the partial
    logits = torch.stack([(mixer.key_norm(v) * mixer.query).sum(-1) for v in sources])
    torch.testing.assert_close(weights, logits.softmax(0), atol=1e-12, rtol=0)
    torch.testing.assert_close((weights[..., None] * sources).sum(0), depth_attention(mixer, list(sources)))


@pytest.mark.parametrize("skipped", [{0}, {1}, {1, 2}, {3}])
def test_fast_path_resumes_a_cached_state_with_layers_skipped_like_the_reference(skipped):
    """Diagnostics resume from any layer's state with later layers skipped: a skip can cross a block boundary,
    so phase 1 cached in the state must be recomputed for the block the next sublayer is in."""
    model = _model("block_attnres", 4, 2)
    inner = model.model
    ids = torch.randint(0, 256, (2, 6))

    def run(path):
        with kernel.use(path), torch.no_grad():
            h, ctx = inner.embed(input_ids=ids)
            state = inner.residual.start(h)
            for i, layer in enumerate(inner.positions):
                if i not in skipped:
                    state = inner.residual.step(state, i, layer, ctx)
            return inner.residual.readout(state)

    torch.testing.assert_close(run("fast"), run("reference"), atol=1e-12, rtol=0)


def test_two_phase_online_softmax_merge_equals_one_softmax():
    """Phase 1 over n completed sources for several mixers, merged with a partial source per mixer, equals one
    softmax over all n + 1 sources."""
    torch.manual_seed(0)
    n, mixers, shape, d = 4, 3, (2, 5), 8
    sources = [torch.randn(*shape, d, dtype=torch.float64) * scale for scale in (1.0, 30.0, 0.1, 4.0)]
    logits = torch.randn(n, *shape, mixers, dtype=torch.float64) * 20  # large: the max shift matters
    partials = torch.randn(mixers, *shape, d, dtype=torch.float64)
    partial_logits = torch.randn(mixers, *shape, dtype=torch.float64) * 20
    weights, top, total = kernel.depth_softmax(logits)
    mixed = kernel.depth_mix(weights.movedim(-1, 0), sources)
    for m in range(mixers):
        share = kernel.merge_share(top[..., m], total[..., m], partial_logits[m])
        merged = kernel.mixer_input(mixed[m], weights[..., m], sources, share, partials[m])
        alpha = torch.cat([logits[..., m], partial_logits[m][None]]).softmax(0)
        expected = sum(a[..., None] * v for a, v in zip(alpha, [*sources, partials[m]]))
        torch.testing.assert_close(merged, expected, atol=1e-12, rtol=0)


def test_source_logits_fold_the_key_norm_gain_into_the_query():
    torch.manual_seed(0)
    mixer = DepthAttention(16, eps=1e-5).double()
    with torch.no_grad():
        mixer.query.normal_()
        mixer.key_norm.weight.uniform_(0.5, 1.5)
    v = torch.randn(3, 4, 16, dtype=torch.float64) * 7
    queries = kernel.effective_queries([mixer.query], [mixer.key_norm.weight])
    torch.testing.assert_close(kernel.source_logits(v, queries, 1e-5)[..., 0], (mixer.key_norm(v) * mixer.query).sum(-1),
                               atol=1e-12, rtol=0)


def test_unknown_kernel_path_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.setenv(kernel.ENV_VAR, "triton")
    with pytest.raises(UserError, match="LAYERWISE_ATTNRES_KERNEL='triton'.*auto, fast, reference"):
        kernel.active_path()
    with pytest.raises(UserError, match=r"use\(path\)='fused'"):
        with kernel.use("fused"):
            pass
    monkeypatch.setenv(kernel.ENV_VAR, "reference")
    assert kernel.active_path() == "reference"
    with kernel.use("fast"):
        assert kernel.active_path() == "fast"
    monkeypatch.delenv(kernel.ENV_VAR)
    assert kernel.active_path() == "auto"


def test_auto_takes_the_fast_path_from_the_token_threshold_up(reference_calls):
    model = _model("block_attnres", 2, 2)
    rows = kernel.FAST_MIN_TOKENS // 8  # tokens = batch x 8
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (rows - 1, 8)), use_cache=False)
        assert len(reference_calls) == 2 * 2 + 1
        model(input_ids=torch.randint(0, 256, (rows, 8)), use_cache=False)
        assert len(reference_calls) == 2 * 2 + 1  # no more reference calls


@pytest.mark.parametrize("dtype, max_rel, mean_abs", [(torch.float32, 1e-5, 1e-6), (torch.bfloat16, 0.02, 5e-4)])
def test_fast_and_reference_agree_to_the_dtypes_rounding_so_batch_size_does_not_pick_the_numbers(dtype, max_rel,
                                                                                                 mean_abs):
    """Under "auto" the path depends on the forward's token count; both normalise keys in float32 at least, so
    they differ only by rounding (bf16: keys rounded to bf16 in the reference gave 10x the mean gap)."""
    torch.manual_seed(0)
    model = tiny_model("block-attnres", random_queries=True).to(dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (32, 16))
    with torch.no_grad():
        with kernel.use("reference"):
            ref = model(ids).logits.float()
        with kernel.use("fast"):
            fast = model(ids).logits.float()
    gap = (ref - fast).abs()
    assert gap.max() <= max_rel * ref.abs().max() and gap.mean() <= mean_abs


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_suite.sh runs it)")


@needs_cuda
@pytest.mark.parametrize("preset", ["block-attnres", "attnres"])
def test_cuda_compiled_fast_path_under_bf16_autocast_matches_the_reference_logits_and_gradients(preset):
    torch.manual_seed(0)
    model = tiny_model(preset, random_queries=True).cuda()
    ids = torch.randint(0, model.config.vocab_size, (8, 64), device="cuda")

    def run(path, forward):
        model.zero_grad(set_to_none=True)
        with kernel.use(path), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(ids).logits.float()
        logits.square().mean().backward()
        return logits.detach(), [p.grad.float().clone() for p in model.parameters()]

    ref_logits, ref_grads = run("reference", model)
    fast_logits, fast_grads = run("fast", torch.compile(model))
    assert (fast_logits - ref_logits).abs().max() <= 0.02 * ref_logits.abs().max()
    for ref, fast in zip(ref_grads, fast_grads):
        assert (fast - ref).norm() <= 0.1 * ref.norm() + 1e-6  # bf16 rounding (never run: no GPU lent yet)
