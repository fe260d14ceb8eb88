"""Architecture test: every project module sits in one layer, and imports point down.

    Layer  Name            Modules
    -----  --------------  ------------------------------------------------------------------
    L0     base            latprune.errors, latprune.io
    L1     models          latprune.models, latprune.models.*
    L2     latency tables  latprune.latency_tables, latprune.latency_tables.* (incl. .runtimes.*)
    L3     export          latprune.export, latprune.export.*
    L4     pipeline        latprune.pipeline, latprune.pipeline.*
    L5     entry points    latprune (package __init__), latprune.cli, latprune.testing, benchmarks.*

Rules, checked on each file's AST (source folders come from ``[tool.setuptools] package-dir``):
- a module imports only modules of its own layer or lower ones, and only ones that exist; nothing imports
  ``benchmarks.*``;
- project modules are imported at the top of a module, never inside a function or class (only heavy optional
  third-party packages may be). The one exception is the PEP 562 ``__getattr__`` of ``latprune/__init__.py``
  (lazy public API); no other module defines a module-level ``__getattr__``. Literal
  ``importlib.import_module("latprune...")`` calls count as imports;
- no import cycles among the module-level imports (``if TYPE_CHECKING:`` imports excluded);
- a new module under latprune/ must be given a layer here first;
- the modules in TORCH_FREE import with torch, torchvision and torch_pruning blocked.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

try:
    import tomllib  # Python 3.11+; on 3.10 the default package-dir below is used
except ModuleNotFoundError:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PACKAGE_DIR = {"latprune": "latprune", "latprune.models": "models", "latprune.latency_tables": "latency_tables",
                       "latprune.export": "export", "latprune.pipeline": "pipeline"}
LAYERS = [  # (level, name, exact modules, packages whose submodules all belong to the layer)
    (0, "base", {"latprune.errors", "latprune.io"}, ()),
    (1, "models", set(), ("latprune.models",)),
    (2, "latency tables", set(), ("latprune.latency_tables",)),
    (3, "export", set(), ("latprune.export",)),
    (4, "pipeline", set(), ("latprune.pipeline",)),
    (5, "entry points", {"latprune", "latprune.cli", "latprune.testing"}, ("benchmarks",)),
]
PROJECT_ROOTS = ("latprune", "benchmarks")
LAZY_HOOK = ("latprune", "__getattr__")  # the only function allowed to import project modules
TORCH_FREE = ["latprune.pipeline.knapsack", "latprune.latency_tables.table", "latprune.latency_tables.predict",
              "latprune.models.widths"]
BLOCKED = ("torch", "torchvision", "torch_pruning")


class Import(NamedTuple):
    line: int
    target: str  # project module imported
    func: str | None  # enclosing function/class, None at module level
    type_checking: bool  # under `if TYPE_CHECKING:`


def layer_of(module: str) -> tuple[int, str] | None:
    for level, name, exact, packages in LAYERS:
        if module in exact or any(module == p or module.startswith(p + ".") for p in packages):
            return level, name
    return None


def _fmt(module: str) -> str:
    layer = layer_of(module)
    return f"{module} (L{layer[0]} {layer[1]})" if layer else f"{module} (no layer)"


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Package name -> source folder, from pyproject; default folders that exist but are not mapped are added."""
    try:
        mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    except (AttributeError, OSError, KeyError, ValueError):  # no tomllib, no file, no key, bad TOML
        mapping = {}
    mapping = {pkg: folder for pkg, folder in mapping.items() if pkg}
    for pkg, folder in DEFAULT_PACKAGE_DIR.items():
        if pkg not in mapping and folder not in mapping.values() and (root / folder).is_dir():
            mapping[pkg] = folder
    return {pkg: root / folder for pkg, folder in mapping.items()}


def discover(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is_package) for every .py file of the packages and of benchmarks/."""
    modules: dict[str, tuple[Path, bool]] = {}
    for pkg, folder in [*package_dirs(root).items(), ("benchmarks", root / "benchmarks")]:
        for path in sorted(folder.rglob("*.py")):
            parts = [*pkg.split("."), *path.relative_to(folder).with_suffix("").parts]
            is_pkg = parts[-1] == "__init__"
            modules.setdefault(".".join(parts[:-1] if is_pkg else parts), (path, is_pkg))
    return modules


def _nodes(node: ast.AST, func: str | None = None, tc: bool = False):
    """Yield (node, enclosing function/class qualname or None, under `if TYPE_CHECKING:`) for all nodes below."""
    for field, value in ast.iter_fields(node):
        for child in value if isinstance(value, list) else [value]:
            if not isinstance(child, ast.AST):
                continue
            child_tc = tc or (isinstance(node, ast.If) and field == "body"
                              and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING")
            yield child, func, child_tc
            inner = func
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                inner = f"{func}.{child.name}" if func else child.name
            yield from _nodes(child, inner, child_tc)


def project_imports(module: str, source: str, known: set[str] = frozenset(), is_package: bool = False) -> list[Import]:
    """Every import of a project module in `source` (statements and literal importlib.import_module calls).

    `from a.b import c` imports module a.b.c when `known` (the project's module names) holds it, else module a.b."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node, func, tc in _nodes(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and getattr(node.func, "attr", getattr(node.func, "id", None)) \
                == "import_module":
            names = [node.args[0].value]
        for target in dict.fromkeys(n for n in names if n.split(".")[0] in PROJECT_ROOTS):
            found.append(Import(node.lineno, target, func, tc))
    return found


def upward_violations(module: str, imports: list[Import], where: str, known: set[str] = frozenset()) -> list[str]:
    """Upward imports and imports of benchmarks; with `known` (all project modules) also imports of missing ones."""
    out, own = [], layer_of(module)
    for imp in imports:
        target = layer_of(imp.target)
        if known and imp.target not in known:
            out.append(f"{where}:{imp.line}: {module} imports {imp.target}, which does not exist (moved or deleted?)")
        elif imp.target.split(".")[0] == "benchmarks":
            out.append(f"{where}:{imp.line}: {_fmt(module)} imports {imp.target}: benchmarks are scripts, not imported")
        elif own and target and target[0] > own[0]:
            out.append(f"{where}:{imp.line}: {_fmt(module)} imports {_fmt(imp.target)}: imports must point down")
    return out


def function_level_violations(module: str, source: str, imports: list[Import], where: str) -> list[str]:
    out = [f"{where}:{imp.line}: function-level import of {imp.target} in {imp.func}(): import it at the top of the "
           "module (only heavy optional third-party packages may be imported inside functions)"
           for imp in imports if imp.func and (module, imp.func) != LAZY_HOOK]
    for node, func, _ in _nodes(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__" and func is None and module != LAZY_HOOK[0]:
            out.append(f"{where}:{node.lineno}: {module} defines a module-level __getattr__: only latprune/__init__.py "
                       "may (PEP 562 lazy public API)")
    return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles found depth first, one per back edge, each a closed chain rotated to start at its smallest module."""
    cycles, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(v: str, path: list[str]) -> None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                loop = path[path.index(w):]
                i = loop.index(min(loop))
                cycles.append([*loop[i:], *loop[:i], loop[i]])
            elif w not in state:
                visit(w, path)
        path.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v, [])
    return cycles


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """Module -> modules it imports at module level (TYPE_CHECKING excluded), from {module: (source, is_package)}."""
    known = set(sources)
    return {mod: {imp.target for imp in project_imports(mod, src, known, is_pkg)
                  if imp.func is None and not imp.type_checking and imp.target in known and imp.target != mod}
            for mod, (src, is_pkg) in sources.items()}


def _tree():
    modules = discover()
    known = set(modules)
    for mod, (path, is_pkg) in sorted(modules.items(), key=lambda item: item[1][0]):  # by file path
        source = path.read_text()
        yield mod, source, is_pkg, project_imports(mod, source, known, is_pkg), str(path.relative_to(ROOT))


def _fail_if(violations: list[str]) -> None:
    if violations:
        pytest.fail(f"{len(violations)} violation(s):\n" + "\n".join(violations), pytrace=False)


def test_every_module_has_a_layer():
    _fail_if([f"{path}: {mod} has no layer: it must be placed in the layer table of tests/test_layers.py"
              for mod, _, _, _, path in _tree() if layer_of(mod) is None])


def test_imports_point_down():
    known = set(discover())
    _fail_if([v for mod, _, _, imports, path in _tree() for v in upward_violations(mod, imports, path, known)])


def test_no_function_level_project_imports():
    _fail_if([v for mod, src, _, imports, path in _tree() for v in function_level_violations(mod, src, imports, path)])


def test_no_import_cycles():
    graph = import_graph({mod: (src, is_pkg) for mod, src, is_pkg, _, _ in _tree()})
    _fail_if(["import cycle: " + " -> ".join(cycle) for cycle in find_cycles(graph)])


_IMPORT_WITHOUT_TORCH = """
import importlib, importlib.util, json, pathlib, sys
blocked, dirs, module = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"{name} is blocked: this module must import without torch")
class SourceTree:  # the packages from the source folders, whatever an editable install maps
    def find_spec(self, name, path=None, target=None):
        init = pathlib.Path(dirs.get(name, "/nonexistent")) / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[dirs[name]])
sys.meta_path[:0] = [NoTorch(), SourceTree()]
importlib.import_module(module)
"""


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free(module):
    if module not in discover():
        pytest.fail(f"{module} is required (torch-free) but its source file does not exist", pytrace=False)
    dirs = json.dumps({pkg: str(folder) for pkg, folder in package_dirs().items()})
    proc = subprocess.run([sys.executable, "-c", _IMPORT_WITHOUT_TORCH, json.dumps(BLOCKED), dirs, module],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.fail(f"{module} does not import without torch: {last}", pytrace=False)


# Self-tests: the checker itself finds what it must, so the real-tree tests cannot pass by accident.

def test_checker_flags_upward_import():
    imports = project_imports("latprune.models.x", "from latprune.pipeline.plan import PruningPlan\n")
    assert upward_violations("latprune.models.x", imports, "models/x.py") == [
        "models/x.py:1: latprune.models.x (L1 models) imports latprune.pipeline.plan (L4 pipeline): "
        "imports must point down"]
    down = project_imports("latprune.pipeline.y", "from . import plan\nimport latprune.errors\n",
                           {"latprune.pipeline.plan"})
    assert [i.target for i in down] == ["latprune.pipeline.plan", "latprune.errors"]
    assert upward_violations("latprune.pipeline.y", down, "pipeline/y.py") == []
    assert "does not exist" in upward_violations("latprune.pipeline.y", down, "", {"latprune.errors"})[0]
    assert len(upward_violations("latprune.cli", project_imports("latprune.cli", "import benchmarks.speedup"), "")) == 1


def test_checker_flags_function_level_import():
    src = ("import json\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from latprune.cli import main\n"
           "def f():\n    import numpy\n    from latprune.errors import BadInput\n"
           "def g():\n    importlib.import_module('latprune.pipeline.run')\n")
    out = function_level_violations("latprune.export.x", src, project_imports("latprune.export.x", src), "x.py")
    assert [v.split(": ")[0] for v in out] == ["x.py:7", "x.py:9"]
    assert "function-level import of latprune.errors in f()" in out[0]
    assert function_level_violations("latprune.export.x", "def __getattr__(name):\n    pass\n", [], "x.py")


def test_checker_allows_lazy_getattr_in_package_root():
    src = ("import importlib\n_LAZY = {'run': ('latprune.pipeline.run', 'run')}\ndef __getattr__(name):\n"
           "    from latprune.errors import BadInput\n    mod, attr = _LAZY[name]\n"
           "    importlib.import_module('latprune.export.onnx_export')\n"
           "    return getattr(importlib.import_module(mod), attr)\n")
    assert len(project_imports("latprune", src, is_package=True)) == 2
    assert function_level_violations("latprune", src, project_imports("latprune", src, is_package=True), "") == []


def test_checker_finds_cycles():
    sources = {"latprune.pipeline.plan": ("from latprune.pipeline import prune\n", False),
               "latprune.pipeline.prune": ("from .plan import PruningPlan\n", False),
               "latprune.pipeline.ok": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        "    from latprune.pipeline.plan import PruningPlan\n", False)}
    assert find_cycles(import_graph(sources)) == [
        ["latprune.pipeline.plan", "latprune.pipeline.prune", "latprune.pipeline.plan"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
