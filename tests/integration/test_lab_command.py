"""`labkit lab` starts JupyterLab with the lab's own defaults: no "get notified about Jupyter news?" pop-up.

The pop-up comes from JupyterLab's notification settings (``fetchNews`` is ``"none"``, "ask", by default); the lab's
config folder sets the default to ``"false"`` through ``labconfig/default_setting_overrides.json`` on
``JUPYTER_CONFIG_PATH``. This starts the very command `labkit lab` execs, with a throw-away Jupyter home so that
no one's own settings answer instead, and asks the running server for the setting.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from labkit.cli import JUPYTER_CONFIG, jupyter_lab_command

SETTING = "@jupyterlab/apputils-extension:notification"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_command_puts_the_labs_config_first_and_keeps_the_learners() -> None:
    args, env = jupyter_lab_command(["--no-browser"])
    assert args[1:4] == ["-m", "jupyter", "lab"] and "--no-browser" in args
    paths = env["JUPYTER_CONFIG_PATH"].split(os.pathsep)
    assert paths[0] == str(JUPYTER_CONFIG)
    overrides = json.loads((JUPYTER_CONFIG / "labconfig" / "default_setting_overrides.json").read_text())
    assert overrides[SETTING]["fetchNews"] == "false"


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_jupyterlab_started_by_labkit_lab_does_not_ask_about_news(tmp_path: Path) -> None:
    port, token = _free_port(), "labkit-test"
    args, env = jupyter_lab_command(
        ["--no-browser", f"--port={port}", "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={token}"]
    )  # fmt: skip
    env = {**env, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}  # fmt: skip
    server = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/lab/api/settings/{SETTING}?token={token}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    setting = json.load(answer)
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, f"JupyterLab exited: {server.stderr.read().decode()[-800:]}"
                assert time.monotonic() < deadline, "JupyterLab did not answer within 60 s"
                time.sleep(0.5)
        assert setting["schema"]["properties"]["fetchNews"]["default"] == "false"
        assert "fetchNews" not in json.loads(setting.get("raw") or "{}"), "a default, not a setting of the learner's"
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
