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


Entry = tuple[str, os.DirEntry[str], os.stat_result]


def _entries(directory: Path, prefix: str, changes: WorkspaceChanges) -> Iterator[Entry]:
    """The entries of ``directory`` in name order, with their workspace path and lstat.

    The top-level ``.git`` (the agent's git view) is skipped; a ``.git`` further down is
    listed as unsupported and not descended into. The directory is read whole and closed at
    once (a deep walk holds no directory open); one that cannot be read (too long a path, gone)
    is listed as unsupported.
    """
    try:
        with os.scandir(directory) as scanned:
            entries = sorted(scanned, key=lambda e: e.name)
    except OSError:
        changes.unsupported.append(prefix or ".")
        return
    for entry in entries:
        if not prefix and entry.name == ".git":
            continue
        relative = _join(prefix, entry.name)
        if entry.name.lower() == ".git":
            changes.unsupported.append(relative)
            continue
        try:
            yield relative, entry, entry.stat(follow_symlinks=False)
        except OSError:
            changes.unsupported.append(relative)


def _walk(root: Path, changes: WorkspaceChanges) -> Iterator[tuple[Entry, Callable[[], None]]]:
    """Every entry under ``root`` depth first in name order, as a recursive walk would give
    them, but with a stack of its own: the agent chooses the depth. Each entry comes with a
    ``descend`` to call for a directory whose entries should follow."""
    stack = [_entries(root, "", changes)]
    while stack:
        found = next(stack[-1], None)
        if found is None:
            stack.pop()
            continue
        relative, entry, _ = found

        def descend(path: str = entry.path, prefix: str = relative) -> None:
            stack.append(_entries(Path(path), prefix, changes))

        yield found, descend


def _written(entry: os.DirEntry[str], st: os.stat_result) -> Written | None:
    """A regular file or a symlink (read as a link, never followed); None for anything else."""
    if stat.S_ISREG(st.st_mode):
        return Written(
            _file_mode(st),
            source=Path(entry.path),
            identity=(st.st_dev, st.st_ino),
            size=st.st_size,
        )
    if stat.S_ISLNK(st.st_mode):
        return Written(MODE_SYMLINK, link=os.fsencode(os.readlink(entry.path)))
    return None


def _walk_upper(directory: Path, changes: WorkspaceChanges) -> None:
    for (relative, entry, st), descend in _walk(directory, changes):
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            changes.deleted.append(relative)
        elif stat.S_ISDIR(st.st_mode):
            if _is_opaque(Path(entry.path)):
                changes.cleared.append(relative)
            descend()
        elif (written := _written(entry, st)) is not None:
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


def from_worktree(worktree: Path, start_tree: dict[str, TreeEntry]) -> WorkspaceChanges:
    """The differences between a worktree's files and the start commit's tree."""
    changes = WorkspaceChanges()
    present: set[str] = set()
    _walk_worktree(worktree, start_tree, changes, present)
    for path, entry in start_tree.items():
        if path in present:
            continue
        if entry.mode == MODE_GITLINK and (worktree / path).is_dir():
            continue  # a submodule that is not checked out is an empty directory
        changes.deleted.append(path)
    return changes


def _walk_worktree(
    directory: Path,
    start_tree: dict[str, TreeEntry],
    changes: WorkspaceChanges,
    present: set[str],
) -> None:
    for (relative, entry, st), descend in _walk(directory, changes):
        before = start_tree.get(relative)
        if stat.S_ISDIR(st.st_mode):
            if before is not None and before.mode == MODE_GITLINK:
                present.add(relative)  # a checked-out submodule: its own repository
            else:
                descend()
            continue
        written = _written(entry, st)
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
