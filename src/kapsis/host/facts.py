"""Cheap facts about the host that change what a sandbox plan can promise.

Probed from the filesystem only (no subprocesses), so a run pays microseconds for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
APPARMOR_ENABLED = Path("/sys/module/apparmor/parameters/enabled")


@dataclass(frozen=True)
class HostFacts:
    rootless: bool
    cgroup_version: int
    apparmor: bool

    @property
    def limits_enforced(self) -> bool:
        """Rootless podman on cgroup v1 ignores memory, cpu and pids limits."""
        return not self.rootless or self.cgroup_version == 2


def probe_host() -> HostFacts:
    return HostFacts(
        rootless=os.geteuid() != 0,
        cgroup_version=2 if (CGROUP_ROOT / "cgroup.controllers").exists() else 1,
        apparmor=_apparmor_enabled(),
    )


def _apparmor_enabled() -> bool:
    try:
        return APPARMOR_ENABLED.read_text().strip().upper().startswith("Y")
    except OSError:
        return False
