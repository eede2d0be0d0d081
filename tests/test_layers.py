"""The package's layers import only downwards (docs/layout.md): the kernel library (ops,
reference, kernels) knows nothing of the losses, the losses nothing of the application; the
Triton kernels import nothing of robalign. Checked on the source (lazy imports included)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# layer of a module: 0 the utilities and the ground truth, 1 the ops, 2 the losses, 3 the application
LAYERS = {"robalign._validation": 0, "robalign._io": 0, "robalign.ground_truth": 0, "robalign.kernels": 1,
          "robalign.ops": 1, "robalign.losses": 2, "robalign.app": 3}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts = ["robalign", "kernels", *parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str):
    for prefix, value in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return value
    return None                                      # the facade (robalign/__init__), _compat, __main__


def imported(path: Path, module: str):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            yield target
            yield from (f"{target}.{a.name}" for a in node.names)


FILES = sorted([*ROOT.joinpath("robalign").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")])


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downwards(path):
    module = module_name(path)
    mine = layer(module)
    if mine is None:
        return
    upward = sorted({t for t in imported(path, module) if t.startswith("robalign")
                     and layer(t) is not None and layer(t) > mine})
    assert not upward, f"{module} (layer {mine}) imports from a higher layer: {upward}"
    if module.startswith("robalign.kernels"):
        assert not any(t.startswith("robalign") and not t.startswith("robalign.kernels")
                       for t in imported(path, module)), "kernels/ must import nothing of robalign"
