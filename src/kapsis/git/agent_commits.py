"""Bring the commits an agent made in its own git view into the project, as untrusted data.

The agent's git directory is agent-writable, so the host never runs git *in* it (its config,
hooks and alternates are the agent's). Instead the host reads one ref file as text and copies
the regular files of the agent's object store into a quarantine directory it owns (no symlinks,
no ``info/alternates``). There it checks that the history is complete and descends from the
commit the agent started from, and which paths it touched. Only accepted commits are packed
from quarantine and indexed into the project (``index-pack`` recomputes every object name).
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from kapsis.errors import GitWorkflowError
from kapsis.git.owner import SHARED_TMP
from kapsis.git.runner import GitCommandError, Repo

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_OBJECT_DIR_RE = re.compile(r"^([0-9a-f]{2}|pack)$")


def _no_symlinks_below(root: Path, path: Path) -> bool:
    """Whether no component of ``path`` after ``root`` is a symlink (the agent may plant one)."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            return False
    return True


def read_branch_tip(agent_git: Path, branch: str) -> str | None:
    """The agent's tip of ``branch`` from its loose ref or packed-refs, or None."""
    loose = agent_git / "refs" / "heads" / branch
    try:
        if _no_symlinks_below(agent_git, loose) and loose.is_file():
            value = loose.read_text(encoding="ascii", errors="replace").strip()
            return value if _SHA_RE.match(value) else None
    except OSError:
        return None
    packed = agent_git / "packed-refs"
    if packed.is_file() and not packed.is_symlink():
        wanted = f"refs/heads/{branch}"
        for line in packed.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split(" ", 1)
            if len(parts) == 2 and parts[1] == wanted and _SHA_RE.match(parts[0]):
                return parts[0]
    return None


def _copy_object_store(source: Path, destination: Path) -> None:
    """Copy the agent's loose objects and packs: regular files only, nothing else."""
    if not source.is_dir() or source.is_symlink():
        return
    for child in source.iterdir():
        if not _OBJECT_DIR_RE.match(child.name) or child.is_symlink() or not child.is_dir():
            continue
        target = destination / child.name
        target.mkdir()
        for item in child.iterdir():
            st = item.lstat()
            if stat.S_ISREG(st.st_mode):
                shutil.copyfile(item, target / item.name, follow_symlinks=False)


class AgentObjects:
    """The agent's objects in quarantine: readable by host git, not yet in the repository.

    Used as a context manager; ``env`` makes host git commands see the quarantined objects
    next to the repository's own. Only :meth:`import_into_repository` copies them in, so
    commits the host refuses or squashes leave nothing behind in the user's object store.
    """

    def __init__(self, repo: Repo, agent_git: Path) -> None:
        self.repo = repo
        self.agent_git = agent_git
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        self.env: dict[str, str] = {}

    def __enter__(self) -> AgentObjects:
        self._scratch = tempfile.TemporaryDirectory(
            prefix="kapsis-objects-", dir=SHARED_TMP if self.repo.owner is not None else None
        )
        objects = Path(self._scratch.name) / "objects"
        objects.mkdir()
        _copy_object_store(self.agent_git / "objects", objects)
        owner = self.repo.owner
        if owner is not None:  # host git reads the quarantine as the repository's owner
            owner.give(Path(self._scratch.name))
        self.env = {"GIT_ALTERNATE_OBJECT_DIRECTORIES": str(objects)}
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()

    def verify(self, start: str, tip: str) -> int:
        """Check that ``tip`` is a complete history on top of ``start``; return its length."""
        repo, env = self.repo, self.env
        try:
            kind = repo.run("cat-file", "-t", tip, env=env).stdout.decode().strip()
            if kind != "commit":
                raise GitWorkflowError(f"the agent's branch points at {tip}, which is not a commit")
            repo.run("rev-list", "--objects", "--missing=error", tip, f"^{start}", env=env)
        except GitCommandError as error:
            raise GitWorkflowError(f"the agent's commits are incomplete: {error}") from None
        ancestry = repo.run("merge-base", "--is-ancestor", start, tip, env=env, check=False)
        if ancestry.returncode != 0:
            raise GitWorkflowError(
                f"the agent rewrote its branch: {tip[:12]} does not descend from the start "
                f"commit {start[:12]}"
            )
        return int(repo.run("rev-list", "--count", tip, f"^{start}", env=env).stdout)

    def touched_paths(self, start: str, tip: str) -> set[str]:
        """Every path any commit in ``start..tip`` added, changed or removed."""
        commits = self.repo.run("rev-list", tip, f"^{start}", env=self.env).stdout
        if not commits.strip():
            return set()
        listing = self.repo.run(
            "diff-tree",
            "--stdin",
            "-r",
            "-m",
            "-z",
            "--no-renames",
            "--name-only",
            "--no-commit-id",
            input=commits,
            env=self.env,
        ).stdout
        return {path for path in listing.decode(errors="surrogateescape").split("\0") if path}

    def import_into_repository(self, start: str, tip: str) -> None:
        """Pack ``start..tip`` from quarantine and index it into the repository."""
        repo = self.repo
        packer = repo.popen(
            "pack-objects", "--revs", "--stdout", "--quiet",
            env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        indexer = repo.popen(
            "index-pack", "--stdin", "--fix-thin", stdin=packer.stdout, stdout=subprocess.DEVNULL
        )
        assert packer.stdin is not None and packer.stdout is not None
        packer.stdout.close()  # the indexer owns the pipe now
        packer.stdin.write(f"{tip}\n^{start}\n".encode())
        packer.stdin.close()
        packer_error = packer.stderr.read() if packer.stderr else b""
        indexer_error = indexer.communicate()[1]
        if packer.wait() != 0 or indexer.returncode != 0:
            detail = (packer_error or indexer_error).decode(errors="replace").strip()
            last = detail.splitlines()[-1] if detail else "corrupt objects"
            raise GitWorkflowError(f"the agent's commits could not be read ({last})")
        try:
            repo.run("rev-list", "--objects", "--missing=error", tip, f"^{start}")
        except GitCommandError as error:
            raise GitWorkflowError(f"the agent's commits are incomplete: {error}") from None
