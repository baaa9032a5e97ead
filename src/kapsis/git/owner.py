"""Whose account host git runs as: root running Kapsis on a repository of a user's runs git as
that user, so that everything written into the repository is theirs (see :mod:`.runner`).

Also the check that a user's repository holds nothing of root's (files an older Kapsis, run as
root, left there), which the user's own git, and Kapsis running as them, could not update.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RepoOwner:
    """The account host git runs as on a repository that root does not own."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    name: str

    @classmethod
    def of(cls, path: Path) -> RepoOwner | None:
        """``path``'s owner when this process is root and the owner is not, else None."""
        if os.geteuid() != 0:
            return None  # a user's git writes as that user anyway
        try:
            info = os.stat(path)
        except OSError:
            return None
        return cls.for_uid(info.st_uid, info.st_gid)

    @classmethod
    def for_uid(cls, uid: int | None, gid: int | None = None) -> RepoOwner | None:
        """The account of ``uid`` when this process is root and ``uid`` is not, else None."""
        if uid is None or uid == 0 or os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:  # an id without an account (a container's files, say)
            return cls(uid, uid if gid is None else gid, (), "/nonexistent", str(uid))
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return cls(uid, entry.pw_gid, groups, entry.pw_dir, entry.pw_name)

    def subprocess_options(self) -> dict[str, Any]:
        """``subprocess`` arguments that run a command as this owner, without root's groups."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` as the owner's: their home, so git reads their own config (identity,
        credentials), not root's; their names; none of root's per-user dirs, which they could
        not use (and a TMPDIR of root's may be private)."""
        owned = {key: value for key, value in env.items() if key not in _ROOTS_OWN}
        owned.update({"HOME": self.home, "USER": self.name, "LOGNAME": self.name})
        return owned

    def give(self, root: Path) -> None:
        """Hand ``root`` (a scratch dir root made for the owner's git) and all in it to them."""
        chown_tree(root, self.uid, self.gid)

    def run(
        self, argv: Sequence[str], *, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        """``argv`` as the owner, in ``/`` (a plain command, not git)."""
        return subprocess.run(
            list(argv),
            capture_output=True,
            env=self.environment(os.environ),
            cwd="/",
            timeout=timeout,
            check=False,
            **self.subprocess_options(),
        )

    def make_private(self, directory: Path) -> None:
        """:func:`kapsis.paths.make_private` for the owner's own ``~/.kapsis``, done as them."""
        self.run(["mkdir", "-p", "-m", "700", "--", str(directory)])
        self.run(["chmod", "go-rwx", "--", str(directory)])


def clear_special_bits(root: Path, owner: RepoOwner | None) -> None:
    """Take set-uid and set-gid bits off every file under ``root`` (links are never followed,
    other filesystems never entered). An agent's file that keeps them in a worktree of the
    user's would run as the user for anyone on the machine. ``find`` walks a tree of any depth
    without recursion; in an owner's home it runs as them."""
    command = ["find", str(root), "-xdev", "-type", "f", "-perm", "/6000"]
    command += ["-exec", "chmod", "ug-s", "--", "{}", "+"]
    if owner is not None:
        owner.run(command, timeout=600)
    else:
        subprocess.run(command, capture_output=True, check=False, timeout=600)


def remove_tree(path: Path, owner: RepoOwner | None) -> None:
    """Delete ``path`` and all below it, never following a symlink.

    In an owner's home, which they may rearrange meanwhile (a symlink put where a parent
    directory was would lead root's delete anywhere), it is deleted with their rights. The tree
    may be the agent's, of any depth: ``rm`` walks it without recursion (Python's own rmtree
    recurses, and ends in RecursionError, which no ``ignore_errors`` catches).
    """
    command = ["rm", "-rf", "--one-file-system", "--", str(path)]
    if owner is not None:
        owner.run(command)
    else:
        subprocess.run(command, capture_output=True, check=False)


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give ``root`` and everything below it to ``uid``/``gid``; links are changed, never
    followed (the walk does not descend into them either)."""
    os.lchown(root, uid, gid)
    for directory, subdirs, files in os.walk(root):
        for name in (*subdirs, *files):
            os.lchown(os.path.join(directory, name), uid, gid)


def copy_owned_file(source: Path, target: Path, uid: int | None) -> bool:
    """Copy ``source`` to ``target`` if it is a regular file (of ``uid``, when given); False
    otherwise. Opened without following a link and without blocking: in a user's repository
    that root works on, the user could have put a link to a file of root's (or a fifo) there."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (uid is not None and info.st_uid != uid):
            return False
        with open(target, "wb") as copy:
            shutil.copyfileobj(handle, copy)
    return True


# Where root makes the scratch dirs it hands to an owner: root's own TMPDIR may be private
# (pam_tmpdir's /tmp/user/0).
SHARED_TMP = "/tmp"

# Root's per-user settings, dropped when a command runs as a repository's owner.
_ROOTS_OWN = frozenset(
    {
        "XDG_CONFIG_HOME",
        "XDG_CACHE_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
        "XDG_RUNTIME_DIR",
        "TMPDIR",
        "MAIL",
        "EMAIL",
    }
)


# Where git writes when Kapsis makes a branch, commits, imports objects or adds a worktree.
_WRITTEN_DIRS = ("refs", "logs", "objects", "worktrees")
FOREIGN_SCAN_LIMIT = 50_000


def foreign_entries(common_dir: Path, uid: int, *, limit: int = FOREIGN_SCAN_LIMIT) -> list[Path]:
    """Entries under the places git writes in ``common_dir`` that ``uid`` does not own.

    Object files are skipped (git only ever reads them; their directories count). Iterative and
    bounded: at most ``limit`` entries are looked at, and the first ten offenders returned.
    """
    found: list[Path] = []
    pending = [common_dir / name for name in _WRITTEN_DIRS]
    seen = 0
    while pending and seen < limit and len(found) < 10:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            if entry.path.startswith(str(common_dir / "objects")) and not is_dir:
                continue
            if info.st_uid != uid:
                found.append(Path(entry.path))
            if is_dir:
                pending.append(Path(entry.path))
    return found[:10]
