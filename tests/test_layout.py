"""The test suite's own rules: helpers live in helper modules, so no test module imports another one."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> list[str]:
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def test_no_test_module_imports_another_test_module() -> None:
    # Given every module of tests/; When their imports are read
    offenders = sorted(f"{path.relative_to(TESTS)} imports {module}"
                       for path in TESTS.rglob("*.py")
                       for module in imported_modules(path)
                       if module.split(".")[-1].startswith("test_") and not module.startswith("aiohttp."))
    # Then none names a test_* module (shared builders go to helper modules such as dest_helpers.py)
    assert offenders == []
