"""Cached decoding after a layer program: one KV-cache slot per position vs a layer object run twice.

    python bench/layer_program_cache.py                                  # SmolLM2-135M (the GGUF), 12-13 repeated
    python bench/layer_program_cache.py --model runs/smollm2 --program 0-17,12-17,18-29
    python bench/layer_program_cache.py --model tiny-random              # seconds: a random 4-layer Llama

For each way of repeating layers it decodes greedily with the KV cache (`generate`) and reports the largest gap
between the cached per-step logits and the logits of full cache-free forwards of the same sequence:

naive        the layer list rebuilt as ModuleList([L0, ..., L12, L13, L12, L13, ...]): the repeated layer objects
             keep their `layer_idx`, so both occurrences write and read one cache slot (what a hand-made loop
             does in transformers 5: a layer owns its index, transformers #28462);
tied         `layers=PROGRAM:tie`: the weights are shared, every position gets its own slot;
materialised `layers=PROGRAM`: repeated layers are copies, every position gets its own slot;
original     the model unchanged: the floor of the comparison (float32 rounding).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch


def load(name: str):
    from layerwise.loading import load_model, smollm2_gguf

    if name == "tiny-random":
        import transformers

        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()
    model, _ = load_model(smollm2_gguf() if name == "smollm2" else name)
    return model.eval()


@torch.no_grad()
def cached_vs_full(model, prompt: torch.Tensor, new_tokens: int) -> float:
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    full = model(input_ids=out.sequences, use_cache=False).logits[:, prompt.shape[1] - 1:-1]
    return (torch.stack(out.logits, dim=1) - full).abs().max().item()


def naive_repeat(model, order: list[int]):
    from layerwise.arch import depth_view

    naive = copy.copy(model)  # shares every module; only the layer list below is new
    stack = depth_view(model).layers
    layers = list(stack)
    naive_stack = torch.nn.ModuleList(layers[i] for i in order)
    parent = model.get_submodule(_parent_path(model, stack))
    restore = (parent, _child_name(parent, stack), stack, model.config.num_hidden_layers)
    setattr(parent, restore[1], naive_stack)
    model.config.num_hidden_layers = len(order)
    return naive, restore


def _parent_path(model, child) -> str:
    for name, module in model.named_modules():
        if any(c is child for c in module.children()):
            return name
    raise LookupError("layer list not found")


def _child_name(parent, child) -> str:
    return next(name for name, c in parent.named_children() if c is child)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    from layerwise.transform import apply, parse_layer_program

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny-random, or a model path")
    parser.add_argument("--program", default=None, help="layer program (default: layers 12-13 repeated, or 1-2 "
                                                         "for tiny-random)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    model = load(args.model)
    n = model.config.num_hidden_layers
    program = args.program or ("0-13,12-13,14-29" if n == 30 else f"0-2,1-2,3-{n - 1}")
    order = parse_layer_program(program).order
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    rows = {"original": cached_vs_full(model, prompt, args.new_tokens)}
    naive, (parent, name, stack, depth) = naive_repeat(model, order)
    rows["naive"] = cached_vs_full(naive, prompt, args.new_tokens)
    setattr(parent, name, stack)
    model.config.num_hidden_layers = depth
    rows["tied"] = cached_vs_full(apply(copy.deepcopy(model), [f"layers={program}:tie"]), prompt, args.new_tokens)
    rows["materialised"] = cached_vs_full(apply(copy.deepcopy(model), [f"layers={program}"]), prompt, args.new_tokens)
    print(f"model {args.model} ({n} layers), program {program} ({len(order)} positions), prompt {args.prompt_tokens} "
          f"tokens, {args.new_tokens} new; max |cached - full| logit:")
    for key, value in rows.items():
        print(f"  {key:13s} {value:.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "program": program, **rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
