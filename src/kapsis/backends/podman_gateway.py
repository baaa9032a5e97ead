"""The network gateway of a filtered sandbox, as a Podman container in the sandbox's pod.

The gateway starts first and owns the network namespace (on podman's bridge network); the agent
container joins it with ``--network container:``. The gateway has CAP_NET_ADMIN and its own
uid range; the agent has no capabilities, another uid range and its own pid namespace, so it
can neither change the rules nor see or signal the gateway's processes. Before the agent starts,
the gateway's entrypoint runs the self-test inside the namespace and writes its verdict where
the host reads it; unless it is "ok", the run stops there.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from kapsis.backends import _uidslots
from kapsis.errors import SandboxError
from kapsis.network.gateway_files import (
    GatewayDirs,
    gateway_dirs,
    write_gateway_files,
)
from kapsis.network.gateway_layout import (
    BLOCKED_SETS,
    CONFIG_TARGET,
    GATEWAY_CAPABILITIES,
    LOG_TARGET,
    UNPRIVILEGED_PORT_START,
)
from kapsis.network.observe import BlockedConnection, blocked_in_table
from kapsis.sandbox.plan import SandboxPlan

PODMAN = "podman"


def gateway_run_args(plan: SandboxPlan, *, uid_base: int | str) -> list[str]:
    gateway = plan.network.gateway
    assert gateway is not None
    dirs = gateway_dirs(Path(plan.workspace.root))
    args = [PODMAN, "run", "--detach", "--pod", plan.pod_name, "--name", gateway.container_name]
    args += ["--pull", "never", "--network", plan.network.podman_network, "--dns", "127.0.0.1"]
    for key, value in plan.labels.items():
        args += ["--label", f"{key}={value}"]
    args += ["--label", "io.kapsis.role=gateway"]
    if plan.userns.kind == "mapped":
        first = f"{uid_base}" if isinstance(uid_base, str) else uid_base + _uidslots.GATEWAY_OFFSET
        size = _uidslots.CONTAINER_RANGE
        args += ["--uidmap", f"0:{first}:{size}", "--gidmap", f"0:{first}:{size}"]
    # Ports below 1024 stay privileged in the namespace the gateway owns (the agent joins it):
    # the resolver listens on one that the agent must never bind.
    args += ["--sysctl", f"net.ipv4.ip_unprivileged_port_start={UNPRIVILEGED_PORT_START}"]
    args += ["--cap-drop", "ALL"]
    for capability in GATEWAY_CAPABILITIES:
        args += ["--cap-add", capability]
    args += ["--security-opt", "no-new-privileges"]
    args += ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/run:rw,nosuid,nodev,noexec"]
    args += ["--tmpfs", "/tmp:rw,nosuid,nodev,noexec", "--memory", "256m", "--pids-limit", "128"]
    args += [
        "--volume",
        f"{dirs.config}:{CONFIG_TARGET}:ro",
        "--volume",
        f"{dirs.log}:{LOG_TARGET}",
    ]
    args += [gateway.image, "/bin/bash", f"{CONFIG_TARGET}/entrypoint.sh"]
    return args


def start_gateway(plan: SandboxPlan, uid_base: int | str) -> None:
    """Start the gateway and run the self-test; raise SandboxError (no agent) if either fails."""
    gateway = plan.network.gateway
    assert gateway is not None
    owner = uid_base + _uidslots.GATEWAY_OFFSET if isinstance(uid_base, int) else None
    write_gateway_files(
        gateway_dirs(Path(plan.workspace.root)), plan.network.policy, gateway.upstreams, owner
    )
    started = subprocess.run(
        gateway_run_args(plan, uid_base=uid_base), capture_output=True, text=True, check=False
    )
    if started.returncode != 0:
        if "image not known" in started.stderr or "no such image" in started.stderr.lower():
            raise SandboxError(
                f"the network gateway image {gateway.image} is missing; build it with "
                "`kapsis setup` (or run with --network-mode none)"
            )
        detail = (started.stderr.strip().splitlines() or ["no output"])[-1]
        raise SandboxError(f"the network gateway did not start: {detail}")
    verdict = _await_verdict(gateway_dirs(Path(plan.workspace.root)), gateway.container_name)
    if verdict is not None:
        raise SandboxError(
            f"the network gateway failed its self-test ({verdict}); the agent was not started "
            "and had no network"
        )


def _await_verdict(dirs: GatewayDirs, container: str, timeout: float = 20.0) -> str | None:
    """None when the gateway's self-test passed, else why not (it writes its verdict)."""
    deadline = time.monotonic() + timeout
    checked_running = time.monotonic()
    while time.monotonic() < deadline:
        verdict = dirs.verdict.read_text().strip() if dirs.verdict.exists() else ""
        if verdict == "ok":
            return None
        if verdict:  # empty: the file exists but its line is not written yet
            detail = dirs.verdict_detail.read_text(errors="replace").strip()
            return "; ".join(detail.splitlines()[-3:]) or _gateway_failure(container)
        if time.monotonic() - checked_running > 2.0:
            # Every 2 s: a gateway that died before writing a verdict will never write one.
            checked_running = time.monotonic()
            state = subprocess.run(
                [PODMAN, "inspect", "--format", "{{.State.Running}}", container],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if state.stdout.strip() != "true":
                return _gateway_failure(container)
        time.sleep(0.01)
    return f"no verdict within {timeout:g}s"


def _gateway_failure(container: str) -> str:
    logs = subprocess.run(
        [PODMAN, "logs", "--tail", "3", container], capture_output=True, text=True, check=False
    )
    lines = (logs.stdout + logs.stderr).strip().splitlines()
    return lines[-1] if lines else "the gateway exited"


def blocked_connections(plan: SandboxPlan) -> tuple[list[BlockedConnection], bool]:
    """The refused destinations the firewall counted, and whether the gateway still ran."""
    gateway = plan.network.gateway
    if gateway is None:
        return [], True
    # One exec for both sets: each podman exec costs a process start in the container.
    result = subprocess.run(
        [PODMAN, "exec", gateway.container_name, "nft", "-j", "list", "table", "inet", "kapsis"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return [], False
    return blocked_in_table(json.loads(result.stdout or "{}"), BLOCKED_SETS), True
