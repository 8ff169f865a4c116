"""Family adapters, checked against the models they describe: every declared reader of a norm reads exactly
that norm's output, every norm and every linear is declared exactly once, the final norm feeds the head."""

import pytest
import torch
import transformers
from conftest import HF_FAMILIES, hf_model
from torch import nn

from layerwise import LayerwiseForCausalLM, ModelConfig
from layerwise.arch import FEEDS, LINEAR_GROUPS, ROLES, SUPPORTED_FAMILIES, depth_view, model_map
from layerwise.errors import UserError
from layerwise.nn.norms import NORMS
from layerwise.reference import rms_norm

# Every placement, every norm (BHyT in both forms) and the options that add norms or linears.
LAYERWISE = {
    "pre": {}, "post": dict(norm_placement="post"), "peri": dict(norm_placement="peri", embedding_norm=True),
    "mixln": dict(norm_placement="mixln"), "deepnorm": dict(norm_placement="deepnorm"),
    "layernorm-gelu": dict(norm="layernorm", mlp="gelu"), "dyt": dict(norm="dyt"),
    "bhyt-parallel": dict(norm="bhyt"), "bhyt-exact": dict(norm="bhyt", bhyt_exact=True, bhyt_lambda_final=1.0),
    "seednorm": dict(norm="seednorm"), "frozen": dict(norm="frozen"),
    "qk-norm": dict(qk_norm=True), "lns": dict(layernorm_scaling=True),
    "satformer": dict(value_residual="satformer"), "post-satformer": dict(norm_placement="post",
                                                                          value_residual="satformer"),
    "block-attnres": dict(residual="block_attnres", attnres_blocks=4), "delta-attnres": dict(residual="delta_attnres"),
}
CASES = HF_FAMILIES + [f"layerwise-{name}" for name in LAYERWISE]


def layerwise_model(**fields):
    cfg = ModelConfig(vocab_size=128, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64, **fields)
    model = LayerwiseForCausalLM(cfg).eval()
    with torch.no_grad():  # off their init values, so that a swapped gain or a zero beta cannot hide a mix-up
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def build(case):
    torch.manual_seed(0)
    return layerwise_model(**LAYERWISE[case.removeprefix("layerwise-")]) if case.startswith("layerwise") \
        else hf_model(case)


def is_norm_like(module):
    return "Norm" in type(module).__name__ or isinstance(module, tuple(NORMS.get(name) for name in NORMS.names()))


def is_linear(module):
    return isinstance(module, (nn.Linear, transformers.pytorch_utils.Conv1D))


def ids_of(modules):
    return [id(m) for m in modules]


@pytest.mark.parametrize("case", CASES)
def test_each_declared_reader_reads_exactly_its_norms_output(case):
    model = build(case)
    mm = model_map(model)
    outputs, inputs, handles = {}, {}, []
    for site in mm.norms():
        handles.append(site.norm.register_forward_hook(lambda m, args, out: outputs.__setitem__(id(m), out)))
        for reader in site.readers:
            handles.append(reader.register_forward_pre_hook(lambda m, args: inputs.__setitem__(id(m), args[0])))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 12)))
    for handle in handles:
        handle.remove()
    for site in mm.norms():
        assert id(site.norm) in outputs, f"{site.role} norm {type(site.norm).__name__} never ran"
        for reader in site.readers:
            expected = outputs[id(site.norm)] * site.scale if site.scale != 1.0 else outputs[id(site.norm)]
            assert torch.equal(inputs[id(reader)], expected), f"{site.role} reader {reader} reads something else"
    assert mm.final_norm.readers == (mm.head,)


def _first(value):
    return value[0] if isinstance(value, tuple) else value


# AttnRes routes each sublayer's input from depth, so the stream identities below do not hold there.
STANDARD_RESIDUAL = [c for c in CASES if "attnres" not in c]


@pytest.mark.parametrize("case", STANDARD_RESIDUAL)
def test_sublayer_output_norms_are_added_to_the_stream_and_post_add_norms_are_the_stream(case):
    model = build(case)
    mm = model_map(model)
    seen, handles = {}, []

    def keep_input(key):  # HF layers take the stream positionally or as hidden_states
        return lambda m, args, kwargs: seen.__setitem__(key, args[0] if args else kwargs["hidden_states"])

    def keep_output(key):
        return lambda m, args, out: seen.__setitem__(key, _first(out))

    for layer in mm.layers:
        i = layer.index
        handles += [layer.module.register_forward_pre_hook(keep_input((i, "in")), with_kwargs=True),
                    layer.module.register_forward_hook(keep_output((i, "out")))]
        if layer.mid_residual is not None:
            handles.append(layer.mid_residual.register_forward_pre_hook(keep_input((i, "mid")), with_kwargs=True))
        for site in layer.norms:
            handles.append(site.norm.register_forward_hook(keep_output((i, site.role))))
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (2, 12)))
    for handle in handles:
        handle.remove()
    for layer in mm.layers:
        i = layer.index
        for site in layer.norms:
            if site.feeds not in ("residual", "stream"):
                continue
            before, after = {"attn_out": ((i, "in"), (i, "mid")), "mlp_out": ((i, "mid"), (i, "out"))}[site.role]
            added = seen[before] + seen[i, site.role] if site.feeds == "residual" else seen[i, site.role]
            assert torch.equal(seen[after], added), f"layer {i} {site.role} does not feed the stream as declared"


@pytest.mark.parametrize("case", CASES)
def test_every_norm_is_declared_exactly_once_with_a_known_role_and_destination(case):
    model = build(case)
    mm = model_map(model)
    for layer in mm.layers:
        inside = [m for m in layer.module.modules() if is_norm_like(m)]
        assert sorted(ids_of(site.norm for site in layer.norms)) == sorted(ids_of(inside))
    declared = ids_of(site.norm for site in mm.norms())
    assert len(declared) == len(set(declared))
    assert sorted(declared) == sorted(ids_of(m for m in model.modules() if is_norm_like(m)))
    for site in mm.norms():
        assert site.role in ROLES and site.feeds in FEEDS
        assert (site.feeds == "linears") == bool(site.readers), site


@pytest.mark.parametrize("case", CASES)
def test_every_linear_is_in_exactly_one_group_and_the_head_is_the_rest(case):
    model = build(case)
    mm = model_map(model)
    grouped = []
    for layer in mm.layers:
        assert set(layer.linears) == set(LINEAR_GROUPS)
        own = ids_of(m for group in LINEAR_GROUPS for m in layer.linears[group])
        inside = ids_of(m for m in layer.module.modules() if is_linear(m))
        # A value-residual gate lives beside the layers (one module per model), all else inside the layer.
        assert sorted(set(own) - set(ids_of(layer.linears["value_gate"]))) == sorted(inside)
        assert layer.linears["attn_in"] and layer.linears["attn_out"] and layer.linears["mlp_in"]
        grouped += own
    assert len(grouped) == len(set(grouped))
    assert sorted(grouped + [id(mm.head)]) == sorted(ids_of(m for m in model.modules() if is_linear(m)))


@pytest.mark.parametrize("case", CASES)
def test_depth_view_is_the_model_maps_handles(case):
    model = build(case)
    mm, view = model_map(model), depth_view(model)
    assert [id(m) for m in view.layers] == [id(layer.module) for layer in mm.layers]
    assert (view.final_norm, view.head, view.embed, view.family) == (mm.final_norm.norm, mm.head, mm.embed, mm.family)
    for layer in mm.layers:
        assert view.mid_residual(layer.module) is layer.mid_residual
        assert view.attention(layer.module) is layer.attention


def test_layerwise_roles_follow_each_layers_placement():
    mm = model_map(build("layerwise-mixln"))  # 4 layers, round(0.25 * 4) = 1 Post-LN layer first
    assert [(s.role, s.feeds) for s in mm.layers[0].norms] == [("attn_out", "stream"), ("mlp_out", "stream")]
    assert [(s.role, s.feeds) for s in mm.layers[1].norms] == [("attn_in", "linears"), ("mlp_in", "linears")]
    peri = model_map(build("layerwise-peri"))
    assert [s.feeds for s in peri.layers[2].norms] == ["linears", "residual", "linears", "residual"]
    assert [s.role for s in peri.extra_norms] == ["embedding"]
    lns = model_map(build("layerwise-lns"))
    assert [layer.norm("mlp_in").scale for layer in lns.layers] == pytest.approx([1, 2**-0.5, 3**-0.5, 0.5])


def test_rmsnorm_gain_offset_is_what_the_norm_multiplies_by():
    # Gemma stores gain - 1; folding a gain into the next linear must add the offset back.
    for family in HF_FAMILIES:
        mm = model_map(build(family))
        for site in mm.norms():
            if "RMSNorm" not in type(site.norm).__name__:
                continue
            norm = site.norm
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
            with torch.no_grad():
                norm.weight.copy_(torch.randn_like(norm.weight))
                x = torch.randn(3, norm.weight.shape[0])
                torch.testing.assert_close(norm(x), rms_norm(x, site.gain_offset + norm.weight, eps))
        assert {s.gain_offset for s in mm.norms()} == {1.0 if family.startswith("gemma") else 0.0}


def test_tied_head_follows_the_config():
    assert model_map(layerwise_model()).tied_head
    assert not model_map(layerwise_model(tie_word_embeddings=False)).tied_head


def test_unsupported_architecture_error_is_one_line_naming_every_supported_family():
    model = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64))
    for adapter in (model_map, depth_view):
        with pytest.raises(UserError) as err:
            adapter(model)
        message = str(err.value)
        assert "\n" not in message and "unsupported architecture 'bert'" in message
        assert all(family in message for family in SUPPORTED_FAMILIES)
    assert sorted(SUPPORTED_FAMILIES) == sorted(HF_FAMILIES + ["layerwise"])
