"""The installed command: help, version, and the one-line error contract in a real process."""

import subprocess
import sys

from lorasurgeon import __version__

from conftest import ROOT, run_cli


def test_version_and_help():
    assert run_cli("--version").stdout.strip() == f"lorasurgeon, version {__version__}"
    for flag in ("-h", "--help"):
        result = run_cli(flag)
        assert result.exit_code == 0 and "inspect" in result.stdout
    assert "--json" in run_cli("inspect", "-h").stdout


def test_python_dash_m_in_a_real_process(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "lorasurgeon", "inspect", str(ROOT / "fixtures" / "base")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "model.safetensors" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "lorasurgeon", "inspect", str(tmp_path / "missing")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: {tmp_path / 'missing'}: no such file or folder"
    debug = subprocess.run([sys.executable, "-m", "lorasurgeon", "--debug", "inspect", str(tmp_path / "missing")],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
