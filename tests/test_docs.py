"""The documents stay true to the code: the layout in docs/architecture.md is the package's tree, and
every test docs/reliability.md cites for a guarantee exists."""

from __future__ import annotations

import re

from helpers import ROOT

PACKAGE = ROOT / "lorasurgeon"


def layout_block() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"## Layout\n\n```\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no Layout block"
    lines = block.group(1).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("lorasurgeon/"))
    end = next(i for i, line in enumerate(lines) if line.startswith("tests/"))
    return "\n".join(lines[start:end])


def test_every_module_and_package_is_in_the_architecture_layout():
    block = layout_block()
    named_files = set(re.findall(r"\b([a-z_0-9]+\.py|py\.typed)\b", block))
    named_dirs = set(re.findall(r"^\s+([a-z_]+)/", block, re.M))
    files = {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent == PACKAGE}
    dirs = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    dirs |= {p.name for p in PACKAGE.glob("*/*") if p.is_dir() and p.name != "__pycache__"}
    assert files - named_files == set(), "modules missing from docs/architecture.md"
    assert named_files - files - {"py.typed"} == set(), "docs/architecture.md names modules that do not exist"
    assert dirs == named_dirs, (sorted(dirs - named_dirs), sorted(named_dirs - dirs))


def test_every_test_reliability_md_cites_exists():
    text = (ROOT / "docs" / "reliability.md").read_text()
    cited = 0
    for row in text.splitlines():
        current = None
        for file, name in re.findall(r"(tests/test_\w+\.py)?::(test_\w+)", row):
            current = file or current
            assert current, f"a test cited without its file: {name}"
            source = (ROOT / current).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{current}::{name} does not exist"
            cited += 1
    assert cited >= 20
