import subprocess
import sys

from click.testing import CliRunner

import cli
from agent import __version__


def test_version_and_help():
    r = CliRunner().invoke(cli.main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    r = CliRunner().invoke(cli.main, ["--help"])
    assert r.exit_code == 0 and "demo" in r.output


def test_console_script_runs_the_walkthrough():
    out = subprocess.run([sys.executable, "-m", "cli", "demo", "--seed", "3"], capture_output=True, text=True, check=True)
    assert "matched" in out.stdout and "TX power -8 dBm" in out.stdout
