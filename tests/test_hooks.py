"""The observation API: stable hook-point names, `capture` (exact names, globs, reduce, hooks gone on exit even
after an exception) and the final norm's input hook."""

import pytest
import torch
from conftest import tiny_model

from layerwise.errors import UserError
from layerwise.nn.hooks import capture, hook_points


def tiny(preset="pre-rmsnorm", **overrides):
    return tiny_model(preset, n_layers=3, **overrides)


def active_hooks(model) -> int:
    return sum(len(p._forward_hooks) for p in hook_points(model).values())


def test_names_are_the_same_for_the_causal_lm_its_inner_model_and_a_compiled_wrapper():
    model = tiny()
    names = list(hook_points(model))
    assert list(hook_points(model.model)) == names
    assert list(hook_points(torch.compile(model, backend="eager"))) == names
    assert {"model.layers.2.attn.hook_in", "model.layers.0.mlp.hook_out", "model.layers.1.attn.fn.hook_q",
            "model.hook_final_norm_in"} <= set(names)
    assert hook_points(model)["model.layers.2.attn.hook_in"] is model.model.layers[2].attn.hook_in


def test_the_final_norm_input_hook_sees_exactly_what_the_final_norm_receives():
    model = tiny("block-attnres", attnres_blocks=3)
    ids = torch.randint(0, 256, (2, 9))
    received = []
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: received.append(args[0]))
    with torch.no_grad(), capture(model, "model.hook_final_norm_in") as cache:
        model(ids)
    handle.remove()
    assert len(received) == 1
    torch.testing.assert_close(cache["model.hook_final_norm_in"], received[0], rtol=0, atol=0)


def test_a_glob_captures_every_matching_point_in_layer_order():
    model = tiny()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad(), capture(model, ["model.layers.*.attn.hook_in", "model.hook_final_norm_in"]) as cache:
        logits = model(ids).logits
    assert list(cache) == [f"model.layers.{i}.attn.hook_in" for i in range(3)] + ["model.hook_final_norm_in"]
    # Pre-LN: layer i's attention reads the stream h_i; the last layer's output is the final norm's input.
    h = cache["model.layers.0.attn.hook_in"]
    torch.testing.assert_close(h, model.model.embed_tokens(ids))
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model.model.norm(cache["model.hook_final_norm_in"])), logits)


def test_reduce_keeps_only_the_reduction():
    model = tiny()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad(), capture(model, "model.layers.*.mlp.hook_out") as full, \
            capture(model, "model.layers.*.mlp.hook_out", reduce=lambda x: x.norm(dim=-1)) as norms:
        model(ids)
    for name in full:
        assert norms[name].shape == (2, 9)
        torch.testing.assert_close(norms[name], full[name].norm(dim=-1))


def test_hooks_are_removed_on_exit_and_when_the_block_raises():
    model = tiny()
    with capture(model, "model.layers.*"):
        assert active_hooks(model) > 0
    assert active_hooks(model) == 0
    with pytest.raises(RuntimeError, match="inside"):
        with capture(model, "model.layers.*"):
            raise RuntimeError("inside")
    assert active_hooks(model) == 0
    with capture(model, "model.layers.0.attn.hook_in") as cache:
        pass
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 4)))
    assert "model.layers.0.attn.hook_in" not in cache  # nothing recorded after the block


def test_a_point_that_fires_twice_is_read_call_by_call():
    model = tiny()
    first, second = torch.randint(0, 256, (1, 4)), torch.randint(0, 256, (1, 5))
    with torch.no_grad(), capture(model, "model.hook_final_norm_in") as cache:
        model(first)
        model(second)
    assert [h.shape[1] for h in cache.calls("model.hook_final_norm_in")] == [4, 5]
    with pytest.raises(KeyError, match="fired 2 times"):
        cache["model.hook_final_norm_in"]


def test_a_name_that_matches_no_point_is_an_error_naming_it():
    with pytest.raises(UserError, match=r"no hook point matches 'layers\.0\.attn\.hook_in'.*model\.layers"):
        with capture(tiny(), ["model.layers.0.attn.hook_in", "layers.0.attn.hook_in"]):
            pass
