"""Run network checks inside a real sandbox: the config and probe helpers of the network tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from .internet import Internet, probe_script
from .kapsis_runner import Kapsis

GATEWAY = "127.0.0.1"  # the gateway's resolver, as the agent sees it


def probe_project(tmp_path: Path) -> Path:
    """A project holding the probe script (run as ``python3 /workspace/probe.py CHECKS``)."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "probe.py").write_text(probe_script())
    return root


def config(tmp_path: Path, internet: Internet, network: str = "podman", extra: str = "") -> Path:
    path = tmp_path / f"network-{network}.yaml"
    path.write_text(
        f"network:\n  dns_servers: [{internet.dns_server}]\n  podman_network: {network}\n" + extra
    )
    return path


def probe(
    kapsis: Kapsis, project: Path, checks: list[list[Any]], *flags: str
) -> tuple[list[dict[str, Any]], subprocess.CompletedProcess[str]]:
    """Run the checks inside a sandbox; one result per check (see internet.run_probes)."""
    task = f"python3 /workspace/probe.py '{json.dumps(checks)}'"
    result = kapsis.run(project, task, *flags)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result


def failed(outcome: dict[str, Any]) -> bool:
    return "error" in outcome
