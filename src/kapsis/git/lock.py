"""One lock per repository, so parallel agents' host git steps on a shared repo take turns.

Each agent's branch, temporary index and worktree are its own, but creating worktrees, importing
objects and moving refs touch shared files in the repository; git refuses concurrent writers
there (``index.lock``, ``packed-refs.lock``) instead of waiting. The lock file lives under
``~/.kapsis/locks``, never inside the user's repository.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kapsis import paths


@contextmanager
def repository_lock(common_dir: Path) -> Iterator[None]:
    digest = hashlib.sha256(str(common_dir.resolve()).encode()).hexdigest()[:16]
    with named_lock(f"repo-{digest}"):
        yield


@contextmanager
def named_lock(name: str) -> Iterator[None]:
    """An exclusive lock on ``~/.kapsis/locks/NAME.lock``, held for the ``with`` block."""
    directory = paths.private_dir(paths.locks_dir())
    descriptor = os.open(directory / f"{name}.lock", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(descriptor, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
