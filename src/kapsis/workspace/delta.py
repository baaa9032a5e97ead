"""The delta layer: what the start commit has that the view's base does not.

Overlay mode stacks the agent's view on a frozen base (:mod:`.bases`), the tree of one commit.
When the agent starts from another commit (the user's uncommitted work carried as a commit, a
newer checkout, its own branch continued, a ``--base-branch``), the differences go into one
more read-only layer on top: the start commit's version of each path that differs, and a
whiteout for each path the start commit lacks. Both commits are read from git's object store,
never from the live checkout, so building it costs time in proportion to the difference and the
result is fixed at launch.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kapsis.errors import MalformedTreeError
from kapsis.git.changes import MODE_EXECUTABLE, MODE_GITLINK, MODE_SYMLINK
from kapsis.git.runner import Repo

_ABSENT = "000000"
MODE_TREE = "040000"
_CHUNK = 1 << 20
_MAX_LINK = 4096


@dataclass(frozen=True)
class _Difference:
    path: str
    old_mode: str  # the base's mode; _ABSENT when it lacks the path
    mode: str  # the start commit's mode; _ABSENT when it lacks the path
    object_id: str


def _checked_path(raw: bytes) -> str:
    """A tree path as the delta may use it: relative, plain steps; else refused.

    The start commit can be an agent's own (a continued branch), and git stores a tree written
    with ``hash-object --literally`` whatever its names are: ``/etc/x`` or ``a/../../x`` would
    lead the host's writes out of the layer (one name twice is refused by the caller).
    """
    path = os.fsdecode(raw)
    if path.startswith("/") or any(
        step in ("", ".", "..") or step.lower() == ".git" for step in path.split("/")
    ):
        raise MalformedTreeError(
            f"the start commit's tree holds a path no checkout can hold ({path[:200]!r}); "
            "it was not made by git (an agent's crafted commit?), so no view is built from it"
        )
    return path


def _differences(
    repo: Repo, base: str, start: str, tree_env: dict[str, str] | None
) -> list[_Difference]:
    # -t: a directory the start commit lacks is one whiteout, not one per file it held.
    args = ("diff-tree", "-r", "-t", "-z", "--no-renames", base, start)
    if tree_env is None:
        raw = repo.run(*args).stdout
    else:
        # A view tree lives in Kapsis's scratch object store, which only this process reads.
        raw = repo.run(*args, env=tree_env, as_owner=False).stdout
    fields = raw.split(b"\0")
    found = []
    # Records come as ":oldmode newmode oldid newid status" then the path, each NUL-ended.
    for meta, path in zip(fields[0::2], fields[1::2], strict=False):
        if not meta.startswith(b":"):
            break
        old_mode, new_mode, _old_id, new_id, _status = meta[1:].decode().split(" ")
        found.append(_Difference(_checked_path(path), old_mode, new_mode, new_id))
    # A path comes twice only as a type change (once gone, once new); present twice, never.
    present = [d.path for d in found if d.mode != _ABSENT]
    if len(present) != len(set(present)):
        raise MalformedTreeError(
            "the start commit's tree holds one name twice; it was not made by git, so no view "
            "is built from it"
        )
    return found


def build_delta(
    repo: Repo, base: str, start: str, delta: Path, *, tree_env: dict[str, str] | None = None
) -> int:
    """Write the layer that turns ``base``'s tree into ``start``'s; return how many paths.

    ``start`` may be a tree that only ``tree_env`` finds (a view without the hidden files,
    :func:`kapsis.git.hidden.view_tree`); its files are all the repository's own blobs.
    """
    delta.mkdir(parents=True, exist_ok=True)
    differences = _differences(repo, base, start, tree_env)
    # What stands in the layer as something other than a directory: nothing may go below it
    # (a symlink there would lead a write out of the layer).
    leaves = {d.path for d in differences if d.mode not in (_ABSENT, MODE_TREE, MODE_GITLINK)}
    present = [d for d in differences if d.mode not in (_ABSENT, MODE_TREE)]
    # Directories the layer holds: parents of what it writes, and submodules.
    made = {str(parent) for d in present for parent in Path(d.path).parents} | {
        d.path for d in present if d.mode == MODE_GITLINK
    }
    # Directories of the base that the start commit lacks altogether: one whiteout each.
    removed_dirs = (
        {d.path for d in differences if d.mode == _ABSENT and d.old_mode == MODE_TREE}
        - made
        - leaves
    )
    files: dict[str, list[_Difference]] = {}
    for difference in present:
        parents = {str(parent) for parent in Path(difference.path).parents}
        if parents & leaves:
            raise MalformedTreeError(
                f"the start commit's tree holds {difference.path[:200]!r} below a file or "
                "symlink of the same tree; it was not made by git, so no view is built from it"
            )
        target = delta / difference.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if difference.mode == MODE_GITLINK:
            # A submodule: an empty directory, as in a checkout; what the base had below it
            # is whited out below.
            target.mkdir(exist_ok=True)
        else:
            files.setdefault(difference.object_id, []).append(difference)
    _write_blobs(repo, delta, files)
    whiteouts = 0
    for difference in differences:
        path = difference.path
        if difference.mode != _ABSENT or path in made or path in leaves:
            # Present: as a file or directory of the start commit where the base had the other.
            continue
        parents = {str(parent) for parent in Path(path).parents}
        if parents & (leaves | removed_dirs):
            # Hidden already: below a file or symlink of the start commit, or below a removed
            # directory's whiteout.
            continue
        target = delta / path
        target.parent.mkdir(parents=True, exist_ok=True)
        # A whiteout: hides the base's file or directory from the agent's view.
        os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        whiteouts += 1
    written = sum(len(same) for same in files.values())
    return written + whiteouts + sum(d.mode == MODE_GITLINK for d in differences)


def _write_blobs(repo: Repo, delta: Path, files: dict[str, list[_Difference]]) -> None:
    """Stream each blob from one ``cat-file --batch`` into its file(s): never whole in memory."""
    if not files:
        return
    process = repo.popen(
        "cat-file", "--batch",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert process.stdin is not None and process.stdout is not None
    requests = "".join(f"{object_id}\n" for object_id in files).encode()

    def feed(stream: IO[bytes]) -> None:
        try:
            stream.write(requests)
        except BrokenPipeError:
            pass
        finally:
            stream.close()

    # Fed from a thread: git answers while it reads, and both pipes have a limited buffer.
    feeder = threading.Thread(target=feed, args=(process.stdin,), daemon=True)
    feeder.start()
    scratch = delta.parent / f".{delta.name}-blob"
    try:
        for _ in files:
            header = process.stdout.readline().decode().split(" ")
            if len(header) != 3 or header[0] not in files:
                raise OSError(f"git cat-file answered {' '.join(header).strip()!r}")
            _stream_to(process.stdout, int(header[2]), scratch)
            process.stdout.read(1)  # the newline after each object
            _place(scratch, delta, files[header[0]])
    finally:
        process.stdout.close()
        process.wait()
        feeder.join()
        scratch.unlink(missing_ok=True)


def _stream_to(stream: IO[bytes], size: int, target: Path) -> None:
    with open(target, "wb") as out:
        remaining = size
        while remaining:
            chunk = stream.read(min(_CHUNK, remaining))
            if not chunk:
                raise OSError("git cat-file ended early")
            out.write(chunk)
            remaining -= len(chunk)


def _place(blob: Path, delta: Path, differences: list[_Difference]) -> None:
    """Put one blob at each path that has it: symlinks first, then copies, the last moved."""
    regular = [d for d in differences if d.mode != MODE_SYMLINK]
    for difference in differences:
        if difference.mode == MODE_SYMLINK:
            with open(blob, "rb") as link:
                # Longer than any path the kernel accepts: os.symlink refuses it, as git would.
                os.symlink(os.fsdecode(link.read(_MAX_LINK + 1)), delta / difference.path)
    for position, difference in enumerate(regular):
        target = delta / difference.path
        if position == len(regular) - 1:
            os.replace(blob, target)
        else:
            shutil.copyfile(blob, target)
        target.chmod(0o755 if difference.mode == MODE_EXECUTABLE else 0o644)
