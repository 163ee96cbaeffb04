"""The shape of the memscan package, read from its source with `ast`: the import graph, its layers, and
function lengths. `python tests/structure.py` prints the summary; tests/test_structure.py holds it to the rules.

Layers, lowest first: a module may import its own layer and those below, never one above, and no import
may close a cycle. Function-local imports are allowed only of optional dependencies (OPTIONAL).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "memscan"
# Lowest first; a module's layer is that of the longest prefix naming it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("memscan.version", "memscan.errors", "memscan.files", "memscan.checks", "memscan.layout", "memscan.wording",
              "memscan.folders", "memscan.results", "memscan.fields", "memscan.progress")),
    ("data", ("memscan.store", "memscan.theory", "memscan.analysis", "memscan.membership", "memscan.verbatim.match",
              "memscan.qf", "memscan.sites", "memscan.models", "memscan.preflight", "memscan.corpus",
              "memscan.knn.tuning", "memscan.knn.scan", "memscan.knn.cells", "memscan.knn.kmeans", "memscan.knn.exact",
              "memscan.knn.shards")),
    ("engines", ("memscan.engines", "memscan.knn.index", "memscan.knn.mips", "memscan.knn")),
    ("stages", ("memscan.extract", "memscan.query", "memscan.score", "memscan.verbatim", "memscan.train",
                "memscan.saturation", "memscan.assoc", "memscan.geometry")),
    ("report", ("memscan.report", "memscan.show")),
    ("pipeline", ("memscan.stages", "memscan.catalog", "memscan.experiments", "memscan.demo")),
    ("interface", ("memscan.cli", "memscan.__init__", "memscan.__main__")),
)
# Modules that import others by name with importlib (the CLI's commands, `memscan.load`), so that `memscan --help`
# and `import memscan` import no torch; every module name among their strings counts as an import.
LAZY_LOADERS = ("memscan.cli.__init__", "memscan.__init__")
OPTIONAL = ("ray", "accelerate")   # imported where used, so memscan runs without them
MAX_FUNCTION_LINES = 60


@dataclass
class Module:
    name: str
    path: Path
    imports: set[str] = field(default_factory=set)
    local_imports: list[tuple[str, int, str]] = field(default_factory=list)   # (function, line, module)
    functions: list[tuple[int, str, int]] = field(default_factory=list)      # (lines, qualified name, line)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts)


def layer_of(name: str) -> int:
    matches = [(len(prefix), number) for number, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if name == prefix or name.startswith(prefix + ".")]
    if not matches:
        raise SystemExit(f"{name} has no layer in tests/structure.py LAYERS")
    return max(matches)[1]


def _imported(node: ast.Import | ast.ImportFrom, module: str, known: set[str]) -> Iterator[str]:
    """The memscan modules an import statement names (a package's __init__ for `from memscan import x` of a name)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")[:-node.level]
            base = ".".join(package + ([base] if base else []))
        targets = [_submodule(f"{base}.{alias.name}", known) or base for alias in node.names]
    for target in targets:
        if target.split(".")[0] != "memscan":
            continue
        while target not in known and f"{target}.__init__" not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        yield target if target in known else f"{target}.__init__"


def _submodule(name: str, known: set[str]) -> str | None:
    """`name` if it is a module or a package (its __init__), else None (a name defined in a module)."""
    return name if name in known else f"{name}.__init__" if f"{name}.__init__" in known else None


def _top_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module or ""] if not node.level else ["memscan"]


def scan() -> dict[str, Module]:
    modules = {module_name(path): Module(module_name(path), path) for path in sorted(PACKAGE.rglob("*.py"))}
    known = set(modules)
    for module in modules.values():
        tree = ast.parse(module.path.read_text(), str(module.path))
        for function, qualified in _functions(tree):
            lines = function.end_lineno - function.lineno + 1
            module.functions.append((lines, qualified, function.lineno))
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for name in _top_names(node):
                        module.local_imports.append((qualified, node.lineno, name))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module.imports.update(t for t in _imported(node, module.name, known) if t != module.name)
            elif (module.name in LAZY_LOADERS and isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and node.value in known):
                module.imports.add(node.value)   # a module imported by name (importlib), as the CLI's commands
    return modules


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]]:
    """Every function and method with its qualified name; a nested function counts inside its parent's lines."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, prefix + node.name
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")


def cycles(modules: dict[str, Module]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        for target in modules[name].imports:
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for name in modules:
        if name not in index:
            visit(name)
    return found


def upward_imports(modules: dict[str, Module]) -> list[str]:
    """Imports of a higher layer than the importer's: `a (stages) imports b (report)`."""
    return [f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
            for name, module in modules.items() for target in sorted(module.imports)
            if layer_of(target) > layer_of(name)]


def forbidden_local_imports(modules: dict[str, Module]) -> list[str]:
    return [f"{module.name}.{function} (line {line}) imports {name} inside a function"
            for module in modules.values() for function, line, name in module.local_imports
            if name.split(".")[0] not in OPTIONAL]


def longest_functions(modules: dict[str, Module], count: int = 5) -> list[tuple[int, str]]:
    every = [(lines, f"{module.name}.{name}") for module in modules.values() for lines, name, _ in module.functions]
    return sorted(every, reverse=True)[:count]


def summary(modules: dict[str, Module]) -> list[str]:
    per_layer = {layer: [name for name in modules if LAYERS[layer_of(name)][0] == layer] for layer, _ in LAYERS}
    edges = sum(len(module.imports) for module in modules.values())
    lines = [f"{len(modules)} modules, {edges} imports between them; "
             f"{len(cycles(modules))} cycles, {len(upward_imports(modules))} upward imports, "
             f"{len(forbidden_local_imports(modules))} function-local imports of required packages"]
    lines += [f"  {layer:<9} {len(names):>3} modules: {', '.join(sorted(n.removeprefix('memscan.') for n in names))}"
              for layer, names in per_layer.items()]
    lines.append("longest functions: " + ", ".join(f"{name} {lines}" for lines, name in longest_functions(modules)))
    return lines


if __name__ == "__main__":
    found = scan()
    print("\n".join(summary(found)))
    for problem in [*map(" -> ".join, cycles(found)), *upward_imports(found), *forbidden_local_imports(found)]:
        print("  " + problem)
