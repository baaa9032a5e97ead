"""resources.disk: the agent's workspace and tmpfs mounts are bounded by the kernel. Past the
limit the agent gets ENOSPC inside its sandbox; the host keeps writing its audit trail, commits
what the agent made and removes the disk with the run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .kapsis_runner import Kapsis
from .repos import git, one_commit_repository

pytestmark = pytest.mark.integration

# Each write is told apart in the transcript; then the agent frees room and writes its result.
FILL = (
    "dd if=/dev/zero of=/workspace/fill bs=1M count=120 2>&1; "
    "echo workspace-rc=$?; ls -l /workspace/fill | awk '{print \"workspace-bytes=\" $5}'; "
    "dd if=/dev/zero of=/tmp/fill bs=1M count=120 2>&1; "
    "ls -l /tmp/fill | awk '{print \"tmp-bytes=\" $5}'; "
    "rm -f /workspace/fill /tmp/fill; echo done > /workspace/result.txt"
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return one_commit_repository(tmp_path / "project")


def _bytes(logs: str, key: str) -> int:
    line = next(line for line in logs.splitlines() if line.startswith(f"{key}="))
    return int(line.split("=", 1)[1])


def _loop_mounts(kapsis: Kapsis) -> list[str]:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    return [m for m in mounts if str(kapsis.home) in m and m.startswith("/dev/loop")]


@pytest.mark.parametrize("mode", ["overlay", "worktree"])
def test_a_full_quota_is_enospc_inside_and_the_host_goes_on(
    kapsis: Kapsis, project: Path, mode: str
) -> None:
    agent_id = f"quota-{mode}"
    result = kapsis.run(
        project, FILL, "--network-mode", "none", "--disk", "48m", "--mode", mode, "--json",
        "--agent-id", agent_id,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    logs = kapsis("logs", agent_id).stdout
    assert logs.count("No space left on device") == 2, logs  # the workspace and /tmp
    assert _bytes(logs, "workspace-bytes") < 48 * 1024**2
    assert _bytes(logs, "tmp-bytes") <= 48 * 1024**2
    record = kapsis.status(agent_id)
    assert record["phase"] == "complete" and record["disk"] == "48m" and record["disk_enforced"]
    assert "result.txt" in git(project, "ls-tree", "--name-only", outcome["commit_sha"])
    verified = kapsis("audit", "verify", agent_id)
    assert verified.returncode == 0, verified.stdout
    if mode == "overlay":
        assert _loop_mounts(kapsis) == []  # committed: its disk went with the run
    else:
        assert len(_loop_mounts(kapsis)) == 1  # the worktree stays, on its disk, until cleanup
        assert (Path(record["work_location"]) / "result.txt").read_text() == "done\n"
    cleaned = kapsis("cleanup", "--agent", agent_id, "--force")
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert _loop_mounts(kapsis) == []
    assert not (kapsis.home / "sandboxes" / agent_id).exists()


def test_control_with_room_the_same_writes_succeed(kapsis: Kapsis, project: Path) -> None:
    result = kapsis.run(
        project, FILL, "--network-mode", "none", "--disk", "1g", "--json", "--agent-id", "roomy"
    )

    assert result.returncode == 0, result.stderr
    logs = kapsis("logs", "roomy").stdout
    assert "No space left on device" not in logs
    assert _bytes(logs, "workspace-bytes") == _bytes(logs, "tmp-bytes") == 120 * 1024**2


def test_the_disk_file_takes_only_what_the_agent_wrote(kapsis: Kapsis, project: Path) -> None:
    """A 10g quota is a sparse file: the host's disk pays for the agent's writes only."""
    result = kapsis.run(
        project, "head -c 1000000 /dev/urandom > /workspace/r.bin; sleep 2", "--network-mode",
        "none", "--disk", "10g", "--mode", "worktree", "--detach", "--agent-id", "sparse",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = kapsis.wait_finished("sparse")
    image = kapsis.home / "sandboxes" / "sparse" / "disk.img"
    assert image.stat().st_size == 10 * 1024**3
    assert image.stat().st_blocks * 512 < 64 * 1024**2
    assert record["phase"] == "complete"
    assert kapsis("cleanup", "--agent", "sparse").returncode == 0


BIG_FILL = (
    "dd if=/dev/zero of=/workspace/fill bs=1M count=600 2>&1; "
    "ls -l /workspace/fill | awk '{print \"workspace-bytes=\" $5}'; "
    "rm -f /workspace/fill; echo done > /workspace/result.txt"
)


def _home_of(kapsis: Kapsis, size: str) -> Path:
    """The Kapsis home on a filesystem of ``size`` (a tmpfs, unmounted after the test)."""
    kapsis.home.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(kapsis.home)],
        check=True,
    )
    return kapsis.home


@pytest.fixture
def small_home(kapsis: Kapsis) -> Path:
    """A home of 512 MiB: much less than the default quota of 10g."""
    return _home_of(kapsis, "512m")


def test_a_quota_larger_than_the_free_space_cannot_fill_the_hosts_filesystem(
    kapsis: Kapsis, project: Path, small_home: Path
) -> None:
    result = kapsis.run(project, BIG_FILL, "--network-mode", "none", "--agent-id", "bigq")

    assert result.returncode == 0, result.stderr
    assert "lowered from 10g" in result.stderr
    logs = kapsis("logs", "bigq").stdout
    assert "No space left on device" in logs
    assert _bytes(logs, "workspace-bytes") < 256 * 1024**2
    record = kapsis.status("bigq")
    assert record["phase"] == "complete" and record["disk_enforced"]
    assert kapsis("audit", "verify", "bigq").returncode == 0
    assert os.statvfs(small_home).f_bavail * os.statvfs(small_home).f_frsize > 128 * 1024**2


def test_control_with_no_limit_the_same_agent_fills_the_hosts_filesystem(
    kapsis: Kapsis, project: Path, small_home: Path, tmp_path: Path
) -> None:
    no_limit = tmp_path / "no-limit.yaml"
    no_limit.write_text("resources:\n  disk: null\n")
    # Exit 0 when the agent wrote past 400 MB: more than the lowered quota of the test above
    # would let it; then it frees the room (the host's own writes meanwhile may have failed).
    fill = (
        "dd if=/dev/zero of=/workspace/fill bs=1M count=600; "
        "test $(stat -c %s /workspace/fill) -gt 400000000; wrote=$?; rm -f /workspace/fill; "
        "exit $wrote"
    )
    result = kapsis.run(
        project, fill, "--network-mode", "none", "--agent-id", "noq", "--config", no_limit
    )
    assert result.returncode == 0, result.stderr


def _free(path: Path) -> int:
    facts = os.statvfs(path)
    return facts.f_bavail * facts.f_frsize


def test_agents_together_cannot_fill_the_hosts_filesystem(
    kapsis: Kapsis, project: Path, tmp_path: Path
) -> None:
    """Disks are sparse: the first agent's has taken nothing yet when the second launches. Its
    300m still counts as taken, so the two cannot fill the 1 GiB filesystem between them, and
    a third gets no disk at all."""
    home = _home_of(kapsis, "1g")
    keep = "dd if=/dev/zero of=/workspace/fill bs=1M count=900 2>&1; echo done > result.txt"
    first = kapsis.run(
        project, f"sleep 6; {keep}", "--network-mode", "none", "--mode", "worktree",
        "--disk", "300m", "--detach", "--agent-id", "fill-a",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    second = kapsis.run(
        project, keep, "--network-mode", "none", "--mode", "worktree", "--agent-id", "fill-b"
    )
    assert second.returncode == 0, second.stderr
    assert "lowered from 10g" in second.stderr
    assert kapsis.wait_finished("fill-a", timeout=120)["phase"] == "complete"

    for agent_id in ("fill-a", "fill-b"):
        assert "No space left on device" in kapsis("logs", agent_id).stdout
        assert kapsis("audit", "verify", agent_id).returncode == 0
    # Both disks full and kept (worktrees): the host still has most of its reserve.
    assert _free(home) > 192 * 1024**2
    third = kapsis.run(project, keep, "--network-mode", "none", "--agent-id", "fill-c")
    assert third.returncode == 3
    assert "no room for the agent's disk" in third.stderr
    assert "for the other agents' disks" in third.stderr
