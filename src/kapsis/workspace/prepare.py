"""Host-side workspace preparation before the sandbox starts, and the agent's branch creation.

For a git project: create (or check) the agent's branch, write the agent's git view, and in
worktree mode check out the worktree; in overlay mode write the gitlink into the upper dir (it
hides the project's own ``.git`` from the agent) and, when the start commit is not the checkout,
the delta layer. Mounting is the backend's job; this only writes files and refs.
"""

from __future__ import annotations

from pathlib import Path

from kapsis.errors import SandboxError
from kapsis.git.lock import repository_lock
from kapsis.git.runner import ZERO_SHA, GitCommandError, Repo
from kapsis.sandbox.plan import SandboxPlan
from kapsis.workspace.delta import build_delta
from kapsis.workspace.gitview import build_agent_git, write_gitlink
from kapsis.workspace.worktree import add_worktree, remove_worktree


def plan_repo(plan: SandboxPlan) -> Repo | None:
    git = plan.git
    if not git.repository or git.git_dir is None or git.common_dir is None:
        return None
    return Repo(Path(plan.project), Path(git.git_dir), Path(git.common_dir))


def prepare_workspace(plan: SandboxPlan) -> None:
    workspace, git = plan.workspace, plan.git
    Path(workspace.root).mkdir(parents=True, exist_ok=True)
    repo = plan_repo(plan)
    if repo is None:
        return
    assert git.branch is not None and git.start_commit is not None
    assert workspace.agent_git is not None
    try:
        with repository_lock(repo.common_dir):
            if workspace.release_worktree is not None:
                remove_worktree(repo, Path(workspace.release_worktree))
            _create_branch(repo, git.branch, git.start_commit, resume=git.resume)
            if workspace.mode == "worktree":
                assert workspace.worktree is not None and workspace.gitlink is not None
                add_worktree(repo, Path(workspace.worktree), git.branch)
                write_gitlink(Path(workspace.gitlink))
        build_agent_git(
            repo,
            Path(workspace.agent_git),
            branch=git.branch,
            start=git.start_commit,
            agent=plan.agent,
            agent_id=plan.agent_id,
            checkout_index=_checkout_index(plan, repo),
        )
        if workspace.mode == "overlay":
            # Rootless, podman mounts the overlay itself and needs its scratch dir to exist.
            Path(workspace.work).mkdir(parents=True, exist_ok=True)
            write_gitlink(Path(workspace.upper) / ".git")
            if workspace.needs_delta:
                build_delta(
                    repo,
                    git.start_commit,
                    Path(workspace.delta),
                    hide_untracked=workspace.hide_untracked,
                )
    except GitCommandError as error:
        raise SandboxError(f"cannot prepare the agent's git workspace: {error}") from None


def _checkout_index(plan: SandboxPlan, repo: Repo) -> Path | None:
    """The index of the files the agent will see, if one exists that can describe them."""
    workspace = plan.workspace
    if workspace.mode == "worktree" and workspace.worktree is not None:
        own = Repo.discover(Path(workspace.worktree))
        return own.git_dir / "index" if own is not None else None
    # Overlay: the project's checkout is the lower layer; with a delta on top it is not.
    return None if workspace.needs_delta else repo.git_dir / "index"


def _create_branch(repo: Repo, branch: str, start: str, *, resume: bool) -> None:
    ref = f"refs/heads/{branch}"
    if resume:
        if repo.rev(ref) != start:
            raise SandboxError(
                f"branch {branch} moved after the run was planned; run again to start from its "
                "new tip"
            )
        return
    result = repo.run("update-ref", ref, start, ZERO_SHA, check=False)
    if result.returncode != 0:
        raise SandboxError(
            f"branch {branch} appeared after the run was planned (another agent?); run again"
        )


def abandon_workspace(plan: SandboxPlan) -> None:
    """Undo :func:`prepare_workspace` after a sandbox that never started: the agent did nothing."""
    repo = plan_repo(plan)
    git, workspace = plan.git, plan.workspace
    if repo is None or git.branch is None or git.start_commit is None:
        return
    with repository_lock(repo.common_dir):
        if workspace.worktree is not None:
            remove_worktree(repo, Path(workspace.worktree))
        if not git.resume:
            # Only while it still points where it was created: then it holds nothing new.
            repo.run("update-ref", "-d", f"refs/heads/{git.branch}", git.start_commit, check=False)
