"""The package's layers: every import points downward, and the benchmark adapters sit on top of the library.

Imports are read from the source (module level and inside functions alike), so a lazy import that points upward
fails here as an eager one would.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bottom to top. A module may import its own layer and the layers below it.
LAYERS = ("core", "models", "generation", "judges", "evaluation", "methods", "train", "toy", "experiments", "cli")
# The adapters may use the library up to the toy world (its prompts), never what is built on top of them.
ADAPTERS_REACH = LAYERS.index("toy")


def _modules(folder: str, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        name = ".".join((package, *parts)).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(path: Path, module: str) -> list[tuple[str, tuple[str, ...]]]:
    """(imported module, imported names) of every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                package = module.split(".")[: -node.level + (path.name == "__init__.py")]
                base = ".".join([*package, base]) if base else ".".join(package)
            found.append((base, tuple(a.name for a in node.names)))
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core")


LIBRARY = _modules("comat", "comat")
ADAPTERS = _modules("benchmarks", "comat_benchmarks")


def test_every_library_module_has_a_layer():
    strays = [m for m in LIBRARY if m.count(".") == 1 and m.split(".")[1] not in LAYERS]
    assert not strays, f"modules outside the layer packages: {strays}"


@pytest.mark.parametrize("module", sorted(LIBRARY))
def test_library_imports_point_downward(module):
    for target, _ in _imports(LIBRARY[module], module):
        if target.split(".")[0] == "comat_benchmarks":
            pytest.fail(f"{module} imports the adapters ({target}); find them through comat.evaluation.registry")
        if target.split(".")[0] == "comat" and target in LIBRARY | {"comat": None}:
            assert _layer(target) <= _layer(module), f"{module} ({LAYERS[_layer(module)]}) imports {target} " \
                                                     f"({LAYERS[_layer(target)]}), a layer above it"


@pytest.mark.parametrize("module", sorted(ADAPTERS))
def test_adapters_use_the_library_below_the_experiments(module):
    for target, _ in _imports(ADAPTERS[module], module):
        if target.split(".")[0] == "comat":
            assert _layer(target) <= ADAPTERS_REACH, f"{module} imports {target} ({LAYERS[_layer(target)]})"


@pytest.mark.parametrize("module", sorted(LIBRARY | ADAPTERS))
def test_no_private_name_crosses_a_module(module):
    path = (LIBRARY | ADAPTERS)[module]
    for target, names in _imports(path, module):
        if target.split(".")[0] in ("comat", "comat_benchmarks") and target != module:
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{module} imports private {private} from {target}"


def test_the_checker_sees_an_upward_import(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from comat.experiments.ablate import run_ablation\n")
    (target, _), = _imports(tmp_path / "m.py", "comat.models.m")
    assert _layer(target) > _layer("comat.models.m")
