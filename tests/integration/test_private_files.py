"""What Kapsis keeps on the host is the user's alone: ``~/.kapsis`` is 0700, and below it the
records of a run (status, transcript, audit, plan, locks, sandbox dir) are 0600 / 0700, so
another local user reads none of it even where the home itself was opened up."""

from __future__ import annotations

import json
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .kapsis_runner import Kapsis
from .repos import one_commit_repository

pytestmark = pytest.mark.integration

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


@pytest.fixture
def open_place(base_image: str) -> Iterator[Path]:
    """A directory every user can pass through (pytest's own are 0700: they would hide all)."""
    place = Path(tempfile.mkdtemp(prefix="kapsis-private-", dir="/tmp"))
    place.chmod(0o755)
    try:
        yield place
    finally:
        subprocess.run(["rm", "-rf", "--", str(place)], check=False)


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True, check=False)


def test_a_runs_records_are_private_to_the_user(open_place: Path, base_image: str) -> None:
    kapsis = Kapsis(home=open_place / "home", config_dir=open_place / "config", image=base_image)
    project = one_commit_repository(open_place / "project")

    result = kapsis.run(
        project, "echo secret-output; sleep 30", "--network-mode", "none", "--detach",
        "--agent-id", "priv1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    home = kapsis.home
    sandbox = home / "sandboxes" / "priv1"
    try:
        records = [
            home / "status" / "priv1.json",
            home / "audit" / "priv1.jsonl",
            sandbox / "plan.json",
            sandbox / "supervisor.log",
            *sorted((home / "locks").iterdir()),
        ]
        directories = [
            home,
            *(home / d for d in ("status", "audit", "locks", "sandboxes")),
            sandbox,
        ]
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        for directory in directories:
            assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0, directory
        for record in records:
            assert stat.S_IMODE(record.stat().st_mode) & 0o077 == 0, record

        # Another user, even with the home opened up, reads none of the records, and cannot
        # reach the sandbox's audit socket.
        home.chmod(0o711)
        for record in records[:3]:
            denied = _as_nobody("cat", str(record))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr
        connect = (
            "import socket, sys; s = socket.socket(socket.AF_UNIX); "
            f"s.connect({str(sandbox / 'audit.sock')!r})"
        )
        refused = _as_nobody("python3", "-c", connect)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        # Control: the same user reads a file of that home that was left world-readable.
        (home / "public.txt").write_text("anyone\n")
        (home / "public.txt").chmod(0o644)
        assert _as_nobody("cat", str(home / "public.txt")).stdout == "anyone\n"
    finally:
        home.chmod(0o700)
        kapsis("stop", "priv1")
        kapsis.wait_finished("priv1")
    transcript = home / "logs" / "priv1.log"
    assert "secret-output" in transcript.read_text()
    assert stat.S_IMODE(transcript.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((home / "logs").stat().st_mode) & 0o077 == 0
    assert json.loads((home / "status" / "priv1.json").read_text())["phase"] == "failed"
    assert kapsis("cleanup", "--agent", "priv1", "--force").returncode == 0
