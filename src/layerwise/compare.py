"""`layerwise compare`: train several presets under an identical budget, then write the comparison."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.console import Console

from .report.comparison import console_table, write_comparison
from .runs import run_summary
from .train.config import TrainConfig
from .train.run_folder import RunFolderLock, check_out_path
from .train.trainer import train


def compare(presets: list[str], seeds: list[int], base: TrainConfig, out: Path,
            console: Console | None = None) -> dict:
    """Runs go to out/<preset>-seed<k>; everything but the preset (and seed) is identical, including the
    batches (they depend only on seed and step). Runs already finished are reused via resume=auto, which
    refuses a run trained with other settings (and names them) rather than report it under the new ones."""
    from .config import ModelConfig

    console = console or Console()
    if getattr(base, "init_from", None):
        from .errors import UserError

        raise UserError(f"TrainConfig.init_from={base.init_from!r}: compare trains presets from scratch; continue "
                        "training a loaded model with `layerwise train --init-from` instead")
    for name in presets:
        ModelConfig.from_preset(name, base.model["size"])  # fail before training anything
    check_out_path(out)
    lock = RunFolderLock(out)  # a second compare into `out` fails here, naming this process
    try:
        return _train_and_compare(presets, seeds, base, out, console)
    finally:
        lock.release()


def _train_and_compare(presets: list[str], seeds: list[int], base: TrainConfig, out: Path, console: Console) -> dict:
    runs: dict[str, list[dict]] = {}
    params: dict[str, int] = {}
    for name in presets:
        for seed in seeds:
            cfg = replace(base, model={**base.model, "preset": name}, seed=seed, out=str(out / f"{name}-seed{seed}"),
                          resume="auto")
            console.rule(f"{name} (seed {seed})")
            result = train(cfg, console)
            params[name] = result["params"]
            runs.setdefault(name, []).append(run_summary(Path(cfg.out)))
    header = (f"Budget per run: {base.max_tokens:,} tokens ({base.total_steps} steps x {base.batch_size} x "
              f"{base.seq_len}), size {base.model['size']}, lr {base.lr} ({base.schedule}), seeds {seeds}, "
              f"data {base.data or 'embedded Shakespeare'}.")
    report = write_comparison(out, runs, params, header)
    console.print(console_table(report["rows"]))  # the Markdown table, in comparison.md, is wider than 80
    console.print("outputs: " + ", ".join(str(p) for p in report["files"]))
    return report
