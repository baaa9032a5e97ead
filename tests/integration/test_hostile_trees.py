"""A hostile agent's tree: thousands of levels deep, and many entries Kapsis cannot commit.

The run still ends as it should: its work saved (what can be), a bounded note on the rest, the
status final, the audit sealed, and no pod left behind.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .kapsis_runner import Kapsis
from .repos import git, one_commit_repository

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    """pytest's own clean-up of its temporary directories recurses: whatever the test left
    (a failed run keeps its sandbox) goes with rm first."""
    yield
    subprocess.run(["rm", "-rf", "--", str(tmp_path)], check=False)


DEEP = (
    'python3 -c "import os\n'
    "os.makedirs('/workspace/out', exist_ok=True)\n"
    "open('/workspace/out/result.txt', 'w').write('done\\\\n')\n"
    "fd = os.open('/workspace', os.O_RDONLY)\n"
    "for _ in range(3000):\n"
    "    os.mkdir('d', dir_fd=fd); fd = os.open('d', os.O_RDONLY, dir_fd=fd)\n"
    "for i in range(300):\n"
    "    os.mkfifo('/workspace/out/pipe%d-' % i + 'x' * 200)\n"
    '"'
)


def test_a_deep_tree_and_many_odd_files_end_in_a_saved_run(kapsis: Kapsis, tmp_path: Path) -> None:
    project = one_commit_repository(tmp_path / "project")

    result = kapsis.run(project, DEEP, "--network-mode", "none", "--json", "--agent-id", "deep1")

    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["exit_code"] == 0 and outcome["commit_sha"]
    assert kapsis.status("deep1")["phase"] == "complete"
    files = git(project, "ls-tree", "-r", "--name-only", outcome["commit_sha"]).splitlines()
    assert "out/result.txt" in files  # control: the agent's real work is committed
    note = next(n for n in outcome["notes"] if n.startswith("not committed"))
    assert len(note) < 4000 and "more" in note  # 300 fifos and the deep tail, in a few lines
    verified = kapsis("audit", "verify", "deep1")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    pods = subprocess.run(
        ["podman", "pod", "exists", "kapsis-deep1"], capture_output=True, check=False
    )
    assert pods.returncode != 0
    # Cleanup removes the deep tree too (Python's rmtree would recurse past its limit).
    cleaned = kapsis("cleanup", "--agent", "deep1", "--force")
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert not (kapsis.home / "sandboxes" / "deep1").exists()


SPECIAL = (
    "cp /bin/true /workspace/setuid-tool && chmod 6755 /workspace/setuid-tool && "
    "cp /bin/true /workspace/plain-tool && chmod 0755 /workspace/plain-tool && "
    "truncate -s 1T /workspace/sparse.bin && echo done > /workspace/result.txt && "
    "grep ' /workspace ' /proc/mounts > /workspace/mounts.txt"
)


@pytest.mark.parametrize("mode", ["worktree", "overlay"])
def test_setuid_bits_never_reach_the_host_and_a_sparse_terabyte_is_left_out(
    kapsis: Kapsis, tmp_path: Path, mode: str
) -> None:
    project = one_commit_repository(tmp_path / "project")
    agent_id = f"special-{mode}"
    # No disk quota: an overlay layer then stays on the host's own filesystem after the run
    # (with one, its disk goes with the run once the work is committed).
    unbounded = tmp_path / "no-quota.yaml"
    unbounded.write_text("resources:\n  disk: null\n")

    result = kapsis.run(
        project, SPECIAL, "--network-mode", "none", "--mode", mode, "--json",
        "--agent-id", agent_id, "--config", str(unbounded),
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    record = kapsis.status(agent_id)
    mounts = git(project, "show", f"{outcome['commit_sha']}:mounts.txt")
    assert "nosuid" in mounts and "nodev" in mounts  # inert inside the sandbox too
    listing = git(project, "ls-tree", outcome["commit_sha"])
    assert "100755 blob" in next(line for line in listing.splitlines() if "setuid-tool" in line)
    assert "sparse.bin" not in listing and "result.txt" in listing
    note = next(n for n in outcome["notes"] if "git.max_file_size" in n)
    assert "sparse.bin" in note
    work = Path(record["work_location"])
    setuid_mode = (work / "setuid-tool").stat().st_mode
    assert setuid_mode & 0o6000 == 0 and setuid_mode & 0o111  # the bits gone, exec kept
    assert (work / "plain-tool").stat().st_mode & 0o777 == 0o755  # control: untouched
    assert kapsis("audit", "verify", agent_id).returncode == 0
