"""The engine's modules import each other one way, at module level only, and the package exports the API."""

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import smoothcert.worker.smoothing as smoothing

PACKAGE = "smoothcert.worker.smoothing"
FOLDER = Path(smoothing.__file__).parent


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(FOLDER.glob("*.py"))}


def _imported(node: ast.AST) -> set[str]:
    """Sibling modules of the package named by the imports under ``node``."""
    found = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.ImportFrom) and sub.module:
            if sub.module == PACKAGE:
                found.update(alias.name for alias in sub.names)
            elif sub.module.startswith(PACKAGE + "."):
                found.add(sub.module.split(".")[3])
        elif isinstance(sub, ast.Import):
            found.update(
                a.name.split(".")[3] for a in sub.names if a.name.startswith(PACKAGE + ".")
            )
    return found


def test_no_function_level_imports():
    lazy = [
        f"{name}.py:{node.lineno}"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for sub in ast.walk(node)
        if isinstance(sub, (ast.Import, ast.ImportFrom))
    ]
    assert not lazy


def test_modules_import_each_other_without_a_cycle():
    modules = _modules()
    graph = {name: _imported(tree) & set(modules) - {name} for name, tree in modules.items()}
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"import cycle: {exc.args[1]}") from None
    assert order.index("checks") < order.index("sampling") < order.index("certify")
    assert order.index("results") < order.index("sequential")


def test_the_package_exports_the_api():
    for name in smoothing.__all__:
        assert getattr(smoothing, name) is not None
    assert {
        "certify",
        "predict",
        "certify_at_radius",
        "Run",
        "Certificate",
        "Prediction",
        "RadiusDecision",
        "Canceled",
        "InputError",
        "Progress",
        "CancelCheck",
        "default_batch_size",
    } <= set(smoothing.__all__)
