"""Functions that fit on a screen: no function of the package is longer than 80 lines, its signature and
docstring included. Complexity is ruff's (mccabe ≤ 15, pyproject)."""

from __future__ import annotations

import ast

from helpers import ROOT

MAX_LINES = 80


def lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """From ``def`` (decorators not counted) to the function's last line."""
    assert node.end_lineno is not None
    return node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted((ROOT / "lorasurgeon").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and lines(node) > MAX_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines(node)} lines)")
    assert not long, long
