"""filesystem.hide in a project that is not a repository: the patterns are looked for in the
folder itself, and what cannot be looked through stops the launch."""

from __future__ import annotations

from pathlib import Path

import pytest

from kapsis.errors import SandboxError
from kapsis.git import hidden
from kapsis.workspace.prepare import prepare_workspace


def test_a_folder_that_cannot_be_looked_through_stops_the_launch_in_one_line(
    make_plan, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that cannot be listed may hold a hidden file the agent can open by name (a
    rootless user's own 0300 folder, say): the launch is refused, not shown unhidden."""
    (project / "locked").mkdir()
    (project / "locked" / ".env").write_text("TOKEN=secret\n")
    plan = make_plan()
    assert plan.workspace.needs_delta and not plan.git.repository
    real = hidden.os.scandir

    def scandir(path: Path | int) -> object:
        if not isinstance(path, int) and Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(hidden.os, "scandir", scandir)
    with pytest.raises(SandboxError) as refused:
        prepare_workspace(plan)
    message = str(refused.value)
    assert "Permission denied" in message and "filesystem.hide" in message
    assert "\n" not in message
