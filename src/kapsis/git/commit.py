"""Turn the agent's work into a commit on its branch, on the host, without a checkout.

The new tree is the start commit's tree with the workspace changes applied, built by
``git fast-import`` (no work tree, no index of the user's, no hooks, no filters). Paths matching
``git.commit_exclude`` and new files the repository ignores are left out. The commit goes on top
of the agent's own commits when it made any, and the branch moves with a compare-and-swap from
the tip it had at launch, so nothing a user or another agent did meanwhile is overwritten.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from kapsis.errors import GitWorkflowError
from kapsis.git.agent_commits import AgentObjects, read_branch_tip
from kapsis.git.changes import TreeEntry, WorkspaceChanges, Written
from kapsis.git.hidden import hide_rules
from kapsis.git.lock import repository_lock
from kapsis.git.runner import Repo

SCRATCH_REF_PREFIX = "refs/kapsis/scratch/"


@dataclass(frozen=True)
class CommitRequest:
    repo: Repo
    branch: str
    start_commit: str
    message: str
    committer_name: str
    committer_email: str
    exclude: tuple[str, ...]
    scratch_name: str
    agent_git: Path | None = None
    ignore_view: Path | None = None
    max_file_size: int | None = None  # larger files are left out (git.max_file_size)
    # filesystem.hide: the start commit's files it hides are kept as they are (the agent never
    # saw them, so their absence is no deletion); what the agent wrote there is left out.
    hide: tuple[str, ...] = ()


# Below this much free space, a failed fast-import is put down to a full disk.
LOW_SPACE_BYTES = 16 * 1024 * 1024
# What one commit reads of the agent's files at most: the agent makes files for nothing
# (sparse ones take no disk), the host reads every byte of them.
MAX_COMMIT_BYTES = 2 * 1024**3
# A file larger than this that takes less than 1/8 of its size on disk is mostly holes.
SPARSE_FROM = 1024 * 1024


def split_identity(identity: str) -> tuple[str, str]:
    """``"Name <email>"`` (git.committer's form) as (name, email)."""
    name, _, email = identity.partition(" <")
    return name, email.rstrip(">")


@dataclass
class CommitOutcome:
    commit_sha: str | None
    created_commit: bool
    agent_commits: int = 0
    squashed_agent_commits: bool = False
    excluded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    # Left out as larger than git.max_file_size: (path, size in bytes).
    too_large: list[tuple[str, int]] = field(default_factory=list)
    # Left out as mostly holes, or past MAX_COMMIT_BYTES in all: (path, size in bytes).
    sparse: list[tuple[str, int]] = field(default_factory=list)
    over_total: list[tuple[str, int]] = field(default_factory=list)
    # What the agent wrote where filesystem.hide hides: left out.
    hidden: list[str] = field(default_factory=list)


def is_excluded(path: str, patterns: Iterable[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def tree_listing(
    repo: Repo, commit: str, env: dict[str, str] | None = None
) -> dict[str, TreeEntry]:
    raw = repo.run("ls-tree", "-r", "-z", "-l", "--full-tree", commit, env=env).stdout
    listing: dict[str, TreeEntry] = {}
    for record in raw.split(b"\0"):
        if not record:
            continue
        meta, _, path = record.partition(b"\t")
        mode, _kind, object_id, size = meta.decode().split()
        listing[os.fsdecode(path)] = TreeEntry(mode, object_id, int(size) if size.isdigit() else -1)
    return listing


def quote_path(path: str) -> bytes:
    """A path in fast-import's C-style quoting, safe for any byte a file name may hold."""
    out = bytearray(b'"')
    for byte in os.fsencode(path):
        if byte in (0x22, 0x5C):
            out += b"\\" + bytes([byte])
        elif byte < 0x20 or byte == 0x7F:
            out += b"\\%03o" % byte
        else:
            out.append(byte)
    out += b'"'
    return bytes(out)


def commit_workspace(request: CommitRequest, changes: WorkspaceChanges) -> CommitOutcome:
    """Commit what the agent left in its workspace (and keep its own commits)."""
    repo = request.repo
    start = request.start_commit
    with repository_lock(repo.common_dir), hide_rules(request.hide) as hiding:
        tip = start
        agent_commits = 0
        squash = False
        outcome_excluded: set[str] = set()
        start_listing = tree_listing(repo, start)
        tracked = set(start_listing)
        kept_hidden = {path: start_listing[path] for path in hiding.tracked(repo, start)}
        agent_tip = (
            read_branch_tip(request.agent_git, request.branch) if request.agent_git else None
        )
        if request.agent_git is not None and agent_tip is not None and agent_tip != start:
            with AgentObjects(repo, request.agent_git) as agent_objects:
                agent_commits = agent_objects.verify(start, agent_tip)
                # What the agent committed counts as tracked even when its commits are squashed.
                tracked |= set(tree_listing(repo, agent_tip, env=agent_objects.env))
                touched = agent_objects.touched_paths(start, agent_tip)
                leaked = {path for path in touched if is_excluded(path, request.exclude)}
                leaked |= hiding.matching(touched)
                if leaked:
                    # Keeping those commits would put excluded files in the branch's history;
                    # they are not imported at all.
                    squash = True
                    outcome_excluded |= leaked
                else:
                    agent_objects.import_into_repository(start, agent_tip)
                    tip = agent_tip

        written = dict(changes.written)
        hidden_written = sorted(hiding.matching(written))
        for path in hidden_written:
            del written[path]
        too_large: list[tuple[str, int]] = []
        sparse: list[tuple[str, int]] = []
        over_total: list[tuple[str, int]] = []
        total = 0
        for path, item in sorted(written.items()):
            # Judged on the size listed, never read: a sparse file of a terabyte costs the
            # agent nothing and must cost the host nothing either.
            if is_excluded(path, request.exclude):
                pass  # git.commit_exclude: listed as excluded only
            elif request.max_file_size is not None and item.size > request.max_file_size:
                too_large.append((path, item.size))
            elif item.size > SPARSE_FROM and item.allocated < item.size // 8:
                sparse.append((path, item.size))
            elif total + item.size > MAX_COMMIT_BYTES:
                over_total.append((path, item.size))
            else:
                total += item.size
                continue
            outcome_excluded.add(path)
            del written[path]
        ignored = _ignored(repo, [p for p in written if p not in tracked], request.ignore_view)
        for path in ignored:
            del written[path]

        tree = _build_tree(repo, request, start, changes, written, kept_hidden)
        outcome = CommitOutcome(
            commit_sha=None,
            created_commit=False,
            agent_commits=agent_commits,
            squashed_agent_commits=squash,
            excluded=sorted(outcome_excluded),
            ignored=sorted(ignored),
            unsupported=sorted(changes.unsupported),
            too_large=too_large,
            sparse=sparse,
            over_total=over_total,
            hidden=hidden_written,
        )
        if tree == repo.tree_of(tip):
            new_tip = tip
        else:
            message = request.message
            if squash:
                message = message.rstrip("\n") + (
                    f"\n\nThe agent's {agent_commits} commit(s) were squashed into this one "
                    "because they touched paths in git.commit_exclude.\n"
                )
            new_tip = _commit_tree(repo, request, tree, tip, message)
            outcome.created_commit = True
        if new_tip != start:
            _move_branch(repo, request.branch, new_tip, start)
            outcome.commit_sha = new_tip
        return outcome


def _commit_tree(repo: Repo, request: CommitRequest, tree: str, parent: str, message: str) -> str:
    identity = {
        "GIT_AUTHOR_NAME": request.committer_name,
        "GIT_AUTHOR_EMAIL": request.committer_email,
        "GIT_COMMITTER_NAME": request.committer_name,
        "GIT_COMMITTER_EMAIL": request.committer_email,
    }
    result = repo.run("commit-tree", tree, "-p", parent, input=message.encode(), env=identity)
    return result.stdout.decode().strip()


def _move_branch(repo: Repo, branch: str, new_tip: str, expected: str) -> None:
    result = repo.run(
        "update-ref",
        "-m",
        "kapsis: the agent's work",
        f"refs/heads/{branch}",
        new_tip,
        expected,
        check=False,
    )
    if result.returncode != 0:
        keep = f"refs/kapsis/saved/{branch}"
        repo.run("update-ref", keep, new_tip, check=False)
        raise GitWorkflowError(
            f"branch {branch} moved while the agent ran, so the host did not overwrite it; the "
            f"agent's work is commit {new_tip[:12]} (kept as {keep}); "
            f"merge it with `git -C {repo.root} merge {new_tip[:12]}`"
        )


def _ignored(repo: Repo, paths: list[str], view: Path | None) -> list[str]:
    """The new (untracked) paths that the repository's ignore rules exclude."""
    if not paths:
        return []
    # check-ignore refuses literal pathspecs; a "./" prefix keeps a name that starts with ":"
    # from being read as pathspec magic, and comes back in the output.
    result = repo.run(
        "check-ignore",
        "--no-index",
        "--stdin",
        "-z",
        input=b"".join(b"./" + os.fsencode(p) + b"\0" for p in paths),
        env={"GIT_LITERAL_PATHSPECS": "0"},
        work_tree=view or repo.root,
        check=False,
        # Reads the ignore files of a view that may sit in Kapsis's own (root-only) dirs.
        as_owner=False,
    )
    if result.returncode not in (0, 1):
        raise GitWorkflowError(
            f"git check-ignore failed: {result.stderr.decode(errors='replace').strip()}"
        )
    return [os.fsdecode(p.removeprefix(b"./")) for p in result.stdout.split(b"\0") if p]


def _fast_import_failure(repo: Repo, stderr: str) -> str:
    """One line that says why fast-import failed; a full disk by name."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    fatal = [line for line in lines if line.startswith("fatal:")]
    reason = (fatal or lines or ["no message"])[-1][:300]
    try:
        disk = os.statvfs(repo.common_dir)
    except OSError:
        return f"git fast-import failed: {reason}"
    if disk.f_bavail * disk.f_frsize < LOW_SPACE_BYTES:
        return (
            f"no space left on the repository's disk ({repo.common_dir}); free some, and "
            f"commit the work kept in the sandbox (git fast-import: {reason})"
        )
    return f"git fast-import failed: {reason}"


def _build_tree(
    repo: Repo,
    request: CommitRequest,
    start: str,
    changes: WorkspaceChanges,
    written: dict[str, Written],
    kept: dict[str, TreeEntry],
) -> str:
    """Start's tree with the changes applied, via fast-import into a scratch ref; the ``kept``
    entries of start's (the hidden files) as they were, whatever the changes did above them."""
    scratch = f"{SCRATCH_REF_PREFIX}{request.scratch_name}"
    process = repo.popen(
        "fast-import", "--quiet", "--force", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    assert process.stdin is not None
    stream = process.stdin
    try:
        stream.write(f"commit {scratch}\ncommitter kapsis <kapsis@localhost> 0 +0000\n".encode())
        stream.write(f"data 0\nfrom {start}\n".encode())
        for path in [*changes.deleted, *changes.cleared]:
            stream.write(b"D " + quote_path(path) + b"\n")
        for path, item in written.items():
            stream.write(f"M {item.mode} inline ".encode() + quote_path(path) + b"\n")
            # Streamed: a file is never held in memory whole.
            item.stream(lambda size: stream.write(b"data %d\n" % size), stream.write)
            stream.write(b"\n")
        for path, entry in kept.items():
            stream.write(f"M {entry.mode} {entry.object_id} ".encode() + quote_path(path) + b"\n")
        stream.write(b"\n")
        stream.close()
    except BrokenPipeError:
        pass
    except BaseException:
        process.kill()  # a file could not be read: fast-import must not finish a partial tree
        process.wait()
        raise
    error = process.stderr.read() if process.stderr else b""
    if process.wait() != 0:
        raise GitWorkflowError(_fast_import_failure(repo, error.decode(errors="replace")))
    try:
        return repo.tree_of(scratch)
    finally:
        repo.run("update-ref", "-d", scratch, check=False)
