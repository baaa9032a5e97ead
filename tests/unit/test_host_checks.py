"""Host checks and the image builder's host-side logic, on fake inputs.

The checks are pure functions of text read from /proc, /sys and /etc, so each one is fed the text
of a real host layout (the values below were copied from Debian 12 machines). The image builder is
run against fake ``debootstrap`` and ``podman`` programs, which prove the caching and the error
messages without root, a network or a container engine.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tarfile
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from kapsis.errors import HostUnsupportedError, SandboxError
from kapsis.host import checks, host_parsing, image, requirements
from kapsis.host.host_parsing import CgroupLayout
from kapsis.host.requirements import Check

# /proc/self/mounts (cgroup lines) of the three layouts.
HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
HYBRID_WITH_HUGETLB = HYBRID_MOUNTS + (
    "cgroup /sys/fs/cgroup/hugetlb cgroup rw,relatime,hugetlb 0 0\n"
)
V2_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n"
LEGACY_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
"""
PROC_CGROUPS = """\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpu\t1\t5\t1
memory\t4\t64\t1
net_cls\t0\t6\t1
hugetlb\t0\t5\t1
pids\t8\t5\t1
"""
# CapEff of a root session without CAP_SYS_RESOURCE (bit 24), and of a full root session.
STATUS_NO_SYS_RESOURCE = "Name:\tbash\nCapInh:\t0000000000000000\nCapEff:\t000001fffeffffff\n"
STATUS_FULL_ROOT = "Name:\tbash\nCapEff:\t000001ffffffffff\n"


# --- cgroups ----------------------------------------------------------------------------------


def test_cgroup_layout_hybrid() -> None:
    layout = host_parsing.cgroup_layout(HYBRID_MOUNTS)
    assert layout.version == 1
    assert layout.hybrid
    assert layout.v1_controllers == {"cpu", "cpuacct", "memory", "pids"}


def test_cgroup_layout_v2_and_legacy() -> None:
    assert host_parsing.cgroup_layout(V2_MOUNTS) == CgroupLayout(2, False, frozenset())
    legacy = host_parsing.cgroup_layout(LEGACY_MOUNTS)
    assert (legacy.version, legacy.hybrid) == (1, False)
    assert legacy.v1_controllers == {"cpu", "cpuacct", "memory"}


def test_hybrid_blockers_from_the_v2_controllers_file() -> None:
    layout = host_parsing.cgroup_layout(HYBRID_MOUNTS)
    assert host_parsing.hybrid_blockers(layout, "hugetlb\n", PROC_CGROUPS) == ["hugetlb"]
    assert host_parsing.hybrid_blockers(layout, "\n", PROC_CGROUPS) == []
    mounted = host_parsing.cgroup_layout(HYBRID_WITH_HUGETLB)
    assert host_parsing.hybrid_blockers(mounted, "", PROC_CGROUPS) == []


def test_hybrid_blockers_fall_back_to_proc_cgroups() -> None:
    layout = host_parsing.cgroup_layout(HYBRID_MOUNTS)
    assert host_parsing.hybrid_blockers(layout, None, PROC_CGROUPS) == ["hugetlb"]
    mounted = host_parsing.cgroup_layout(HYBRID_WITH_HUGETLB)
    assert host_parsing.hybrid_blockers(mounted, None, PROC_CGROUPS) == []
    assert (
        host_parsing.hybrid_blockers(host_parsing.cgroup_layout(V2_MOUNTS), "hugetlb", PROC_CGROUPS)
        == []
    )


def test_hybrid_check_fails_only_for_crun_and_gives_the_mount_command() -> None:
    layout = host_parsing.cgroup_layout(HYBRID_MOUNTS)
    failing = requirements.check_hybrid("crun", layout, ["hugetlb"])
    assert not failing.ok and failing.required
    assert failing.fix == (
        "mkdir -p /sys/fs/cgroup/hugetlb"
        " && mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb"
    )
    with_sudo = requirements.check_hybrid("crun", layout, ["hugetlb"], sudo="sudo ").fix
    assert with_sudo and with_sudo.startswith("sudo mkdir")
    assert requirements.check_hybrid("runc", layout, ["hugetlb"]).ok
    assert requirements.check_hybrid("crun", layout, []).ok
    assert requirements.check_hybrid("crun", host_parsing.cgroup_layout(V2_MOUNTS), ["hugetlb"]).ok


def test_limits_rootless_cgroup_v1_are_not_enforced_and_say_so() -> None:
    check = requirements.check_limits(rootless=True, cgroup_version=1, delegated=None)
    assert not check.ok
    assert not check.required
    assert "NOT enforced" in check.detail
    assert check.fix
    assert requirements.check_limits(rootless=False, cgroup_version=1, delegated=None).ok
    assert requirements.check_limits(rootless=True, cgroup_version=2, delegated=None).ok


def test_limits_rootless_cgroup_v2_need_delegated_controllers() -> None:
    partial = requirements.check_limits(True, 2, frozenset({"cpu", "pids"}))
    assert not partial.ok and "memory" in partial.detail and partial.fix
    full = requirements.check_limits(True, 2, frozenset({"cpu", "cpuset", "io", "memory", "pids"}))
    assert full.ok


# --- the nofile ulimit ------------------------------------------------------------------------


def test_configured_nofile_reads_the_last_file_that_sets_default_ulimits() -> None:
    base = '[containers]\ndefault_ulimits = [\n  "nofile=1048576:1048576",\n]\n'
    override = '[containers]\ndefault_ulimits = ["nproc=32768:32768", "nofile=20000:20000"]\n'
    unrelated = '[engine]\nruntime = "crun"\n'
    assert host_parsing.configured_nofile([base]) == 1048576
    assert host_parsing.configured_nofile([base, override, unrelated]) == 20000
    assert host_parsing.configured_nofile([unrelated]) is None
    assert host_parsing.configured_nofile(["[containers]\ndefault_ulimits = []\n"]) is None
    assert host_parsing.configured_nofile(["this is = = not toml", override]) == 20000
    assert (
        host_parsing.configured_nofile(['[containers]\ndefault_ulimits = ["nofile=4096"]\n'])
        == 4096
    )


def test_nofile_check_fails_on_a_low_hard_limit_without_config() -> None:
    can_raise = host_parsing.has_capability(STATUS_NO_SYS_RESOURCE, checks.CAP_SYS_RESOURCE)
    assert can_raise is False
    check = requirements.check_nofile(False, 20000, can_raise, None)
    assert not check.ok and check.required
    assert "RLIMIT_NOFILE" in check.detail
    assert check.fix and "nofile=20000:20000" in check.fix


def test_nofile_check_passes_when_fixed_or_not_needed() -> None:
    assert requirements.check_nofile(False, 20000, False, 20000).ok
    assert not requirements.check_nofile(False, 20000, False, 1048576).ok, "above the hard limit"
    assert requirements.check_nofile(False, 1048576, False, None).ok
    assert requirements.check_nofile(False, 20000, True, None).ok, "CAP_SYS_RESOURCE can raise it"
    rootless = requirements.check_nofile(True, 1024, False, None)
    assert rootless.ok, "rootless keeps the session limits"
    assert host_parsing.has_capability(STATUS_FULL_ROOT, checks.CAP_SYS_RESOURCE)
    assert not host_parsing.has_capability("Name:\tbash\n", checks.CAP_SYS_RESOURCE)


def test_the_nofile_fix_writes_a_file_that_the_check_accepts(tmp_path: Path) -> None:
    fix = requirements.check_nofile(False, 20000, False, None).fix
    assert fix is not None
    command = fix.replace("/etc/containers", str(tmp_path))
    subprocess.run(["sh", "-c", command], check=True)
    files = checks.containers_conf_files(rootless=False, etc=tmp_path, usr=tmp_path / "none")
    assert files[-1] == tmp_path / "containers.conf.d" / "kapsis.conf"
    texts = [f.read_text() for f in files if f.exists()]
    assert requirements.check_nofile(False, 20000, False, host_parsing.configured_nofile(texts)).ok


def test_containers_conf_files_are_in_podman_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONTAINERS_CONF", raising=False)
    etc, usr, home = tmp_path / "etc", tmp_path / "usr", tmp_path / "home"
    (etc / "containers.conf.d").mkdir(parents=True)
    for name in ("b.conf", "a.conf", "ignored.txt"):
        (etc / "containers.conf.d" / name).write_text("")
    rootful = checks.containers_conf_files(rootless=False, etc=etc, usr=usr, home=home)
    assert rootful == [
        usr / "containers.conf",
        etc / "containers.conf",
        etc / "containers.conf.d" / "a.conf",
        etc / "containers.conf.d" / "b.conf",
    ]
    rootless = checks.containers_conf_files(rootless=True, etc=etc, usr=usr, home=home)
    assert rootless[-1] == home / ".config" / "containers" / "containers.conf"
    monkeypatch.setenv("CONTAINERS_CONF", "/x/only.conf")
    assert checks.containers_conf_files(rootless=False, etc=etc) == [Path("/x/only.conf")]


def test_runtime_is_the_configured_one_else_crun_else_runc() -> None:
    def only(*names: str) -> Any:
        return lambda name: f"/usr/bin/{name}" if name in names else None

    conf = '[engine]\nruntime = "runc"\n'
    assert host_parsing.configured_runtime([conf]) == "runc"
    assert host_parsing.pick_runtime("runc", only("crun", "runc")) == "runc"
    assert host_parsing.pick_runtime(None, only("crun", "runc")) == "crun"
    assert host_parsing.pick_runtime(None, only("runc")) == "runc"
    assert host_parsing.pick_runtime(None, only()) is None
    assert not requirements.check_runtime(None, None).ok
    assert requirements.check_runtime("runc", None).fix == "apt-get install runc"


# --- rootless ---------------------------------------------------------------------------------


def test_subid_ranges_by_name_or_uid() -> None:
    text = "containers:200000:1000000\nalice:100000:65536\n1001:300000:65536\nbad:line\n"
    assert host_parsing.subid_ranges(text, "alice", 1000) == [(100000, 65536)]
    assert host_parsing.subid_ranges(text, "bob", 1001) == [(300000, 65536)]
    assert requirements.check_subids("/etc/subuid", text, "alice", 1000).ok
    small = requirements.check_subids("/etc/subuid", "alice:100000:1000\n", "alice", 1000)
    assert not small.ok and "1000" in small.detail
    missing = requirements.check_subids("/etc/subgid", text, "carol", 1002)
    assert not missing.ok
    assert missing.fix == (
        "sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 carol"
    )


def test_device_check(tmp_path: Path) -> None:
    assert not requirements.check_device(str(tmp_path / "nope"), "x", "modprobe fuse").ok
    device = tmp_path / "dev"
    device.write_text("")
    assert requirements.check_device(str(device), "x", "modprobe fuse").ok
    if os.geteuid() != 0:  # root can open anything, so the mode only matters to other users
        device.chmod(0)
        locked = requirements.check_device(str(device), "x", "modprobe fuse")
        assert not locked.ok and locked.fix == f"sudo chmod 666 {device}"


# --- kernel, image, AppArmor, podman ----------------------------------------------------------


def test_parse_version() -> None:
    assert host_parsing.parse_version("6.18.44-fc-v657") == (6, 18, 44)
    assert host_parsing.parse_version("5.10.0-28-amd64") == (5, 10, 0)
    assert host_parsing.parse_version("4.3") == (4, 3)
    assert host_parsing.parse_version("garbage") == (0, 0)


def test_idmapped_mounts_need_linux_5_19() -> None:
    assert requirements.check_idmapped("6.1.0-18-amd64", required=True).ok
    assert requirements.check_idmapped("5.19.0", required=True).ok
    old = requirements.check_idmapped("5.15.0-91-generic", required=True)
    assert not old.ok and old.required and old.fix and "5.19" in old.detail
    assert not requirements.check_idmapped("5.15.0", required=False).required


def test_overlay_check() -> None:
    assert requirements.check_overlay("nodev\tsysfs\nnodev\toverlay\n", False).ok
    assert requirements.check_overlay("nodev\tsysfs\n", True).ok
    missing = requirements.check_overlay("nodev\tsysfs\n", False)
    assert not missing.ok and missing.fix == "modprobe overlay"


def test_image_and_debootstrap_checks() -> None:
    missing = requirements.check_image("localhost/kapsis-base:latest", False)
    assert not missing.ok and missing.fix == "kapsis setup --build"
    assert requirements.check_image("x", True).ok
    assert not requirements.check_debootstrap(None, needed=True).ok
    assert requirements.check_debootstrap(None, needed=True).required
    assert not requirements.check_debootstrap(None, needed=False).required


def test_apparmor_is_informational() -> None:
    absent = requirements.check_apparmor(False)
    assert absent.ok and not absent.required
    assert absent.detail == "not available: paranoid profile will refuse to start"
    assert requirements.check_apparmor(True).ok


def test_podman_check() -> None:
    assert requirements.check_podman("4.3.1").ok
    assert not requirements.check_podman(None).ok
    old = requirements.check_podman("3.4.4")
    assert not old.ok and old.fix


def test_every_failing_check_has_a_fix() -> None:
    hybrid = host_parsing.cgroup_layout(HYBRID_MOUNTS)
    failing = [
        requirements.check_podman(None),
        requirements.check_runtime(None, None),
        requirements.check_subids("/etc/subuid", "", "alice", 1000),
        requirements.check_device("/nonexistent/dev/fuse", "fuse-overlayfs", "modprobe fuse"),
        requirements.check_runtime_dir(None, 1000, "alice"),
        requirements.check_storage(host_parsing.StorageDriver("vfs"), rootless=True),
        requirements.check_storage(host_parsing.StorageDriver("vfs"), rootless=False),
        requirements.check_storage(None, rootless=True),
        requirements.check_limits(True, 1, None),
        requirements.check_nofile(False, 20000, False, None),
        requirements.check_hybrid("crun", hybrid, ["hugetlb"]),
        requirements.check_overlay("", False),
        requirements.check_idmapped("5.10.0", required=True),
        requirements.check_debootstrap(None, needed=True),
        requirements.check_image("img", False),
    ]
    for check in failing:
        assert not check.ok, check
        assert check.fix, f"{check.name} fails without a fix"


def test_checks_as_json_ignores_informational_failures() -> None:
    passing = Check("podman", True, "podman 4.3.1")
    warning = Check("resource limits", False, "NOT enforced", "run as root", required=False)
    failing = Check("base image", False, "missing", "kapsis setup --build")
    report = checks.checks_as_json([passing, warning], "img")
    assert report["ok"] is True
    assert report["image"] == "img"
    assert report["checks"][1] == {
        "name": "resource limits",
        "ok": False,
        "detail": "NOT enforced",
        "fix": "run as root",
        "required": False,
    }
    assert checks.checks_as_json([passing, warning, failing], "img")["ok"] is False


def test_run_checks_on_this_host_is_fast_and_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    real_run = subprocess.run

    def counting_run(args: list[str], *rest: Any, **kwargs: Any) -> Any:
        calls.append(list(args))
        return real_run(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "run", counting_run)
    started = time.monotonic()
    result = checks.run_checks("localhost/kapsis-no-such-image:never")
    elapsed = time.monotonic() - started
    # podman --version, podman info (storage), podman image exists (base, gateway), one podman
    # image inspect (agents)
    assert len(calls) <= 5, calls
    assert elapsed < 5
    names = [check.name for check in result]
    assert len(names) == len(set(names))
    for expected in (
        "podman",
        "OCI runtime",
        "cgroup",
        "resource limits",
        "nofile ulimit",
        "cgroup hybrid mode",
        "overlayfs",
        "storage driver",
        "idmapped mounts",
        "debootstrap",
        "agent images",
        "base image",
        "AppArmor",
    ):
        assert expected in names
    image_check = next(check for check in result if check.name == "base image")
    assert not image_check.ok and image_check.fix == "kapsis setup --build"
    assert all(check.fix for check in result if not check.ok)


# --- the image builder: mirror choice -----------------------------------------------------------

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_mirror_from_deb822_sources() -> None:
    entries = image.parse_deb822_sources(DEB822)
    assert entries == [
        ("http://deb.debian.org/debian", ["bookworm", "bookworm-updates"]),
        ("http://deb.debian.org/debian-security", ["bookworm-security"]),
    ]
    assert image.pick_mirror(entries) == "http://deb.debian.org/debian"
    disabled = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\nEnabled: no\n"
    assert image.parse_deb822_sources(disabled) == []


def test_mirror_from_one_line_sources() -> None:
    text = (
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb http://security.debian.org/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://ftp.de.debian.org/debian/ "
        "bookworm main contrib\n"
    )
    entries = image.parse_one_line_sources(text)
    assert [uri for uri, _ in entries] == [
        "http://security.debian.org/debian-security",
        "http://ftp.de.debian.org/debian/",
    ]
    assert image.pick_mirror(entries) == "http://ftp.de.debian.org/debian"


def test_mirror_choice_rules() -> None:
    ubuntu = [("http://archive.ubuntu.com/ubuntu", ["jammy"])]
    assert image.pick_mirror(ubuntu) == image.DEFAULT_MIRROR
    trixie = [("http://mirror.example/debian/", ["trixie"])]
    assert image.pick_mirror(trixie) == "http://mirror.example/debian"
    snapshot = [("http://snapshot.debian.org/archive/debian/20250520T000000Z", ["bookworm"])]
    assert image.pick_mirror(snapshot) == snapshot[0][0]
    assert image.pick_mirror([("cdrom:[Debian]/", ["bookworm"])]) == image.DEFAULT_MIRROR
    assert image.pick_mirror([]) == image.DEFAULT_MIRROR


def test_debian_mirror_reads_files_and_honours_the_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(image.MIRROR_ENV, raising=False)
    sources = tmp_path / "debian.sources"
    sources.write_text(DEB822.replace("deb.debian.org", "mirror.local"))
    assert image.debian_mirror(tmp_path / "missing.list", sources) == "http://mirror.local/debian"
    assert image.debian_mirror(tmp_path / "a", tmp_path / "b") == image.DEFAULT_MIRROR
    monkeypatch.setenv(image.MIRROR_ENV, "http://override.example/debian")
    assert image.debian_mirror(tmp_path / "a", sources) == "http://override.example/debian"


# --- the image builder against fake debootstrap and podman ------------------------------------

FAKE_DEBOOTSTRAP = """#!/bin/sh
echo "$@" >> "$FAKE_LOG/debootstrap"
target="$4"
mkdir -p "$target/etc" "$target/dev" "$target/proc" "$target/usr/bin" "$target/var/lib/apt/lists"
echo rootfs > "$target/etc/hostname"
echo device > "$target/dev/console"
echo list > "$target/var/lib/apt/lists/Packages"
"""

FAKE_PODMAN = """#!/bin/sh
echo "$@" >> "$FAKE_LOG/podman"
case "$1" in
  unshare) shift; exec "$@" ;;
  image) exit "${FAKE_EXISTS:-1}" ;;
  import) cp "$2" "$FAKE_LOG/imported.tar" ;;
  build)
    if [ -n "$FAKE_BUILD_ERROR" ]; then echo "$FAKE_BUILD_ERROR" >&2; exit 125; fi
    for arg in "$@"; do last="$arg"; done
    cp "$last/Containerfile" "$FAKE_LOG/Containerfile" ;;
esac
"""


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH whose debootstrap and podman are fakes that log their arguments to the returned
    directory; tar and sh are the real ones."""
    bin_dir, log = tmp_path / "fakebin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("debootstrap", FAKE_DEBOOTSTRAP), ("podman", FAKE_PODMAN)):
        program = bin_dir / name
        program.write_text(text)
        program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setattr(image, "_SBIN_DIRS", ())
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv(image.MIRROR_ENV, raising=False)
    return log


def test_build_caches_the_rootfs_and_skips_debootstrap_the_second_time(
    fakes: Path, kapsis_home: Path
) -> None:
    lines: list[str] = []
    image.build_base_image("localhost/kapsis-unit:test", progress=lines.append)

    tarballs = list((kapsis_home / "cache").glob("rootfs-bookworm-*.tar"))
    assert len(tarballs) == 1
    debootstrap_args = (fakes / "debootstrap").read_text().split()
    assert debootstrap_args[:2] == [
        "--variant=minbase",
        "--include=git,bash,coreutils,python3,ca-certificates,openssh-client",
    ]
    assert debootstrap_args[2] == "bookworm"
    with tarfile.open(fakes / "imported.tar") as archive:
        names = set(archive.getnames())
    assert "./etc/hostname" in names and "./dev" in names
    assert "./dev/console" not in names, "/dev comes from the runtime"
    assert "./var/lib/apt/lists/Packages" not in names
    containerfile = (fakes / "Containerfile").read_text()
    assert "useradd --uid 1000 --gid 1000 --home-dir /home/agent" in containerfile
    assert "io.kapsis.image" in containerfile
    assert not any(line.startswith("USER") for line in containerfile.splitlines())
    build = next(
        line for line in (fakes / "podman").read_text().splitlines() if line.startswith("build")
    )
    assert "-t localhost/kapsis-unit:test" in build
    assert f"KAPSIS_VERSION={image.kapsis_version()}" in build
    assert "--pull=never" in build
    assert any("debootstrap" in line for line in lines)
    assert not [p for p in (kapsis_home / "cache").iterdir() if p.name.startswith("debootstrap-")]

    lines.clear()
    image.build_base_image("localhost/kapsis-unit:test", progress=lines.append)
    assert len((fakes / "debootstrap").read_text().splitlines()) == 1, "debootstrap ran again"
    assert any("cached root filesystem" in line for line in lines)


def test_build_reuses_an_imported_rootfs(
    fakes: Path, kapsis_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_EXISTS", "0")
    image.build_base_image("localhost/kapsis-unit:test")
    podman_calls = (fakes / "podman").read_text().splitlines()
    assert not (fakes / "debootstrap").exists()
    assert not any(call.startswith("import") for call in podman_calls)
    assert any(call.startswith("build") for call in podman_calls)


def test_build_without_debootstrap_says_how_to_install_it(fakes: Path) -> None:
    (fakes.parent / "fakebin" / "debootstrap").unlink()
    with pytest.raises(HostUnsupportedError, match="apt-get install debootstrap"):
        image.build_base_image("localhost/kapsis-unit:test")


def test_build_without_podman_says_how_to_install_it(
    fakes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (fakes.parent / "fakebin" / "podman").unlink()
    monkeypatch.setenv("PATH", str(fakes.parent / "fakebin"))
    with pytest.raises(HostUnsupportedError, match="podman is not installed; install podman"):
        image.build_base_image("localhost/kapsis-unit:test")


def test_rootless_build_runs_debootstrap_and_tar_in_the_podman_user_namespace(
    fakes: Path, kapsis_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    image.build_base_image("localhost/kapsis-unit:test")
    unshared = [
        line.split()[1:4]
        for line in (fakes / "podman").read_text().splitlines()
        if line.startswith("unshare")
    ]
    assert unshared[0][:2] == ["env", "container=lxc"]
    assert unshared[0][2].endswith("/debootstrap")
    assert unshared[1][0] == "tar"
    assert unshared[2][:3] == ["rm", "-rf", "--one-file-system"]
    assert len(list((kapsis_home / "cache").glob("rootfs-bookworm-*.tar"))) == 1
    assert not [p for p in (kapsis_home / "cache").iterdir() if p.name.startswith("debootstrap-")]


def test_failed_debootstrap_is_one_line_with_a_fix(fakes: Path, kapsis_home: Path) -> None:
    failing = fakes.parent / "fakebin" / "debootstrap"
    failing.write_text("#!/bin/sh\necho 'E: Failed getting release file' >&2\nexit 1\n")
    with pytest.raises(SandboxError) as raised:
        image.build_base_image("localhost/kapsis-unit:test")
    message = str(raised.value)
    assert "\n" not in message
    assert "Failed getting release file" in message and image.MIRROR_ENV in message
    log = kapsis_home / "cache" / "debootstrap.log"
    assert str(log) in message
    assert "Failed getting release file" in log.read_text()
    assert not list((kapsis_home / "cache").glob("rootfs-*")), "no half-made tarball is kept"
    assert not [p for p in (kapsis_home / "cache").iterdir() if p.name.startswith("debootstrap-")]


@pytest.mark.parametrize(
    ("error", "hint"),
    [
        (
            "Error: crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted: "
            "OCI permission denied",
            "default_ulimits",
        ),
        (
            "crun: cgroups in hybrid mode not supported, drop all controllers from cgroupv2",
            "mount -t cgroup -o hugetlb",
        ),
        ("Error: something else", "run `kapsis setup --build` again"),
    ],
)
def test_failed_podman_build_names_the_fix(
    fakes: Path, monkeypatch: pytest.MonkeyPatch, error: str, hint: str
) -> None:
    monkeypatch.setenv("FAKE_EXISTS", "0")
    monkeypatch.setenv("FAKE_BUILD_ERROR", error)
    with pytest.raises(SandboxError) as raised:
        image.build_base_image("localhost/kapsis-unit:test")
    assert not isinstance(raised.value, HostUnsupportedError)
    assert hint in str(raised.value)
    assert "\n" not in str(raised.value)


def test_debootstrap_path_gets_sbin_for_chroot() -> None:
    assert image._with_sbin("/usr/bin:/bin") == "/usr/bin:/bin:/usr/sbin:/sbin"
    assert image._with_sbin("/usr/sbin:/usr/bin") == "/usr/sbin:/usr/bin:/sbin"
    assert image._with_sbin("") == "/usr/sbin:/sbin"


def test_rootfs_key_changes_with_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    key = image.rootfs_key()
    assert key == image.rootfs_key()
    monkeypatch.setattr(image, "INCLUDE", (*image.INCLUDE, "curl"))
    assert image.rootfs_key() != key


def test_agent_images_are_reported_with_their_cli_versions_and_the_fix_for_missing_ones():
    from kapsis.host.agent_images import ImageInfo

    present = ImageInfo("localhost/kapsis-agent-claude:latest", True, "claude", "2.1.332")
    missing = ImageInfo("localhost/kapsis-agent-codex:latest", False)
    check = requirements.check_agent_images({"claude": present, "codex": missing})
    assert not check.ok and not check.required  # informational: shell runs need none
    assert "claude 2.1.332" in check.detail and "missing: codex" in check.detail
    assert check.fix == "kapsis setup --agents codex"
    complete = requirements.check_agent_images({"claude": present})
    assert complete.ok and complete.fix is None


# --- rootless set-up: storage driver, /dev/fuse, runtime dir ----------------------------------

PODMAN_INFO_NATIVE = "overlay\n{}\n"
PODMAN_INFO_FUSE = (
    'overlay\n{"overlay.mount_program":{"Executable":"/usr/bin/fuse-overlayfs",'
    '"Package":"fuse-overlayfs_1.10-1_amd64","Version":"fuse-overlayfs: version 1.10"}}\n'
)


def test_podman_info_tells_native_overlay_from_fuse_overlayfs() -> None:
    assert host_parsing.parse_storage_info(PODMAN_INFO_NATIVE) == host_parsing.StorageDriver(
        "overlay"
    )
    fuse = host_parsing.parse_storage_info(PODMAN_INFO_FUSE)
    assert fuse == host_parsing.StorageDriver("overlay", "/usr/bin/fuse-overlayfs")
    assert host_parsing.parse_storage_info("vfs\n{}\n") == host_parsing.StorageDriver("vfs")
    assert host_parsing.parse_storage_info("") is None
    assert host_parsing.parse_storage_info("overlay\nnot json") == host_parsing.StorageDriver(
        "overlay"
    )


def test_vfs_storage_is_an_error_whose_fix_sets_overlay_and_resets() -> None:
    vfs = requirements.check_storage(host_parsing.StorageDriver("vfs"), rootless=True)
    assert not vfs.ok and vfs.required
    assert vfs.fix is not None
    assert "~/.config/containers/storage.conf" in vfs.fix
    assert 'driver = "overlay"' in vfs.fix
    assert "podman system reset" in vfs.fix
    native = requirements.check_storage(host_parsing.StorageDriver("overlay"), rootless=True)
    assert native.ok and native.detail == "overlay (native)"
    fuse = requirements.check_storage(
        host_parsing.StorageDriver("overlay", "/usr/bin/fuse-overlayfs"), rootless=True
    )
    assert fuse.ok and "fuse-overlayfs" in fuse.detail
    assert not requirements.check_storage(None, rootless=True).ok


def test_the_storage_fix_is_a_command_that_writes_overlay(tmp_path: Path) -> None:
    """The fix's first two steps, run in a scratch HOME, leave a storage.conf naming overlay."""
    fix = requirements.check_storage(host_parsing.StorageDriver("vfs"), rootless=True).fix
    assert fix is not None
    steps = fix.split(" && podman system reset")[0]
    subprocess.run(["sh", "-c", steps], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                   check=True)  # fmt: skip
    written = (tmp_path / ".config/containers/storage.conf").read_text()
    assert tomllib.loads(written) == {"storage": {"driver": "overlay"}}


def test_dev_fuse_is_required_only_by_fuse_overlayfs(monkeypatch: pytest.MonkeyPatch) -> None:
    def locked(device: str, *_: str) -> requirements.Check:
        return requirements.Check(device, False, "locked", "fix")

    monkeypatch.setattr(requirements, "check_device", locked)
    native = requirements.check_fuse(host_parsing.StorageDriver("overlay"))
    assert not native.required and "not needed" in native.detail
    fuse = requirements.check_fuse(host_parsing.StorageDriver("overlay", "/usr/bin/fuse-overlayfs"))
    assert fuse.required and not fuse.ok
    assert requirements.check_fuse(None).required  # unknown driver: the device may be needed


def test_runtime_dir_must_exist_and_be_the_users_and_the_fix_needs_no_systemd(
    tmp_path: Path,
) -> None:
    uid = os.getuid()
    missing = requirements.check_runtime_dir(str(tmp_path / "nope"), uid, "alice")
    assert not missing.ok and missing.fix is not None
    assert missing.fix.startswith(f"sudo install -d -m 700 -o alice /run/user/{uid} && export")
    assert not requirements.check_runtime_dir(str(tmp_path), uid + 1, "alice").ok  # not theirs
    assert requirements.check_runtime_dir(str(tmp_path), uid, "alice").ok


def test_disk_quota_rootless_says_whether_the_disk_helper_serves_and_why_not() -> None:
    served = requirements.check_disk_helper(None)
    assert served.ok and not served.required and "disk helper" in served.detail
    gap = requirements.check_disk_helper("you are not in the group kapsis (sudo usermod -aG ...)")
    assert not gap.ok and not gap.required
    assert gap.detail.startswith("NOT enforced: you are not in the group kapsis")
