"""Helpers shared by test modules (on the test path through ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_labkit(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m labkit`` with the session's environment (which points at the test stack) plus ``env``."""
    child_env = {**os.environ, **env}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "labkit", *args], capture_output=True, text=True, env=child_env, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The command failed with exit ``code`` and said why in exactly one ``Error:`` line, with no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]
