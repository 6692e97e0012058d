"""`autorank-bench NAME`: the listing names every command, each command's module runs its own
parser under its own name, an unknown command is one line and exit 2, and pyproject registers it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from autorank.bench import cli

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_registers_the_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["autorank-bench"] == "autorank.bench.cli:main"


def test_the_listing_names_every_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name}  " in out


def test_an_unknown_command_is_one_line_and_exit_2(capsys):
    assert cli.main(["nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("autorank-bench: error: unknown command 'nope': use one of layers,")


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_each_command_prints_its_help_under_its_name(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: autorank-bench {name}")


def test_python_dash_m_runs_it():
    r = subprocess.run([sys.executable, "-m", "autorank.bench", "nope"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "unknown command 'nope'" in r.stderr
