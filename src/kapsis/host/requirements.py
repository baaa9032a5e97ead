"""What each host requirement needs, and the fix when it is not met: one :class:`Check` each.

:mod:`kapsis.host.checks` reads the host (files under /proc, /sys and /etc, a few podman calls)
and hands the values to these functions, which decide; the tests feed them fake inputs. Only the
device and runtime-directory checks look at the path they are about themselves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kapsis.host.agent_images import ImageInfo
from kapsis.host.facts import CGROUP_ROOT
from kapsis.host.host_parsing import (
    PODMAN_DEFAULT_NOFILE,
    CgroupLayout,
    StorageDriver,
    nofile_ok,
    parse_version,
    subid_ranges,
)

MIN_IDMAP_OVERLAY_KERNEL = (5, 19)
MIN_SUBID_COUNT = 65_536
MIN_PODMAN = (4, 0)


@dataclass(frozen=True)
class Check:
    """One host requirement. ``required=False`` checks are informational: they never make the
    host fail, even when ``ok`` is False (then they are a warning)."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    required: bool = True


def check_podman(version: str | None, *, sudo: str = "") -> Check:
    fix = f"{sudo}apt-get install podman (or run scripts/install.sh)"
    if version is None:
        return Check("podman", False, "podman is not installed", fix)
    parsed = parse_version(version)
    if parsed < MIN_PODMAN:
        return Check(
            "podman",
            False,
            f"podman {version} is too old (need 4.0 or newer)",
            "upgrade podman to 4.x or newer",
        )
    return Check("podman", True, f"podman {version}")


def check_runtime(runtime: str | None, path: str | None, *, sudo: str = "") -> Check:
    if runtime is None or path is None:
        what = (
            f"OCI runtime {runtime} is configured but not installed"
            if runtime
            else ("no OCI runtime (crun or runc) found")
        )
        return Check("OCI runtime", False, what, f"{sudo}apt-get install {runtime or 'crun'}")
    return Check("OCI runtime", True, f"{runtime} ({path})")


def check_ca_bundle(lacking: list[str] | None) -> Check:
    """Whether the host trusts CAs the base image does not (a TLS-inspecting proxy's)."""
    name = "CA certificates"
    if lacking is None:
        return Check(
            name, True, "not compared (no host bundle, or the image has none)", required=False
        )
    if not lacking:
        return Check(name, True, "the base image trusts every CA the host does", required=False)
    shown = "; ".join(lacking[:2]) + (f" and {len(lacking) - 2} more" if len(lacking) > 2 else "")
    return Check(
        name,
        False,
        f"the host trusts {len(lacking)} CA(s) the base image does not ({shown}): HTTPS from "
        "a sandbox through this network may fail certificate checks",
        "set network.ca_bundle: host in ~/.config/kapsis/config.yaml",
        required=False,
    )


def check_disk_helper(gap: str | None) -> Check:
    """Rootless: whether resources.disk can be enforced (by the disk helper, through sudo)."""
    if gap is None:
        return Check("disk quota", True, "enforced (the disk helper, through sudo)", required=False)
    return Check("disk quota", False, f"NOT enforced: {gap}", required=False)


def check_mode(rootless: bool, uid: int) -> Check:
    if rootless:
        return Check(
            "mode",
            True,
            f"rootless (uid {uid}): sandboxes run in your user namespace",
            required=False,
        )
    return Check(
        "mode",
        True,
        "rootful: each sandbox gets its own unprivileged host uid range",
        required=False,
    )


def check_subids(path: str, text: str, user: str, uid: int) -> Check:
    name = f"{Path(path).name} range"
    ranges = subid_ranges(text, user, uid)
    big = [r for r in ranges if r[1] >= MIN_SUBID_COUNT]
    fix = f"usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}"
    if big:
        start, count = big[0]
        return Check(name, True, f"{user}: {count} ids from {start}")
    if ranges:
        return Check(
            name,
            False,
            f"{user} has only {sum(r[1] for r in ranges)} ids in {path} (need {MIN_SUBID_COUNT})",
            f"sudo {fix}",
        )
    return Check(name, False, f"no range for {user} in {path}", f"sudo {fix}")


def check_device(device: str, needed_by: str, module_fix: str) -> Check:
    name = device
    if not os.path.exists(device):
        return Check(
            name, False, f"{device} is missing (needed by {needed_by})", f"sudo {module_fix}"
        )
    if not os.access(device, os.R_OK | os.W_OK):
        return Check(
            name,
            False,
            f"{device} is not usable by this user (needed by {needed_by})",
            f"sudo chmod 666 {device}",
        )
    return Check(name, True, "usable")


def check_runtime_dir(runtime_dir: str | None, uid: int, user: str) -> Check:
    """The runtime dir podman keeps its sockets and locks in: set, the user's, writable.

    The fix makes the directory the way systemd-logind would (it works without systemd); with
    logind, ``loginctl enable-linger`` keeps it across logouts instead.
    """
    wanted = f"/run/user/{uid}"
    fix = (
        f"sudo install -d -m 700 -o {user} {wanted} && export XDG_RUNTIME_DIR={wanted} "
        "(add the export to your shell's profile; with systemd-logind, "
        f"`sudo loginctl enable-linger {user}` makes and keeps it instead)"
    )
    if not runtime_dir:
        return Check("XDG_RUNTIME_DIR", False, "not set (rootless podman needs it)", fix)
    try:
        owner = os.stat(runtime_dir).st_uid
    except OSError:
        return Check("XDG_RUNTIME_DIR", False, f"{runtime_dir} does not exist", fix)
    if owner != uid or not os.access(runtime_dir, os.W_OK):
        return Check("XDG_RUNTIME_DIR", False, f"{runtime_dir} is not this user's", fix)
    return Check("XDG_RUNTIME_DIR", True, runtime_dir)


STORAGE_CONF_FIX = (
    "mkdir -p ~/.config/containers && printf '[storage]\\ndriver = \"overlay\"\\n' "
    "> ~/.config/containers/storage.conf && podman system reset --force "
    "(this deletes this user's images and containers: run `kapsis setup` again after it)"
)


ROOT_STORAGE_FIX = (
    'set driver = "overlay" in the [storage] table of /etc/containers/storage.conf, then '
    "sudo podman system reset --force (it deletes root's images: run `sudo kapsis setup` again)"
)


def check_fuse(storage: StorageDriver | None) -> Check:
    """/dev/fuse matters only to fuse-overlayfs; native overlay in a user namespace (Linux >=
    5.13) needs none, so then a missing or locked device is no failure."""
    fuse = check_device("/dev/fuse", "fuse-overlayfs, the storage's mount program", "modprobe fuse")
    if fuse.ok or storage is None or storage.mount_program is not None:
        return fuse
    return Check(fuse.name, False, "not needed: podman uses native overlay", None, required=False)


def check_storage(driver: StorageDriver | None, *, rootless: bool) -> Check:
    """Overlay (native, or fuse-overlayfs) is required; vfs copies every layer of every image
    for each container: runs are slow and images huge."""
    name = "storage driver"
    if driver is None:
        return Check(
            name,
            False,
            "`podman info` failed: cannot tell the storage driver",
            "run `podman info` to see why, fix that, then `kapsis setup --check` again",
        )
    if driver.name == "overlay":
        how = f"via {driver.mount_program}" if driver.mount_program else "native"
        return Check(name, True, f"overlay ({how})")
    if driver.name == "vfs":
        fix = STORAGE_CONF_FIX if rootless else ROOT_STORAGE_FIX
        return Check(
            name,
            False,
            "vfs: every container copies its whole image (slow starts, huge storage); podman "
            "keeps the driver its storage was made with until it is reset",
            fix,
        )
    return Check(name, True, driver.name)


def check_cgroup(layout: CgroupLayout) -> Check:
    if layout.version == 2:
        detail = "v2 (unified)"
    elif layout.hybrid:
        detail = "v1 (hybrid, with a v2 hierarchy at /sys/fs/cgroup/unified)"
    else:
        detail = "v1"
    return Check("cgroup", True, detail, required=False)


def check_limits(rootless: bool, cgroup_version: int, delegated: frozenset[str] | None) -> Check:
    """Whether --memory, --cpus and --pids-limit take effect. Kapsis still runs when they do not,
    and says so in every run's plan, so this check is a warning, not a failure."""
    name = "resource limits"
    if not rootless:
        return Check(name, True, "enforced (rootful podman)", required=False)
    if cgroup_version == 1:
        return Check(
            name,
            False,
            "NOT enforced: rootless podman on cgroup v1 ignores --memory, --cpus and --pids-limit",
            "run Kapsis as root (rootful podman enforces them on cgroup v1), or boot with "
            "systemd.unified_cgroup_hierarchy=1 to get cgroup v2",
            required=False,
        )
    wanted = {"memory", "pids", "cpu"}
    if delegated is not None and not wanted <= delegated:
        missing = ", ".join(sorted(wanted - delegated))
        return Check(
            name,
            False,
            f"NOT enforced: the {missing} controller(s) are not delegated to your user",
            "sudo mkdir -p /etc/systemd/system/user@.service.d && printf '[Service]\\n"
            "Delegate=memory pids cpu cpuset io\\n' | sudo tee "
            "/etc/systemd/system/user@.service.d/delegate.conf && sudo systemctl daemon-reload "
            "(then log in again)",
            required=False,
        )
    return Check(name, True, "enforced (rootless podman on cgroup v2)", required=False)


def check_nofile(
    rootless: bool, hard_limit: int, can_raise: bool, configured_hard: int | None
) -> Check:
    name = "nofile ulimit"
    if rootless:
        return Check(name, True, "not needed: rootless podman keeps the session's limits")
    if nofile_ok(hard_limit, can_raise, configured_hard):
        if configured_hard is not None:
            return Check(name, True, f"containers.conf sets nofile to {configured_hard}")
        return Check(name, True, f"hard limit {hard_limit}")
    return Check(
        name,
        False,
        f"hard nofile limit is {hard_limit} (< {PODMAN_DEFAULT_NOFILE}) without CAP_SYS_RESOURCE: "
        "every container fails with `crun: setrlimit RLIMIT_NOFILE: Operation not permitted`",
        "mkdir -p /etc/containers/containers.conf.d && printf '[containers]\\n"
        f'default_ulimits = ["nofile={hard_limit}:{hard_limit}", "nproc=32768:32768"]\\n\' '
        "> /etc/containers/containers.conf.d/kapsis.conf",
    )


def check_hybrid(
    runtime: str | None, layout: CgroupLayout, blockers: Sequence[str], *, sudo: str = ""
) -> Check:
    name = "cgroup hybrid mode"
    if not layout.hybrid:
        return Check(name, True, "not in hybrid mode")
    if runtime != "crun":
        return Check(name, True, f"hybrid, fine with {runtime}")
    if not blockers:
        return Check(name, True, "hybrid; every controller is on v1, as crun needs")
    fix = " && ".join(
        f"{sudo}mkdir -p {CGROUP_ROOT}/{c} && {sudo}mount -t cgroup -o {c} cgroup {CGROUP_ROOT}/{c}"
        for c in blockers
    )
    return Check(
        name,
        False,
        f"crun refuses hybrid mode while {', '.join(blockers)} is on the v2 hierarchy "
        '("cgroups in hybrid mode not supported")',
        fix,
    )


def check_overlay(filesystems: str, module_available: bool, *, sudo: str = "") -> Check:
    if any(line.split()[-1:] == ["overlay"] for line in filesystems.splitlines()):
        return Check("overlayfs", True, "kernel overlayfs available")
    if module_available:
        return Check("overlayfs", True, "overlay module available (loaded on first use)")
    return Check("overlayfs", False, "the kernel has no overlayfs", f"{sudo}modprobe overlay")


def check_idmapped(release: str, *, required: bool) -> Check:
    version = parse_version(release)
    shown = ".".join(str(part) for part in version[:2])
    if version >= MIN_IDMAP_OVERLAY_KERNEL:
        return Check("idmapped mounts", True, f"Linux {shown} (>= 5.19)", required=required)
    return Check(
        "idmapped mounts",
        False,
        f"Linux {shown} is older than 5.19: no idmapped mounts under overlayfs, which the "
        "rootful copy-on-write workspace needs",
        "upgrade the kernel to Linux 5.19 or newer (Debian: bookworm's 6.1 kernel)",
        required=required,
    )


def check_debootstrap(path: str | None, *, needed: bool, sudo: str = "") -> Check:
    if path:
        return Check(
            "debootstrap", True, f"{path} (used by `kapsis setup --build`)", required=needed
        )
    return Check(
        "debootstrap",
        False,
        "not installed; `kapsis setup --build` needs it",
        f"{sudo}apt-get install debootstrap",
        required=needed,
    )


def check_image(image: str, present: bool) -> Check:
    if present:
        return Check("base image", True, f"{image} present")
    return Check("base image", False, f"{image} is missing", "kapsis setup --build")


def check_gateway_image(image: str, present: bool) -> Check:
    if present:
        return Check("gateway image", True, f"{image} present")
    return Check(
        "gateway image",
        False,
        f"{image} is missing: filtered network mode (the default) cannot run",
        "kapsis setup",
    )


def check_agent_images(images: dict[str, ImageInfo]) -> Check:
    """Which agent profiles' images exist (informational: only runs of that agent need one)."""
    present = [
        f"{agent} {info.version}" if info.version else agent
        for agent, info in images.items()
        if info.present
    ]
    missing = [agent for agent, info in images.items() if not info.present]
    detail = f"present: {', '.join(present) or 'none'}"
    if not missing:
        return Check("agent images", True, detail, required=False)
    return Check(
        "agent images",
        False,
        f"{detail}; missing: {', '.join(missing)} (runs of those agents fail until built)",
        f"kapsis setup --agents {','.join(missing)}",
        required=False,
    )


def check_apparmor(enabled: bool) -> Check:
    if enabled:
        return Check("AppArmor", True, "enabled (the paranoid profile can run)", required=False)
    return Check(
        "AppArmor", True, "not available: paranoid profile will refuse to start", required=False
    )
