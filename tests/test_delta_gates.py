"""Delta AttnRes options (Luo, Cai, Hu): the gates, the null source, the entropy bonus and the released code's
alternating-sum block sources, each against its formula written out in float64, plus the round trips every
preset gets (HF save/load, cached generate, compile) for the options no preset selects."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers
from conftest import greedy_without_cache, tiny_model

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.nn.hooks import capture
from layerwise.nn.residual import sublayers
from layerwise.reference import depth_attention

GATES = ["none", "sigmoid_scalar", "sigmoid_vector", "learnable_alpha"]


def _model(residual="delta_attnres", n_layers=3, **overrides):
    """A float64 Delta model whose pseudo-queries, gates and null sources are all drawn at random, so a wrong
    index or a formula that agrees with the right one only at init shows."""
    model = tiny_model(n_layers=n_layers, residual=residual, dtype=torch.float64, random_queries=True, **overrides)
    scheme = model.model.residual
    with torch.no_grad():
        if scheme.null_sources is not None:
            scheme.null_sources.normal_(0, 1.0)
        for name, p in scheme.named_parameters():
            if name.startswith("gates."):
                p.normal_(0, 0.5)
    return model


def _gate(kind, gate, h):
    """g of `u = h + g * mix`, written from the gate's parameters."""
    if kind == "none":
        return 1.0
    if kind == "sigmoid_scalar":
        return 1 / (1 + torch.exp(-gate.logit))
    if kind == "sigmoid_vector":
        return 1 / (1 + torch.exp(-(h @ gate.proj.weight.T + gate.proj.bias)))
    return gate.alpha


def reference_logits(model, ids):
    """Delta (Block) AttnRes written out sublayer by sublayer: sublayer j reads h + g_j * depth attention over
    [null source j] + its sources; Delta's sources are [e, every sublayer output], Delta Block's are appended at
    each block's first layer: e, then h - h_previous_block_start (or h - the previous source, as released)."""
    cfg, scheme = model.config, model.model.residual
    block = cfg.residual == "delta_block_attnres"
    per_block = math.ceil(cfg.n_layers / cfg.attnres_blocks)
    e, ctx = model.model.embed(input_ids=ids)
    h, sources, block_start = e, [], None
    for j, sub in enumerate(sublayers(model.model.layers)):
        k = j if cfg.delta_null_source else j - 1  # mixer index: sublayer 0 has one only with a null source
        routed = ([scheme.null_sources[k].expand_as(h)] if cfg.delta_null_source else []) + sources
        x = h
        if routed:
            gate = scheme.gates[k] if scheme.gates is not None else None
            x = h + _gate(cfg.delta_gate, gate, h) * depth_attention(scheme.mixers[k], routed)
        out = sub.branch(x, ctx)
        if not block:
            sources = sources + ([e] if j == 0 else []) + [out]
        elif j % 2 == 0 and (j // 2) % per_block == 0:
            if block_start is None:
                sources = [h]
            elif cfg.delta_block_sources == "released":
                sources = sources + [h - sources[-1]]
            else:
                sources = sources + [h - block_start]
            block_start = h
        h = h + out
    return model.lm_head(model.model.norm(h))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("null", [False, True])
def test_delta_attnres_with_each_gate_and_null_source_is_its_formula(gate, null):
    model = _model(delta_gate=gate, delta_null_source=null)
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(model(ids).logits, reference_logits(model, ids), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gate", ["none", "sigmoid_vector"])
@pytest.mark.parametrize("sources", ["deltas", "released"])
@pytest.mark.parametrize("null", [False, True])
def test_delta_block_attnres_with_each_source_definition_is_its_formula(gate, sources, null):
    model = _model("delta_block_attnres", n_layers=5, attnres_blocks=3, delta_gate=gate, delta_block_sources=sources,
                   delta_null_source=null)  # blocks of 2 layers: 0-1, 2-3, 4
    ids = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(model(ids).logits, reference_logits(model, ids), rtol=1e-12, atol=1e-12)


def test_the_released_gate_form_is_the_same_sum():
    """(1 - g) h + g (h + mix), as the released code writes every gate, equals h + g mix."""
    model = _model(delta_gate="sigmoid_vector")
    gate = model.model.residual.gates[0]
    h, mixed = torch.randn(2, 5, 128, dtype=torch.float64), torch.randn(2, 5, 128, dtype=torch.float64)
    g = _gate("sigmoid_vector", gate, h)
    torch.testing.assert_close(gate(h, mixed), (1 - g) * h + g * (h + mixed), rtol=1e-12, atol=1e-12)


def test_released_block_sources_are_alternating_sums_of_the_block_deltas():
    """One layer per block: the released sources are [e, D0, e + D1, D0 + D2] for block deltas D_k."""
    model = _model("delta_block_attnres", n_layers=4, attnres_blocks=4, delta_block_sources="released")
    ids = torch.randint(0, 256, (1, 6))
    with capture(model, "model.residual.mixers.*.hook_sources") as seen:
        model(ids)
    last = seen[f"model.residual.mixers.{len(model.model.residual.mixers) - 1}.hook_sources"]
    with capture(model, "model.layers.*.hook_out") as outputs:
        model(ids)
    outs = list(outputs.values())
    e, _ = model.model.embed(input_ids=ids)
    d = [outs[2 * k] + outs[2 * k + 1] for k in range(3)]  # the block deltas: each layer's two outputs
    assert len(last) == 4
    for got, want in zip(last, [e, d[0], e + d[1], d[0] + d[2]]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---- inits ------------------------------------------------------------------------------------------------------

def test_fresh_gates_and_null_sources_start_at_the_released_inits():
    cases = {"sigmoid_scalar": {"logit": -2.0}, "sigmoid_vector": {"proj.weight": 0.0, "proj.bias": -2.0},
             "learnable_alpha": {"alpha": 0.0}}
    for gate, inits in cases.items():
        scheme = LayerwiseForCausalLM(ModelConfig.from_preset("delta-attnres", delta_gate=gate,
                                                              delta_null_source=True)).model.residual
        assert len(scheme.gates) == len(scheme.mixers) == 2 * 4  # a null source gives sublayer 0 a mixer too
        for g in scheme.gates:
            params = dict(g.named_parameters())
            assert set(params) == set(inits), gate
            for name, value in inits.items():
                assert torch.all(params[name] == value), (gate, name)
        assert torch.count_nonzero(scheme.null_sources) == 0
    assert len(LayerwiseForCausalLM(ModelConfig.from_preset("delta-attnres")).model.residual.mixers) == 2 * 4 - 1


def _stream_only_copy(model):
    """The Pre-RMSNorm model with `model`'s layers, embedding and final norm: the plain residual stream."""
    plain = LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", n_layers=model.config.n_layers)).double()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("model.residual.") for k in unexpected)
    return plain.eval()


@pytest.mark.parametrize("residual", ["delta_attnres", "delta_block_attnres"])
def test_learnable_alpha_at_init_is_exactly_the_plain_residual_stream(residual):
    blocks = dict(attnres_blocks=2) if residual == "delta_block_attnres" else {}
    model = tiny_model(residual=residual, dtype=torch.float64, random_queries=True, delta_gate="learnable_alpha",
                       delta_null_source=True, **blocks)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _stream_only_copy(model)(ids).logits)


def test_a_zero_null_source_with_zero_queries_adds_the_mean_over_n_plus_one_sources():
    """Not the identity the released code's comment promises: uniform weights over [0, v_1..v_n] add sum v / (n+1)."""
    scheme = tiny_model(residual="delta_attnres", dtype=torch.float64, delta_null_source=True).model.residual
    h = torch.randn(2, 5, 128, dtype=torch.float64)
    sources = list(torch.randn(3, 2, 5, 128, dtype=torch.float64))
    ctx = type("Ctx", (), {"extras": {}})()
    torch.testing.assert_close(scheme.route(3, h, sources, ctx), h + sum(sources) / 4, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scheme.route(0, h, [], ctx), h, rtol=0, atol=0)  # sublayer 0 reads [0]: h exactly


# ---- entropy bonus ----------------------------------------------------------------------------------------------

def _mean_depth_entropy(model, ids):
    """Mean over the routed sublayers of the token-mean entropy -sum_i a_i log a_i of their depth weights, from
    the weights the mixers' hook points see (kept differentiable)."""
    weights, handles = [], []
    for mixer in model.model.residual.mixers:
        handles.append(mixer.hook_weights.register_forward_hook(lambda m, a, out: weights.append(out)))
    try:
        logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    entropies = [-(w * torch.log(w)).sum(0).mean() for w in weights]
    return logits, torch.stack(entropies).mean(), len(entropies)


@pytest.mark.parametrize("residual, null", [("delta_attnres", False), ("delta_block_attnres", True)])
def test_the_entropy_bonus_subtracts_lambda_times_the_mean_depth_entropy_and_its_gradient(residual, null):
    lam = 0.37
    blocks = dict(attnres_blocks=2) if residual == "delta_block_attnres" else {}
    model = _model(residual, n_layers=4, delta_null_source=null, delta_entropy_bonus=lam, **blocks)
    ids = torch.randint(0, 256, (2, 10))
    params = [p for p in model.parameters()]

    out = model(ids, labels=ids)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)

    model.model.residual.entropy_bonus = 0.0  # the same weights, cross-entropy alone
    logits, entropy, n_routed = _mean_depth_entropy(model, ids)
    assert n_routed == 2 * 4 - (0 if null else 1)  # every sublayer with sources, and only those
    plain = model(ids, labels=ids)
    assert plain.residual_loss is None
    torch.testing.assert_close(out.residual_loss, -lam * entropy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, plain.loss - lam * entropy, rtol=1e-12, atol=1e-12)
    ce_grads = torch.autograd.grad(plain.loss, params, allow_unused=True)
    entropy_grads = torch.autograd.grad(entropy, params, allow_unused=True)
    moved = 0
    for g, g_ce, g_h in zip(grads, ce_grads, entropy_grads):
        g_h = torch.zeros_like(g) if g_h is None else g_h
        torch.testing.assert_close(g, g_ce - lam * g_h, rtol=1e-10, atol=1e-12)
        moved += bool(g_h.abs().max() > 1e-6)
    assert moved > 0  # the bonus really reaches the queries and key norms


def test_a_depth_weight_that_underflows_to_zero_keeps_the_entropy_gradient_finite():
    from layerwise.nn.residual import depth_entropy

    logits = torch.tensor([[0.0], [-200.0], [1.0]], requires_grad=True)  # exp(-200) is 0 in float32
    weights = logits.softmax(0)
    assert weights[1] == 0
    depth_entropy(weights).backward()
    assert torch.isfinite(logits.grad).all()


def test_the_trainer_trains_on_the_entropy_bonus_and_logs_the_cross_entropy(corpus, tmp_path):
    from test_train import train_losses

    from layerwise.train.config import TrainConfig
    from layerwise.train.trainer import train

    def run(out, bonus):
        train(TrainConfig(model=dict(preset="delta-attnres", size="tiny", n_layers=2, delta_entropy_bonus=bonus),
                          data=str(corpus), out=str(out), max_tokens=3 * 4 * 32, batch_size=4, seq_len=32, lr=3e-2,
                          warmup=0, eval_every=100, eval_batches=1, telemetry_every=100, ckpt_every=100,
                          log_every=1, tensorboard=False))
        return train_losses(out)

    plain, bonus = run(tmp_path / "plain", 0.0), run(tmp_path / "bonus", 5.0)
    # Zero pseudo-queries weight the sources uniformly, the entropy's maximum, so the bonus has no gradient at
    # init: the first update is the same, and step 2 logs the same cross-entropy (no bonus in the logged loss).
    assert plain[1] == pytest.approx(bonus[1], abs=1e-6) and plain[2] == pytest.approx(bonus[2], abs=1e-6)
    assert plain[3] != pytest.approx(bonus[3], abs=1e-4)  # the second update followed the bonus too


# ---- config -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (dict(delta_gate="tanh"), r"ModelConfig\.delta_gate='tanh' is not one of none, sigmoid_scalar"),
    (dict(delta_block_sources="alternating"), r"ModelConfig\.delta_block_sources='alternating' is not one of deltas, "
                                              r"released"),
    (dict(delta_entropy_bonus=-0.1), r"ModelConfig\.delta_entropy_bonus=-0\.1 must be a finite number >= 0"),
    (dict(delta_entropy_bonus=float("nan")), r"ModelConfig\.delta_entropy_bonus=nan must be"),
    (dict(delta_null_source="yes"), r"ModelConfig\.delta_null_source='yes' must be True or False"),
])
def test_bad_delta_fields_fail_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_preset("delta-block-attnres", **overrides)


@pytest.mark.parametrize("preset, overrides, field", [
    ("pre-rmsnorm", dict(delta_gate="sigmoid_scalar"), "delta_gate"),
    ("block-attnres", dict(delta_null_source=True), "delta_null_source"),
    ("delta-attnres", dict(delta_block_sources="released"), "delta_block_sources"),  # no blocks to source
])
def test_a_delta_field_nothing_selected_reads_warns(preset, overrides, field):
    with pytest.warns(UserWarning, match=rf"^ModelConfig\.{field}=.*it has no effect$"):
        ModelConfig.from_preset(preset, **overrides)


def test_the_delta_fields_the_schemes_read_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelConfig.from_preset("delta-block-attnres", delta_gate="sigmoid_vector", delta_null_source=True,
                                delta_entropy_bonus=0.01, delta_block_sources="released")
        ModelConfig.from_preset("delta-attnres", delta_gate="learnable_alpha", delta_entropy_bonus=0.01)


# ---- round trips for the options no preset selects ---------------------------------------------------------------

OPTIONS = {
    "sigmoid-vector-null": dict(residual="delta_attnres", delta_gate="sigmoid_vector", delta_null_source=True),
    "sigmoid-scalar-block": dict(residual="delta_block_attnres", attnres_blocks=2, delta_gate="sigmoid_scalar"),
    "alpha-entropy": dict(residual="delta_attnres", delta_gate="learnable_alpha", delta_entropy_bonus=0.1),
    "released-null-entropy": dict(residual="delta_block_attnres", attnres_blocks=2, delta_block_sources="released",
                                  delta_null_source=True, delta_entropy_bonus=0.1),
}


def _option_model(name):
    model = tiny_model(random_queries=True, **OPTIONS[name])
    with torch.no_grad():  # gates away from their init, so a lost gate parameter would show after a reload
        for pname, p in model.model.residual.named_parameters():
            if pname.startswith(("gates.", "null_sources")):
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_save_then_auto_from_pretrained_gives_bit_identical_logits(name, tmp_path):
    model = _option_model(name)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(before, loaded(ids).logits)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_cached_generate_equals_greedy_full_forwards(name):
    model = _option_model(name)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    prompt = torch.randint(0, 256, (2, 6))
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, greedy_without_cache(model, prompt, 8))


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_compiles_fullgraph_and_trains_every_parameter(name):
    model = _option_model(name).train()
    ids = torch.randint(0, 256, (2, 16))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    out = compiled(ids, labels=ids)
    eager = model(ids, labels=ids)
    torch.testing.assert_close(out.logits, eager.logits)
    torch.testing.assert_close(out.loss, eager.loss)
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
