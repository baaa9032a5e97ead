"""Cheap facts about the host that change what a sandbox plan can promise.

Probed from the filesystem only (no subprocesses), so a run pays microseconds for them.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
APPARMOR_ENABLED = Path("/sys/module/apparmor/parameters/enabled")
# systemd-resolved's list of real upstreams comes first: /etc/resolv.conf then says 127.0.0.53.
RESOLV_CONF_CANDIDATES = (Path("/run/systemd/resolve/resolv.conf"), Path("/etc/resolv.conf"))


@dataclass(frozen=True)
class HostFacts:
    rootless: bool
    cgroup_version: int
    apparmor: bool
    # Resolvers a sandbox's gateway can use (the host's own loopback resolvers are left out).
    dns_servers: tuple[str, ...] = ()

    @property
    def limits_enforced(self) -> bool:
        """Rootless podman on cgroup v1 ignores memory, cpu and pids limits."""
        return not self.rootless or self.cgroup_version == 2


def probe_host() -> HostFacts:
    return HostFacts(
        rootless=os.geteuid() != 0,
        cgroup_version=2 if (CGROUP_ROOT / "cgroup.controllers").exists() else 1,
        apparmor=_apparmor_enabled(),
        dns_servers=tuple(host_dns_servers()),
    )


def host_dns_servers(candidates: Sequence[Path] = RESOLV_CONF_CANDIDATES) -> list[str]:
    """The host's resolvers that a sandbox can reach (loopback ones are the host's own)."""
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        servers = []
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                try:
                    address = ipaddress.ip_address(fields[1].split("%")[0])
                except ValueError:
                    continue
                if not address.is_loopback:
                    servers.append(str(address))
        if servers:
            return servers
    return []


def _apparmor_enabled() -> bool:
    try:
        return APPARMOR_ENABLED.read_text().strip().upper().startswith("Y")
    except OSError:
        return False
