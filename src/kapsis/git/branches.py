"""The agent's branch: its name (given or derived from the task), git's naming rules, its start.

A branch that exists is continued from its tip, which is how a user iterates: review the
agent's work, update the spec, run again on the same branch. A new branch starts from
``base_branch`` or, by default, from the commit the project has checked out.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kapsis.errors import ConfigError
from kapsis.git.runner import GIT, Repo, git_environment

BRANCH_PREFIX = "kapsis/"
_SLUG_LIMIT = 40


def slugify(text: str) -> str:
    """Lowercase words of ``text`` joined by '-', short enough for a branch name."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > _SLUG_LIMIT:
            break
        slug = candidate
    return slug or "task"


def auto_branch_name(task_summary: str, agent_id: str) -> str:
    return f"{BRANCH_PREFIX}{slugify(task_summary)}-{agent_id}"


def check_branch_name(name: str, where: str) -> str:
    """``name`` if git accepts it as a branch name; else a ConfigError naming ``where``."""
    # Outside any repository, so that "@{-1}" is judged as a name, not expanded.
    result = subprocess.run(
        [GIT, "check-ref-format", "--branch", name],
        capture_output=True,
        text=True,
        env=git_environment({"GIT_CEILING_DIRECTORIES": "/"}),
        cwd="/",
        check=False,
    )
    if result.returncode != 0 or name.startswith("-") or name == "HEAD" or "@{" in name:
        raise ConfigError(
            f"{where}: {name!r} is not a valid branch name (git's rules: no spaces, '..', '~', "
            "'^', ':', '?', '*', '[', '\\\\', no leading '-' or trailing '.lock'); pick another"
        )
    return name


def checked_out_branches(repo: Repo) -> dict[str, Path]:
    """Branch name -> the work tree that has it checked out, over all of the repo's worktrees."""
    listing = repo.run("worktree", "list", "--porcelain", "-z").stdout.decode()
    checked_out: dict[str, Path] = {}
    worktree: Path | None = None
    for field in listing.split("\0"):
        if field.startswith("worktree "):
            worktree = Path(field.removeprefix("worktree "))
        elif field.startswith("branch refs/heads/") and worktree is not None:
            checked_out[field.removeprefix("branch refs/heads/")] = worktree
    return checked_out


@dataclass(frozen=True)
class BranchTarget:
    branch: str
    start_commit: str
    resume: bool
    base: str
    # A finished agent's worktree that still has the branch checked out, to be removed first.
    release_worktree: Path | None = None


def resolve_target(
    repo: Repo,
    branch: str,
    base_branch: str | None,
    *,
    branch_origin: str,
    base_origin: str,
    releasable: frozenset[Path] = frozenset(),
) -> BranchTarget:
    """Where the agent's branch starts, checked against the repository as it is now.

    ``releasable`` are worktrees of finished agents whose work is saved: a branch checked out
    in one of them can be continued (the worktree is removed before the new run).
    """
    in_use = checked_out_branches(repo)
    release = None
    if branch in in_use:
        if in_use[branch] not in releasable:
            raise ConfigError(
                f"{branch_origin}: branch {branch!r} is checked out in {in_use[branch]}; the "
                "host commits to the agent's branch, so pick another branch or switch that "
                "checkout away"
            )
        release = in_use[branch]
    tip = repo.rev(f"refs/heads/{branch}^{{commit}}")
    if tip is not None:
        return BranchTarget(branch, tip, resume=True, base=branch, release_worktree=release)
    if base_branch is not None:
        start = repo.rev(f"refs/heads/{base_branch}^{{commit}}") or repo.rev(
            f"{base_branch}^{{commit}}"
        )
        if start is None:
            raise ConfigError(
                f"{base_origin}: base branch {base_branch!r} does not exist in {repo.root}; "
                "name an existing branch or commit"
            )
        return BranchTarget(branch=branch, start_commit=start, resume=False, base=base_branch)
    head = repo.rev("HEAD^{commit}")
    if head is None:
        raise ConfigError(
            f"PROJECT {repo.root}: the repository has no commits yet; commit something first "
            "so the agent's branch has a place to start"
        )
    current = repo.run("symbolic-ref", "--quiet", "--short", "HEAD", check=False)
    base = current.stdout.decode().strip() if current.returncode == 0 else head[:12]
    return BranchTarget(branch=branch, start_commit=head, resume=False, base=base)
