"""The README's Python section runs as written, and prints what its comments say."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from helpers import ROOT


def readme_block(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- ci:{name} -->\n```\w*\n(.*?)```\n<!-- /ci:{name} -->", text, re.S)
    assert match, f"README.md has no ci:{name} block"
    return match.group(1)


def test_the_python_section_runs_and_prints_what_it_says(tmp_path):
    code = readme_block("python")
    shutil.copytree(ROOT / "fixtures", tmp_path / "fixtures")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    promised = [c.strip() for c in re.findall(r"print\(.*\)\s+# (.*)", code)]  # the comments beside prints
    assert promised and out[0].startswith(promised[0].removesuffix("..."))
    assert out[1] == promised[1]
    assert out[-1].startswith("refused: fixtures/adapter: BASE is a PEFT adapter") and "look swapped" in out[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base-again", "extracted", "fixtures", "merged"]


def test_the_folders_the_readme_examples_write_are_ignored_by_git():
    text = (ROOT / "README.md").read_text()
    shell = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))
    python = readme_block("python")
    written = set(re.findall(r"-o ([\w.-]+)", shell)) | set(re.findall(r'"(merged|base-again|extracted)"', python))
    ignored = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert written and written - {"OUT", "lora"} <= ignored, sorted(written - ignored)
