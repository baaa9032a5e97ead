"""The disk helper runs as root for any member of the group kapsis: what it accepts from them.

Its arguments are hostile input (a user may call it by hand through sudo): ids not paths, sizes
in bounds, SUDO_UID as sudo sets it, and room counted with every disk's unwritten part taken.
The real mkfs and mount are run by tests/integration/test_rootless_disk.py; here they are
recorded, so the accounting and the refusals are checked without privileges.
"""

from __future__ import annotations

import os
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
    """What statvfs says is free on the helper's filesystem, settable by the test."""
    state = SimpleNamespace(bytes=10 * 1024 * MIB)
    monkeypatch.setattr(
        disk_helper.os, "statvfs", lambda path: SimpleNamespace(f_bavail=state.bytes, f_frsize=1)
    )
    return state


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """mkfs and mount recorded, not run; the mount leaves the lost+found mkfs would make."""
    calls: list[list[str]] = []

    def run_tool(argv: list[str], what: str) -> None:
        calls.append(argv)
        if argv[0] == "mount":
            (Path(argv[-1]) / "lost+found").mkdir()

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
    mkfs, mount = made
    assert mkfs[0] == "mkfs.ext4" and "root_owner=0:0" in mkfs[mkfs.index("-E") + 1]
    assert mount == ["mount", "-o", "loop,nosuid,nodev", str(image), str(target)]
    assert not (target / "lost+found").exists()


@root_only
def test_the_other_disks_unwritten_parts_count_as_taken(
    state: Path, free: SimpleNamespace, made: list[list[str]]
) -> None:
    """Another user's sparse 6 GiB disk may still fill: a new one gets what is left after it."""
    free.bytes = 8 * 1024 * MIB
    sparse_image(state, 4242, "theirs", 6 * 1024 * MIB)

    disk_helper.make(state, 0, "mine", 10 * 1024 * MIB)

    left = 2 * 1024 * MIB - disk_helper.RESERVE
    assert (disk_helper.images_dir(state, 0) / "mine.img").stat().st_size == left


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
