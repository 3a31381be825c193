"""The package layout is a layering (docs/extending.md, README "Layout"): a module imports only its own
layer and the layers below it, the project's import graph has no cycle, and a project module is imported
inside a function only where that keeps a heavy library off the start-up path of `arm --help`.

    core <- data <- trajectory <- merge <- method | baselines <- evals <- run <- hydra_plugins

Read from the source with `ast`: nothing is imported.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["arm.core", "arm.data", "arm.trajectory", "arm.merge", ("arm.method", "baselines"), "evals", "arm.run",
          "hydra_plugins"]
PACKAGES = ("arm", "baselines", "evals", "hydra_plugins")
HEAVY = ("torch", "transformers", "lm_eval", "vllm", "wandb", "matplotlib", "accelerate", "datasets", "numpy", "safetensors")


def layer_of(module: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        for prefix in (layer if isinstance(layer, tuple) else (layer,)):
            if module == prefix or module.startswith(prefix + "."):
                return index
    return None  # arm/__init__.py, arm/__main__.py: the package's entry, above every layer


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "tasks" in path.relative_to(ROOT).parts:  # lm-eval task helpers, loaded by lm-eval by path
                continue
            found[module_name(path)] = path
    return found


MODULES = project_modules()


def resolve(target: str) -> str | None:
    """The project module an import names (`from arm.core import cache` names arm.core.cache)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(project module, line, inside a function?) of every import in the file."""
    return _imports(path, tuple(sorted(MODULES)))


@functools.cache
def _imports(path: Path, modules: tuple[str, ...]) -> list[tuple[str, int, bool]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [f"{child.module}.{alias.name}" for alias in child.names]
            else:
                visit(child, inner)
                continue
            for name in names:
                if name.split(".")[0] in PACKAGES and (target := resolve(name)) is not None:
                    out.append((target, child.lineno, in_function))
    visit(tree, False)
    return out


def heavy_at_import(module: str, seen: set[str] | None = None) -> bool:
    """Whether importing `module` imports a heavy library (directly or through project modules)."""
    if seen is None:
        return _heavy(module, tuple(sorted(MODULES)))
    return _heavy_walk(module, seen)


@functools.cache
def _heavy(module: str, modules: tuple[str, ...]) -> bool:
    return _heavy_walk(module, set())


def _heavy_walk(module: str, seen: set[str]) -> bool:
    if module in seen:
        return False
    seen.add(module)
    tree = ast.parse(MODULES[module].read_text())
    for node in tree.body:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            if name.split(".")[0] in HEAVY:
                return True
    return any(_heavy_walk(target, seen) for target, _, inner in imports(MODULES[module]) if not inner)


def test_the_layout_has_the_layers():
    for layer in ("arm/core", "arm/data", "arm/trajectory", "arm/merge", "arm/method", "arm/run"):
        assert (ROOT / layer / "__init__.py").is_file(), layer
    flat = sorted(p.name for p in (ROOT / "arm").glob("*.py"))
    assert flat == ["__init__.py", "__main__.py"], f"modules outside the layers: {flat}"


def test_imports_follow_the_layering():
    wrong = []
    for module, path in MODULES.items():
        own = layer_of(module)
        if own is None:
            continue
        for target, line, _ in imports(path):
            theirs = layer_of(target)
            if theirs is not None and theirs > own:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (a higher layer)")
            # ARM and the baselines are peers: neither builds on the other
            if {module.split(".")[0], target.split(".")[0]} == {"arm", "baselines"} and own == theirs == 4:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} (method and baselines are peers)")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = {module: {target for target, _, _ in imports(path) if target != module} for module, path in MODULES.items()}
    # a package's __init__ and its submodules: importing `arm.data.domains.corpus` runs arm.data.domains first,
    # which is not a cycle unless the package imports the module back
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    counter = [0]

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    assert not cycles, f"import cycles: {cycles}"


def test_function_level_imports_only_keep_heavy_libraries_lazy():
    lazy_ok = {m for m in MODULES if heavy_at_import(m)}
    wrong = []
    for path in MODULES.values():
        for target, line, inner in imports(path):
            if inner and target not in lazy_ok:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("fault", ["upward", "cycle"])
def test_the_checks_catch_a_planted_fault(fault, tmp_path, monkeypatch):
    """The checks above are not vacuous: an upward import and a cycle, planted in copies, are found."""
    core = tmp_path / "arm" / "core"
    core.mkdir(parents=True)
    (tmp_path / "arm" / "__init__.py").write_text("")
    (core / "__init__.py").write_text("")
    run = tmp_path / "arm" / "run"
    run.mkdir()
    (run / "__init__.py").write_text("")
    (run / "job.py").write_text("from arm.core import a\n")
    (core / "a.py").write_text("from arm.run import job\n" if fault == "upward" else "from arm.core import b\n")
    (core / "b.py").write_text("from arm.core import a\n")
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(module, "MODULES", {module_name(p): p for p in tmp_path.rglob("*.py")})
    check = test_imports_follow_the_layering if fault == "upward" else test_no_import_cycle
    with pytest.raises(AssertionError):
        check()


def test_only_the_run_layer_sees_hydra():
    """Config is parsed once at the top of a job (arm/core/specs.py): below arm/run nothing imports Hydra."""
    wrong = []
    for module, path in MODULES.items():
        if module.startswith(("arm.run", "hydra_plugins")) or layer_of(module) is None:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            wrong += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "hydra"]
    assert not wrong, "\n".join(wrong)
