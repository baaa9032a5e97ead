"""Host checks for `kapsis setup`: can this machine run Kapsis sandboxes, and what fixes it if not.

:func:`run_checks` inspects the host and returns one :class:`Check` per requirement, each failing
one with a concrete fix command. It reads files under /proc, /sys and /etc and runs a handful of
subprocesses (``podman --version``, ``podman info`` for the storage driver, ``podman image
exists`` for the base and gateway images, one ``podman image inspect`` for every agent image),
so it takes about a second.

The decisions (:mod:`kapsis.host.requirements`) and the parsers (:mod:`kapsis.host.host_parsing`)
are small pure functions that take text or values (not paths they open themselves), so they can
be tested on fake inputs; this module reads the host and hands them what it read.
"""

from __future__ import annotations

import os
import platform
import pwd
import re
import resource
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kapsis.config.models import DEFAULT_IMAGE
from kapsis.errors import KapsisError
from kapsis.host.agent_images import profile_images
from kapsis.host.facts import CGROUP_ROOT, probe_host
from kapsis.host.host_parsing import (
    StorageDriver,
    cgroup_layout,
    configured_nofile,
    configured_runtime,
    has_capability,
    hybrid_blockers,
    parse_storage_info,
    pick_runtime,
)
from kapsis.host.image import image_present
from kapsis.host.requirements import (
    Check,
    check_agent_images,
    check_apparmor,
    check_ca_bundle,
    check_cgroup,
    check_debootstrap,
    check_device,
    check_disk_helper,
    check_fuse,
    check_gateway_image,
    check_hybrid,
    check_idmapped,
    check_image,
    check_limits,
    check_mode,
    check_nofile,
    check_overlay,
    check_podman,
    check_runtime,
    check_runtime_dir,
    check_storage,
    check_subids,
)
from kapsis.sandbox.network_plan import DEFAULT_GATEWAY_IMAGE

CAP_SYS_RESOURCE = 24

ETC_CONTAINERS = Path("/etc/containers")
USR_CONTAINERS = Path("/usr/share/containers")
_RUNTIME_DIRS = (
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/usr/libexec/podman",
    "/bin",
    "/sbin",
)


def run_checks(image: str = DEFAULT_IMAGE) -> list[Check]:
    """Inspect this host; one :class:`Check` per requirement, in a stable order."""
    facts = probe_host()
    uid = os.geteuid()
    conf_texts = _read_all(containers_conf_files(rootless=facts.rootless))
    layout = cgroup_layout(_read("/proc/self/mounts"))
    runtime = pick_runtime(configured_runtime(conf_texts), _find_program)
    release = platform.release()
    sudo = "sudo " if facts.rootless else ""

    checks = [check_podman(_podman_version(), sudo=sudo)]
    checks.append(check_runtime(runtime, _find_program(runtime) if runtime else None, sudo=sudo))
    checks.append(check_mode(facts.rootless, uid))
    storage = _storage_driver()
    if facts.rootless:
        user = _user_name(uid)
        checks.append(check_subids("/etc/subuid", _read("/etc/subuid"), user, uid))
        checks.append(check_subids("/etc/subgid", _read("/etc/subgid"), user, uid))
        checks.append(check_runtime_dir(os.environ.get("XDG_RUNTIME_DIR"), uid, user))
    checks.append(check_storage(storage, rootless=facts.rootless))
    if facts.rootless:
        checks.append(check_fuse(storage))
        checks.append(check_device("/dev/net/tun", "slirp4netns, for networking", "modprobe tun"))
        from kapsis.workspace.disk import helper_gap

        checks.append(check_disk_helper(helper_gap()))
    checks.append(check_cgroup(layout))
    # The same facts the run plan uses, so `kapsis setup` and `kapsis run` never disagree.
    checks.append(check_limits(facts.rootless, facts.cgroup_version, _delegated_controllers(uid)))
    hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    checks.append(
        check_nofile(
            facts.rootless,
            hard_nofile,
            has_capability(_read("/proc/self/status"), CAP_SYS_RESOURCE),
            configured_nofile(conf_texts),
        )
    )
    blockers = hybrid_blockers(
        layout,
        _read_or_none(CGROUP_ROOT / "unified" / "cgroup.controllers"),
        _read("/proc/cgroups"),
    )
    checks.append(check_hybrid(runtime, layout, blockers, sudo=sudo))
    overlay_module = Path(f"/lib/modules/{release}/kernel/fs/overlayfs").is_dir()
    checks.append(check_overlay(_read("/proc/filesystems"), overlay_module, sudo=sudo))
    checks.append(check_idmapped(release, required=not facts.rootless))
    image_check = check_image(image, image_present(image))
    checks.append(
        check_debootstrap(_find_program("debootstrap"), needed=not image_check.ok, sudo=sudo)
    )
    checks.append(image_check)
    if image_check.ok:
        checks.append(check_ca_bundle(_cas_the_image_lacks(image)))
    checks.append(check_gateway_image(DEFAULT_GATEWAY_IMAGE, image_present(DEFAULT_GATEWAY_IMAGE)))
    from kapsis.agents import list_profiles

    try:
        agents = profile_images(list_profiles(), None)  # profiles with an image of their own
    except KapsisError:
        agents = {}  # a broken user profile is reported when it is used, not here
    checks.append(check_agent_images(agents))
    checks.append(check_apparmor(facts.apparmor))
    return checks


def checks_as_json(checks: Sequence[Check], image: str) -> dict[str, Any]:
    """The report as JSON-ready data: ``ok`` is True when every required check passes."""
    return {
        "ok": all(check.ok for check in checks if check.required),
        "image": image,
        "checks": [asdict(check) for check in checks],
    }


def _cas_the_image_lacks(image: str) -> list[str] | None:
    from kapsis.sandbox.ca_bundle import HOST_BUNDLES, extra_host_cas

    host = next((Path(p) for p in HOST_BUNDLES if Path(p).is_file()), None)
    if host is None:
        return None
    try:
        shown = subprocess.run(
            ["podman", "run", "--rm", "--network", "none", "--entrypoint", "cat", image,
             HOST_BUNDLES[0]],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if shown.returncode != 0 and b"No such file" in shown.stderr:
        return extra_host_cas(host.read_bytes(), b"")  # the image trusts no CA at all
    if shown.returncode != 0:
        return None
    return extra_host_cas(host.read_bytes(), shown.stdout)


def containers_conf_files(
    *,
    rootless: bool,
    etc: Path = ETC_CONTAINERS,
    usr: Path = USR_CONTAINERS,
    home: Path | None = None,
) -> list[Path]:
    """containers.conf files in the order podman reads them (later ones override)."""
    if os.environ.get("CONTAINERS_CONF"):
        return [Path(os.environ["CONTAINERS_CONF"])]
    files = [
        usr / "containers.conf",
        etc / "containers.conf",
        *sorted((etc / "containers.conf.d").glob("*.conf")),
    ]
    if rootless:
        user = (home or Path.home()) / ".config" / "containers"
        files += [user / "containers.conf", *sorted((user / "containers.conf.d").glob("*.conf"))]
    return files


# --- reading the host -------------------------------------------------------------------------


def _read(path: str | Path) -> str:
    return _read_or_none(path) or ""


def _read_or_none(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _read_all(files: Iterable[Path]) -> list[str]:
    return [text for text in (_read_or_none(f) for f in files) if text is not None]


def _find_program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((str(p) for d in _RUNTIME_DIRS if (p := Path(d) / name).is_file()), None)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _delegated_controllers(uid: int) -> frozenset[str] | None:
    """Controllers systemd delegates to the user's manager (cgroup v2), None when unknown."""
    service = CGROUP_ROOT / "user.slice" / f"user-{uid}.slice" / f"user@{uid}.service"
    text = _read_or_none(service / "cgroup.controllers")
    return frozenset(text.split()) if text is not None else None


def _storage_driver() -> StorageDriver | None:
    podman = _find_program("podman")
    if podman is None:
        return None
    template = "{{.Store.GraphDriverName}}\n{{json .Store.GraphOptions}}"
    try:
        result = subprocess.run(
            [podman, "info", "--format", template],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_storage_info(result.stdout) if result.returncode == 0 else None


def _podman_version() -> str | None:
    podman = _find_program("podman")
    if podman is None:
        return None
    try:
        result = subprocess.run(
            [podman, "--version"], capture_output=True, text=True, timeout=15, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\d+\.\d+(\.\d+)?\S*", result.stdout)
    return match.group(0) if result.returncode == 0 and match else None
