"""Frozen bases: a project's files at one commit, checked out once and shared read-only.

In overlay mode the agent's view is stacked from read-only layers Kapsis made at launch, never
from the user's live checkout (which the user, a build or another agent may change at any
moment; the kernel leaves the result undefined when a mounted overlay's lower layer changes):

* a base: the tree of one commit, checked out once under ``~/.kapsis/bases`` and shared by
  every agent on the project. It costs what a checkout costs, so it is made on a project's first
  launch and again only after a large change;
* above it, per launch, the delta (:mod:`.delta`): the start commit's files that differ from the
  base and whiteouts for those it lacks, which costs in proportion to that difference.

A base is reused while the difference stays within :data:`MAX_DELTA_PATHS` paths; beyond that a
new base is made. The runner keeps a record of each base (its size and how long it took) under
``~/.kapsis/base-records``; ``kapsis cleanup`` removes the bases no running agent uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from kapsis import paths
from kapsis.errors import SandboxError
from kapsis.git.lock import named_lock
from kapsis.git.owner import RepoOwner, remove_tree
from kapsis.git.runner import Repo

# Past this many differing paths a delta would cost more than it saves: a new base is made.
MAX_DELTA_PATHS = 2000
# How many of a project's newest bases are compared with the start commit.
CANDIDATES = 3
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class BaseRecord:
    """A base that exists: ``tree`` holds the files of ``commit`` of ``project``."""

    project: str
    key: str
    commit: str
    tree: str
    files: int
    bytes: int
    seconds: float
    made_at: float
    owner_uid: int | None = None

    @property
    def index(self) -> Path:
        return index_path(self.tree)


@dataclass(frozen=True)
class BaseChoice:
    """The base a launch will stack its view on, and how far the start commit is from it."""

    key: str
    commit: str
    tree: str
    exists: bool
    delta_paths: int


def index_path(tree: str) -> Path:
    """The index ``checkout-index`` left beside a base, with the stat data of its files."""
    return Path(f"{tree}.index")


def project_key(repo: Repo) -> str:
    """A stable, readable name for the repository's bases: its folder name and a digest of its
    git dir (two clones of one project are two projects)."""
    digest = hashlib.sha256(os.fsencode(repo.common_dir.resolve())).hexdigest()[:12]
    name = _SAFE_NAME.sub("-", repo.root.name)[:40] or "project"
    return f"{name}-{digest}"


def records(key: str | None = None) -> list[BaseRecord]:
    """The runner's records of bases, newest first (of one project when ``key`` is given)."""
    root = paths.base_records_dir()
    found: list[BaseRecord] = []
    for record_file in root.glob(f"{key or '*'}/*.json"):
        try:
            found.append(BaseRecord(**json.loads(record_file.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # a torn or foreign file is not a record
    return sorted(found, key=lambda record: record.made_at, reverse=True)


def choose_base(repo: Repo, start: str, head: str | None) -> BaseChoice:
    """The base for a view of ``start``: the existing one nearest to it if near enough, else a
    new one at the checked-out commit ``head`` (when ``start`` is near that: it will serve the
    next launches too) or at ``start`` itself."""
    key = project_key(repo)
    best: BaseChoice | None = None
    for record in records(key)[:CANDIDATES]:
        if not Path(record.tree).is_dir():
            continue
        distance = delta_size(repo, record.commit, start)
        if distance <= MAX_DELTA_PATHS and (best is None or distance < best.delta_paths):
            best = BaseChoice(key, record.commit, record.tree, True, distance)
    if best is not None:
        return best
    commit, distance = start, 0
    if head is not None and head != start:
        to_head = delta_size(repo, head, start)
        if to_head <= MAX_DELTA_PATHS:
            commit, distance = head, to_head
    tree = base_tree_dir(repo, key) / commit
    return BaseChoice(key, commit, str(tree), tree.is_dir(), distance)


def base_tree_dir(repo: Repo, key: str) -> Path:
    owner_home = repo.owner.home if repo.owner is not None else None
    return paths.bases_dir(owner_home) / key


def delta_size(repo: Repo, base: str, start: str) -> int:
    if base == start:
        return 0
    listing = repo.run("diff-tree", "-r", "-z", "--no-renames", "--name-only", base, start).stdout
    return listing.count(b"\0")


@contextmanager
def project_lock(key: str) -> Iterator[None]:
    """Making, choosing to keep and removing a project's bases take turns."""
    with named_lock(f"base-{key}"):
        yield


def ensure_base(repo: Repo, key: str, commit: str, tree: Path) -> BaseRecord | None:
    """Make the base of ``commit`` at ``tree`` unless it exists; the new base's record, or None
    if it existed.

    Called with :func:`project_lock` held, so parallel launches make one base, once.
    """
    if tree.is_dir():
        return None
    began = time.monotonic()
    if repo.owner is None:
        paths.make_private(paths.kapsis_home())
    else:
        repo.owner.make_private(tree.parent.parent.parent)  # their ~/.kapsis
    scratch = tree.parent / f".making-{commit}-{secrets.token_hex(4)}"
    _as_owner(repo, ["mkdir", "-p", "--", str(scratch / "tree")])
    try:
        raw = _raw_checkout_repo(repo, scratch)
        env = {"GIT_INDEX_FILE": str(scratch / "index")}
        raw.run("read-tree", commit, env=env)
        # -u keeps the files' stat data in the index: an agent's `git status` on an unchanged
        # view need not read them all again.
        raw.run(
            "checkout-index", "--all", "--force", "-u",
            env=env, extra_config=RAW_CHECKOUT_CONFIG,
        )  # fmt: skip
        _as_owner(repo, ["mv", "-T", "--", str(scratch / "index"), str(index_path(str(tree)))])
        try:
            _as_owner(repo, ["mv", "-T", "--", str(scratch / "tree"), str(tree)])
        except SandboxError:
            if not tree.is_dir():  # else another launch (root's or the user's) made it first
                raise
    finally:
        remove_tree(scratch, repo.owner)
    files, size = _tree_size(repo, commit)
    record = BaseRecord(
        project=str(repo.root),
        key=key,
        commit=commit,
        tree=str(tree),
        files=files,
        bytes=size,
        seconds=round(time.monotonic() - began, 3),
        made_at=time.time(),
        owner_uid=repo.owner.uid if repo.owner is not None else None,
    )
    write_record(record)
    return record


# The base holds each blob as git stores it, like the delta above it and like the host's commit
# of the agent's work: no end-of-line or encoding conversion, no $Id$, no filter driver, whatever
# the commit's own .gitattributes (which an agent may have written) or the user's config say.
RAW_ATTRIBUTES = "* -text -eol -ident -filter -working-tree-encoding\n"
RAW_CHECKOUT_CONFIG = ("core.autocrlf=false", "core.symlinks=true", "core.eol=lf")


def _raw_checkout_repo(repo: Repo, scratch: Path) -> Repo:
    """A scratch git dir that borrows the project's objects and whose info/attributes (which
    outrank the tree's) turn every conversion off; its work tree is ``scratch/tree``."""
    git_dir = scratch / "git"
    _as_owner(repo, ["git", "init", "--bare", "--quiet", str(git_dir)])
    objects = repo.common_dir / "objects"
    for path, content in (
        (git_dir / "info" / "attributes", RAW_ATTRIBUTES),
        (git_dir / "objects" / "info" / "alternates", f"{objects}\n"),
    ):
        script = 'mkdir -p -- "$(dirname -- "$2")" && printf "%s" "$1" > "$2"'
        _as_owner(repo, ["sh", "-c", script, "sh", content, str(path)])
    return Repo(scratch / "tree", git_dir, git_dir)


def _as_owner(repo: Repo, argv: list[str]) -> None:
    """``argv`` as the repository's owner (root on a user's repository: in their home, with
    their rights), else as this process; a failure stops the launch and says why."""
    if repo.owner is not None:
        result = repo.owner.run(argv)
    else:
        result = subprocess.run(argv, capture_output=True, cwd="/", check=False)
    if result.returncode != 0:
        raise SandboxError(
            f"cannot make the project's base: {' '.join(argv[:2])} failed: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )


def write_record(record: BaseRecord) -> None:
    directory = paths.private_dir(paths.base_records_dir() / record.key)
    paths.write_private(directory / f"{record.commit}.json", json.dumps(asdict(record)))


def remove_base(record: BaseRecord) -> None:
    """Delete a base's files (as their owner, in a user's home) and then its record."""
    owner = RepoOwner.for_uid(record.owner_uid)
    remove_tree(Path(record.tree), owner)
    remove_tree(record.index, owner)
    (paths.base_records_dir() / record.key / f"{record.commit}.json").unlink(missing_ok=True)


def remove_stale_scratch(key: str) -> None:
    """Half-made bases of launches that died; call with the project's lock held (a launch
    making one holds it)."""
    places = {(Path(record.tree).parent, record.owner_uid) for record in records(key)}
    for directory, owner_uid in places:
        for scratch in directory.glob(".making-*"):
            remove_tree(scratch, RepoOwner.for_uid(owner_uid))


def _tree_size(repo: Repo, commit: str) -> tuple[int, int]:
    listing = repo.run("ls-tree", "-r", "-l", "-z", commit).stdout
    files = size = 0
    for entry in listing.split(b"\0"):
        if not entry:
            continue
        fields = entry.split(b"\t", 1)[0].split()
        files += 1
        if len(fields) == 4 and fields[3].isdigit():
            size += int(fields[3])
    return files, size
