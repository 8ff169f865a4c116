"""Each variant carries its rules: capability flags transforms ask, the config fields it reads (a field nothing
selected reads warns), and one init table that covers every tensor exactly once."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.nn.initialization import attach_init, init_weights
from layerwise.nn.norms import LayerNormScaling
from layerwise.nn.registry import REGISTRIES, selected_variants, variant_of
from layerwise.presets import PRESETS, SIZES

# (config field, name): (depth_dependent, drop_safe, repeat_safe). Every registered variant must be listed.
FLAGS = {
    ("norm", "layernorm"): (False, True, True),
    ("norm", "rmsnorm"): (False, True, True),
    ("norm", "ssrmsnorm"): (False, True, True),
    ("norm", "dyt"): (False, True, True),
    ("norm", "bhyt"): (False, True, True),
    ("norm", "prepbn"): (False, True, False),
    ("norm", "identity"): (False, True, True),
    ("norm", "seednorm"): (False, True, True),
    ("norm", "frozen"): (False, True, True),
    ("norm", "crmsnorm"): (False, True, True),
    ("norm", "fakeln"): (False, True, True),
    ("norm", "un"): (False, True, False),
    ("norm", "powernorm"): (False, True, False),
    ("bhyt_var_approx", "baseline"): (False, True, True),
    ("bhyt_var_approx", "beta"): (False, True, True),
    ("bhyt_var_approx", "eta"): (False, True, True),
    ("bhyt_var_approx", "residual_aware"): (False, True, True),
    ("norm_placement", "pre"): (False, True, True),
    ("norm_placement", "post"): (False, True, True),
    ("norm_placement", "peri"): (False, True, True),
    ("norm_placement", "mixln"): (True, True, True),
    ("norm_placement", "deepnorm"): (True, True, True),
    ("residual", "standard"): (False, True, True),
    ("residual", "full_attnres"): (True, False, False),
    ("residual", "block_attnres"): (True, False, False),
    ("residual", "delta_attnres"): (True, False, False),
    ("residual", "delta_block_attnres"): (True, False, False),
    ("value_residual", "none"): (False, True, True),
    ("value_residual", "resformer"): (True, False, False),
    ("value_residual", "satformer"): (True, False, False),
    ("mlp", "swiglu"): (False, True, True),
    ("mlp", "gelu"): (False, True, True),
    ("mlp", "gelu_tanh"): (False, True, True),
    ("position_embedding", "rope"): (False, True, True),
    ("position_embedding", "learned"): (False, True, True),
}


def test_every_registered_variant_states_its_flags():
    registered = {(field, name) for field, registry in REGISTRIES.items() for name in registry.names()}
    assert registered == set(FLAGS)


@pytest.mark.parametrize("field, name", sorted(FLAGS))
def test_capability_flags(field, name):
    variant = REGISTRIES[field].get(name)
    assert (variant.depth_dependent, variant.drop_safe, variant.repeat_safe) == FLAGS[(field, name)]
    # A flag that refuses something says why, in words an error message can carry.
    assert bool(variant.depth_dependence) == variant.depth_dependent
    assert bool(variant.drop_hazard) == (not variant.drop_safe)


def test_layernorm_scaling_is_a_variant_selected_by_its_switch_and_not_depth_dependent():
    # It scales by each layer's origin index (layer_origin), which programs and pruning preserve.
    assert not LayerNormScaling.depth_dependent and LayerNormScaling.drop_safe and LayerNormScaling.repeat_safe
    assert LayerNormScaling in selected_variants(ModelConfig.from_preset("lns"))
    assert LayerNormScaling not in selected_variants(ModelConfig.from_preset("pre-rmsnorm"))


def test_placement_flags_that_routing_bhyt_and_lns_ask():
    table = {name: (p.additive, p.adds_raw_branch, p.pre_sublayer_norms)
             for name, p in ((n, REGISTRIES["norm_placement"].get(n)) for n in REGISTRIES["norm_placement"].names())}
    assert table == {"pre": (True, True, True), "peri": (True, False, True), "mixln": (False, False, True),
                     "post": (False, False, False), "deepnorm": (False, False, False)}


def test_bhyt_picks_its_parallel_layer_unless_exact():
    from layerwise.nn.block import BHyTParallelLayer, Layer

    assert variant_of(ModelConfig.from_preset("bhyt"), "norm").layer_class(ModelConfig.from_preset("bhyt")) \
        is BHyTParallelLayer
    star = ModelConfig.from_preset("bhyt-star")
    assert variant_of(star, "norm").layer_class(star) is Layer


def test_a_field_no_selected_variant_reads_warns_naming_it_and_its_readers():
    with pytest.warns(UserWarning) as record:
        ModelConfig.from_preset("pre-rmsnorm", attnres_blocks=4)
    assert [str(w.message) for w in record] == [
        "ModelConfig.attnres_blocks=4 is read by residual scheme block_attnres, delta_block_attnres, "
        "not by residual='standard'; it has no effect"]
    assert record[0].filename == __file__  # it points at the line that set the field


@pytest.mark.parametrize("overrides, field", [
    (dict(dyt_alpha_attn=0.8), "dyt_alpha_attn"), (dict(bhyt_exact=True), "bhyt_exact"),
    (dict(norm_bias=False), "norm_bias"), (dict(mixln_ratio=0.5), "mixln_ratio"),
    (dict(value_residual_gate="tanh"), "value_residual_gate"), (dict(value_residual_last_k=2), "value_residual_last_k"),
    (dict(residual="full_attnres", attnres_blocks=4), "attnres_blocks"),  # Full AttnRes ignores the block count
])
def test_each_unread_variant_field_warns(overrides, field):
    with pytest.warns(UserWarning, match=rf"^ModelConfig\.{field}=.*it has no effect$"):
        ModelConfig.from_preset("pre-rmsnorm", **overrides)


@pytest.mark.parametrize("overrides", [
    dict(residual="block_attnres", attnres_blocks=4), dict(residual="delta_block_attnres", attnres_blocks=2),
    dict(norm="dyt", dyt_alpha_attn=0.8, norm_bias=False), dict(norm_placement="mixln", mixln_ratio=0.5),
    dict(value_residual="satformer", value_residual_gate="tanh", value_residual_last_k=2),
    dict(attnres_blocks=8),  # the default value, set explicitly, is not a mistake
])
def test_fields_the_selected_variants_read_do_not_warn(overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelConfig.from_preset("pre-rmsnorm", **overrides)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_no_preset_at_any_size_warns(size):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in PRESETS:
            ModelConfig.from_preset(name, size)


def test_every_declared_field_is_a_config_field():
    fields = set(ModelConfig.__dataclass_fields__)
    declared = {f for registry in REGISTRIES.values() for v in registry.classes() for f in v.config_fields}
    assert declared and declared <= fields


# ---- init -------------------------------------------------------------------------------------------------------

def test_a_tensor_in_no_init_group_is_refused():
    model = LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", n_layers=1))
    model.model.layers[0].attn.fn.register_parameter("extra", nn.Parameter(torch.zeros(3)))
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.attn\.fn\.extra is in 0 groups \(none\)"):
        attach_init(model)
    with pytest.raises(RuntimeError, match="CausalSelfAttention.extra has no init group"):
        init_weights(model.model.layers[0].attn.fn)


def test_a_tensor_in_two_init_groups_is_refused(monkeypatch):
    import layerwise.nn.initialization as initialization

    original = initialization.parameter_groups

    def doubled(model):
        groups = original(model)
        return groups + [initialization.InitGroup("again", groups[0].members, groups[0].init)]

    monkeypatch.setattr(initialization, "parameter_groups", doubled)
    with pytest.raises(RuntimeError, match=r"embed_tokens\.weight is in 2 groups \(token embedding, again\)"):
        LayerwiseForCausalLM(ModelConfig.from_preset("pre-rmsnorm", n_layers=1))


def test_from_pretrained_keeps_the_loaded_weights(tmp_path):
    model = LayerwiseForCausalLM(ModelConfig.from_preset("dyt", n_layers=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # far from any init: a re-init would show
    model.save_pretrained(tmp_path)
    loaded = LayerwiseForCausalLM.from_pretrained(tmp_path)
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
