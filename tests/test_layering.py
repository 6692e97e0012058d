"""The layers import only downwards (docs/ARCHITECTURE.md), read from the source with ast.

    bottom (errors, units, io, redact, interrupt, conf: nothing of autorank) < shortcut < models < plan, cost and
    the device runner < workload < search < tracking < app (app, __main__, export, validate)

Every `import` / `from ... import` in every module of autorank/ counts, inside functions too, and
importlib.import_module("autorank...") with a literal name. The torch-only core (shortcut,
models, plan, cost, the device runner) also imports none of the search stack, anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autorank"

# first component under autorank/ (a subpackage, or a module's stem) -> layer
LAYERS = {
    "__init__": 0, "errors": 0, "units": 0, "io": 0, "conf": 0, "redact": 0, "interrupt": 0,
    "shortcut": 1,
    "models": 2,
    "plan": 3, "cost": 3, "device": 3,  # device*.py: the torch-only device runner
    "workload": 4,
    "search": 5,
    "tracking": 6,
    "app": 7, "__main__": 7, "export": 7, "validate": 7,
    "bench": 7,
}
LAYER_NAMES = {0: "bottom", 1: "shortcut", 2: "models", 3: "plan/cost", 4: "workload", 5: "search",
               6: "tracking", 7: "app"}
CORE = 3  # layers <= CORE: torch (+ yaml) only
SEARCH_STACK = {"hydra", "omegaconf", "optuna", "optuna_integration", "lightning", "pytorch_lightning",
                "torchmetrics", "mlflow", "torchvision", "sklearn", "pandas", "plotly", "matplotlib", "rich"}

# Known violations, one (module, imported module) pair each, with the issue that removes it. The
# test fails on any pair not listed, and on a listed pair that no longer occurs (the list only
# shrinks). Empty: every import points downwards.
ALLOWED: set[tuple[str, str]] = set()


# Loading a module from its file (importlib.util.spec_from_file_location) hides an import from
# the checks above. None is allowed.
ALLOWED_PATH_LOADS: set[str] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "autorank":
        raise ValueError(module)
    if len(parts) == 1:
        return LAYERS["__init__"]
    key = parts[1]
    if key.startswith("device") and key not in LAYERS:
        key = "device"
    if key not in LAYERS:
        raise KeyError(f"{module}: no layer for autorank/{parts[1]}: add it to LAYERS in {Path(__file__).name}")
    return LAYERS[key]


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, source: str | None = None) -> list[str]:
    """Every module `path` (its text, or `source` read as if it were there) imports: absolute
    names; `from pkg import name` counts pkg.name when that is a module of ours, else pkg."""
    module, is_package = module_name(path), path.name == "__init__.py"
    out = []
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            for a in node.names:
                sub = PACKAGE.parent / Path(*f"{target}.{a.name}".split("."))
                ours = target.split(".")[0] == "autorank" and (sub.with_suffix(".py").exists() or sub.is_dir())
                out.append(f"{target}.{a.name}" if ours else target)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append(node.args[0].value)
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def edges() -> set[tuple[str, str]]:
    return {(module_name(p), imp) for p in MODULES for imp in imports_of(p)}


def upward(pairs) -> set[tuple[str, str]]:
    return {(m, imp) for m, imp in pairs if imp.split(".")[0] == "autorank" and layer_of(imp) > layer_of(m)}


def test_every_module_has_a_layer():
    for p in MODULES:
        layer_of(module_name(p))


def test_no_module_imports_from_a_higher_layer():
    found = upward(edges())
    new = sorted(found - ALLOWED)
    assert not new, "imports from a higher layer:\n" + "\n".join(
        f"  {m} ({LAYER_NAMES[layer_of(m)]}) imports {imp} ({LAYER_NAMES[layer_of(imp)]})" for m, imp in new)
    assert not ALLOWED - found, f"fixed, remove from ALLOWED: {sorted(ALLOWED - found)}"


# The factories of torchvision's architectures (mobilenet_v2, resnet18, vit_tiny) import torchvision
# inside the factory function: a device that runs such a model needs torchvision for the
# architecture itself; mcunet_like and small_cnn need torch alone (tests/test_core_imports.py
# imports autorank.models with torchvision blocked). transformers (tiny_llama) is not in the
# search stack: it is the language model's architecture, imported inside its factory too.
CORE_ALLOWED = {("autorank.models.factories", "torchvision.models"), ("autorank.models.vit", "torchvision.models")}


def test_the_core_imports_none_of_the_search_stack():
    bad = sorted((m, imp) for m, imp in edges()
                 if layer_of(m) <= CORE and imp.split(".")[0] in SEARCH_STACK
                 and (m, imp) not in CORE_ALLOWED)
    assert not bad, f"torch-only core modules import the search stack: {bad}"


def test_bottom_modules_import_nothing_of_autorank():
    bad = sorted((m, imp) for m, imp in edges() if layer_of(m) == 0 and imp.split(".")[0] == "autorank")
    assert not bad, bad


def test_no_module_is_loaded_by_its_file_path():
    found = {module_name(p) for p in MODULES
             if any(isinstance(n, ast.Attribute) and n.attr == "spec_from_file_location"
                    for n in ast.walk(ast.parse(p.read_text())))}
    assert found <= ALLOWED_PATH_LOADS, f"modules loading others by path: {sorted(found - ALLOWED_PATH_LOADS)}"
    assert found == ALLOWED_PATH_LOADS, f"fixed, remove from ALLOWED_PATH_LOADS: {sorted(ALLOWED_PATH_LOADS - found)}"


# -- the checker itself: it sees what it must ---------------------------------------------------
@pytest.mark.parametrize("source, expected", [
    ("import autorank.search.study", ["autorank.search.study"]),
    ("from autorank.app import run", ["autorank.app"]),
    ("from autorank import tracking", ["autorank.tracking"]),
    ("def f():\n    from ..search import space", ["autorank.search.space"]),
    ("from . import meta", ["autorank.cost.meta"]),
    ("import importlib\nimportlib.import_module('autorank.workload')", ["importlib", "autorank.workload"]),
])
def test_the_checker_finds_imports(source, expected):
    path = PACKAGE / "cost" / "saved.py"  # read as if it were this module (plan/cost layer)
    found = imports_of(path, source)
    assert found == expected
    ours = {("autorank.cost.saved", imp) for imp in found if imp.startswith("autorank")}
    assert upward(ours) == {(m, imp) for m, imp in ours if layer_of(imp) > layer_of(m)}
    assert bool(upward(ours)) == any(imp.split(".")[1] in ("search", "app", "tracking", "workload") for _, imp in ours)
