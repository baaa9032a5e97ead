"""Faults on the host's side of a run: the repository's disk full while the work is saved, the
agent out of memory, an agent that goes quiet. Each ends with a final status, an audit chain that
verifies, no commit half-made or lost, and no pod left behind."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .kapsis_runner import Kapsis
from .repos import git, one_commit_repository

pytestmark = pytest.mark.integration


def _no_pod(agent_id: str) -> bool:
    return subprocess.run(["podman", "pod", "exists", f"kapsis-{agent_id}"]).returncode != 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB filesystem of the test's own for the user's repository."""
    image, mount = tmp_path / "small.img", tmp_path / "small"
    mount.mkdir()
    with image.open("wb") as handle:
        handle.truncate(48 * 1024**2)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


BIG_WORK = "head -c 64000000 /dev/urandom > /workspace/big.bin && echo small > /workspace/small.txt"


def test_the_repositorys_disk_full_while_saving_loses_nothing(
    kapsis: Kapsis, small_disk: Path, tmp_path: Path
) -> None:
    project = one_commit_repository(small_disk / "project")
    start = git(project, "rev-parse", "HEAD")
    config = tmp_path / "big.yaml"
    config.write_text("git:\n  max_file_size: 1g\nresources:\n  disk: 1g\n")

    result = kapsis.run(
        project, BIG_WORK, "--network-mode", "none", "--config", str(config), "--json",
        "--agent-id", "full1",
    )  # fmt: skip

    assert result.returncode == 8, result.stderr  # COMMIT_FAILED
    record = kapsis.status("full1")
    assert record["phase"] == "failed" and record["error_type"] == "commit_failed"
    assert "no space left on the repository's disk" in record["message"]
    assert "\n" not in record["message"]
    # Nothing half-made: the branch is where it started and the repository is whole.
    assert git(project, "rev-parse", record["branch"]) == start
    assert subprocess.run(["git", "-C", str(project), "fsck", "--no-dangling"]).returncode == 0
    # Nothing lost: the work is where the status says.
    work = Path(record["work_location"])
    assert (work / "big.bin").stat().st_size == 64_000_000
    assert (work / "small.txt").read_text() == "small\n"
    assert kapsis("audit", "verify", "full1").returncode == 0
    assert _no_pod("full1")
    # Room again (the user freed some): the same work can be saved by a run that continues.
    assert kapsis("cleanup", "--agent", "full1", "--force").returncode == 0


def test_control_with_room_the_same_work_is_committed(kapsis: Kapsis, tmp_path: Path) -> None:
    project = one_commit_repository(tmp_path / "project")
    config = tmp_path / "big.yaml"
    config.write_text("git:\n  max_file_size: 1g\nresources:\n  disk: 1g\n")

    result = kapsis.run(
        project, BIG_WORK, "--network-mode", "none", "--config", str(config), "--json",
        "--agent-id", "room1",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    commit = json.loads(result.stdout)["commit_sha"]
    assert "big.bin" in git(project, "ls-tree", "--name-only", commit)


def test_an_agent_that_goes_quiet_is_stopped_as_stalled(kapsis: Kapsis, tmp_path: Path) -> None:
    project = one_commit_repository(tmp_path / "project")
    config = tmp_path / "idle.yaml"
    config.write_text("resources:\n  idle_timeout: 2s\n  idle_action: stop\n")

    started = time.monotonic()
    result = kapsis.run(
        project, "echo working; echo done > /workspace/out.txt; sleep 60", "--network-mode",
        "none", "--config", str(config), "--json", "--agent-id", "quiet1",
    )  # fmt: skip

    assert time.monotonic() - started < 40
    assert result.returncode == 5, result.stderr  # KILLED
    record = kapsis.status("quiet1")
    assert record["phase"] == "failed" and record["error_type"] == "stalled"
    assert record["stalled"] and "no output and no report" in record["message"]
    assert "out.txt" in git(project, "ls-tree", "--name-only", record["commit_sha"])
    events = json.loads(kapsis("audit", "show", "quiet1", "--json").stdout)
    assert "agent_stalled" in [event["event_type"] for event in events]
    assert kapsis("audit", "verify", "quiet1").returncode == 0
    assert _no_pod("quiet1")


def test_control_an_agent_that_keeps_talking_is_never_stalled(
    kapsis: Kapsis, tmp_path: Path
) -> None:
    project = one_commit_repository(tmp_path / "project")
    config = tmp_path / "idle.yaml"
    config.write_text("resources:\n  idle_timeout: 2s\n  idle_action: stop\n")

    result = kapsis.run(
        project, "for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 0.5; done", "--network-mode",
        "none", "--config", str(config), "--json", "--agent-id", "talk1",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    record = kapsis.status("talk1")
    assert record["phase"] == "complete" and not record["stalled"]


def test_a_quiet_agent_is_only_flagged_by_default_and_the_flag_clears(
    kapsis: Kapsis, tmp_path: Path
) -> None:
    project = one_commit_repository(tmp_path / "project")
    config = tmp_path / "idle.yaml"
    config.write_text("resources:\n  idle_timeout: 1s\n")
    started = kapsis.run(
        project, "sleep 5; for i in $(seq 1 10); do echo back; sleep 0.3; done",
        "--network-mode", "none", "--config", str(config), "--detach", "--agent-id", "flag1",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    seen_stalled = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        record = kapsis.status("flag1")
        seen_stalled |= bool(record["stalled"])
        if seen_stalled and not record["stalled"]:
            break  # it spoke again: no longer stalled
        time.sleep(0.3)
    assert seen_stalled and not record["stalled"] and record["phase"] == "running"
    final = kapsis.wait_finished("flag1")
    assert final["phase"] == "complete"  # flagged, never stopped
