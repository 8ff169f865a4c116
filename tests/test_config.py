"""Bad configs fail at construction with a ValueError naming the field; YAML and config.json round trips."""

import json

import pytest
import transformers

import layerwise  # noqa: F401
from layerwise import LayerwiseForCausalLM, ModelConfig


@pytest.mark.parametrize("overrides,field,detail", [
    (dict(d_model=130, n_heads=4), "d_model", "not divisible by n_heads=4"),
    (dict(n_kv_heads=3), "n_kv_heads", "must divide n_heads=4"),
    (dict(residual="block_attnres", attnres_blocks=40), "attnres_blocks", "exceeds the 8 sublayers of a 4-layer"),
    (dict(residual="block_attnres", attnres_blocks=3), "attnres_blocks", "valid: [1, 2, 4, 8]"),
    (dict(residual="delta_block_attnres", attnres_blocks=5), "attnres_blocks", "use 1..4"),
    (dict(norm_placement="mixln", mixln_ratio=1.5), "mixln_ratio", "[0, 1]"),
    (dict(mixln_ratio=-0.1), "mixln_ratio", "[0, 1]"),
    (dict(norm="batchnorm"), "norm",
     "valid: bhyt, crmsnorm, dyt, fakeln, frozen, identity, layernorm, powernorm, prepbn, rmsnorm, seednorm, "
     "ssrmsnorm, un"),
    (dict(norm_placement="middle"), "norm_placement", "valid: deepnorm, mixln, peri, post, pre"),
    (dict(residual="hyper"), "residual", "valid: block_attnres, delta_attnres"),
    (dict(value_residual="x"), "value_residual", "valid: none, resformer, satformer"),
    (dict(mlp="relu"), "mlp", "valid: gelu, gelu_tanh, swiglu"),
    (dict(residual="full_attnres", norm_placement="post"), "residual", "needs an additive placement"),
    (dict(layernorm_scaling=True, norm_placement="post"), "layernorm_scaling", "use pre, peri or mixln"),
    (dict(layernorm_scaling=True, scaled_init=True), "layernorm_scaling", "scaled_init"),
    (dict(norm="bhyt", norm_placement="peri"), "bhyt_exact", "set bhyt_exact=True"),
    (dict(value_residual="satformer", value_residual_gate="softplus"), "value_residual_gate", "relu"),
    (dict(value_residual="satformer", value_residual_last_k=4), "value_residual_last_k", "1..3"),
    (dict(seednorm_heads=3), "seednorm_heads", "divide d_model=128"),
    (dict(n_layers=0), "n_layers", "positive integer"),
    (dict(norm_eps=0.0), "norm_eps", "> 0"),
])
def test_invalid_config_raises_naming_the_field(overrides, field, detail):
    with pytest.raises(ValueError) as err:
        ModelConfig.from_preset("pre-rmsnorm", "tiny", **overrides)
    message = str(err.value)
    assert message.startswith(f"ModelConfig.{field}="), message
    assert detail in message, message


def test_unknown_field_is_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match="unknown field.*n_layer\\b.*valid fields: .*n_layers"):
        ModelConfig(n_layer=3)


def test_unknown_preset_and_size_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid: pre-ln, pre-rmsnorm"):
        ModelConfig.from_preset("pre-layernorm")
    with pytest.raises(ValueError, match="valid: tiny, 124m, 350m, 1b"):
        ModelConfig.from_preset("lns", size="7b")


def _saved(tmp_path, edit):
    LayerwiseForCausalLM(ModelConfig.from_preset("lns", "tiny")).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return tmp_path


def test_config_json_with_unknown_key_fails_clearly(tmp_path):
    folder = _saved(tmp_path, lambda d: d.update(depth_magic=3))
    with pytest.raises(ValueError, match="unknown field.*depth_magic"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_config_json_from_an_unsupported_version_fails_clearly(tmp_path):
    folder = _saved(tmp_path, lambda d: d.update(layerwise_version=99))
    with pytest.raises(ValueError, match="layerwise_version=99.*reads version 1"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_yaml_starts_from_a_preset_and_overrides_fields(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("preset: block-attnres\nsize: tiny\nn_layers: 6\nattnres_blocks: 3\n")
    cfg = ModelConfig.from_yaml(path)
    assert (cfg.residual, cfg.n_layers, cfg.attnres_blocks, cfg.d_model) == ("block_attnres", 6, 3, 128)


def test_yaml_with_a_bad_field_names_it(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("preset: mix-ln\nmixln_ratio: 2\n")
    with pytest.raises(ValueError, match="ModelConfig.mixln_ratio=2"):
        ModelConfig.from_yaml(path)


def test_config_round_trips_through_dict():
    cfg = ModelConfig.from_preset("satformer", "tiny", value_residual_last_k=2)
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
