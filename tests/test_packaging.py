"""The distribution ships every package of the tree, and the `robustgate` command starts."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_SHIPPED = {"tests", "bench", "deploy", "docs", "bundles", "scripts", ".venv", "build", "dist"}


def test_every_package_directory_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"robustgate"}
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and (rel.parts[0] in NOT_SHIPPED or rel.parts[0].startswith(".")):
            continue
        found.add(".".join(("robustgate", *rel.parts)))
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - found == set(), "pyproject.toml lists packages that do not exist"


def test_cli_help_lists_every_subcommand():
    out = subprocess.run(
        [sys.executable, "-m", "robustgate.proxy.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("serve", "train", "fit", "eval", "probe"):
        assert command in out


def test_cli_rejects_an_unknown_subcommand():
    proc = subprocess.run([sys.executable, "-m", "robustgate.proxy.cli", "bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
