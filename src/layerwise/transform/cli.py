"""`layerwise prune`: delete decoder layers from a model and save the result as a normal HF checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..cli_options import MODEL, out_option
from ..errors import UserError

console = Console()
PLAN_FILE = "prune_plan.json"


def prune_command(
    model: str = MODEL,
    drop: Optional[str] = typer.Option(None, "--drop", help="Layers to delete, 0-based, as a comma list with "
                                                            "INCLUSIVE ranges: 14,20-23 deletes layers 14, 20, 21, "
                                                            "22 and 23."),
    remove: Optional[int] = typer.Option(None, "--remove", help="Number of layers to delete, chosen by --strategy "
                                                                "on calibration text (instead of --drop)."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="How --remove chooses: angular (Gromov et al.: "
                                           "the N-layer span whose input and output are closest in angle at the "
                                           "last token), removal (the N layers cheapest to remove one at a time), "
                                           "greedy (SLEB: remove the cheapest layer, re-measure, repeat)."),
    data: Optional[str] = typer.Option(None, help="Calibration text file or token shard (.bin); default: embedded "
                                                  "Shakespeare."),
    tokens: int = typer.Option(4096, help="Calibration tokens."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration sequence."),
    batch_size: int = typer.Option(2, "--batch-size", help="Sequences per forward."),
    out: Path = out_option(..., "the pruned model (safetensors), its tokenizer and, with --remove, prune_plan.json"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it is not empty (the new model "
                                                             "is written whole first)."),
):
    """Delete decoder layers and save a normal model: it loads with from_pretrained and generates with a cache.

    Either name the layers (--drop) or let a strategy choose --remove N of them on calibration text; the
    choice, every loss it measured, and the full and pruned model's calibration loss go to prune_plan.json in
    --out. Layer indices count from 0 (layer 0 is the first decoder layer after the embedding) and a range a-b
    includes both a and b, unlike mergekit's end-exclusive layer_range. The saved config.json lists, under
    layer_origin, the original index of each layer that remains.

    Examples: layerwise prune path/to/SmolLM2-135M-Instruct.Q4_1.gguf --drop 14,20-23 --out runs/smollm2-25l
    layerwise prune path/to/SmolLM2-135M-Instruct.Q4_1.gguf --remove 4 --strategy greedy --out runs/smollm2-sleb4
    """
    from ..loading import check_token_windows, load_model
    from ..outputs import check_model_destination
    from .prune import original_layer_indices, parse_layer_list
    from .steps import apply
    from .save import save_transformed

    if (drop is None) == (remove is None):
        raise UserError("give exactly one of --drop LIST (the layers to delete) and --remove N (how many a "
                        "--strategy chooses)")
    layers = None
    if drop is not None:
        if strategy is not None:
            raise UserError("--strategy chooses layers for --remove; --drop names them itself, so drop --strategy")
        try:
            layers = parse_layer_list(drop)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--drop") from None
    else:
        from ..diagnose.pruning import STRATEGIES, check_prune_request

        if strategy is None:
            raise UserError(f"--remove {remove} needs --strategy {'|'.join(STRATEGIES)}")
        check_prune_request(strategy, remove)
        check_token_windows(tokens, seq_len, batch_size)
    check_model_destination(out, overwrite, source=model)
    with console.status(f"loading {model} ..."):
        net, tokenizer = load_model(model)
    n_before = net.config.num_hidden_layers
    reshaped_before = original_layer_indices(net.config) != list(range(n_before))
    _check_saveable_once_pruned(net)
    plan = None
    if layers is None:
        plan = _plan(net, tokenizer, remove, strategy, data, tokens, seq_len, batch_size)
        layers = plan["removed_layers"]
    net = apply(net, [f"drop={','.join(map(str, layers))}"], source=model)
    extra = {PLAN_FILE: json.dumps({"model": str(model), **plan}, indent=1)} if plan is not None else {}
    card = {} if plan is None else dict(  # the plan's own measurement: the card reports what was measured
        card_facts=_calibration_facts(plan, f"{strategy} chose the layers"),
        evaluation={"calibration loss, full model": plan["full_loss"], "calibration loss, pruned": plan["pruned_loss"]},
        evaluation_note=f"Next-token loss on the {plan['calibration']['tokens']:,} calibration tokens {strategy} "
                        "chose the layers on (not held-out data).")
    with console.status(f"saving to {out} ..."):
        save_transformed(net, tokenizer, out, overwrite, extra_files=extra, **card)
    console.print(f"removed layers {', '.join(map(str, layers))} (0-based) of {n_before}; "
                  f"{net.config.num_hidden_layers} remain")
    if reshaped_before:  # the input was already transformed: say what it runs relative to the original
        console.print("layers of the original model it runs now: "
                      f"{', '.join(map(str, original_layer_indices(net.config)))}")
    plan_note = f", {out / PLAN_FILE}" if plan is not None else ""
    console.print(f"outputs: {out} (load with AutoModelForCausalLM.from_pretrained){plan_note}")


def _calibration_facts(plan: dict, what: str) -> list[tuple[str, str]]:
    """The model card's line on the calibration text a plan was measured on."""
    from ..model_card import code

    calibration = plan["calibration"]
    return [("calibration data", f"{code(calibration['data'])}, {calibration['tokens']:,} tokens in windows of "
                                 f"{calibration['seq_len']} ({what})")]


def _check_saveable_once_pruned(net) -> None:
    """A layerwise model whose layers depend on their position (Mix-LN, DeepNorm) can be pruned in memory but
    not saved; say so before the strategy measures for minutes, not at the save."""
    if getattr(net.config, "model_type", None) != "layerwise":
        return
    from ..nn.registry import selected_variants

    for variant in selected_variants(net.config):
        if variant.depth_dependent:
            field = variant.selector_field
            raise UserError(f"cannot save a pruned {field}={getattr(net.config, field)!r} model: it "
                            f"{variant.depth_dependence}, so its layers would reload differently at their new "
                            "positions; score the pruned model in memory with `layerwise eval --apply drop=...`")


def _plan(net, tokenizer, remove, strategy, data, tokens, seq_len, batch_size) -> dict:
    """Measure and choose the layers to remove; print the choice; the plan as prune_plan.json holds it."""
    from rich.table import Table

    from ..diagnose import depth_view
    from ..diagnose.metrics import token_batches
    from ..diagnose.pruning import check_prune_request, plan_pruning
    from ..loading import load_tokens
    from .program import check_reshapeable
    from .prune import original_layer_indices

    check_prune_request(strategy, remove, len(depth_view(net).layers))
    check_reshapeable(net)  # before minutes of measuring, not after
    batches = list(token_batches(load_tokens(data, tokenizer, tokens), seq_len, batch_size, tokens))
    n_tokens = sum(b.numel() for b in batches)
    def say(k: int, chosen) -> None:
        console.print(f"round {k}: removed layer {chosen.removed[0]} (loss {min(v for _, v in chosen.candidates):.4f})")

    with console.status(f"{strategy}: choosing {remove} layers on {n_tokens:,} calibration tokens ..."):
        plan = plan_pruning(net, batches, remove, strategy, on_round=say)
    originals = original_layer_indices(net.config)
    table = Table(title=f"{strategy}: {remove} of {plan.n_layers} layers, {n_tokens:,} tokens "
                        f"(loss {plan.full_loss:.4f} -> {plan.pruned_loss:.4f})")
    for column in ("round", "removed", "measured", "value"):
        table.add_column(column, justify="right")
    for k, chosen in enumerate(plan.rounds):  # one row per removed layer or span, with what chose it
        for layers, value in chosen.candidates:
            if set(layers) <= set(chosen.removed):
                table.add_row(str(k + 1), ", ".join(map(str, layers)), chosen.score, f"{value:.4f}")
    console.print(table)
    return {**plan.to_json(), "removed_original_layers": [originals[i] for i in plan.removed],
            "calibration": {"data": data or "embedded Shakespeare", "tokens": n_tokens, "seq_len": seq_len,
                            "batch_size": batch_size}}


def transform_command(
    model: str = MODEL,
    steps: Optional[list[str]] = typer.Option(None, "--apply", metavar="STEP",
                                              help="A step to run; repeat for several, run in order. None: the "
                                                   "model is saved as it loads (e.g. a GGUF as safetensors)."),
    out: Path = out_option(..., "the transformed model (safetensors), its tokenizer and a model card"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it holds another model (the new "
                                                             "model is written whole first)."),
):
    """Run transform steps on a model, in order, and save the result as a normal model folder.

    The folder loads with AutoModelForCausalLM.from_pretrained (after `import layerwise` when it is a layerwise
    model); its config.json lists the steps (layerwise_transforms), the source (layerwise_source) and the
    source layer of each layer (layer_origin), and README.md says the same for people. `layerwise eval` and
    `layerwise diagnose` take the same --apply steps and run them in memory.

    Steps (0-based layer indices; ranges a-b include both ends; kept in step with the registered steps by
    tests/test_transform_cli.py):

    \b
      drop=12-15,20            delete layers; the rest are renumbered and keep their math
      layers=0-15,12-15,16-29  a layer program: the new stack lists source layers in order, repeats
                               allowed (materialised copies); add :tie to run one set of weights several times
      fold-norms               fold each norm's gain (and LayerNorm bias) into the linears that read it
      fold-prepbn              a finished PRepBN's eval map into its readers; the norms become identity
      pre-rmsnorm              Pre-LN -> Pre-RMSNorm, exactly (Jiang et al., NeurIPS 2023)
      pre-crmsnorm             Pre-LN -> Pre-CRMSNorm: the same, with the stream compressed to d-1
      to-layerwise             a Llama-family (or GPT-2) HF model as a LayerwiseForCausalLM, same logits
      to-hf                    a layerwise model back to its HF family (to-hf=FAMILY picks one)
      quantize=4/2:10-14/8:0   per-layer HQQ widths (2/3/4/8, 16 = float) for the layers' linears; last
                               step; saved as quantized.safetensors (load with layerwise.loading.load_model)

    Example: layerwise transform path/to/SmolLM2-135M-Instruct.Q4_1.gguf --apply layers=0-15,12-15,16-29 --out runs/smollm2-34l
    """
    from ..loading import load_model
    from ..outputs import check_model_destination
    from .save import save_transformed
    from .steps import apply, parse_steps

    parsed = parse_steps(steps or [])  # a typo fails before the model is read
    check_model_destination(out, overwrite, source=model)
    with console.status(f"loading {model} ..."):
        net, tokenizer = load_model(model)
    n_before = net.config.num_hidden_layers
    with console.status(f"applying {', '.join(map(str, parsed))} ..."):
        net = apply(net, parsed, source=model)
    with console.status(f"saving to {out} ..."):
        save_transformed(net, tokenizer, out, overwrite)
    done = f"applied {', '.join(map(str, parsed))}" if parsed else "no steps: saved as loaded"
    console.print(f"{done}: {n_before} -> {net.config.num_hidden_layers} layers")
    loader = ("layerwise.loading.load_model" if getattr(net.config, "layerwise_quantization", None) is not None
              else "AutoModelForCausalLM.from_pretrained")
    console.print(f"outputs: {out} (load with {loader}; README.md says how it was made)")


QUANT_PLAN_FILE = "quant_plan.json"


def quantize_command(
    model: str = MODEL,
    bits: Optional[str] = typer.Option(None, "--bits", help="The widths, as the quantize step writes them: "
                                       "BITS[/BITS:LAYERS]..., e.g. 4/2:10-14,20/8:0,29 (every layer at 4 bits, "
                                       "10-14 and 20 at 2, 0 and 29 at 8); widths 2, 3, 4, 8, or 16 (float). "
                                       "Layers 0-based, ranges inclusive."),
    avg_bits: Optional[float] = typer.Option(None, "--avg-bits", help="Target average bits per weight over the "
                                             "decoder layers' linears; --order ranks the layers on calibration "
                                             "text and the least important get the lower widths (instead of "
                                             "--bits)."),
    widths: Optional[str] = typer.Option(None, "--widths", help="Widths --avg-bits may use (default 2,3,4,8)."),
    order: Optional[str] = typer.Option(None, "--order", help="How --avg-bits ranks layers: lim (how little a "
                                        "layer changes its input), zd (share of outlier weights), removal (loss "
                                        "when the layer is skipped), random (control; --seed). Default lim."),
    seed: int = typer.Option(0, "--seed", help="Seed of --order random."),
    data: Optional[str] = typer.Option(None, help="Calibration text file or token shard (.bin) for --avg-bits; "
                                                  "default: embedded Shakespeare."),
    tokens: int = typer.Option(4096, help="Calibration tokens."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration sequence."),
    batch_size: int = typer.Option(2, "--batch-size", help="Sequences per forward."),
    group: Optional[int] = typer.Option(None, "--group", help="HQQ group size: weights sharing one scale and "
                                                              "zero (default 64)."),
    out: Path = out_option(..., "the quantized model (quantized.safetensors, config.json), its tokenizer and, "
                                "with --avg-bits, quant_plan.json"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it holds another model (the new "
                                                             "model is written whole first)."),
):
    """Quantize the decoder layers' linears with HQQ, each layer at its own width, and save the result.

    Either give the widths (--bits) or a target average (--avg-bits) that a layer ranking (--order) on
    calibration text turns into widths; the ranking, each layer's width and the achieved average go to
    quant_plan.json in --out. Embeddings, the LM head and norms stay in floating point. The folder holds
    quantized.safetensors, not model.safetensors: load it with layerwise.loading.load_model(DIR), or score it
    with `layerwise eval DIR` (docs/quantization.md describes the format).

    Examples: layerwise quantize path/to/SmolLM2-135M-Instruct.Q4_1.gguf --bits 4/8:0,29 --out runs/smollm2-q4
    layerwise quantize path/to/SmolLM2-135M-Instruct.Q4_1.gguf --avg-bits 3.5 --order lim --out runs/smollm2-q35
    """
    from ..arch.quantized import WEIGHTS_FILE, hqq_linear_class
    from ..loading import check_token_windows, load_model
    from ..outputs import check_model_destination
    from .quantize import DEFAULT_GROUP, BitSpec, check_quantizable, parse_bit_spec
    from .save import save_transformed
    from .steps import apply

    if (bits is None) == (avg_bits is None):
        raise UserError("give exactly one of --bits SPEC (the widths) and --avg-bits X (a target a --order "
                        "ranking turns into widths)")
    if group is not None and group < 1:
        raise UserError(f"--group {group}: use a positive group size, e.g. 64")
    spec = None
    if bits is not None:
        for option, value in (("--widths", widths), ("--order", order), ("--data", data)):
            if value is not None:
                raise UserError(f"{option} is for --avg-bits; --bits names every width itself, so drop {option}")
        try:
            spec = parse_bit_spec(bits)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--bits") from None
        if group is not None and "group=" in bits:
            raise UserError("give the group size once: in --bits (/group=N) or as --group")
        if group is not None:
            spec = BitSpec(spec.default, spec.overrides, group)
    else:
        from ..diagnose.quantization import WIDTHS, check_bit_request

        width_list = list(WIDTHS)
        if widths is not None:
            try:
                width_list = [int(w) for w in widths.split(",")]
            except ValueError:
                raise typer.BadParameter(f"{widths!r} is not a comma list of widths, e.g. 2,3,4,8",
                                         param_hint="--widths") from None
        order = order or "lim"
        check_bit_request(avg_bits, width_list, order)
        check_token_windows(tokens, seq_len, batch_size)
    hqq_linear_class()  # a missing extra fails before the model is read
    check_model_destination(out, overwrite, source=model)
    with console.status(f"loading {model} ..."):
        net, tokenizer = load_model(model)
    float_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    plan = None
    if spec is None:
        try:  # the smallest width everywhere: group sizes and tied layers are refused before minutes of ranking
            check_quantizable(net, BitSpec(min(width_list), group_size=group or DEFAULT_GROUP))
        except ValueError as err:
            raise UserError(f"cannot quantize {model}: {err}") from None
        plan = _plan_bits(net, tokenizer, avg_bits, width_list, order, seed, data, tokens, seq_len, batch_size)
        step = plan["step"] + (f"/group={group}" if group is not None else "")
    else:
        step = f"quantize={bits}" + (f"/group={group}" if group is not None else "")
    with console.status(f"applying {step} ..."):
        net = apply(net, [step], source=model)
    extra = {QUANT_PLAN_FILE: json.dumps({"model": str(model), **plan}, indent=1)} if plan is not None else {}
    facts = _calibration_facts(plan, f"{order} ranked the layers") if plan is not None else []
    with console.status(f"saving to {out} ..."):
        save_transformed(net, tokenizer, out, overwrite, extra_files=extra, card_facts=facts)
    record = net.config.layerwise_quantization
    _print_bits(record, net)
    size = (out / WEIGHTS_FILE).stat().st_size
    console.print(f"average bits per weight: {record['avg_bits_layers']:.3f} over the decoder layers' linears, "
                  f"{record['avg_bits_model']:.3f} over the whole model (scales, zeros and float parts counted)")
    console.print(f"size on disk: {out / WEIGHTS_FILE} {size / 2**20:.2f} MiB ({size:,} bytes; the float model's "
                  f"weights: {float_bytes / 2**20:.2f} MiB)")
    plan_note = f", {out / QUANT_PLAN_FILE}" if plan is not None else ""
    console.print(f"outputs: {out} (load with layerwise.loading.load_model; `layerwise eval {out}` scores it)"
                  f"{plan_note}")


def _print_bits(record: dict, net) -> None:
    from rich.table import Table

    from .prune import original_layer_indices

    bits = record["layer_bits"]
    origin = original_layer_indices(net.config) if getattr(net.config, "layer_order", None) is None else None
    table = Table(title=f"HQQ widths (group size {record['group_size']}; 16 = left in floating point)")
    for column in ("layer", *(("original layer",) if origin and origin != list(range(len(bits))) else ()), "bits"):
        table.add_column(column, justify="right")
    for index, width in enumerate(bits):
        shown = [str(index)]
        if origin and origin != list(range(len(bits))):
            shown.append(str(origin[index]))
        table.add_row(*shown, str(width))
    console.print(table)
    console.print(f"kept in floating point: {', '.join(record['kept_in_float'])}")


def _plan_bits(net, tokenizer, avg_bits, widths, order, seed, data, tokens, seq_len, batch_size) -> dict:
    """Rank the layers on calibration text and allocate the widths; quant_plan.json holds the result."""
    from ..diagnose import depth_view
    from ..diagnose.metrics import token_batches
    from ..diagnose.quantization import plan_bits
    from ..loading import load_tokens

    batches = list(token_batches(load_tokens(data, tokenizer, tokens), seq_len, batch_size, tokens))
    n_tokens = sum(b.numel() for b in batches)
    with console.status(f"{order}: ranking {len(depth_view(net).layers)} layers on {n_tokens:,} calibration "
                        "tokens ..."):
        plan = plan_bits(net, depth_view(net), batches, avg_bits=avg_bits, widths=widths, order=order, seed=seed)
    console.print(f"{order}: planned {plan.avg_bits:.3f} bits per weight (nominal widths, before the scale and zero "
                  f"of each group) for a target of {avg_bits}")
    return {**plan.to_json(), "step": plan.step(),
            "calibration": {"data": data or "embedded Shakespeare", "tokens": n_tokens, "seq_len": seq_len,
                            "batch_size": batch_size}}
