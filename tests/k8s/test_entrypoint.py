"""``python -m kapsis.operator`` (what the Deployment runs) against the test cluster: it
handles a request, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.k8s.requests import Requests

SRC = Path(__file__).resolve().parents[2] / "src"


def test_the_operator_entry_point_runs_and_stops_on_sigterm(
    api_client: Any, kubeconfig: Path, namespace: str, tmp_path: Path
):
    env = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "KAPSIS_OPERATOR_DATA_DIR": str(tmp_path / "operator"),
        "KAPSIS_OPERATOR_DNS_SERVERS": "192.0.2.53",
        "HOME": str(tmp_path / "home"),
    }
    env.pop("KUBERNETES_SERVICE_HOST", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "kapsis.operator", "--kubeconfig", str(kubeconfig), "-n", namespace],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        requests = Requests(api_client, namespace)
        requests.create("from-main")
        requests.wait_pod("from-main", timeout=30)
        assert requests.wait_accepted("from-main")["podName"]
        assert (tmp_path / "operator" / "keys" / "audit-ed25519.pub.pem").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output


def test_a_bad_data_dir_is_a_config_error(tmp_path: Path, kubeconfig: Path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {
        **os.environ,
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "KAPSIS_OPERATOR_DATA_DIR": str(blocker / "sub"),
        "KAPSIS_OPERATOR_DNS_SERVERS": "192.0.2.53",
    }
    result = subprocess.run(
        [sys.executable, "-m", "kapsis.operator", "--kubeconfig", str(kubeconfig)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "KAPSIS_OPERATOR_DATA_DIR" in result.stderr


def test_kapsis_operator_run_is_a_cli_command():
    from typer.testing import CliRunner

    from kapsis.cli.app import app

    result = CliRunner().invoke(app, ["operator", "run", "--help"])
    assert result.exit_code == 0 and "--namespace" in result.output
