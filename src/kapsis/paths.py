"""Where Kapsis keeps its host-side state. Nothing under these paths is mounted into a sandbox.

``KAPSIS_HOME`` (default ``~/.kapsis``) holds per-agent state; ``KAPSIS_CONFIG_DIR`` (default
``$XDG_CONFIG_HOME/kapsis`` or ``~/.config/kapsis``) holds user configuration and agent profiles.
Both are read from the environment on each call so that tests and SDK users can redirect them.
"""

from __future__ import annotations

import os
from pathlib import Path


def kapsis_home() -> Path:
    return Path(os.environ.get("KAPSIS_HOME") or Path.home() / ".kapsis")


def make_private(directory: Path) -> None:
    """Create ``directory`` (a Kapsis home) 0700, or take group and other access away from it.

    Below it lie the agents' files: an agent may have made a file set-uid (to the user, when it
    runs as the user) or world-writable; no other local user may reach any of them.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid == os.geteuid() and info.st_mode & 0o077:
        directory.chmod(0o700)


def private_dir(directory: Path) -> Path:
    """``directory``, made (with any missing parents) 0700 if it did not exist."""
    missing = []
    current = directory
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
    return directory


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, a file only its owner may read (0600, even if it existed);
    through a temporary file and a rename, so a reader never finds it half-written."""
    partial = path.with_name(f".{path.name}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(descriptor, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def config_dir() -> Path:
    explicit = os.environ.get("KAPSIS_CONFIG_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "kapsis"


def status_dir() -> Path:
    return kapsis_home() / "status"


def logs_dir() -> Path:
    return kapsis_home() / "logs"


def audit_dir() -> Path:
    return kapsis_home() / "audit"


def sandboxes_dir() -> Path:
    return kapsis_home() / "sandboxes"


def sandbox_dir(agent_id: str) -> Path:
    return sandboxes_dir() / agent_id


def worktrees_dir(owner_home: str | None = None) -> Path:
    """Where worktrees of agents are checked out.

    ``owner_home``: root runs Kapsis on a repository of the user whose home this is (sudo); the
    worktree belongs to them, so it goes under *their* ``~/.kapsis``, which they can reach.
    """
    if owner_home is not None:
        return Path(owner_home) / ".kapsis" / "worktrees"
    return kapsis_home() / "worktrees"


def bases_dir(owner_home: str | None = None) -> Path:
    """Where the frozen base snapshots of projects are kept (see :mod:`kapsis.workspace.bases`);
    like worktrees, under the home of the repository's owner when root works on theirs."""
    if owner_home is not None:
        return Path(owner_home) / ".kapsis" / "bases"
    return kapsis_home() / "bases"


def base_records_dir() -> Path:
    """The runner's own records of the bases its runs made or used (size, age, where)."""
    return kapsis_home() / "base-records"


def locks_dir() -> Path:
    return kapsis_home() / "locks"


def transcript_path(agent_id: str) -> Path:
    return logs_dir() / f"{agent_id}.log"


def user_agents_dir() -> Path:
    return config_dir() / "agents"


def user_config_file() -> Path:
    return config_dir() / "config.yaml"
