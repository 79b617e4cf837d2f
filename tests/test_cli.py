"""The installed command: help, version, and the one-line error contract in a real process."""

import subprocess
import sys

from helpers import ROOT, run_cli

from lorasurgeon import __version__


def test_version_and_help():
    assert run_cli("--version").stdout.strip() == f"lorasurgeon, version {__version__}"
    for flag in ("-h", "--help"):
        result = run_cli(flag)
        assert result.exit_code == 0 and "inspect" in result.stdout
    assert "--json" in run_cli("inspect", "-h").stdout


def test_python_dash_m_in_a_real_process(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "lorasurgeon", "inspect", str(ROOT / "fixtures" / "base")],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "model.safetensors" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lorasurgeon", "inspect", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {tmp_path / 'missing'}: no such file or folder"
    debug = subprocess.run(
        [sys.executable, "-m", "lorasurgeon", "--debug", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_debug_works_after_the_command_too(tmp_path):
    """Errors say 'run with --debug'; people put it at the end of the line they just ran."""
    for where in (["--debug", "inspect", str(tmp_path / "missing")], ["inspect", str(tmp_path / "missing"), "--debug"]):
        done = subprocess.run([sys.executable, "-m", "lorasurgeon", *where], capture_output=True, text=True)
        assert done.returncode != 0 and "Traceback" in done.stderr and "InputNotFoundError" in done.stderr, done.stderr


def test_every_option_of_every_command_has_help_text():
    import click

    from lorasurgeon.cli import cli

    missing = [
        f"{name} {p.opts[0]}"
        for name, cmd in cli.commands.items()
        for p in cmd.params
        if isinstance(p, click.Option) and not p.help
    ]
    assert missing == []


def test_short_dtype_names_work_on_the_command_line(tmp_path):
    from safetensors.torch import load_file

    fixtures = ROOT / "fixtures"
    for spelling, dtype in (("bf16", "torch.bfloat16"), ("fp16", "torch.float16"), ("fp32", "torch.float32")):
        out = tmp_path / spelling
        assert run_cli("merge", fixtures / "base", fixtures / "adapter", "-o", out, "--dtype", spelling).exit_code == 0
        assert {str(t.dtype) for t in load_file(out / "model.safetensors").values()} == {dtype}
    lora = tmp_path / "lora"
    assert (
        run_cli("extract", fixtures / "base", tmp_path / "fp32", "--rank", "2", "--dtype", "bf16", "-o", lora).exit_code
        == 0
    )
    assert {str(t.dtype) for t in load_file(lora / "adapter_model.safetensors").values()} == {"torch.bfloat16"}
    bad = run_cli("merge", fixtures / "base", fixtures / "adapter", "-o", tmp_path / "x", "--dtype", "int8")
    assert bad.exit_code == 2 and "int8" in bad.stderr
