"""What one evaluation task returns, and the uncertainty of an accuracy measured on n items."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass
class EvalResult:
    """One task's numbers. `stderr` follows lm-eval (sample standard deviation / sqrt(n)); `ci95` is the
    Wilson score interval for accuracies, which stays inside [0, 1] and is honest at small --limit."""

    task: str
    metrics: dict[str, float]
    n: int  # items scored (token windows for perplexity)
    stderr: dict[str, float] = field(default_factory=dict)
    ci95: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)  # what was measured: data file, seq_len, tokens scored...

    def to_json(self) -> dict:
        """A dict for json.dumps; NaN (an accuracy's stderr at n = 1) becomes null, which strict JSON allows."""
        return _nan_to_none(asdict(self))


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def perplexity_of(mean_nll: float) -> float:
    """exp(mean NLL), inf rather than OverflowError for a broken model (mean NLL above ~709 nats)."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def binomial_stderr(successes: int, n: int) -> float:
    """lm-eval's stderr of a mean of 0/1 scores: sqrt(p (1 - p) / (n - 1)); NaN below two items."""
    if n < 2:
        return math.nan
    p = successes / n
    return math.sqrt(p * (1 - p) / (n - 1))


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes an end is exactly 0 or 1; the formula gets there only up to rounding.
    low = 0.0 if successes == 0 else centre - half
    high = 1.0 if successes == n else centre + half
    return (low, high)


def accuracy_result(task: str, correct: dict[str, Sequence[bool]], other_metrics: dict[str, float] | None = None,
                    **fields) -> EvalResult:
    """EvalResult of accuracies (each a list of per-item 0/1 outcomes, all of one length) with their stderr and
    95% interval, plus `other_metrics` (e.g. LAMBADA's perplexity) and any other EvalResult `fields`."""
    n = len(next(iter(correct.values())))
    metrics, stderr, ci95 = {}, {}, {}
    for name, outcomes in correct.items():
        hits = sum(bool(x) for x in outcomes)
        metrics[name] = hits / n if n else math.nan
        stderr[name] = binomial_stderr(hits, n)
        ci95[name] = wilson_interval(hits, n)
    return EvalResult(task=task, metrics=metrics | (other_metrics or {}), n=n, stderr=stderr, ci95=ci95, **fields)
