"""pyproject.toml and environment.yml list the same dependencies; README, CI and docs agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# conda-forge names that differ from PyPI's
CONDA_TO_PYPI = {"redis-py": "redis"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement.strip(), maxsplit=1)[0].lower()


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_matches_pyproject() -> None:
    project = _pyproject()["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed: set[str] = set()
    for item in env["dependencies"]:
        if isinstance(item, dict):
            listed |= {_name(r) for r in item["pip"]}
        else:
            name = _name(item)
            if name not in {"python", "pip"}:
                listed.add(CONDA_TO_PYPI.get(name, name))
    assert listed == wanted


def _fenced_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert match, f"README has no {marker} block"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_commands() -> None:
    """The README's two test commands, word for word; before them only the system packages the README names."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [
        line for line in ci if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    packages = [line for line in commands if line.startswith(("apt-get update ", "apt-get install "))]
    assert commands == [*packages, _fenced_command("test-command"), _fenced_command("test-command-apache")]
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{line}`" in readme for line in packages), packages


def test_the_browser_extra_is_what_the_second_test_command_installs() -> None:
    extras = _pyproject()["project"]["optional-dependencies"]
    assert _name(extras["browser"][0]) == "playwright"
    assert '".[test,browser]"' in _fenced_command("test-command-apache")
    assert "service/static/*" in _pyproject()["tool"]["setuptools"]["package-data"]["labkit"]


def test_readme_lab_command_uses_the_console_entry() -> None:
    command = _fenced_command("lab-command")
    assert command.startswith("python3 -m pip install -e . && ")
    assert command.endswith("python3 -m labkit lab")
    assert _pyproject()["project"]["scripts"]["labkit"] == "labkit.cli:cli"
