"""Per-layer quantized models (HQQ) and their folder format, for every family the adapters know.

A quantized model is a normal model of its family whose decoder-layer linears are `hqq.core.quantize.HQQLinear`
modules, each of its layer's width; embeddings, the LM head and every norm stay in floating point. Its config
records `layerwise_quantization` (backend, version, group size, each stored layer's width), from which a
loader rebuilds the same modules before reading the weights.

Folder format (docs/quantization.md): config.json (with `layerwise_quantization`) and `quantized.safetensors`,
which holds the float tensors under their state-dict names (a tied head once, under the embedding's name) and,
for each quantized linear at module path P, HQQ's own state-dict entries `P.W_q` (the packed codes), `P.scale`
and `P.zero` (float16), `P.bias` when the linear has one, and HQQ's small metadata tensors (width, group size,
shape, packing). The file is deliberately not `model.safetensors`: a stock `from_pretrained` then fails
loudly instead of loading a model with random layers.

Scale and zero are rounded to float16 right after quantizing, so the model in memory computes exactly what
the file reloads into.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .adapters import depth_view

QUANTIZATION_KEY = "layerwise_quantization"
WEIGHTS_FILE = "quantized.safetensors"
BACKEND = "hqq"
BACKEND_VERSION = "0.2.8.post1"
WIDTHS = (2, 3, 4, 8)  # HQQ's packed widths
FLOAT_WIDTH = 16  # a layer written with this width keeps its linears in floating point


def hqq_linear_class():
    """The HQQLinear class our quantized models use, or a one-line UserError saying how to install the extra."""
    try:
        from hqq.core.quantize import HQQLinear
    except ImportError:
        raise UserError("quantization needs the hqq package; run `pip install 'layerwise[quantize]'`") from None
    return _dequantize_once(HQQLinear)


@functools.cache
def _dequantize_once(HQQLinear: type) -> type:
    class DequantizeOnceHQQLinear(HQQLinear):
        """HQQLinear that keeps its de-quantized weight while no gradient is taken.

        HQQ's PyTorch backend de-quantizes the weight at every call, which on CPU makes a forward several times
        slower than the float model's; evaluation and decoding reuse the same weight, so it is de-quantized
        once, at first use, and the float copy is held in memory (the file on disk stays packed). The output is
        HQQ's own computation: a matmul with the same weight, then the bias.
        """

        _weight = None

        # HQQLinear's __init__ sets `forward` to its class's backend method, this one by default.
        def forward_pytorch_backprop(self, x):
            if torch.is_grad_enabled():
                self._weight = None
                return super().forward_pytorch_backprop(x)
            if self._weight is None:
                self._weight = self.dequantize()
            out = torch.matmul(x, self._weight.t())
            if self.bias is not None:
                out += self.bias
            return out

        def load_state_dict(self, *args, **kwargs):
            self._weight = None
            return super().load_state_dict(*args, **kwargs)

    return DequantizeOnceHQQLinear


def _quantize_config(nbits: int, group_size: int) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=nbits, group_size=group_size)


def is_quantized(model: nn.Module) -> bool:
    return getattr(model.config, QUANTIZATION_KEY, None) is not None


def stored_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers as stored, each once: a layerwise model's `model.layers` (its positions may run a
    stored layer several times), else the family's layer list."""
    if getattr(model.config, "model_type", None) == "layerwise":
        return list(model.model.layers)
    return list(depth_view(model).layers)


def _is_linear(module: nn.Module) -> bool:
    # GPT-2's Conv1D is a linear with its weight stored transposed ([in, out]).
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def layer_linears(layer: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name inside the layer, module) of every float linear in `layer`."""
    for name, module in layer.named_modules():
        if _is_linear(module):
            yield name, module


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a Conv1D."""
    weight = module.weight
    return tuple(weight.shape) if isinstance(module, nn.Linear) else tuple(weight.shape[::-1])


def _as_linear(module: nn.Module) -> nn.Linear:
    if isinstance(module, nn.Linear):
        return module
    out_features, in_features = linear_shape(module)
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def quantize_layers(model: nn.Module, bits: Sequence[int], group_size: int) -> nn.Module:
    """Replace the linears of stored layer i by HQQLinear modules of width `bits[i]` (16: leave the layer) and
    return the model; scale and zero are rounded to float16 so a reload computes the same. The caller checks
    the request (`transform.quantize`)."""
    HQQLinear = hqq_linear_class()
    for layer, width in zip(stored_layers(model), bits):
        if width == FLOAT_WIDTH:
            continue
        for name, module in list(layer_linears(layer)):
            dtype = module.weight.dtype
            with torch.no_grad():
                quantized = HQQLinear(_as_linear(module), _quantize_config(width, group_size), compute_dtype=dtype,
                                      device="cpu", del_orig=True)
                for key in ("scale", "zero"):
                    quantized.meta[key] = quantized.meta[key].half().to(dtype)
            _set_submodule(layer, name, quantized)
    return model


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    HQQLinear = hqq_linear_class()
    return {name: module for name, module in model.named_modules() if isinstance(module, HQQLinear)}


def install_shells(model: nn.Module, record: dict, dtype: torch.dtype, where: str) -> None:
    """Before loading a quantized folder: empty HQQLinear modules where the recorded widths put them."""
    HQQLinear = hqq_linear_class()
    bits = record.get("layer_bits")
    layers = stored_layers(model)
    if not isinstance(bits, list) or len(bits) != len(layers):
        raise UserError(f"{where}: config.json's {QUANTIZATION_KEY}.layer_bits should list one width per stored "
                        f"layer ({len(layers)}); the folder was not written by `layerwise quantize`, or was edited")
    group_size = record.get("group_size")
    for layer, width in zip(layers, bits):
        if width == FLOAT_WIDTH:
            continue
        for name, _ in list(layer_linears(layer)):
            _set_submodule(layer, name, HQQLinear(None, _quantize_config(width, group_size), compute_dtype=dtype,
                                                  device="cpu", initialize=False))


def disk_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors `quantized.safetensors` holds: the state dict with scale and zero as float16 and each tensor
    shared by several names (a tied head) once, under its first name."""
    quantized = quantized_modules(model)
    tensors, seen = {}, set()
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized and leaf in ("scale", "zero"):
            tensor = tensor.half()
        elif tensor.is_floating_point() or owner not in quantized:
            storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            if storage in seen:
                continue
            seen.add(storage)
        tensors[key] = tensor.detach().contiguous()
    return tensors


def save_quantized_weights(model: nn.Module, folder: Path) -> int:
    """Write `quantized.safetensors` into `folder`; return its size in bytes."""
    from safetensors.torch import save_file

    path = Path(folder) / WEIGHTS_FILE
    save_file(disk_tensors(model), str(path), metadata={"format": "pt", "layerwise": QUANTIZATION_KEY})
    return path.stat().st_size


def load_quantized_weights(model: nn.Module, folder: Path) -> None:
    """Fill a model that `install_shells` prepared from `folder/quantized.safetensors`; refuse a file that
    lacks a tensor the model needs (a tensor tied to one the file holds is filled by the tie)."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{folder}: config.json says the model is quantized but {WEIGHTS_FILE} is missing; copy "
                        "the whole folder `layerwise quantize` wrote")
    tensors = load_file(str(path))
    quantized = quantized_modules(model)
    for name, module in quantized.items():
        prefix = name + "."
        if prefix + "W_q" not in tensors:
            raise UserError(f"{path}: lacks the packed weights {prefix}W_q that config.json's layer_bits put "
                            "there; the file does not match config.json; write the folder again with "
                            "`layerwise quantize`")
        module.load_state_dict({key[len(prefix):]: tensors.pop(key) for key in list(tensors)
                                if key.startswith(prefix)})
        module.W_q = nn.Parameter(module.W_q, requires_grad=False)  # a Parameter, as after quantizing
    fresh = model.state_dict()
    aliases: dict[tuple, list[str]] = {}
    for key, tensor in fresh.items():
        if key.rpartition(".")[0] not in quantized:
            aliases.setdefault((tensor.untyped_storage().data_ptr(), tuple(tensor.shape)), []).append(key)
    result = model.load_state_dict(tensors, strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [key for key in result.missing_keys if key.rpartition(".")[0] not in quantized
               and not any(other in tensors for group in aliases.values() if key in group for other in group)]
    if missing or unexpected:
        shown = ", ".join((missing or unexpected)[:3])
        raise UserError(f"{path}: {'lacks' if missing else 'has unexpected'} tensor(s) {shown}; the file does not "
                        "match config.json; write the folder again with `layerwise quantize`")


def disk_bits(model: nn.Module) -> tuple[float, float]:
    """(bits per parameter over the decoder layers' linears, bits per parameter over the whole model), as
    stored on disk: packed codes, float16 scale and zero, biases and float layers at their dtype, and for the
    model also embeddings, head and norms (a tied head counted once)."""
    quantized = quantized_modules(model)
    layer_bits = layer_params = 0
    for layer in stored_layers(model):
        for module in layer.modules():
            if module in quantized.values():
                out_features, in_features = module.meta["shape"]
                n_groups = module.meta["scale"].numel()
                layer_bits += 8 * module.W_q.numel() * module.W_q.element_size() + 2 * 16 * n_groups
                layer_params += out_features * in_features
                if module.bias is not None:
                    layer_bits += 8 * module.bias.numel() * module.bias.element_size()
                    layer_params += module.bias.numel()
            elif _is_linear(module):
                for tensor in (module.weight, module.bias):
                    if tensor is not None:
                        layer_bits += 8 * tensor.numel() * tensor.element_size()
                        layer_params += tensor.numel()
    model_bits, model_params = layer_bits, layer_params
    counted = {id(p) for m in quantized.values() for p in m.parameters()}
    for layer in stored_layers(model):
        counted |= {id(p) for m in layer.modules() if _is_linear(m) for p in m.parameters(recurse=False)}
    for tensor in model.parameters():  # parameters() yields a tied tensor once
        if id(tensor) not in counted:
            model_bits += 8 * tensor.numel() * tensor.element_size()
            model_params += tensor.numel()
    return layer_bits / max(layer_params, 1), model_bits / max(model_params, 1)


def kept_in_float(model: nn.Module) -> list[str]:
    """The modules with float parameters that quantization leaves alone (embeddings, head, norms, any other
    non-linear weights), a layer's index written as `*` so each kind is named once."""
    quantized = set(quantized_modules(model).values())
    stack_names = {}
    for index, layer in enumerate(stored_layers(model)):
        for name, module in model.named_modules():
            if module is layer:
                stack_names[name] = index
    names: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):  # a tied head is named too
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        if not own or module in quantized:
            continue
        in_layer = next((prefix for prefix in stack_names if name.startswith(prefix + ".")), None)
        if in_layer is not None:
            if _is_linear(module):
                continue  # a float layer's linear: reported by its width, 16
            parent, _, _ = in_layer.rpartition(".")
            name = f"{parent}.*{name[len(in_layer):]}" if parent else f"*{name[len(in_layer):]}"
        if name not in names:
            names.append(name)
    return names
