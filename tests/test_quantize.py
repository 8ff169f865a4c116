"""The `quantize` step (HQQ, per-layer widths), its folder format and `layerwise quantize --bits`: widths land on
the modules they name, 8 bits stays close to float, the saved folder reloads bit-exactly and is smaller, bad
requests fail in one line naming the step, and a quantized model decodes with its cache as by full forwards."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from hqq.core.quantize import HQQLinear
from torch import nn
from typer.testing import CliRunner

from conftest import HF_FAMILIES, greedy_without_cache, hf_model, tiny_model
from layerwise.arch.quantized import WEIGHTS_FILE, stored_layers
from layerwise.cli import app
from layerwise.errors import UserError
from layerwise.loading import load_model
from layerwise.transform import apply
from layerwise.transform.save import save_transformed

runner = CliRunner()
MODELS = [*HF_FAMILIES, "layerwise"]


def _model(name: str):
    return tiny_model() if name == "layerwise" else hf_model(name)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _max_kl(reference, logits) -> float:
    """The largest per-token KL(reference || logits), in nats."""
    return F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                    reduction="none").sum(-1).max().item()


def _linears(layer):
    return [m for m in layer.modules() if isinstance(m, (nn.Linear, HQQLinear)) or type(m).__name__ == "Conv1D"]


@pytest.mark.parametrize("name", ["llama", "gpt2", "layerwise"])
def test_8_bits_stays_within_a_small_kl_of_float_and_2_bits_does_not(name):
    # Measured on these random models: max per-token KL at 8 bits 5e-7 (gpt2) to 9e-6 (gemma3_text) nats.
    ids = torch.randint(0, 100, (2, 32))
    reference = _logits(_model(name), ids)
    kl8 = _max_kl(reference, _logits(apply(_model(name), ["quantize=8"]), ids))
    kl2 = _max_kl(reference, _logits(apply(_model(name), ["quantize=2"]), ids))
    assert kl8 < 5e-5
    assert kl2 > 20 * kl8  # the bound is tight enough that a coarser quantizer fails it


def test_each_layer_gets_its_width_and_the_config_records_it():
    model = apply(hf_model("llama"), ["quantize=4/2:1/16:2/8:3/group=32"])
    for layer, width in zip(stored_layers(model), [4, 2, 16, 8]):
        linears = _linears(layer)
        assert len(linears) == 7  # q, k, v, o, gate, up, down
        if width == 16:
            assert all(type(m) is nn.Linear for m in linears)
        else:
            assert all(isinstance(m, HQQLinear) and m.meta["nbits"] == width and m.meta["group_size"] == 32
                       for m in linears)
    record = model.config.layerwise_quantization
    assert record["layer_bits"] == [4, 2, 16, 8] and record["group_size"] == 32 and record["backend"] == "hqq"
    assert record["kept_in_float"] == ["model.embed_tokens", "model.layers.*.input_layernorm",
                                       "model.layers.*.post_attention_layernorm", "model.norm", "lm_head"]
    assert isinstance(model.model.embed_tokens, nn.Embedding) and type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("width", [8, 4, 2])
def test_average_bits_count_the_float16_scale_and_zero_of_each_group(width):
    # Llama's linears have no bias and 2, 4 and 8 bits pack without padding: codes plus 2 x 16 bits per group.
    record = apply(hf_model("llama"), [f"quantize={width}"]).config.layerwise_quantization
    assert record["avg_bits_layers"] == width + 32 / 64
    assert width + 0.5 < record["avg_bits_model"] < 32  # the float embedding, head and norms raise it


def test_gpt2_conv1d_linears_become_hqq_linears_that_keep_the_bias():
    model = hf_model("gpt2")
    bias = model.transformer.h[0].attn.c_attn.bias.detach().clone()
    apply(model, ["quantize=8"])
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, HQQLinear) and attn.meta["shape"] == (96, 32)  # (out, in): Conv1D's weight transposed
    assert torch.equal(attn.bias, bias)
    assert type(model.transformer.wte) is nn.Embedding


@pytest.mark.parametrize("name", MODELS)
def test_saved_folder_reloads_with_identical_logits_and_is_smaller(name, tmp_path):
    ids = torch.randint(0, 100, (2, 16))
    model = _model(name)
    model.save_pretrained(tmp_path / "float")
    model = apply(model, ["quantize=3/4:1/16:2/group=32"])
    save_transformed(model, None, tmp_path / "q")
    assert not (tmp_path / "q" / "model.safetensors").exists()
    loaded, _ = load_model(tmp_path / "q")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert loaded.config.layerwise_quantization == model.config.layerwise_quantization
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert [(n, p.dtype, p.shape) for n, p in loaded.named_parameters()] == [
        (n, p.dtype, p.shape) for n, p in model.named_parameters()]
    assert (tmp_path / "q" / WEIGHTS_FILE).stat().st_size < (tmp_path / "float" / "model.safetensors").stat().st_size


def test_stock_from_pretrained_fails_on_a_quantized_folder(tmp_path):
    save_transformed(apply(hf_model("llama"), ["quantize=4"]), None, tmp_path / "q")
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_a_folder_with_its_weights_file_missing_is_refused_in_one_line(tmp_path):
    save_transformed(apply(hf_model("llama"), ["quantize=4"]), None, tmp_path / "q")
    (tmp_path / "q" / WEIGHTS_FILE).unlink()
    with pytest.raises(UserError, match=f"{WEIGHTS_FILE} is missing"):
        load_model(tmp_path / "q")


@pytest.mark.parametrize("step, match", [
    ("quantize=5", "width '5'"),
    ("quantize=4/2:1/8:1", "layer 1 is given a width twice"),
    ("quantize=4/2:9", "layer 9 is out of range"),
    ("quantize=4/group=48", "group=48 does not divide"),
    ("quantize=4/bits=3", "the only option is group=N"),
    ("quantize=4/3", "not BITS:LAYERS"),
])
def test_bad_requests_are_refused_in_one_line_naming_the_step(step, match):
    with pytest.raises(UserError, match=match) as err:
        apply(hf_model("llama"), [step])
    assert str(err.value).startswith(f"--apply {step!r}:") and "\n" not in str(err.value)


def test_quantized_models_refuse_a_second_quantize_and_later_reshaping_steps():
    model = apply(hf_model("llama"), ["quantize=4"])
    for step in ("quantize=8", "drop=1", "fold-norms", "to-layerwise"):
        with pytest.raises(UserError, match=f"step {step.split('=')[0]!r} cannot run on a quantized model"):
            apply(model, [step])


@pytest.mark.parametrize("name", ["llama", "layerwise"])
def test_tied_layer_programs_are_refused(name):
    model = apply(_model(name), ["layers=0-1,0-1:tie"])
    with pytest.raises(UserError, match="tied layers"):
        apply(model, ["quantize=4"])


def test_an_untied_program_quantizes_each_copy(tmp_path):
    model = apply(hf_model("llama"), ["layers=0-1,0-1", "quantize=4/8:2"])
    assert model.config.layerwise_quantization["layer_bits"] == [4, 4, 8, 4]
    save_transformed(model, None, tmp_path / "q")
    ids = torch.randint(0, 100, (1, 9))
    assert torch.equal(_logits(load_model(tmp_path / "q")[0], ids), _logits(model, ids))


def test_missing_hqq_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)  # import now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'layerwise\[quantize\]'"):
        apply(hf_model("llama"), ["quantize=4"])


@pytest.mark.parametrize("name", ["llama", "gpt2", "layerwise"])
def test_cached_generate_equals_full_forwards_when_quantized(name):
    model = apply(_model(name), ["quantize=4/2:0/16:3/group=32"])
    prompt = torch.randint(1, 100, (1, 5))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(cached, greedy_without_cache(model, prompt, 8))


def test_quantize_command_bits_writes_the_folder_and_reports_the_size(tmp_path):
    source, out = tmp_path / "tiny", tmp_path / "q"
    model = hf_model("llama")
    model.save_pretrained(source)
    result = runner.invoke(app, ["quantize", str(source), "--bits", "4/2:1/8:0,3", "--group", "32",
                                 "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "README.md", WEIGHTS_FILE}
    config = json.loads((out / "config.json").read_text())
    assert config["layerwise_quantization"]["layer_bits"] == [8, 2, 4, 8]
    assert config["layerwise_transforms"] == ["quantize=4/2:1/8:0,3/group=32"]
    assert f"{(out / WEIGHTS_FILE).stat().st_size:,} bytes" in result.output
    assert "load_model" in (out / "README.md").read_text()
    ids = torch.randint(0, 100, (1, 9))
    assert torch.equal(_logits(load_model(out)[0], ids),
                       _logits(apply(model, ["quantize=4/2:1/8:0,3/group=32"]), ids))


@pytest.mark.parametrize("args, match", [
    ([], "exactly one of --bits"),
    (["--bits", "4", "--avg-bits", "3.5"], "exactly one of --bits"),
    (["--bits", "4", "--order", "lim"], "--order is for --avg-bits"),
    (["--bits", "4/group=32", "--group", "32"], "group size once"),
])
def test_quantize_command_refuses_bad_flags_before_loading(tmp_path, args, match):
    result = runner.invoke(app, ["quantize", str(tmp_path / "absent"), *args, "--out", str(tmp_path / "q")])
    assert result.exit_code != 0 and isinstance(result.exception, UserError) and match in str(result.exception)


def test_diagnose_reads_a_quantized_folder(tmp_path):
    import numpy as np

    from layerwise.data.shards import write_shard

    save_transformed(apply(hf_model("llama"), ["quantize=4"]), None, tmp_path / "q")
    shard = write_shard(tmp_path / "ids.bin", np.arange(64) % 128, 128)
    result = runner.invoke(app, ["diagnose", str(tmp_path / "q"), "--tokens", "64", "--seq-len", "16",
                                 "--batch-size", "2", "--n-span", "1", "--no-removal", "--no-attention-entropy",
                                 "--data", str(shard), "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((tmp_path / "d" / "diagnosis.json").read_text())["n_layers"] == 4


def test_a_weight_dequantized_once_computes_what_hqq_computes_at_every_call():
    model = apply(hf_model("llama"), ["quantize=3/group=32"])
    module = next(m for m in model.modules() if isinstance(m, HQQLinear))
    x = torch.randn(2, 5, module.in_features)
    with torch.no_grad():
        first, second = module(x), module(x)
        reference = HQQLinear.forward_pytorch(module, x)  # HQQ's own path: de-quantizes now
    assert module._weight is not None  # kept between calls under no_grad
    assert torch.equal(first, reference) and torch.equal(second, reference)
    with torch.enable_grad():  # training goes through HQQ's autograd path and drops the copy
        assert torch.equal(module(x).detach(), reference) and module._weight is None


def test_layers_quantize_independently_so_mixed_models_assemble_from_uniform_ones():
    # scripts/quantization_study.py quantizes each width once and assembles every plan from those layers.
    from layerwise.arch.quantized import quantized_modules

    mixed = apply(hf_model("llama"), ["quantize=4/2:1"])
    assembled = apply(hf_model("llama"), ["quantize=4"])
    two_bit = stored_layers(apply(hf_model("llama"), ["quantize=2"]))[1]
    for name, module in quantized_modules(two_bit).items():
        parent, _, child = name.rpartition(".")
        setattr(stored_layers(assembled)[1].get_submodule(parent), child, module)
    ids = torch.randint(0, 100, (2, 16))
    assert torch.equal(_logits(mixed, ids), _logits(assembled, ids))


def test_a_quantized_model_stays_on_the_cpu_and_refuses_another_device(monkeypatch):
    from layerwise.cli_options import device_for

    quantized, plain = apply(hf_model("llama"), ["quantize=4"]), hf_model("llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the default would be cuda
    assert device_for(quantized, None) == torch.device("cpu")
    assert device_for(plain, None) == torch.device("cuda")
    with pytest.raises(UserError, match=r"--device cuda: a quantized model runs on the CPU"):
        device_for(quantized, "cuda")


def test_training_from_a_quantized_folder_is_refused_in_one_line(tmp_path):
    from layerwise.train.init_from import open_init_model

    save_transformed(apply(hf_model("llama"), ["quantize=4"]), None, tmp_path / "q")
    with pytest.raises(UserError, match=r"init_from=.* is a quantized model .*train the float model"):
        open_init_model(tmp_path / "q")


def test_quantize_command_avg_bits_plans_on_calibration_tokens_and_writes_the_plan(tmp_path):
    import numpy as np

    from layerwise.data.shards import write_shard

    source, out = tmp_path / "tiny", tmp_path / "q"
    hf_model("llama").save_pretrained(source)
    shard = write_shard(tmp_path / "ids.bin", np.arange(256) % 100, 128)
    result = runner.invoke(app, ["quantize", str(source), "--avg-bits", "3.5", "--widths", "2,3,4,8", "--order",
                                 "zd", "--data", str(shard), "--tokens", "256", "--seq-len", "32", "--group", "32",
                                 "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    plan = json.loads((out / "quant_plan.json").read_text())
    bits = [layer["bits"] for layer in plan["layers"]]
    assert sorted(set(bits)) == [3, 4] and plan["avg_bits"] <= 3.5  # the two widths around the target
    config = json.loads((out / "config.json").read_text())
    assert config["layerwise_quantization"]["layer_bits"] == bits
    assert config["layerwise_transforms"] == [plan["step"] + "/group=32"]


def test_a_weights_file_without_a_quantized_linear_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    save_transformed(apply(hf_model("llama"), ["quantize=4"]), None, tmp_path / "q")
    tensors = load_file(tmp_path / "q" / WEIGHTS_FILE)
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.W_q"},
              tmp_path / "q" / WEIGHTS_FILE)
    with pytest.raises(UserError, match=r"lacks the packed weights model\.layers\.1\.mlp\.up_proj\.W_q"):
        load_model(tmp_path / "q")
