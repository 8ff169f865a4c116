"""What many test files share: tiny layerwise and Hugging Face models, and one Shakespeare corpus per run.

Test files import the model helpers (`from conftest import hf_model`) because parametrize lists need them at
collection time; the corpus is a fixture. Removing layers by hand is `layerwise.reference.skipping`, which
bench/diagnose.py uses too.
"""

import os
from pathlib import Path

import pytest
import torch

# Nothing may reach a model hub; every test runs offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))

# The Hugging Face families the adapters support, each built small and random from transformers' own classes.
HF_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "phi3",
               "gpt2", "gpt_neox"]
HF_SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    # A test (or the code it runs) that leaves autograd off breaks every later training test far from the cause.
    enabled = torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert enabled, "this test left torch's grad mode disabled"


def hf_model(family: str, **overrides):
    """A random 4-layer, width-32 model of `family` (vocab 128), in eval mode, the same one on every call."""
    import transformers

    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=4, n_head=4, n_positions=64, **overrides)
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, max_position_embeddings=64, **overrides)
    else:
        cfg = transformers.AutoConfig.for_model(family, **{**HF_SMALL, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None  # decode the full length, as a cache-free greedy loop does
    return model


def tiny_model(preset: str = "pre-rmsnorm", *, dtype: torch.dtype | None = None, random_queries: bool = False,
               **overrides):
    """Preset `preset` at size tiny with `overrides`, in eval mode, the same one on every call.

    random_queries: draw AttnRes pseudo-queries from N(0, 0.5^2), as after training; at their init (zero) every
    depth mixer is a plain mean and formulas that weight sources differently would agree by accident."""
    from layerwise import LayerwiseForCausalLM, ModelConfig

    torch.manual_seed(0)
    model = LayerwiseForCausalLM(ModelConfig.from_preset(preset, "tiny", **overrides))
    if dtype is not None:
        model.to(dtype)
    model.eval()
    if random_queries:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".query"):
                    p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The bundled Shakespeare with a 512-token BPE, built once per test run. Tests only read it: one that
    changes the folder copies it first."""
    from layerwise.data.build import build_corpus

    return build_corpus(["shakespeare"], tmp_path_factory.mktemp("data") / "shakespeare", vocab_size=512)


# Small sliding windows for the families that have them (shorter than the test sequences), so a layer given the
# wrong attention type after a transform changes the logits. Qwen keeps its full-attention layers (0, 1) first.
ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
SLIDING_WINDOWS = {
    "gemma2": dict(layer_types=ALTERNATING, sliding_window=4),
    "gemma3_text": dict(layer_types=ALTERNATING, sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),  # full, full, sliding, sliding
    "qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
}


@torch.no_grad()
def full_logits(model, ids):
    """Logits of a full forward without the KV cache."""
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def greedy_without_cache(model, ids, n_new):
    """Greedy decoding by full forwards: what cached `generate` must reproduce."""
    for _ in range(n_new):
        ids = torch.cat([ids, full_logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def assert_compiled_training_matches_eager(eager, batches, backend: str):
    """Train a deep copy of `eager` compiled (fullgraph) beside it on `batches`: after every step the logits,
    every parameter's gradient and every buffer agree. AOTAutograd (aot_eager, inductor) may recompute saved
    values in the backward from buffers the forward updated in place; this is where that would show."""
    import copy

    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    for ids in batches:
        eager.zero_grad()
        compiled_model.zero_grad()
        a, b = eager(ids, labels=ids), compiled(ids, labels=ids)
        a.loss.backward()
        b.loss.backward()
        torch.testing.assert_close(b.logits, a.logits)
        for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=name)
        for (name, buf), other in zip(eager.named_buffers(), compiled_model.buffers()):
            torch.testing.assert_close(other, buf, msg=name)


def mean_loss(model, batches):
    """Mean next-token cross-entropy of a plain forward over every target of `batches` (float64 logits)."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches:
            logits = model(input_ids=ids, use_cache=False).logits.double()
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
    return total / count


def layer_calls(model, ids):
    """(input, output) of every decoder-layer call of one forward, in execution order, from forward hooks on
    each distinct layer module (a tied layer is called at each of its positions)."""
    from layerwise.diagnose import depth_view

    calls = []

    def hook(module, args, kwargs, out):
        calls.append((args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, tuple) else out))

    modules = list({id(layer): layer for layer in depth_view(model).layers}.values())
    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in modules]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return calls
