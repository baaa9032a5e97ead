"""Pure parsers of what ``kapsis setup --check`` reads on the host.

containers.conf, /proc/self/status, /proc/self/mounts and /proc/cgroups, /etc/subuid, version
strings: each function takes the text (or values), never a path it opens itself, so
:mod:`kapsis.host.checks` reads the host and the tests feed them fake inputs.
"""

from __future__ import annotations

import json
import re
import resource
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kapsis.host.facts import CGROUP_ROOT

# Rootful podman raises the container's nofile limit to this unless containers.conf says otherwise;
# without CAP_SYS_RESOURCE and with a lower hard limit, crun's setrlimit fails.
PODMAN_DEFAULT_NOFILE = 1_048_576
_MOUNT_FLAGS = {
    "rw",
    "ro",
    "relatime",
    "noatime",
    "nodiratime",
    "nosuid",
    "nodev",
    "noexec",
    "xattr",
    "clone_children",
    "noprefix",
    "cpuset_v2_mode",
    "favordynmods",
}


@dataclass(frozen=True)
class CgroupLayout:
    version: int  # 2 = unified; 1 = legacy or hybrid
    hybrid: bool  # v1 controllers plus a v2 hierarchy at /sys/fs/cgroup/unified
    v1_controllers: frozenset[str]


def parse_version(text: str) -> tuple[int, ...]:
    """``"6.18.44-fc-v657"`` -> (6, 18, 44); ``"podman version 4.3.1"`` -> (4, 3, 1)."""
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return (0, 0)
    return tuple(int(part) for part in match.groups() if part is not None)


def _conf_values(texts: Iterable[str], table: str, key: str) -> list[Any]:
    values: list[Any] = []
    for text in texts:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            continue
        section = data.get(table)
        if isinstance(section, dict) and key in section:
            values.append(section[key])
    return values


def configured_nofile(conf_texts: Iterable[str]) -> int | None:
    """The hard nofile limit of the effective ``[containers] default_ulimits`` (the last file
    that sets the key wins), or None when no file sets nofile."""
    settings = _conf_values(conf_texts, "containers", "default_ulimits")
    if not settings or not isinstance(settings[-1], list):
        return None
    for entry in settings[-1]:
        match = re.fullmatch(r"\s*nofile=(-?\d+)(?::(-?\d+))?\s*", str(entry))
        if match:
            return int(match.group(2) or match.group(1))
    return None


def configured_runtime(conf_texts: Iterable[str]) -> str | None:
    values = _conf_values(conf_texts, "engine", "runtime")
    return str(values[-1]) if values else None


def pick_runtime(configured: str | None, find: Callable[[str], str | None]) -> str | None:
    """The runtime podman will use: the configured one, else crun, else runc."""
    if configured:
        return configured
    for candidate in ("crun", "runc"):
        if find(candidate):
            return candidate
    return None


def nofile_ok(hard_limit: int, can_raise: bool, configured_hard: int | None) -> bool:
    if can_raise or hard_limit >= PODMAN_DEFAULT_NOFILE or hard_limit == resource.RLIM_INFINITY:
        return True
    return configured_hard is not None and 0 <= configured_hard <= hard_limit


def has_capability(proc_status: str, capability: int) -> bool:
    """Whether the ``CapEff`` line of /proc/<pid>/status has ``capability`` set."""
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", proc_status, re.MULTILINE)
    if match is None:
        return False
    return bool(int(match.group(1), 16) >> capability & 1)


def cgroup_layout(mounts: str, root: str = str(CGROUP_ROOT)) -> CgroupLayout:
    """Read the cgroup layout from /proc/self/mounts text."""
    v2_at_root = False
    v2_unified = False
    controllers: set[str] = set()
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point, fstype, options = fields[1], fields[2], fields[3]
        if fstype == "cgroup2":
            if point == root:
                v2_at_root = True
            elif point.startswith(root + "/"):
                v2_unified = True
        elif fstype == "cgroup" and point.startswith(root + "/"):
            controllers |= {
                option
                for option in options.split(",")
                if option not in _MOUNT_FLAGS and "=" not in option
            }
    if v2_at_root:
        return CgroupLayout(version=2, hybrid=False, v1_controllers=frozenset())
    return CgroupLayout(
        version=1, hybrid=v2_unified and bool(controllers), v1_controllers=frozenset(controllers)
    )


def hybrid_blockers(
    layout: CgroupLayout, unified_controllers: str | None, proc_cgroups: str
) -> list[str]:
    """Controllers on the v2 side of a hybrid layout; crun refuses to run while any exist.

    The truth is the v2 hierarchy's ``cgroup.controllers``; when it cannot be read, fall back to
    hugetlb (the one seen in practice) being enabled but not mounted as v1.
    """
    if not layout.hybrid:
        return []
    if unified_controllers is not None:
        return sorted(set(unified_controllers.split()) - layout.v1_controllers)
    enabled = {
        fields[0]
        for fields in (line.split() for line in proc_cgroups.splitlines())
        if len(fields) == 4 and not fields[0].startswith("#") and fields[3] == "1"
    }
    return ["hugetlb"] if "hugetlb" in enabled - layout.v1_controllers else []


def subid_ranges(text: str, user: str, uid: int) -> list[tuple[int, int]]:
    """(start, count) ranges of /etc/subuid or /etc/subgid for ``user`` (by name or uid)."""
    ranges = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (user, str(uid)):
            try:
                ranges.append((int(fields[1]), int(fields[2])))
            except ValueError:
                continue
    return ranges


@dataclass(frozen=True)
class StorageDriver:
    """podman's storage driver (``podman info``); ``mount_program``: fuse-overlayfs, if used."""

    name: str
    mount_program: str | None = None


def parse_storage_info(text: str) -> StorageDriver | None:
    """``podman info``'s driver line and its options as JSON (see :func:`_storage_driver`)."""
    name, _, options_text = text.strip().partition("\n")
    if not name:
        return None
    try:
        options = json.loads(options_text or "{}")
    except ValueError:
        options = {}
    program = options.get("overlay.mount_program") if isinstance(options, dict) else None
    executable = program.get("Executable") if isinstance(program, dict) else None
    return StorageDriver(name.strip(), executable if isinstance(executable, str) else None)
