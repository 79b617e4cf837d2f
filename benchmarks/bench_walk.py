"""How far one merge walks through the package: the modules whose code runs, and the hops -- the longest chain
of calls from one module into another (a call within a module is no hop) -- measured with ``sys.setprofile``
over every thread, on the committed fixtures (the names cached by a first run, as a user's second merge).

    python benchmarks/bench_walk.py            # the CLI's merge of fixtures/base + fixtures/adapter
    python benchmarks/bench_walk.py --list     # and the modules, by package

docs/architecture.md quotes its figures ("One tensor, from the command line to the bytes on disk").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = str(ROOT / "lorasurgeon")


def _module(frame: FrameType) -> str | None:
    path = frame.f_code.co_filename
    if not path.startswith(PACKAGE):
        return None
    return path[len(str(ROOT)) + 1 :].removesuffix(".py").replace("/", ".").removesuffix(".__init__")


def _hops(frame: FrameType | None) -> int:
    """Module changes along the package's frames of this call stack."""
    chain = []
    while frame is not None:
        name = _module(frame)
        if name is not None and (not chain or chain[-1] != name):
            chain.append(name)
        frame = frame.f_back
    return max(0, len(chain) - 1)


def walk(run: Callable[[], Any]) -> tuple[set[str], int]:
    modules: set[str] = set()
    deepest = 0

    def profile(frame: FrameType, event: str, arg: object) -> None:
        nonlocal deepest
        if event == "call":
            name = _module(frame)
            if name is not None and not frame.f_code.co_name.startswith("<"):  # module bodies are imports, not the walk
                modules.add(name)
                deepest = max(deepest, _hops(frame))

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]
    return modules, deepest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="List the modules, too.")
    args = parser.parse_args()
    from click.testing import CliRunner

    from lorasurgeon.cli import cli

    fixtures = ROOT / "fixtures"
    with tempfile.TemporaryDirectory() as scratch:

        def merge(name: str) -> None:
            argv = ["merge", str(fixtures / "base"), str(fixtures / "adapter"), "-o", str(Path(scratch) / name), "-q"]
            result = CliRunner().invoke(cli, argv, catch_exceptions=False)
            assert result.exit_code == 0, result.output

        merge("first")  # imports and the names cache, as a user's earlier run left them
        modules, hops = walk(lambda: merge("second"))
    print(f"one merge: code runs in {len(modules)} modules of the package; the longest call chain crosses {hops} hops")
    if args.list:
        for name in sorted(modules):
            print(f"  {name}")


if __name__ == "__main__":
    main()
