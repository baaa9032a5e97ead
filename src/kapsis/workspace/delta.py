"""The delta layer: what the start commit has that the project's checkout does not.

Overlay mode mounts the project's checkout as the lower layer, which is free whatever its size.
When the agent starts from another commit (continuing its branch, or a ``--base-branch`` other
than the checkout), the differences go into one more lower layer on top: the start commit's
version of each file that differs, and a whiteout for each file the start commit lacks. Building
it costs time in proportion to the difference, not to the repository.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kapsis.git.changes import MODE_EXECUTABLE, MODE_GITLINK, MODE_SYMLINK
from kapsis.git.commit import tree_listing
from kapsis.git.runner import Repo, without_filters


def _differing_paths(repo: Repo, start: str) -> list[str]:
    # Comparing with the checkout may re-read files; no filter driver may run while it does.
    raw = repo.run(
        "diff-index",
        "-z",
        "--no-renames",
        "--name-only",
        start,
        extra_config=without_filters(repo),
    ).stdout
    return [os.fsdecode(p) for p in raw.split(b"\0") if p]


def _blobs(repo: Repo, object_ids: list[str]) -> dict[str, bytes]:
    if not object_ids:
        return {}
    output = repo.run(
        "cat-file", "--batch", input="".join(f"{oid}\n" for oid in object_ids).encode()
    ).stdout
    blobs: dict[str, bytes] = {}
    position = 0
    while position < len(output):
        header_end = output.index(b"\n", position)
        object_id, _kind, size = output[position:header_end].decode().split(" ")
        start = header_end + 1
        blobs[object_id] = output[start : start + int(size)]
        position = start + int(size) + 1
    return blobs


def _untracked_paths(repo: Repo) -> list[str]:
    """Files and whole directories that git does not track and does not ignore."""
    raw = repo.run("ls-files", "-z", "--others", "--exclude-standard", "--directory").stdout
    return [os.fsdecode(p).rstrip("/") for p in raw.split(b"\0") if p]


def build_delta(repo: Repo, start: str, delta: Path, *, hide_untracked: bool = False) -> int:
    """Write the delta layer for ``start`` into ``delta``; return how many paths it holds.

    ``hide_untracked``: the checkout's untracked (not ignored) files are whited out too, so the
    agent sees ``start``'s tree and no more of the user's state (filesystem.uncommitted: exclude).
    """
    delta.mkdir(parents=True, exist_ok=True)
    paths = _differing_paths(repo, start)
    if hide_untracked:
        paths += [p for p in _untracked_paths(repo) if p not in paths]
    if not paths:
        return 0
    listing = tree_listing(repo, start)
    present = [p for p in paths if p in listing]
    contents = _blobs(
        repo, sorted({listing[p].object_id for p in present if listing[p].mode != MODE_GITLINK})
    )
    for path in present:
        entry = listing[path]
        target = delta / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry.mode == MODE_GITLINK:
            target.mkdir(exist_ok=True)
        elif entry.mode == MODE_SYMLINK:
            os.symlink(os.fsdecode(contents[entry.object_id]), target)
        else:
            target.write_bytes(contents[entry.object_id])
            target.chmod(0o755 if entry.mode == MODE_EXECUTABLE else 0o644)
    written = set(present)
    kept_dirs = {str(parent) for p in present for parent in Path(p).parents}
    for path in paths:
        if path in listing:
            continue
        if path in kept_dirs or os.path.lexists(delta / path):
            continue  # a directory of the start commit now stands where the checkout has a file
        if any(str(parent) in written for parent in Path(path).parents):
            # A file or symlink of the start commit already hides the checkout's directory;
            # writing below it would follow that symlink out of the layer.
            continue
        target = delta / path
        target.parent.mkdir(parents=True, exist_ok=True)
        # A whiteout: hides the checkout's file from the agent's view.
        os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    return len(paths)
