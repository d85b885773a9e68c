"""The layout is the architecture: every module imports, handler/ stands alone, scripts/ never
imports test code, the handler's own import graph has no cycle, and every scripts package says
what it is for.

Modules are found by walking handler/ and scripts/, so a new or moved file is covered without
editing this test.
"""

from __future__ import annotations

import ast
import importlib
import traceback
from pathlib import Path

from tests.conftest import REPO

HANDLER = REPO / "handler"
SCRIPTS = REPO / "scripts"


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports, anywhere in it (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            # `from pkg import mod` imports pkg.mod when mod is a module
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def top_level(name: str) -> str:
    return name.split(".")[0]


ALL_MODULES = [module_name(p) for folder in (HANDLER, SCRIPTS) for p in python_files(folder)]


def test_the_walk_finds_the_known_modules():
    # Guards the walk itself: if it found nothing, every other test here would pass vacuously.
    for expected in ("handler.spec", "handler.tta_classifier", "scripts.train.data", "scripts.deploy.harness",
                     "scripts.ops.ctl", "scripts.evaluate.tta", "scripts.bench.run", "scripts.bench.handlers.noop_handler"):
        assert expected in ALL_MODULES


def test_every_module_under_handler_and_scripts_imports():
    failed = []
    # Alembic's migration scripts (env.py, versions/) are run by Alembic with its context set, not imported.
    for name in (m for m in ALL_MODULES if ".migrations." not in m):
        try:
            importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - SystemExit at import is a failure too
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            failed.append(f"{name}: {last}")
    assert not failed, "modules that do not import:\n" + "\n".join(failed)


def test_handler_imports_nothing_from_scripts_or_tests():
    offenders = [f"{p.relative_to(REPO)} imports {m}" for p in python_files(HANDLER)
                 for m in sorted(imported_modules(p)) if top_level(m) in ("scripts", "tests")]
    assert not offenders, "handler/ goes into the .mar alone:\n" + "\n".join(offenders)


def test_scripts_import_no_test_code():
    offenders = [f"{p.relative_to(REPO)} imports {m}" for p in python_files(SCRIPTS)
                 for m in sorted(imported_modules(p)) if top_level(m) == "tests"]
    assert not offenders, "tests import product code, never the reverse:\n" + "\n".join(offenders)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for root in sorted(graph):
        if state.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def import_graph(folder: Path) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in python_files(folder)}
    return {name: {m for m in imported_modules(path) if m in modules and m != name}
            for name, path in modules.items()}


def handler_graph() -> dict[str, set[str]]:
    return import_graph(HANDLER)


# scripts/ in layers: a package may import its own layer's package or any below it, never one above.
LAYERS = {"train": 0, "ops": 1, "deploy": 2, "evaluate": 3, "diagnose": 3, "demo": 3, "bench": 4, "byo": 4, "ctl": 5,
          "client": 5}


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_handler_import_graph_has_no_cycle():
    graph = handler_graph()
    assert "handler.spec" in graph["handler.loader"]  # the graph sees the edges it should
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in handler/: " + " -> ".join(cycle)


def test_scripts_import_graph_has_no_cycle():
    graph = import_graph(SCRIPTS)
    assert "scripts.bench.drive" in graph["scripts.bench.run"]  # the graph sees the edges it should
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in scripts/: " + " -> ".join(cycle)


def test_scripts_packages_import_only_their_own_layer_or_below():
    """train < ops < deploy < evaluate, diagnose, demo < bench, byo: e.g. ops never imports deploy."""
    packages = {m.split(".")[1] for m in import_graph(SCRIPTS) if m.count(".") >= 1}
    assert packages <= set(LAYERS), f"packages without a layer: {sorted(packages - set(LAYERS))}"
    upward = [f"{a} -> {b}" for a, targets in import_graph(SCRIPTS).items() for b in sorted(targets)
              if a.split(".")[1] != b.split(".")[1] and LAYERS[a.split(".")[1]] <= LAYERS[b.split(".")[1]]]
    assert not upward, "imports that point up (or across) the layers:\n" + "\n".join(upward)


def test_tta_does_not_import_spec():
    assert "handler.spec" not in imported_modules(HANDLER / "tta.py")


def test_every_scripts_folder_is_a_package_with_a_docstring():
    folders = {p.parent for p in python_files(SCRIPTS)}
    missing = [str(f.relative_to(REPO)) for f in sorted(folders) if not (f / "__init__.py").is_file()]
    assert not missing, f"folders under scripts/ without __init__.py: {missing}"
    empty = [str(f.relative_to(REPO)) for f in sorted(folders)
             if not (ast.get_docstring(ast.parse((f / "__init__.py").read_text())) or "").strip()]
    assert not empty, f"packages under scripts/ without a docstring saying what they are for: {empty}"


def test_kept_entry_points_run_the_ops_modules():
    from scripts import client, ctl
    from scripts.ops import client as ops_client
    from scripts.ops import ctl as ops_ctl

    assert ctl.main is ops_ctl.main and ctl.get_args_parser is ops_ctl.get_args_parser
    assert client.main is ops_client.main and client.get_args_parser is ops_client.get_args_parser
