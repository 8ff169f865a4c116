"""Self-contained HTML report of one `layerwise diagnose` result: report.html (charts, rankings, a summary in
words) and report.json (the same summary, rankings and key numbers as plain data).

Each metric list in diagnosis.json is drawn on the axis its length implies: L values are per layer (layer l maps
h_l to h_{l+1}), L+1 per boundary (h_0 = embedding output .. h_L = last layer's output), L-n+1 per span start
(span l covers layers l..l+n-1), and an L x L list is a heatmap. Metrics added to `diagnose` later therefore
render without changes here. Plots are PNG data URIs and the CSS is inline, so the page has no scripts and no
links and opens offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

DIAGNOSIS_FILE, EVAL_FILE = "diagnosis.json", "eval.json"
REPORT_HTML, REPORT_JSON = "report.html", "report.json"

# A layer whose removal costs under 0.1 nats/token (~10% perplexity) is a pruning candidate worth a real eval;
# the threshold is stated in the summary so a reader can apply their own.
CHEAP_REMOVAL_NATS = 0.1

# Importance measures ranked least important first (low value = cheap to remove / little change).
LAYER_MEASURES = ("removal_delta_loss", "removal_kl", "block_influence", "angular_distance", "layer_contribution")
SPAN_MEASURES = ("span_removal_delta_loss", "span_angular_distance_last")
COSINE_MEASURES = ("angular_distance", "block_influence", "span_angular_distance_last", "span_angular_distance_all")
SCALARS = ("loss",)

CONVENTIONS = ("Layers are numbered from 0: layer l reads the residual stream h_l and writes h_{l+1}; h_0 is the "
               "embedding output and h_L the last layer's output (before the final norm). A span a..b lists its "
               "first and last layer, 0-based and inclusive (mergekit's end-exclusive layer_range for it is "
               "[a, b+1]). Under Attention Residuals there is no single stream: h_l is what the final norm would read "
               "if the network stopped before layer l.")

DESCRIPTIONS = {
    "angular_distance": "How far layer l turns the residual stream: mean over tokens of arccos(cos(h_l, h_{l+1}))/pi, "
                        "0 = direction unchanged, 1 = reversed. Low means the layer barely changes the stream.",
    "block_influence": "ShortGPT's Block Influence, 1 - mean cos(h_l, h_{l+1}). ShortGPT prunes the lowest; it is a "
                       "proxy for importance, not a measurement of it.",
    "span_angular_distance_last": "Gromov et al.: arccos(cos(h_l, h_{l+n}))/pi at each sequence's last token, for the "
                                  "span l..l+n-1. Gromov et al. drop the span with the lowest value.",
    "span_angular_distance_all": "The span angular distance arccos(cos(h_l, h_{l+n}))/pi averaged over all tokens "
                                 "rather than the last one.",
    "hidden_rms": "Root-mean-square size of the residual stream at each boundary h_0..h_L (per-token RMS, mean over "
                  "tokens; training telemetry reports the same number under the same name). Steady growth with depth is "
                  "the Pre-LN 'curse of depth': late layers' updates become small relative to the stream.",
    "hidden_var": "Per-token variance of the residual stream over the hidden dimension, at each boundary h_0..h_L.",
    "layer_contribution": "Csordas et al.: ||h_{l+1} - h_l|| / ||h_l||, the size of what layer l adds relative to the "
                          "stream it reads.",
    "attn_contribution": "||a_l|| / ||h_l||: the size of layer l's attention output relative to its input.",
    "mlp_contribution": "||m_l|| / ||h_l + a_l||: the size of layer l's MLP output relative to the stream it reads.",
    "logit_lens_kl": "Logit lens: KL(p_l || p_final) in nats between the prediction read off layer l's output (final "
                     "norm + LM head) and the model's own; 0 at the last layer.",
    "logit_lens_top1": "Logit lens: fraction of tokens where layer l's top-1 token equals the model's.",
    "logit_lens_top5": "Logit lens: mean overlap of layer l's top-5 tokens with the model's top 5 (1 = same set).",
    "logit_lens_loss": "Logit lens: next-token loss (nats/token) if the model stopped after layer l.",
    "removal_delta_loss": "Change in next-token loss (nats/token) when layer l is skipped (its input goes straight "
                          "on). The measured importance; negative means the model does better without the layer.",
    "removal_kl": "KL(p_full || p_without_l) in nats/token: how much skipping layer l changes the output distribution.",
    "span_removal_delta_loss": "Change in next-token loss (nats/token) when the whole span l..l+n-1 is skipped.",
    "span_removal_kl": "KL(p_full || p_without_span) in nats/token when the span l..l+n-1 is skipped.",
    "skip_effect": "Csordas et al.: row s = skipped layer, column l = a later layer; the relative change of layer l's "
                   "contribution h_{l+1} - h_l when layer s is skipped. Blank where l <= s.",
    "attention_entropy": "Mean entropy (nats) of layer l's attention distributions over heads and query positions. "
                         "Low means sharp, focused attention.",
    "loss": "The full model's mean next-token loss, nats/token.",
}

AXIS_LABELS = {"layer": "layer l (0-based)", "boundary": "boundary h_l (0 = embedding, L = last layer output)",
               "span": "span l..l+n-1 (0-based, inclusive)"}


@dataclass
class DiagnosisView:
    """A loaded diagnosis with each metric's axis worked out once."""
    raw: dict
    n_layers: int
    n_span: int | None
    axes: dict[str, str | None]        # metric -> layer | boundary | span | scalar | matrix | None (not shown)
    series: dict[str, list[float]]     # the 1-D metrics as floats, NaN where null

    def values(self, name: str, axis: str) -> list[float] | None:
        return self.series.get(name) if self.axes.get(name) == axis else None


def load_diagnosis(source) -> tuple[dict, Path | None]:
    """The diagnosis dict and the folder it came from (None for a dict): a dict, a diagnosis.json or its folder."""
    folder = None
    if isinstance(source, dict):
        diagnosis = source
    else:
        path = Path(source)
        path = path / DIAGNOSIS_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass a diagnosis.json or the folder `layerwise diagnose "
                                    f"--out` wrote")
        try:
            diagnosis = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        folder = path.parent
    if not (isinstance(diagnosis, dict) and isinstance(diagnosis.get("metrics"), dict)
            and isinstance(diagnosis.get("n_layers"), int) and diagnosis["n_layers"] > 0):
        raise ValueError("a diagnosis needs 'n_layers' (a positive int) and 'metrics' (a dict), as written by "
                         "`layerwise diagnose`")
    return diagnosis, folder


def load_evals(path: Path) -> dict | None:
    """{task: {"metrics": {...}, "n": int}} from an eval.json, or None when there is none."""
    if not path.is_file():
        return None
    try:
        evals = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(evals, dict):
        raise ValueError(f"{path} should map task names to results, got a {type(evals).__name__}")
    # `layerwise eval --out` writes {"model": ..., "tasks": {task: result}}; a bare {task: result} also works.
    return evals.get("tasks", evals)


def _is_value(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _floats(values) -> list[float]:
    return [math.nan if x is None else float(x) for x in values]


def metric_axis(name: str, values, n_layers: int, n_span: int | None) -> str | None:
    """The axis a metric lies on, from its length: 'layer', 'boundary', 'span', 'scalar', 'matrix', or None."""
    if not isinstance(values, list) or not values:
        return None
    if all(isinstance(row, list) for row in values):
        square = all(len(row) == len(values) and all(_is_value(x) for x in row) for row in values)
        return "matrix" if square else None
    if not all(_is_value(x) for x in values):
        return None
    n, n_spans = len(values), (n_layers - n_span + 1 if n_span else None)
    # The span_ prefix settles the one real ambiguity: with n_span = 1 a span list is as long as a layer list.
    if name.startswith("span_") and n == n_spans:
        return "span"
    if name in SCALARS:
        return "scalar" if n == 1 else None
    if n == n_layers:
        return "layer"
    if n == n_layers + 1:
        return "boundary"
    if n == n_spans:
        return "span"
    return "scalar" if n == 1 else None


def diagnosis_view(diagnosis: dict) -> DiagnosisView:
    L, metrics = diagnosis["n_layers"], diagnosis["metrics"]
    n_span = diagnosis.get("n_span")
    if not isinstance(n_span, int) or not 1 <= n_span <= L:
        # Older or hand-made files: the span length follows from any span_ list's length.
        n_span = next((L - len(v) + 1 for k, v in metrics.items()
                       if k.startswith("span_") and isinstance(v, list) and 0 < len(v) <= L), None)
    axes = {name: metric_axis(name, values, L, n_span) for name, values in metrics.items()}
    series = {name: _floats(metrics[name]) for name, axis in axes.items() if axis not in (None, "matrix")}
    return DiagnosisView(diagnosis, L, n_span, axes, series)


# ---------------------------------------------------------------------------------------------- rankings

def span_label(first: int, n_span: int) -> str:
    return f"{first}..{first + n_span - 1}"


def rank_layers(values: list[float]) -> list[dict]:
    """Layers by ascending value, least important first; null and non-finite values are left out."""
    return [{"layer": i, "value": v} for v, i in sorted((v, i) for i, v in enumerate(values) if math.isfinite(v))]


def rank_spans(values: list[float], n_span: int) -> list[dict]:
    """Spans by ascending value, each named 'first..last' (0-based, inclusive)."""
    return [{"span": span_label(r["layer"], n_span), "first": r["layer"], "last": r["layer"] + n_span - 1,
             "value": r["value"]} for r in rank_layers(values)]


def rankings(v: DiagnosisView) -> dict[str, list[dict]]:
    ranked = {name: rank_layers(v.values(name, "layer")) for name in LAYER_MEASURES if v.values(name, "layer")}
    ranked |= {name: rank_spans(v.values(name, "span"), v.n_span) for name in SPAN_MEASURES if v.values(name, "span")}
    return ranked


# ---------------------------------------------------------------------------------------------- summary

def _layers_label(first: int, last: int) -> str:
    return f"Layer {first}" if first == last else f"Layers {first}..{last}"


def _longest_run(mask: list[bool]) -> tuple[int, int] | None:
    best, start = None, None
    for i, flag in enumerate(mask + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if best is None or i - start > best[1] - best[0] + 1:
                best = (start, i - 1)
            start = None
    return best


def _overview(v: DiagnosisView):
    loss = v.values("loss", "scalar")
    tokens = v.raw.get("tokens")
    text = f"{v.raw.get('family', 'model')} with {v.n_layers} layers"
    text += f", diagnosed on {tokens:,} tokens" if isinstance(tokens, int) else ""
    text += f"; mean next-token loss {loss[0]:.4f} nats/token." if loss else "."
    return text, {"loss": loss[0] if loss else None}


def _low_angular_run(v: DiagnosisView):
    distance = v.values("angular_distance", "layer")
    finite = [x for x in distance or [] if math.isfinite(x)]
    if len(finite) < 2:
        return None
    # The median makes the threshold relative to this model: absolute angular distances vary a lot across models.
    threshold = statistics.median(finite)
    first, last = _longest_run([x <= threshold for x in distance])
    peak = max(distance[first:last + 1])
    one = first == last
    text = (f"{_layers_label(first, last)} {'changes' if one else 'each change'} the residual stream's direction "
            f"by {'' if one else 'at most '}{peak:.3g} in angular distance (the longest contiguous run of layers at "
            f"or below the median, {threshold:.3g})")
    numbers = {"first": first, "last": last, "median_threshold": threshold, "max_angular_distance": peak}
    removal = v.values("removal_delta_loss", "layer")
    if removal:
        worst = max(removal[first:last + 1])
        text += (f"; removing {'it costs' if one else 'any one of them costs at most'} {worst:+.3g} nats/token "
                 f"(removal_delta_loss)")
        numbers["max_removal_delta_loss"] = worst
    return text + ".", {"low_angular_run": numbers}


def _removal_costs(v: DiagnosisView):
    ranked = rank_layers(v.values("removal_delta_loss", "layer") or [])
    if not ranked:
        return None
    cheapest, dearest = ranked[0], ranked[-1]
    cheap = sorted(r["layer"] for r in ranked if r["value"] < CHEAP_REMOVAL_NATS)
    text = f"The cheapest single layer to remove is {cheapest['layer']} ({cheapest['value']:+.3g} nats/token"
    text += ", i.e. the loss falls without it)" if cheapest["value"] < 0 else ")"
    text += f"; the most important is {dearest['layer']} ({dearest['value']:+.3g} nats/token). "
    count = f"All {len(cheap)}" if len(cheap) == v.n_layers else f"{len(cheap)} of {v.n_layers}"
    text += (f"{count} layers cost less than {CHEAP_REMOVAL_NATS} nats/token each to remove on "
             f"their own: {', '.join(map(str, cheap))}." if cheap else
             f"No single layer can be removed for less than {CHEAP_REMOVAL_NATS} nats/token.")
    return text, {"cheapest_layer": cheapest, "most_important_layer": dearest, "cheap_layers": cheap,
                  "cheap_threshold_nats": CHEAP_REMOVAL_NATS}


def _cheapest_span(v: DiagnosisView):
    by_loss = rank_spans(v.values("span_removal_delta_loss", "span") or [], v.n_span)
    by_angle = rank_spans(v.values("span_angular_distance_last", "span") or [], v.n_span)
    if not (by_loss or by_angle):
        return None
    parts, numbers = [], {}
    if by_loss:
        best = by_loss[0]
        parts.append(f"The cheapest {v.n_span}-layer span to remove is {best['span']} ({best['value']:+.3g} "
                     f"nats/token)")
        numbers["cheapest_span"] = best
    if by_angle:
        best = by_angle[0]
        parts.append(f"the span whose ends are most alike by last-token angular distance (Gromov et al.'s pick) is "
                     f"{best['span']} ({best['value']:.3g})")
        numbers["most_similar_span"] = best
    text = "; ".join(parts)
    text = text[0].upper() + text[1:]
    if by_loss and by_angle:
        text += (", the same span" if by_loss[0]["first"] == by_angle[0]["first"] else
                 ", a different span: the angular pick is a proxy, the removal cost is measured")
    return f"{text} (spans are first..last layer, 0-based, inclusive).", numbers


def _hidden_growth(v: DiagnosisView):
    rms = v.values("hidden_rms", "boundary")
    if not rms or not (math.isfinite(rms[0]) and math.isfinite(rms[-1])):
        return None
    trend = "grows" if rms[-1] >= rms[0] else "falls"
    text = (f"Hidden-state RMS {trend} from {rms[0]:.3g} at the embedding (h_0) to {rms[-1]:.3g} at the last "
            f"layer's output")
    ratio = rms[-1] / rms[0] if rms[0] > 0 else None
    text += f" (h_{v.n_layers}), x{ratio:.3g}." if ratio is not None else f" (h_{v.n_layers})."
    return text, {"hidden_rms": {"embedding": rms[0], "last": rms[-1], "ratio": ratio}}


def _logit_lens_agreement(v: DiagnosisView):
    top1 = v.values("logit_lens_top1", "layer")
    if not top1:
        return None
    first = v.n_layers
    while first > 0 and top1[first - 1] >= 0.5:
        first -= 1
    if first == v.n_layers:
        return None
    return (f"From layer {first} on, the logit lens (each layer's output through the final norm and head) already "
            f"picks the model's top-1 token for at least half of the tokens.", {"logit_lens_top1_half_from": first})


def _rank_correlation(v: DiagnosisView):
    found = v.raw.get("rank_correlation")
    rho = {k: float(x) for k, x in (found or {}).items() if _is_value(x) and x is not None and math.isfinite(x)}
    if not rho:
        return None
    listed = ", ".join(f"{name} {r:+.2f}" for name, r in sorted(rho.items(), key=lambda kv: -abs(kv[1])))
    proxies = {k: r for k, r in rho.items() if k in COSINE_MEASURES} or rho
    best = max(proxies, key=lambda k: abs(proxies[k]))
    strength = "strong" if abs(proxies[best]) >= 0.7 else "moderate" if abs(proxies[best]) >= 0.4 else "weak"
    text = (f"Spearman rank correlation with removal_delta_loss: {listed}. The best cosine-based proxy, {best}, "
            f"agrees {strength}ly (|rho| >= 0.7 strong, >= 0.4 moderate, else weak); cosine similarity is not "
            f"importance (arXiv 2605.14075), so prune by removal_delta_loss.")
    return text, {"rank_correlation": rho}


def summarize(v: DiagnosisView) -> tuple[list[str], dict]:
    """Plain-language sentences computed from the numbers, and the key numbers behind them."""
    sentences, numbers = [], {}
    for part in (_overview, _removal_costs, _low_angular_run, _cheapest_span, _hidden_growth, _logit_lens_agreement,
                 _rank_correlation):
        found = part(v)
        if found:
            sentences.append(found[0])
            numbers |= found[1]
    return sentences, numbers


# ---------------------------------------------------------------------------------------------- charts

def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chart(name: str, values: list, axis: str, v: DiagnosisView) -> str:
    """One metric as a PNG data URI: bars per layer or span, a line over boundaries, a heatmap for a matrix."""
    # A bare Figure renders with the Agg canvas and touches no pyplot global state (safe in tests and threads).
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if axis == "matrix":
        return _heatmap(name, values)
    fig = Figure(figsize=(7, 3.1))
    ax = fig.subplots()
    if axis == "boundary":
        ax.plot(range(len(values)), values, marker="o", ms=3)
        positive = [x for x in values if math.isfinite(x) and x > 0]
        if len(positive) == len(values) and max(positive) / min(positive) > 50:
            ax.set_yscale("log")   # RMS growth spans orders of magnitude in deep Pre-LN stacks
    else:
        ax.bar(range(len(values)), values, color=["#c0504d" if x < 0 else "#4f81bd" for x in values])
        ax.axhline(0, color="black", lw=0.6)
        finite = [x for x in values if math.isfinite(x)]
        # The threshold line only where it falls near the data; otherwise it would flatten small bars to nothing.
        near = bool(finite) and max(finite) >= CHEAP_REMOVAL_NATS / 2
        if name in ("removal_delta_loss", "span_removal_delta_loss") and near:
            ax.axhline(CHEAP_REMOVAL_NATS, color="gray", ls="--", lw=0.8, label=f"{CHEAP_REMOVAL_NATS} nats")
            ax.legend(fontsize=8)
    label = AXIS_LABELS[axis]
    if axis == "span" and len(values) > 24:
        label = "span start l (the span covers layers l..l+n-1, 0-based)"
    ax.set_xlabel(label.replace("n-1", f"{v.n_span - 1}" if v.n_span else "n-1"))
    ax.set_ylabel(name, fontsize=9)
    ax.set_title(name, fontsize=10)
    if axis == "span" and v.n_span and len(values) <= 24:
        # Name each bar by its span, so nobody has to work out l..l+n-1 (a common off-by-one).
        ax.set_xticks(range(len(values)), [span_label(i, v.n_span) for i in range(len(values))],
                      rotation=45 if len(values) > 8 else 0, fontsize=8)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _heatmap(name: str, rows: list[list]) -> str:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    matrix = np.ma.masked_invalid(np.array([_floats(row) for row in rows], dtype=float))
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="#eeeeee")   # null cells (l <= s) in light grey
    image = ax.imshow(matrix, origin="upper", cmap=cmap, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.85)
    ax.set_xlabel("later layer l (0-based)")
    ax.set_ylabel("skipped layer s (0-based)")
    ax.set_title(name, fontsize=10)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _png(fig)


def caption(name: str, axis: str, v: DiagnosisView) -> str:
    meaning = DESCRIPTIONS.get(name, f"No description on file for this metric; one value per {axis}.")
    if v.n_span and "l..l+n-1" in meaning:
        meaning += f" Here n = {v.n_span}."
    return meaning


# ---------------------------------------------------------------------------------------------- HTML

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta, .note { color: #555; } .note { font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1.2em; }
figure { margin: 0; } figure img { width: 100%; } figcaption { font-size: 0.85em; color: #444; }
"""


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return html.escape(str(x))
    return f"{x:,}" if isinstance(x, int) else (f"{x:.4g}" if math.isfinite(x) else "-")


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _ranking_table(ranked: dict[str, list[dict]], measures: tuple[str, ...], label: str) -> str:
    present = [m for m in measures if m in ranked]
    depth = max(len(ranked[m]) for m in present)
    rows = [[str(i + 1)] + [f"{html.escape(str(ranked[m][i][label]))} ({_fmt(ranked[m][i]['value'])})"
                            if i < len(ranked[m]) else "" for m in present] for i in range(depth)]
    return _table(["rank"] + present, rows)


def _eval_table(evals: dict) -> str:
    tasks = {task: r for task, r in evals.items() if isinstance(r, dict)}
    columns = sorted({k for r in tasks.values() for k in (r.get("metrics") or {})})
    rows = [[html.escape(task), _fmt(r.get("n", "-"))] + [_fmt((r.get("metrics") or {}).get(c, "-")) for c in columns]
            for task, r in tasks.items()]
    return _table(["task", "n"] + columns, rows)


def _charts_html(v: DiagnosisView) -> tuple[str, list[str]]:
    sections, shown = [], []
    for axis, title in (("layer", "Per layer"), ("boundary", "Per layer boundary"), ("span", "Per span"),
                        ("matrix", "Layer x layer")):
        names = [name for name, a in v.axes.items() if a == axis]
        figures = []
        for name in names:
            values = v.raw["metrics"][name] if axis == "matrix" else v.series[name]
            figures.append(f'<figure><img src="{chart(name, values, axis, v)}" alt="{html.escape(name)}">'
                           f"<figcaption><b>{html.escape(name)}</b>: {html.escape(caption(name, axis, v))}"
                           f"</figcaption></figure>")
            shown.append(name)
        if figures:
            sections.append(f"<h3>{title}</h3><div class='charts'>{''.join(figures)}</div>")
    return "".join(sections), shown


def render_html(v: DiagnosisView, sentences: list[str], ranked: dict, evals: dict | None) -> tuple[str, list[str]]:
    """The page, and the names of the metrics it charts."""
    title = v.raw.get("model") or v.raw.get("family") or "model"
    meta = f"{html.escape(str(v.raw.get('family', '?')))} &middot; {v.n_layers} layers &middot; n_span {v.n_span or '-'}"
    if isinstance(v.raw.get("tokens"), int):
        meta += f" &middot; {v.raw['tokens']:,} tokens"
    steps = v.raw.get("apply")
    if isinstance(steps, list) and steps:
        meta += " &middot; after " + html.escape(", ".join(map(str, steps)))
    parts = [f"<h1>Depth diagnosis: {html.escape(str(title))}</h1><p class='meta'>{meta}</p>",
             "<h2>Summary</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in sentences) + "</ul>",
             f"<p class='note'>{html.escape(CONVENTIONS)}</p>"]
    if any(m in ranked for m in LAYER_MEASURES):
        parts.append("<h2>Layers ranked, least important first</h2><p class='note'>Each column orders the layers "
                     "(0-based) by one measure, its value in parentheses; the top rows are the removal candidates.</p>"
                     + _ranking_table(ranked, LAYER_MEASURES, "layer"))
    if any(m in ranked for m in SPAN_MEASURES):
        parts.append(f"<h2>{v.n_span}-layer spans ranked, least important first</h2><p class='note'>A span a..b "
                     f"is layers a to b, 0-based and inclusive.</p>" + _ranking_table(ranked, SPAN_MEASURES, "span"))
    rho = v.raw.get("rank_correlation")
    if isinstance(rho, dict) and rho:
        parts.append("<h2>Rank correlation with removal_delta_loss</h2>"
                     + _table(["metric", "Spearman rho"], [[html.escape(k), _fmt(r)] for k, r in rho.items()]))
    if evals:
        parts.append("<h2>Evaluation</h2>" + _eval_table(evals))
    charts, shown = _charts_html(v)
    parts.append("<h2>Metrics</h2>" + charts)
    scalars = [f"{html.escape(k)} = {_fmt(v.series[k][0])}" for k, a in v.axes.items() if a == "scalar"]
    if scalars:
        parts.append(f"<p class='note'>Single numbers: {'; '.join(scalars)}.</p>")
    skipped = [k for k, a in v.axes.items() if a is None]
    if skipped:
        parts.append(f"<p class='note'>Not shown (shape matches no layer axis): "
                     f"{html.escape(', '.join(skipped))}.</p>")
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>Depth diagnosis: {html.escape(str(title))}</title><style>{CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")
    return page, shown


def _plain(x):
    """JSON-safe copy: NaN and infinities become null so report.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _plain(val) for k, val in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(val) for val in x]
    return x


def write_report(source, out_dir=None, evals: dict | None = None) -> Path:
    """Write out_dir/report.html and out_dir/report.json for a diagnosis; return the HTML path.

    `source` is a diagnosis.json, its folder, or the loaded dict; `out_dir` defaults to the source's folder. The
    eval table comes from `evals` or else from an eval.json beside the diagnosis (in out_dir for a dict).
    """
    diagnosis, folder = load_diagnosis(source)
    if out_dir is None and folder is None:
        raise ValueError("write_report needs out_dir when the diagnosis is passed as a dict")
    out = Path(out_dir) if out_dir is not None else folder
    if evals is None:
        evals = load_evals((folder or out) / EVAL_FILE)
    v = diagnosis_view(diagnosis)
    sentences, numbers = summarize(v)
    ranked = rankings(v)
    page, shown = render_html(v, sentences, ranked, evals)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_HTML).write_text(page, encoding="utf-8")
    payload = {"model": diagnosis.get("model"), "family": diagnosis.get("family"), "n_layers": v.n_layers,
               "n_span": v.n_span, "tokens": diagnosis.get("tokens"), "conventions": CONVENTIONS,
               "summary": sentences, "key_numbers": numbers, "rankings": ranked, "eval": evals, "charts": shown,
               "not_shown": [k for k, a in v.axes.items() if a is None]}
    (out / REPORT_JSON).write_text(json.dumps(_plain(payload), indent=1, allow_nan=False))
    return out / REPORT_HTML
