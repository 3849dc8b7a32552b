"""The package's shape: imports point one way along the pipeline, no cycles, small pieces.

Read from the source with ``ast`` (nothing is imported), so a new cycle, a function-level import
or a stage importing a later one fails here with the offending file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gradindex"

# Layers, lowest first: a module may import only from its own layer or lower ones.
LAYERS = [
    ("gradindex.errors", "gradindex.ranking"),
    ("gradindex.spec", "gradindex.draws"),
    ("gradindex.inputs",),
    ("gradindex.featurize",),
    ("gradindex.store",),
    ("gradindex.search",),
    ("gradindex.query", "gradindex.query_influence"),
    ("gradindex.build",),
    ("gradindex.eval",),
    ("gradindex.demo", "gradindex.serve"),
    ("gradindex.cli", "gradindex"),
]
# the one place function-level imports are allowed: the cli package's modules import each
# command's stage only when that command runs, so `gradindex --help` does not load diffusers,
# FAISS or h5py
LAZY_IMPORTS_ALLOWED = {"gradindex.cli"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# stated reasons for the few pieces over the limits
LONG_MODULES: dict[str, str] = {}
LONG_FUNCTIONS: dict[str, str] = {}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = name == prefix or name.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{name}: not in any layer of tests/test_structure.py LAYERS"
    return best[0]


def _imported(node: ast.AST, known: set[str]) -> list[str]:
    """The gradindex modules an import statement loads."""
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        base = node.module
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return [n for n in names if n == "gradindex" or n.startswith("gradindex.")]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Runtime module-level imports per module, and every function-level gradindex import."""
    known = set(modules())
    graph: dict[str, set[str]] = {}
    lazy: list[str] = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), str(path))
        deps: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue  # annotations only: never executed
            for sub in (
                ast.walk(node) if not isinstance(node, ast.FunctionDef | ast.ClassDef) else ()
            ):
                deps.update(_imported(sub, known))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for sub in ast.walk(node):
                    for dep in _imported(sub, known):
                        lazy.append(f"{path.relative_to(PACKAGE.parent)}:{sub.lineno} {dep}")
        graph[name] = {d for d in deps if d != name and d in known}
    return graph, lazy


def test_every_module_is_in_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_imports_point_down_the_pipeline() -> None:
    graph, _ = import_graph()
    upward = [
        f"{mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)})"
        for mod, deps in graph.items()
        for dep in sorted(deps)
        if layer_of(dep) > layer_of(mod) and dep != "gradindex"
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    graph, _ = import_graph()
    # packages' __init__ modules are docstrings only, so a submodule importing a sibling does
    # not go through its package: drop the edge module -> its own package
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def lazy_imports_allowed(path: str) -> bool:
    """Whether the file (relative to the repository) is, or is inside, a LAZY_IMPORTS_ALLOWED
    module or package."""
    name = module_name(PACKAGE.parent / path)
    return any(name == m or name.startswith(m + ".") for m in LAZY_IMPORTS_ALLOWED)


def test_no_function_level_imports_outside_the_cli() -> None:
    _, lazy = import_graph()
    bad = [line for line in lazy if not lazy_imports_allowed(line.split(":")[0])]
    assert not bad, "function-level gradindex imports:\n" + "\n".join(bad)


def test_subpackage_inits_import_nothing() -> None:
    """Importing gradindex.search for one module must not load every stage below it."""
    for name, path in modules().items():
        if path.name == "__init__.py" and name != "gradindex":
            tree = ast.parse(path.read_text())
            assert not [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], name


def test_modules_and_functions_are_small() -> None:
    long_modules, long_functions = [], []
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES and name not in LONG_MODULES:
            long_modules.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1
                where = f"{name}.{node.name}"
                if size > MAX_FUNCTION_LINES and where not in LONG_FUNCTIONS:
                    long_functions.append(f"{where}: {size} lines")
    assert not long_modules + long_functions, "\n".join(long_modules + long_functions)


def test_the_checks_see_a_planted_violation(tmp_path: Path) -> None:
    """The walker finds a function-level import and an upward one in code it has not seen."""
    src = "from gradindex.query import AttributionIndex\ndef f():\n    from gradindex.cli import main\n"
    tree = ast.parse(src)
    known = {"gradindex.query", "gradindex.cli"}
    top = [d for n in tree.body if not isinstance(n, ast.FunctionDef) for d in _imported(n, known)]
    inner = [d for n in ast.walk(tree.body[1]) for d in _imported(n, known)]
    assert top == ["gradindex.query"] and inner == ["gradindex.cli"]
    assert layer_of("gradindex.query") > layer_of("gradindex.store.vectors")
    assert lazy_imports_allowed("gradindex/cli/query_commands.py")
    assert not lazy_imports_allowed("gradindex/store/describe.py")


def test_benchmarks_import_only_gradindex_names_that_exist():
    """Benchmarks are not run by the suite, so a module move can leave one importing a name
    from its old place (bench_serve did: sample_images from demo.training); every
    ``from gradindex... import name`` in benchmarks/ must resolve."""
    import ast
    import importlib

    missing = []
    for path in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradindex")
            ):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{path.name}:{node.lineno} {node.module}.{alias.name}")
    assert not missing, missing
