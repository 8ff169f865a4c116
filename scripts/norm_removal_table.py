"""The tables of scripts/norm_removal_study.sh, in markdown, from the files it wrote.

    python scripts/norm_removal_table.py runs/norm-removal

Held-out token CE of the base, the vanilla fine-tune and the LN-free fine-tune (mean over windows, with its
standard error and the difference to vanilla), then the per-layer diagnosis of the two fine-tunes side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODELS = (("base", "pretrained base"), ("vanilla", "vanilla fine-tune"), ("noln", "LN-free fine-tune"))
PROFILE = (("angular_distance", "angular distance", "{:.3f}"), ("logit_lens_loss", "logit-lens CE", "{:.2f}"),
           ("hidden_rms", "stream RMS", "{:.2f}"), ("removal_delta_loss", "removal ΔCE", "{:.3f}"))


def main(out: Path) -> None:
    scores = {name: json.loads((out / "eval" / name / "eval.json").read_text())["tasks"]["perplexity"]
              for name, _ in MODELS}
    vanilla = scores["vanilla"]["metrics"]["token_nll"]
    print("| model | held-out CE (nats) | ± stderr | vs vanilla | windows |")
    print("|---|---|---|---|---|")
    for name, title in MODELS:
        s = scores[name]
        nll = s["metrics"]["token_nll"]
        print(f"| {title} | {nll:.4f} | {s['stderr']['token_nll']:.4f} | {nll - vanilla:+.4f} | {s['n']} |")
    diagnoses = {name: json.loads((out / "diagnose" / name / "diagnosis.json").read_text())["metrics"]
                 for name in ("vanilla", "noln")}
    n_layers = len(diagnoses["vanilla"]["angular_distance"])
    print()
    header = " | ".join(f"{title} (vanilla / LN-free)" for _, title, _ in PROFILE)
    print(f"| layer | {header} |")
    print("|---" * (1 + len(PROFILE)) + "|")
    for i in range(n_layers):
        cells = []
        for key, _, fmt in PROFILE:
            pair = [diagnoses[m][key][i] for m in ("vanilla", "noln")]
            cells.append(" / ".join("" if v is None else fmt.format(v) for v in pair))
        print(f"| {i} | " + " | ".join(cells) + " |")
    for m in ("vanilla", "noln"):
        print(f"\nfull-model CE on the diagnosis tokens, {m}: {diagnoses[m]['loss'][0]:.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/norm-removal"))
