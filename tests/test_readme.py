"""The README as a newcomer runs it: every example block in order, in one folder holding the committed fixtures
(as a fresh clone does), each command exiting as it should and printing what the README shows."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

README = (ROOT / "README.md").read_text()
# The two set-up commands (make quickstart, make test) are CI's to run: they install and run this very suite.
SET_UP = ("make ", "pip ", "git ")


def readme_block(name: str) -> str:
    match = re.search(rf"<!-- ci:{name} -->\n```\w*\n(.*?)```\n<!-- /ci:{name} -->", README, re.S)
    assert match, f"README.md has no ci:{name} block"
    return match.group(1)


def example_blocks() -> list[tuple[str, str]]:
    """(language, code) of every bash and python block, in the README's order, set-up commands left out."""
    blocks = []
    for lang, code in re.findall(r"```(bash|python)\n(.*?)```", README, re.S):
        if lang == "bash":
            code = "\n".join(line for line in code.splitlines() if line.strip() and not line.startswith(SET_UP))
        if code.strip():
            blocks.append((lang, code))
    return blocks


def command_lines(code: str) -> list[str]:
    return [shlex.join(shlex.split(line, comments=True)) for line in code.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clone")
    shutil.copytree(ROOT / "fixtures", folder / "fixtures")
    return folder


def run_shell(line: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(shlex.split(line), cwd=cwd, capture_output=True, text=True, env=env)


def test_every_block_runs_in_order_in_one_clone(clone):
    blocks = example_blocks()
    assert [lang for lang, _ in blocks].count("python") == 1 and len(blocks) >= 3
    for lang, code in blocks:
        if lang == "python":
            done = subprocess.run([sys.executable, "-c", code], cwd=clone, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            check_python_output(code, done.stdout)
            continue
        for line in command_lines(code):
            done = run_shell(line, clone)
            allowed = (0, 1) if line.startswith("lorasurgeon diff") else (0,)  # diff exits 1 when A and B differ
            assert done.returncode in allowed, f"{line}: exit {done.returncode}\n{done.stderr}"
            assert "Traceback" not in done.stderr and "error" not in done.stderr, f"{line}:\n{done.stderr}"
    written = {p.name for p in clone.iterdir()} - {"fixtures"}
    ignored = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert written <= ignored, sorted(written - ignored)


def check_python_output(code: str, stdout: str) -> None:
    out = stdout.splitlines()
    promised = [c.strip() for c in re.findall(r"print\(.*\)\s+# (.*)", code)]  # the comments beside prints
    assert promised and out[0].startswith(promised[0].removesuffix("..."))
    assert out[1] == promised[1]
    assert out[-1].startswith("refused: fixtures/adapter: BASE is an adapter") and "look swapped" in out[-1]


def test_the_quick_start_prints_what_the_readme_shows(tmp_path):
    shown = re.search(r"It prints what it did.*?\n```\n(Wrote .*?)\n```", README, re.S)
    assert shown, "the README shows no output of the quick start"
    shutil.copytree(ROOT / "fixtures", tmp_path / "fixtures")
    done = run_shell(readme_block("quickstart").strip(), tmp_path)
    assert done.returncode == 0, done.stderr
    pattern = r"\d+(?:\.\d+)?".join(map(re.escape, re.split(r"\d+(?:\.\d+)?", shown.group(1))))
    assert re.fullmatch(pattern, done.stdout.strip()), (shown.group(1), done.stdout)


def test_ci_runs_exactly_the_readme_s_two_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_block("setup").strip() == "make quickstart" and readme_block("test").strip() == "make test"
    assert "run_block setup" in ci and "run_block test" in ci
    assert re.findall(r"^run_block (\w+)", ci, re.M) == ["setup", "test"]
