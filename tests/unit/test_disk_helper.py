"""The disk helper runs as root for any member of the group kapsis: what it accepts from them.

Its arguments are hostile input (a user may call it by hand through sudo): ids not paths, sizes
in bounds, SUDO_UID as sudo sets it, and room counted with every disk's unwritten part taken.
The real mkfs and mount are run by tests/integration/test_rootless_disk.py; here they are
recorded, so the accounting and the refusals are checked without privileges.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from kapsis.workspace import disk_helper
from kapsis.workspace.disk_helper import HelperError

MIB = 1024**2
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="the helper's dirs must be root's")


@pytest.mark.parametrize("text", ["a", "agent-1", "0" * 32])
def test_agent_ids_are_names(text: str) -> None:
    assert disk_helper.parse_agent_id(text) == text


@pytest.mark.parametrize(
    "text", ["", "../x", "a/b", "A", "-a", "a" * 33, "a\n", ".", "a b", "\u0430", "x\x00"]
)
def test_anything_else_is_refused_as_a_usage_error(text: str) -> None:
    with pytest.raises(HelperError) as refused:
        disk_helper.parse_agent_id(text)
    assert refused.value.code == 2


@pytest.mark.parametrize(
    "text",
    ["", "-1", "+67108864", "67108864 ", "1e9", "0x4000000", "\u0666" * 9, "9" * 17, "1024",
     str(disk_helper.MAX_BYTES + 1)],
)  # fmt: skip
def test_sizes_are_plain_numbers_in_bounds(text: str) -> None:
    with pytest.raises(HelperError) as refused:
        disk_helper.parse_bytes(text)
    assert refused.value.code == 2


def test_a_size_in_bounds_is_taken() -> None:
    assert disk_helper.parse_bytes(str(64 * MIB)) == 64 * MIB


@pytest.mark.parametrize("environ", [{}, {"SUDO_UID": ""}, {"SUDO_UID": "-1"}, {"SUDO_UID": "1 "}])
def test_the_caller_is_who_sudo_says(environ: dict[str, str]) -> None:
    with pytest.raises(HelperError):
        disk_helper.caller_uid(environ)
    assert disk_helper.caller_uid({"SUDO_UID": "1001"}) == 1001


def test_unwritten_bytes_are_what_sparse_files_may_still_take(tmp_path: Path) -> None:
    sparse = tmp_path / "a.img"
    with sparse.open("wb") as file:
        file.truncate(1024 * MIB)
        file.write(b"x" * 65536)
    held = sparse.stat().st_blocks * 512
    (tmp_path / "link.img").symlink_to(sparse)  # a link is not a disk: not counted twice
    (tmp_path / "dir.img").mkdir()
    found = [sparse, tmp_path / "link.img", tmp_path / "dir.img", tmp_path / "gone.img"]

    assert held >= 65536
    assert disk_helper.unwritten_bytes(found) == 1024 * MIB - held


@pytest.fixture
def free(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """What statvfs says is free on the helper's filesystem, settable by the test, and the
    loop devices in use (``loops``: (backing file, size) pairs)."""
    state = SimpleNamespace(bytes=10 * 1024 * MIB, loops=[])
    monkeypatch.setattr(
        disk_helper.os, "statvfs", lambda path: SimpleNamespace(f_bavail=state.bytes, f_frsize=1)
    )
    monkeypatch.setattr(disk_helper, "loop_devices", lambda: state.loops)
    return state


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """mkfs, debugfs and mount recorded, not run."""
    calls: list[list[str]] = []

    def run_tool(argv: list[str], what: str, stdin: str = "") -> None:
        calls.append([*argv, stdin] if stdin else argv)

    monkeypatch.setattr(disk_helper, "run_tool", run_tool)
    return calls


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o755)
    return path


def sparse_image(state: Path, uid: int, name: str, size: int) -> Path:
    folder = disk_helper.images_dir(state, uid)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    image = folder / f"{name}.img"
    with image.open("wb") as file:
        file.truncate(size)
    return image


@root_only
def test_a_disk_is_made_at_its_fixed_place_nosuid_nodev_owned_by_the_caller(
    state: Path, free: SimpleNamespace, made: list[list[str]]
) -> None:
    target = disk_helper.make(state, 0, "a1", 512 * MIB)

    assert target == disk_helper.mount_point(0, "a1", state)
    image = disk_helper.images_dir(state, 0) / "a1.img"
    assert image.stat().st_size == 512 * MIB and image.stat().st_mode & 0o777 == 0o600
    mkfs, debugfs, mount = made
    assert mkfs[0] == "mkfs.ext4" and "root_owner=0:0" in mkfs[mkfs.index("-E") + 1]
    # Its root closed (0700) and empty before the mount makes it reachable.
    assert debugfs[0] == "debugfs" and debugfs[-1] == "rmdir lost+found\nsif <2> mode 040700\n"
    assert mount == ["mount", "-t", "ext4", "-o", "loop,nosuid,nodev", str(image), str(target)]


@root_only
def test_the_other_disks_unwritten_parts_count_as_taken(
    state: Path, free: SimpleNamespace, made: list[list[str]]
) -> None:
    """Another user's sparse 6 GiB disk may still fill: a new one gets what is left after it."""
    free.bytes = 8 * 1024 * MIB
    sparse_image(state, 4242, "theirs", 6 * 1024 * MIB)

    free.loops = [("/elsewhere/deleted.img (deleted)", 512 * MIB)]  # a leaked one: all of it

    disk_helper.make(state, 0, "mine", 10 * 1024 * MIB)

    # What is left, of which one user's disks may promise at most half.
    left = 2 * 1024 * MIB - 512 * MIB - disk_helper.RESERVE
    assert (disk_helper.images_dir(state, 0) / "mine.img").stat().st_size == left // 2


@root_only
def test_one_user_cannot_promise_all_the_room_to_themselves(
    state: Path, free: SimpleNamespace, made: list[list[str]]
) -> None:
    free.bytes = 4 * 1024 * MIB + disk_helper.RESERVE
    disk_helper.make(state, 0, "one", 10 * 1024 * MIB)
    assert (disk_helper.images_dir(state, 0) / "one.img").stat().st_size == 2 * 1024 * MIB
    with pytest.raises(HelperError, match="at most half"):
        disk_helper.make(state, 0, "two", 10 * 1024 * MIB)
    # Another user still gets a share of what is left.
    assert disk_helper.room_for(state, 4242) == 1024 * MIB


@root_only
def test_a_disk_still_held_stays_counted_until_a_later_release(
    state: Path, free: SimpleNamespace, made: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process in it or a bind of it elsewhere keeps the loop device: deleting the file then
    would leave a disk nobody counts."""
    monkeypatch.setattr(disk_helper, "RELEASE_WAIT", 0.0)
    disk_helper.make(state, 0, "held", 64 * MIB)
    image = disk_helper.images_dir(state, 0) / "held.img"
    free.loops = [(str(image), 64 * MIB)]
    with pytest.raises(HelperError, match="still in use"):
        disk_helper.release(state, 0, "held")
    assert image.exists()
    free.loops = []
    disk_helper.release(state, 0, "held")
    assert not image.exists()


def test_mounts_are_read_from_the_kernels_list(tmp_path: Path) -> None:
    """Not from a stat of the path, which a FUSE mount its user put on top could refuse."""
    info = tmp_path / "mountinfo"
    info.write_text(
        "36 35 98:0 / /var/lib/kapsis-disks/mounts/1001/a rw - ext4 /dev/loop1 rw\n"
        "37 36 0:50 / /var/lib/kapsis-disks/mounts/1001/a rw - fuse.x x rw,user_id=1001\n"
        "38 35 98:0 / /tmp/with\\040space rw - ext4 /dev/loop2 rw\n"
    )
    assert disk_helper.mounted(Path("/var/lib/kapsis-disks/mounts/1001/a"), info) == 2
    assert disk_helper.mounted(Path("/tmp/with space"), info) == 1
    assert disk_helper.mounted(Path("/var/lib/kapsis-disks/mounts/1001"), info) == 0


@root_only
def test_no_room_is_refused_and_leaves_nothing(
    state: Path, free: SimpleNamespace, made: list[list[str]]
) -> None:
    free.bytes = 6 * 1024 * MIB
    sparse_image(state, 4242, "theirs", 6 * 1024 * MIB)

    with pytest.raises(HelperError, match="no room"):
        disk_helper.make(state, 0, "mine", 1024 * MIB)
    assert made == []
    assert list(disk_helper.images_dir(state, 0).iterdir()) == []
    assert not disk_helper.mount_point(0, "mine", state).exists()


@root_only
def test_a_caller_has_at_most_max_disks(
    state: Path, free: SimpleNamespace, made: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(disk_helper, "MAX_DISKS", 2)
    disk_helper.make(state, 0, "one", 64 * MIB)
    with pytest.raises(HelperError, match="has a disk already"):
        disk_helper.make(state, 0, "one", 64 * MIB)
    disk_helper.make(state, 0, "two", 64 * MIB)
    with pytest.raises(HelperError, match="the most there may be"):
        disk_helper.make(state, 0, "three", 64 * MIB)


@root_only
@pytest.mark.parametrize("kind", ["link", "group-writable"])
def test_a_state_dir_another_could_change_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "images"
    if kind == "link":
        (tmp_path / "elsewhere").mkdir()
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.mkdir()
        path.chmod(0o775)
    with pytest.raises(HelperError, match="root-owned directory"):
        disk_helper.private_dir(path, 0o700)


@root_only
def test_a_linked_user_dir_is_not_walked_for_images(state: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.img").write_bytes(b"")
    (state / "images").mkdir()
    (state / "images" / "77").symlink_to(elsewhere)
    assert disk_helper.all_images(state) == []


def test_main_refuses_other_commands_and_callers_not_from_sudo(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert disk_helper.main(["mount", "/dev/sda", "/mnt"], {"SUDO_UID": "0"}, state) == 2
    assert disk_helper.main(["list"], {}, state) == 2
    assert disk_helper.main(["release", "../../etc"], {"SUDO_UID": "0"}, state) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and all(line.startswith("kapsis-disk: ") for line in errors)


@root_only
def test_what_sudo_hands_over_from_the_caller_cannot_stop_or_starve_the_helper() -> None:
    """A stop signal while the lock is held would block every user; a tiny file size limit
    would make root's writes fail half-way."""
    probe = (
        "import os, resource, signal, sys\n"
        f"sys.path.insert(0, {str(Path(disk_helper.__file__).parent)!r})\n"
        "import disk_helper\n"
        "disk_helper.harden_process()\n"
        "os.kill(os.getpid(), signal.SIGTSTP)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)\n"
        "print(soft == hard, os.getpriority(os.PRIO_PROCESS, 0))\n"
    )

    def as_a_caller_would() -> None:
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        os.nice(10)

    done = subprocess.run(
        [sys.executable, "-I", "-B", "-c", probe], capture_output=True, text=True, timeout=30,
        preexec_fn=as_a_caller_would,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    raised, nice = done.stdout.split()
    assert raised == "True"
    # Lowering the niceness back needs CAP_SYS_NICE, which this host's root may lack.
    assert nice == "0" or not _may_renice()


def _may_renice() -> bool:
    status = Path("/proc/self/status").read_text()
    effective = int(
        next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16
    )
    return bool(effective & (1 << 23))  # CAP_SYS_NICE
