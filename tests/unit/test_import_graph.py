"""No import cycle among egressd's and egressd_harness's modules; the daemons do not import the
harness.

The graph is read statically with `ast` from every file of the package. An
edge A -> B is any `import B` / `from B import x` in A (and `from P import m`
for a submodule m of P is an edge to P.m), relative imports resolved,
function-level imports included: a lazy import only postpones a cycle to the
first call, it does not remove it. Imports under `if TYPE_CHECKING:` are left
out (they never run), and so are `importlib.import_module` calls by name
(`egressd.cli`'s table of verbs; nothing imports `egressd.cli` back). A package
(`P/__init__.py`) is the node `P`; importing `P.m` is an edge to `P.m` only.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import egressd
import egressd_harness

PACKAGE = Path(egressd.__file__).parent
HARNESS = Path(egressd_harness.__file__).parent
ROOTS = frozenset({"egressd", "egressd_harness"})

#: egressd modules that may import the harness, each inside the one function that needs it.
HARNESS_DOORS: Mapping[str, str] = {
    # `egressd policy check` without --control asks the local fleet (topology up) for its nodes.
    "egressd.policy.cli": "egressd_harness.topology.nodes",
}

#: Cycles still to break, each a sorted tuple of its modules. Empty, and it may only shrink.
ALLOWED_CYCLES: frozenset[tuple[str, ...]] = frozenset()


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif not _is_type_checking(node):
            stack.extend(ast.iter_child_nodes(node))


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The egressd modules that `module` imports (see the module docstring)."""

    def nearest(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    out: set[str | None] = set()
    for node in _imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(nearest(a.name) for a in node.names if a.name.split(".")[0] in ROOTS)
            continue
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        if base.split(".")[0] not in ROOTS:
            continue
        for alias in node.names:
            full = f"{base}.{alias.name}"
            out.add(full if full in known else nearest(base))
    out.discard(None)
    out.discard(module)
    return {m for m in out if m is not None}


def import_graph(files: Mapping[str, Path]) -> dict[str, set[str]]:
    known = set(files)
    return {
        module: imports_of(module, path.read_text(), path.name == "__init__.py", known)
        for module, path in files.items()
    }


def cycles(graph: Mapping[str, set[str]]) -> list[tuple[str, ...]]:
    """Every strongly connected component with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[tuple[str, ...]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(tuple(sorted(component)))
    return sorted(found)


# --- the graph reader itself --------------------------------------------------------------


def test_cycles_finds_a_cycle_and_ignores_a_chain() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_imports_of_reads_every_form() -> None:
    known = {"egressd", "egressd.x", "egressd.x.a", "egressd.x.b", "egressd.y"}
    source = """
import os
import egressd.y
from egressd.x import a, SOMETHING
from . import b
from .. import y
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from egressd.x import b as only_for_types
def lazy():
    from egressd import x
"""
    got = imports_of("egressd.x.c", source, False, known | {"egressd.x.c"})
    assert got == {"egressd.y", "egressd.x.a", "egressd.x", "egressd.x.b"}
    typed_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import egressd.y\n"
    assert imports_of("egressd.x.c", typed_only, False, known) == set()


def test_the_graph_sees_the_package() -> None:
    graph = import_graph(module_files())
    assert "egressd.policy.cli" in graph
    assert "egressd.cliutil" in graph["egressd.policy.cli"]


# --- the property ------------------------------------------------------------------------------


def all_module_files() -> dict[str, Path]:
    return {**module_files(PACKAGE), **module_files(HARNESS)}


def test_no_import_cycle_among_egressd_modules() -> None:
    found = set(cycles(import_graph(all_module_files())))
    assert found - ALLOWED_CYCLES == set(), "import cycles: " + "; ".join(
        " <-> ".join(c) for c in sorted(found - ALLOWED_CYCLES)
    )
    # An allowed cycle that is gone comes off the list.
    assert ALLOWED_CYCLES - found == set()


def test_nothing_imports_the_cli_entry_point() -> None:
    graph = import_graph(module_files())
    assert sorted(m for m, deps in graph.items() if "egressd.cli" in deps) == ["egressd.__main__"]


def test_the_daemons_do_not_import_the_harness() -> None:
    graph = import_graph(all_module_files())
    reaching = {
        module: sorted(d for d in deps if d.split(".")[0] == "egressd_harness")
        for module, deps in graph.items()
        if module.split(".")[0] == "egressd"
    }
    reaching = {m: deps for m, deps in reaching.items() if deps}
    assert reaching == {m: [d] for m, d in HARNESS_DOORS.items()}
