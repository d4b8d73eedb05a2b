"""The tests' own layout (tests/README.md): test modules import from `tests/support/`, never
from each other, and a helper module lives in `tests/support/`, not beside the tests.

A test module imported as a library runs its `pytestmark` and fixtures in the importer's
namespace, and ties two files' tests together; shared fixtures go in the `conftest.py` of the
directory that uses them. The imports are read statically with `ast` (relative imports
resolved, function-level imports included), so a lazy import is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tests

TESTS = Path(tests.__file__).parent
#: Scripts copied into a sandbox and run there (never imported by a test).
SANDBOX_SCRIPTS = TESTS / "e2e" / "udfs"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(TESTS.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_from_tests(module: str, source: str, is_package: bool = False) -> set[str]:
    """The `tests.*` names that `module` imports: `from tests.a import b` gives `tests.a.b`
    (a submodule or a name in `tests.a`; both are checked the same way)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "tests")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            if base.split(".")[0] == "tests":
                out.update(f"{base}.{a.name}" for a in node.names)
    return out


def module_file(target: str) -> Path | None:
    """The module file that `tests.a.b.name` is in or names (None for a package)."""
    parts = target.split(".")
    for n in range(len(parts), 1, -1):
        path = TESTS.parent.joinpath(*parts[:n])
        if path.with_suffix(".py").is_file():
            return path.with_suffix(".py")
    return None


def allowed(target: str) -> bool:
    """tests/support, the `tests` packages, and a conftest (the compose fleet's constants are
    its directory's to share)."""
    path = module_file(target)
    return path is None or path.name == "conftest.py" or TESTS / "support" in path.parents


def violations(root: Path = TESTS) -> dict[str, list[str]]:
    """Each module outside tests/support with the test modules (or stray helpers) it imports."""
    found: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path)
        if TESTS / "support" in path.parents or SANDBOX_SCRIPTS in path.parents:
            continue
        bad = sorted(
            t
            for t in imported_from_tests(module, path.read_text(), path.name == "__init__.py")
            if not allowed(t)
        )
        if bad:
            found[module] = bad
    return found


def stray_helpers(root: Path = TESTS) -> list[str]:
    """Modules beside the tests that are neither a test module, a conftest nor a package."""
    return sorted(
        str(path.relative_to(root.parent))
        for path in root.rglob("*.py")
        if not path.name.startswith("test_")
        and path.name not in ("conftest.py", "__init__.py")
        and TESTS / "support" not in path.parents
        and SANDBOX_SCRIPTS not in path.parents
    )


# --- the reader itself -------------------------------------------------------------------------


def test_imported_from_tests_reads_every_form() -> None:
    source = """
import os
import tests.support.waits
from tests.integration.test_a import fleet
from .test_b import http
from . import test_c
from ..support import netns
def lazy():
    from tests.e2e.test_d import API
"""
    got = imported_from_tests("tests.integration.test_x", source)
    assert got == {
        "tests.support.waits",
        "tests.integration.test_a.fleet",
        "tests.integration.test_b.http",
        "tests.integration.test_c",
        "tests.support.netns",
        "tests.e2e.test_d.API",
    }


def test_allowed_takes_support_and_conftest_and_refuses_test_modules() -> None:
    assert allowed("tests.support.waits.wait_for")
    assert allowed("tests.support")
    assert allowed("tests.compose.conftest.run")
    assert not allowed("tests.integration.test_proxy_dataplane.fleet")
    assert not allowed("tests.integration.test_agent")
    assert not allowed("tests.e2e.test_egress.API")


# --- the property ------------------------------------------------------------------------------


def test_no_test_module_imports_another() -> None:
    assert violations() == {}


def test_helper_modules_live_in_support() -> None:
    assert stray_helpers() == []
