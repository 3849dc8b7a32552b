"""The package's shape: imports point one way along the pipeline, no cycles, small pieces.

Read from the source with ``ast`` (nothing is imported), so a new cycle, a function-level import
or a stage importing a later one fails here with the offending file and line.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path
from typing import Any

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gradindex"

# Layers, lowest first: a module may import only from its own layer or lower ones.
LAYERS = [
    ("gradindex.errors", "gradindex.ranking"),
    ("gradindex.spec", "gradindex.spec_checks", "gradindex.draws"),
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
# names and values that mean one thing everywhere, so each is assigned at module level in one
# module and imported elsewhere (two copies drift apart: a third method added to one of them)
DEFINED_ONCE_NAMES = ("FORMAT_VERSION", "METHODS")
DEFINED_ONCE_VALUES = (("tracin", "retrac"),)


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


def packages() -> set[str]:
    return {name for name, path in modules().items() if path.name == "__init__.py"}


def package_of(name: str, pkgs: set[str]) -> str:
    """The package a module belongs to (a package's ``__init__`` belongs to itself)."""
    return name if name in pkgs else name.rpartition(".")[0]


def private_imports(tree: ast.AST, importer: str, pkgs: set[str]) -> list[str]:
    """``from gradindex.A.b import _x`` where ``gradindex.A`` is not the importer's package."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
            continue
        if not (node.module == "gradindex" or node.module.startswith("gradindex.")):
            continue
        if package_of(node.module, pkgs) == package_of(importer, pkgs):
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.endswith("__"):
                found.append(f"{importer}:{node.lineno} imports {node.module}.{alias.name}")
    return found


def module_constants(tree: ast.Module) -> list[tuple[str, Any]]:
    """(name, value) of each module-level assignment; the value when it is a literal (lists as
    tuples), else None."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        try:
            literal = ast.literal_eval(value)
        except ValueError:
            literal = None
        if isinstance(literal, list):
            literal = tuple(literal)
        out += [(t.id, literal) for t in targets if isinstance(t, ast.Name)]
    return out


def duplicated_constants(trees: dict[str, ast.Module]) -> list[str]:
    """Each name of DEFINED_ONCE_NAMES and value of DEFINED_ONCE_VALUES assigned in more than
    one module (or in none: the check would otherwise pass after a rename)."""
    where: dict[Any, set[str]] = {k: set() for k in (*DEFINED_ONCE_NAMES, *DEFINED_ONCE_VALUES)}
    for mod, tree in trees.items():
        for name, value in module_constants(tree):
            if name in DEFINED_ONCE_NAMES:
                where[name].add(mod)
            if isinstance(value, tuple) and value in DEFINED_ONCE_VALUES:
                where[value].add(mod)
    return [
        f"{key!r} assigned in {sorted(mods) or 'no module'}"
        for key, mods in where.items()
        if len(mods) != 1
    ]


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


def test_no_private_name_is_imported_across_packages() -> None:
    pkgs = packages()
    bad = [
        line
        for name, path in modules().items()
        for line in private_imports(ast.parse(path.read_text()), name, pkgs)
    ]
    assert not bad, "private names imported from another package:\n" + "\n".join(bad)


def test_shared_constants_are_defined_once() -> None:
    trees = {name: ast.parse(path.read_text()) for name, path in modules().items()}
    bad = duplicated_constants(trees)
    assert not bad, "\n".join(bad)


def test_the_new_checks_see_planted_violations() -> None:
    """A private name from another package is caught, one from the importer's own package and a
    dunder are not; a second FORMAT_VERSION, a list copy of the method pair, and a constant
    that no longer exists anywhere are caught."""
    pkgs = {"gradindex", "gradindex.store", "gradindex.search", "gradindex.build"}
    src = (
        "from gradindex.build.shards import _plain\n"
        "from gradindex.search.exact import _blocks\n"
        "from gradindex import __version__\n"
        "def f():\n    from gradindex.store.layout import _atomic\n"
    )
    found = private_imports(ast.parse(src), "gradindex.search.ondisk", pkgs)
    assert found == [
        "gradindex.search.ondisk:1 imports gradindex.build.shards._plain",
        "gradindex.search.ondisk:5 imports gradindex.store.layout._atomic",
    ]
    assert private_imports(ast.parse(src), "gradindex.build.append", pkgs) == [
        "gradindex.build.append:2 imports gradindex.search.exact._blocks",
        "gradindex.build.append:5 imports gradindex.store.layout._atomic",
    ]
    one = {
        "a": ast.parse("FORMAT_VERSION = 1\nMETHODS = ('tracin', 'retrac')\n"),
        "b": ast.parse("from a import METHODS\nPAIR = METHODS\nx = 1\n"),
    }
    assert duplicated_constants(one) == []
    two = dict(one, c=ast.parse("FORMAT_VERSION: int = 1\nREACH = ['tracin', 'retrac']\n"))
    assert duplicated_constants(two) == [
        "'FORMAT_VERSION' assigned in ['a', 'c']",
        "('tracin', 'retrac') assigned in ['a', 'c']",
    ]
    gone = {"b": one["b"]}
    assert len(duplicated_constants(gone)) == 3


# a timing or speed-up in a docstring or comment: it goes stale; figures live in docs/ and
# benchmarks/results/ (issue 28)
TIMING = re.compile(
    r"\d\s?(ms|µs)\b|\d\s?[x×]\s(faster|slower)|\d%\s(faster|slower|less time)"
    r"|[Mm]easured (here|on (the|one|a|two)\b)|\bon (two|2) cores\b|steps/s"
)


def timings_in_prose(src: str) -> list[tuple[int, str]]:
    """(line, match) of each timing in the docstrings, string statements and comments of src."""
    texts = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(src).readline)
        if tok.type == tokenize.COMMENT
    ]
    texts += [
        (node.lineno, node.value.value)
        for node in ast.walk(ast.parse(src))
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    return [(line, m.group(0)) for line, text in texts for m in TIMING.finditer(text)]


def test_no_timings_in_docstrings_or_comments() -> None:
    bad = [
        f"{name}:{line} {found!r}"
        for name, path in modules().items()
        for line, found in timings_in_prose(path.read_text())
    ]
    assert not bad, "timings belong in docs/ or benchmarks/results/:\n" + "\n".join(bad)


def test_the_timing_check_sees_planted_timings() -> None:
    """Docstrings and comments are read; a message string (program output) is not."""
    src = (
        '"""Fast: measured here, 0.66 ms a query."""\n'
        "x = 1  # 1.35× faster per call\n"
        "def f():\n    '''12% faster than two calls.'''\n"
        "msg = 'a message with 5 ms in it is output, not prose'\n"
    )
    assert timings_in_prose(src) == [
        (2, "5× faster"),
        (1, "measured here"),
        (1, "6 ms"),
        (4, "2% faster"),
    ]


def modules_no_test_imports(tests: Path) -> list[str]:
    """gradindex modules with code (not a docstring-only package ``__init__``) that no file
    under ``tests`` imports by name (``import m``, ``from m import x``, ``from pkg import m``)."""
    imported: set[str] = set()
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
    missing = []
    for name, path in modules().items():
        body = ast.parse(path.read_text()).body
        docstring_only = all(
            isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body
        )
        entry_shim = name.endswith(".__main__")  # `python -m` runs it; importing would exit
        if name not in imported and not docstring_only and not entry_shim:
            missing.append(name)
    return missing


def test_every_module_with_code_is_imported_by_a_test() -> None:
    """Each module is tested directly, not only through the stages above it (issue 28)."""
    missing = modules_no_test_imports(Path(__file__).resolve().parent)
    assert not missing, "no test imports: " + ", ".join(missing)


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
