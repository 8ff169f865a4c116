"""Dependencies point down: math <- model <- adapters/loading/run folders <- verbs <- report <- CLI.

Every `import` in src/layerwise is parsed (module level and inside functions alike) and each edge between two
parts of the package must go to a strictly lower level. Two parts on the same level never import each other
(e.g. `transform` may not use `diagnose`: what both need lives one level down). A package's `cli` module is its
command-line face and sits at the top, beside `layerwise.cli`; `cli_options` (what the commands share) sits
just below them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "layerwise"

# Lower number = lower level. A part is a top-level module or subpackage of layerwise.
LEVELS = {
    "errors": 0, "numerics": 0, "lazy": 0,
    "kernels": 0.5,  # fast paths of the math: torch and level-0 modules only, below nn
    "nn": 1, "data": 1, "depth_metrics": 1,
    "config": 2, "validation": 2, "presets": 2, "model": 2,
    "arch": 3, "runs": 3,
    "loading": 4, "outputs": 4, "reference": 4, "model_card": 4,
    "train": 5, "diagnose": 5, "evaluate": 5, "transform": 5,
    "report": 6,
    "compare": 7,
    "cli_options": 7,
    "cli": 8,
}
# config -> validation -> presets -> model form the model layer; within it only these edges exist.
WITHIN_MODEL_LAYER = {("config", "validation"), ("config", "presets"), ("validation", "nn"),
                      ("model", "config")}


def part_of(module: str) -> str:
    """'layerwise.diagnose.trace' -> 'diagnose'; 'layerwise.evaluate.cli' -> 'cli' (commands sit on top)."""
    parts = module.split(".")
    if parts[-1] == "cli":
        return "cli"
    return parts[1] if len(parts) > 1 else "layerwise"


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    return (SRC / f"{name}.py").exists() or (SRC / name).is_dir()


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """Absolute names of the layerwise modules imported anywhere in the file, with line numbers."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "layerwise"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "layerwise":
                continue
            if target == "layerwise" or target.count(".") == 0:
                # `from . import model` imports a submodule; `from . import ModelConfig` the package root.
                found += [(f"layerwise.{alias.name}" if _is_module(alias.name) else "layerwise", node.lineno)
                          for alias in node.names]
            else:
                found.append((target, node.lineno))
    return found


def upward_edges() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        source = part_of(module_name(path))
        if source == "layerwise":  # the package root re-exports the public surface
            continue
        assert source in LEVELS, f"{path}: part {source!r} has no level in tests/test_layering.py"
        for target_module, line in imported_modules(path):
            target = part_of(target_module)
            if target == source or (source, target) in WITHIN_MODEL_LAYER:
                continue
            if target == "layerwise":
                bad.append(f"{path.relative_to(SRC)}:{line} imports the package root; import the module it needs")
                continue
            if LEVELS[target] >= LEVELS[source]:
                bad.append(f"{path.relative_to(SRC)}:{line} {source} (level {LEVELS[source]}) imports "
                           f"{target_module} ({target}, level {LEVELS[target]})")
    return bad


def test_every_import_points_down_the_layers():
    assert upward_edges() == []


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    fake = tmp_path / "layerwise"
    (fake / "nn").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "nn" / "norms.py").write_text("def f():\n    from ..train import trainer\n")
    (fake / "train" / "trainer.py").write_text("from ..nn import norms\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert [edge.split(" ")[0] for edge in upward_edges()] == ["nn/norms.py:2"]


@pytest.mark.parametrize("module, part", [("layerwise.diagnose.trace", "diagnose"), ("layerwise.evaluate.cli", "cli"),
                                          ("layerwise.loading", "loading")])
def test_parts_are_top_level_packages_and_cli_modules_sit_on_top(module, part):
    assert part_of(module) == part
