"""Removing a finished agent's worktree and, once it is safe, its local branch."""

from __future__ import annotations

from pathlib import Path

from kapsis.git.branches import checked_out_branches
from kapsis.git.lock import repository_lock
from kapsis.git.owner import RepoOwner
from kapsis.sandbox.plan import SandboxPlan
from kapsis.workspace.prepare import plan_repo
from kapsis.workspace.worktree import remove_worktree


def remove_worktree_of(plan: SandboxPlan) -> None:
    worktree = plan.workspace.worktree
    if worktree is None:
        return
    repo = plan_repo(plan)
    # Whose it was when planned, even if the repository has gone since.
    owner = RepoOwner.for_uid(plan.workspace.git_uid)
    if repo is None:
        remove_worktree(None, Path(worktree), owner)
        return
    with repository_lock(repo.common_dir):
        remove_worktree(repo, Path(worktree), owner)


def branch_is_saved(plan: SandboxPlan) -> tuple[bool, str]:
    """Whether deleting the agent's local branch loses nothing, and why (not)."""
    repo = plan_repo(plan)
    git = plan.git
    if repo is None or git.branch is None:
        return False, "no branch"
    local = repo.rev(f"refs/heads/{git.branch}")
    if local is None:
        return False, "already gone"
    if local == git.start_commit and not git.resume:
        return True, "holds no work"
    tracking = repo.rev(f"refs/remotes/{git.remote}/{git.branch}")
    if tracking is not None and repo.is_ancestor(local, tracking):
        return True, f"pushed to {git.remote}"
    return False, "has unpushed commits"


def deletable_branch(plan: SandboxPlan, *, force: bool) -> tuple[str, ...]:
    """``("branch NAME",)`` when cleanup may delete the agent's branch, else ``()``."""
    saved, _ = branch_is_saved(plan)
    repo = plan_repo(plan)
    if repo is None or plan.git.branch is None or repo.rev(f"refs/heads/{plan.git.branch}") is None:
        return ()
    if plan.git.branch in checked_out_branches(repo) and plan.workspace.worktree is None:
        return ()
    return (f"branch {plan.git.branch}",) if saved or force else ()


def delete_branch(plan: SandboxPlan, *, force: bool) -> None:
    repo = plan_repo(plan)
    branch = plan.git.branch
    if repo is None or branch is None:
        return
    saved, _ = branch_is_saved(plan)
    if not (saved or force):
        return
    with repository_lock(repo.common_dir):
        checked_out = checked_out_branches(repo)
        if branch in checked_out:
            return  # someone has it checked out (e.g. the user switched to it)
        local = repo.rev(f"refs/heads/{branch}")
        if local is not None:
            repo.run("update-ref", "-d", f"refs/heads/{branch}", local, check=False)
