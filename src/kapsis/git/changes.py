"""What the agent changed in its workspace, read from the host side without running anything.

Two sources give the same :class:`WorkspaceChanges`:

* an overlay upper dir (:func:`from_upper`): copied-up and new files are the writes, whiteouts
  (0/0 character devices) are deletions, and an opaque directory replaced everything under it;
* a worktree (:func:`from_worktree`): every file is compared with the start commit's tree.

Only regular files and symlinks count; fifos, sockets and devices an agent may leave behind are
listed as unsupported. Symlinks are read as links and never followed. The top-level ``.git`` is
the agent's own git view, never part of its work; a ``.git`` anywhere else (any case) is a path
git refuses to check out, so it is listed as unsupported too.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kapsis.errors import FileChangedError

OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
MODE_FILE = "100644"
MODE_EXECUTABLE = "100755"
MODE_SYMLINK = "120000"
MODE_GITLINK = "160000"
READ_PIECE = 1024 * 1024


@dataclass(frozen=True)
class Written:
    """A file or symlink in its final state: ``source`` is read for a file, ``link`` for a link.

    ``identity`` is the file's (device, inode) when it was listed. It is read later, by path;
    whoever can still write where it lies (the user, in a worktree of theirs that root commits)
    could put a symlink or another file there meanwhile, and then root would read that.
    """

    mode: str
    source: Path | None = None
    link: bytes | None = None
    identity: tuple[int, int] | None = None
    size: int = 0  # a file's apparent size when it was listed (a sparse file's too)
    allocated: int = 0  # what it takes on disk (st_blocks): far less than its size if sparse

    def content(self) -> bytes:
        """The whole content (a link's target, or a small file's bytes)."""
        chunks: list[bytes] = []
        self.stream(lambda size: None, chunks.append)
        return b"".join(chunks)

    def stream(self, announce: Callable[[int], object], write: Callable[[bytes], object]) -> None:
        """Give the content in pieces of at most 1 MiB: first ``announce(size)``, then exactly
        that many bytes to ``write``. A file that is no longer what was listed, or that
        changes size while it is read, raises FileChangedError."""
        if self.link is not None:
            announce(len(self.link))
            write(self.link)
            return
        assert self.source is not None
        # O_NOFOLLOW: not a symlink put in its place; O_NONBLOCK: not a fifo (it would hang).
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.source, flags)
        except OSError as error:
            raise FileChangedError(f"{self.source} cannot be read: {error.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (
                self.identity is not None and (st.st_dev, st.st_ino) != self.identity
            ):
                raise FileChangedError(f"{self.source} was replaced after it was listed")
            if self.identity is not None and st.st_size != self.size:
                # Judged (git.max_file_size) on the size listed: it must still be that size.
                raise FileChangedError(f"{self.source} changed size after it was listed")
            announce(st.st_size)
            left = st.st_size
            while left > 0:
                piece = handle.read(min(left, READ_PIECE))
                if not piece:
                    break
                write(piece)
                left -= len(piece)
            if left or handle.read(1):
                raise FileChangedError(f"{self.source} changed size while it was read")


@dataclass
class WorkspaceChanges:
    written: dict[str, Written] = field(default_factory=dict)
    # Paths removed with everything under them (a whiteout, or a file gone from the worktree).
    deleted: list[str] = field(default_factory=list)
    # Directories whose earlier content is gone; what is in ``written`` under them stays.
    cleared: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.written or self.deleted or self.cleared)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _file_mode(st: os.stat_result) -> str:
    return MODE_EXECUTABLE if st.st_mode & 0o111 else MODE_FILE


def _is_opaque(path: Path) -> bool:
    for name in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def from_upper(upper: Path) -> WorkspaceChanges:
    """The changes recorded in an overlay upper dir."""
    changes = WorkspaceChanges()
    _walk_upper(upper, changes)
    return changes


# (workspace path, host path, lstat when listed)
Entry = tuple[str, str, os.stat_result]
Identity = tuple[int, int]


def _entries(
    directory: str, prefix: str, changes: WorkspaceChanges, expected: Identity | None
) -> Iterator[Entry]:
    """The entries of ``directory`` in name order, with their workspace path and lstat.

    The directory is opened without following a link, and must be the one that was listed
    (``expected``, its device and inode): whoever can still write above it (the user, in a
    worktree of theirs that root commits) could have put a link to anywhere in its place or
    in place of a directory above it, and root would list that. The top-level ``.git`` (the
    agent's git view) is skipped; a ``.git`` further down is listed as unsupported and not
    descended into. The directory is read whole and closed at once (a deep walk holds no
    directory open); one that cannot be read (too long a path, gone, replaced) is listed as
    unsupported.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(directory, flags)
    except OSError:
        changes.unsupported.append(prefix or ".")
        return
    try:
        opened = os.fstat(descriptor)
        if expected is not None and (opened.st_dev, opened.st_ino) != expected:
            changes.unsupported.append(prefix or ".")
            return
        # Listed through the descriptor: the names and their lstat are of this directory.
        with os.scandir(descriptor) as scanned:
            entries = sorted(
                ((entry.name, entry.stat(follow_symlinks=False)) for entry in scanned),
                key=lambda item: item[0],
            )
    except OSError:
        changes.unsupported.append(prefix or ".")
        return
    finally:
        os.close(descriptor)
    for name, st in entries:
        if not prefix and name == ".git":
            continue
        relative = _join(prefix, name)
        if name.lower() == ".git":
            changes.unsupported.append(relative)
            continue
        yield relative, os.path.join(directory, name), st


def _walk(
    root: Path, changes: WorkspaceChanges, root_owner: int | None = None
) -> Iterator[tuple[Entry, Callable[[], None]]]:
    """Every entry under ``root`` depth first in name order, as a recursive walk would give
    them, but with a stack of its own: the agent chooses the depth. Each entry comes with a
    ``descend`` to call for a directory whose entries should follow. ``root_owner``: the uid
    ``root`` must belong to (nothing is listed otherwise)."""
    try:
        top = os.lstat(root)
    except OSError:
        changes.unsupported.append(".")
        return
    if not stat.S_ISDIR(top.st_mode) or (root_owner is not None and top.st_uid != root_owner):
        changes.unsupported.append(".")
        return
    stack = [_entries(str(root), "", changes, (top.st_dev, top.st_ino))]
    while stack:
        found = next(stack[-1], None)
        if found is None:
            stack.pop()
            continue
        relative, path, st = found

        def descend(
            path: str = path, prefix: str = relative, identity: Identity = (st.st_dev, st.st_ino)
        ) -> None:
            stack.append(_entries(path, prefix, changes, identity))

        yield found, descend


def _written(path: str, st: os.stat_result) -> Written | None:
    """A regular file or a symlink (read as a link, never followed); None for anything else."""
    if stat.S_ISREG(st.st_mode):
        return Written(
            _file_mode(st),
            source=Path(path),
            identity=(st.st_dev, st.st_ino),
            size=st.st_size,
            allocated=st.st_blocks * 512,
        )
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            return None
        return Written(MODE_SYMLINK, link=os.fsencode(target))
    return None


def _walk_upper(directory: Path, changes: WorkspaceChanges) -> None:
    for (relative, path, st), descend in _walk(directory, changes):
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            changes.deleted.append(relative)
        elif stat.S_ISDIR(st.st_mode):
            if _is_opaque(Path(path)):
                changes.cleared.append(relative)
            descend()
        elif (written := _written(path, st)) is not None:
            changes.written[relative] = written
        else:
            changes.unsupported.append(relative)


def blob_id(content: bytes) -> str:
    """Git's object name for a blob with this content (SHA-1 repositories)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content, usedforsecurity=False).hexdigest()


def blob_id_of(written: Written) -> str:
    """:func:`blob_id` of a file or link, read in pieces (never whole in memory)."""
    digest = hashlib.sha1(usedforsecurity=False)
    written.stream(lambda size: digest.update(b"blob %d\0" % size), digest.update)
    return digest.hexdigest()


@dataclass(frozen=True)
class TreeEntry:
    mode: str
    object_id: str
    size: int = -1  # a blob's size in bytes (-1: not a blob)


def from_worktree(
    worktree: Path, start_tree: dict[str, TreeEntry], owner: int | None = None
) -> WorkspaceChanges:
    """The differences between a worktree's files and the start commit's tree. ``owner``: the
    uid the worktree must belong to (root committing a user's worktree)."""
    changes = WorkspaceChanges()
    present: set[str] = set()
    _walk_worktree(worktree, start_tree, changes, present, owner)
    if "." in changes.unsupported:
        raise FileChangedError(
            f"{worktree} is not the worktree that was planned (gone, replaced or not its "
            "owner's): nothing is committed"
        )
    unread = set(changes.unsupported)
    for path, entry in start_tree.items():
        if path in present or _under(path, unread):
            continue  # what could not be read is not taken for deleted
        if entry.mode == MODE_GITLINK and (worktree / path).is_dir():
            continue  # a submodule that is not checked out is an empty directory
        changes.deleted.append(path)
    return changes


def _under(path: str, directories: set[str]) -> bool:
    """Whether ``path`` is one of ``directories`` or lies below one."""
    if not directories:
        return False
    parts = path.split("/")
    return any("/".join(parts[:depth]) in directories for depth in range(1, len(parts) + 1))


def _walk_worktree(
    directory: Path,
    start_tree: dict[str, TreeEntry],
    changes: WorkspaceChanges,
    present: set[str],
    owner: int | None,
) -> None:
    for (relative, path, st), descend in _walk(directory, changes, owner):
        before = start_tree.get(relative)
        if stat.S_ISDIR(st.st_mode):
            if before is not None and before.mode == MODE_GITLINK:
                present.add(relative)  # a checked-out submodule: its own repository
            else:
                descend()
            continue
        written = _written(path, st)
        if written is None:
            changes.unsupported.append(relative)
            continue
        present.add(relative)
        # Only a file of the same size can be unchanged, and only such a file is read here.
        unchanged = (
            before is not None
            and before.mode == written.mode
            and before.size == (written.size if written.link is None else len(written.link))
            and before.object_id == blob_id_of(written)
        )
        if not unchanged:
            changes.written[relative] = written
