"""Host-side workspace preparation before the sandbox starts, and the agent's branch creation.

For a git project: create (or check) the agent's branch, write the agent's git view, and in
worktree mode check out the worktree; in overlay mode write the gitlink into the upper dir (it
hides the project's own ``.git`` from the agent) and, when the start commit is not the checkout,
the delta layer. Mounting is the backend's job; this only writes files and refs.
"""

from __future__ import annotations

from pathlib import Path

from kapsis.errors import SandboxError
from kapsis.git.hidden import hide_rules, mark_skip_worktree, view_tree
from kapsis.git.lock import repository_lock
from kapsis.git.runner import ZERO_SHA, GitCommandError, Repo
from kapsis.sandbox.plan import SandboxPlan
from kapsis.workspace.bases import BaseRecord, ensure_base, index_path, project_lock
from kapsis.workspace.delta import build_delta
from kapsis.workspace.disk import make_disk, release_disk
from kapsis.workspace.gitview import build_agent_git, write_gitlink
from kapsis.workspace.hiding import hide_in_worktree, whiteout_hidden
from kapsis.workspace.worktree import add_worktree, remove_worktree


def plan_repo(plan: SandboxPlan) -> Repo | None:
    git = plan.git
    if not git.repository or git.git_dir is None or git.common_dir is None:
        return None
    if not Path(git.common_dir).is_dir():
        return None  # the project (or its repository) was deleted since
    return Repo(Path(plan.project), Path(git.git_dir), Path(git.common_dir))


def prepare_workspace(plan: SandboxPlan) -> BaseRecord | None:
    """Write the workspace's files and refs; the base it made, if this launch made one."""
    workspace, git = plan.workspace, plan.git
    Path(workspace.root).mkdir(parents=True, exist_ok=True)
    repo = plan_repo(plan)
    if repo is None:
        if workspace.mode == "overlay" and workspace.needs_delta and not git.repository:
            # The project itself is the lower layer: what it hides is whited out above it.
            Path(workspace.delta).mkdir(parents=True, exist_ok=True)
            try:
                with hide_rules(workspace.hide) as rules:
                    whiteout_hidden(Path(plan.project), Path(workspace.delta), rules)
            except OSError as error:
                # A folder that cannot be listed may still hold a hidden file the agent could
                # open by name: the launch stops rather than show it.
                raise SandboxError(
                    f"cannot look through {plan.project} for filesystem.hide: {error}; make it "
                    "readable, or set filesystem.hide: [] if nothing in it is secret"
                ) from None
        return None
    made: BaseRecord | None = None
    assert git.branch is not None and git.start_commit is not None
    assert workspace.agent_git is not None
    # Before anything is written where the agent will write: that is on its own disk.
    make_disk(workspace)
    try:
        with repository_lock(repo.common_dir):
            if workspace.release_worktree is not None:
                remove_worktree(repo, Path(workspace.release_worktree))
            _create_branch(repo, git.branch, git.start_commit, resume=git.resume)
            if workspace.mode == "worktree":
                assert workspace.worktree is not None and workspace.gitlink is not None
                add_worktree(repo, Path(workspace.worktree), git.branch)
                hide_in_worktree(Path(workspace.worktree), _hidden(plan, repo))
                write_gitlink(Path(workspace.gitlink))
        if workspace.mode == "overlay":
            Path(workspace.work).mkdir(parents=True, exist_ok=True)
            write_gitlink(Path(workspace.upper) / ".git")
            made = _prepare_layers(plan, repo)
        build_agent_git(
            repo,
            Path(workspace.agent_git),
            branch=git.branch,
            start=git.start_commit,
            agent=plan.agent,
            agent_id=plan.agent_id,
            checkout_index=_checkout_index(plan, repo),
        )
        # The agent's git does not take the hidden files for deleted (a worktree's copied
        # index has the marks already).
        mark_skip_worktree(repo, _hidden(plan, repo), Path(workspace.agent_git) / "index")
        _make_mount_points(plan, repo)
    except GitCommandError as error:
        raise SandboxError(f"cannot prepare the agent's git workspace: {error}") from None
    except OSError as error:
        # Writing the layers from a commit an agent may have crafted: that launch fails, said.
        raise SandboxError(f"cannot prepare the agent's workspace: {error}") from None
    return made


def _prepare_layers(plan: SandboxPlan, repo: Repo) -> BaseRecord | None:
    """The frozen base (made if missing) and the start commit's delta above it."""
    workspace, git = plan.workspace, plan.git
    if workspace.base is None or workspace.base_commit is None or workspace.base_key is None:
        return None
    assert git.start_commit is not None
    # The run's plan, which names the base, is saved before this; cleanup decides under the
    # same lock, so it either removed the base before (and it is made again here) or sees the
    # run using it.
    with project_lock(workspace.base_key):
        made = ensure_base(repo, workspace.base_key, workspace.base_commit, Path(workspace.base))
    if workspace.needs_delta and workspace.hidden_paths:
        with hide_rules(workspace.hide) as rules:
            hidden = rules.tracked(repo, git.start_commit)
            tree, env = view_tree(repo, rules, git.start_commit, hidden)
            build_delta(repo, workspace.base_commit, tree, Path(workspace.delta), tree_env=env)
    elif workspace.needs_delta:
        build_delta(repo, workspace.base_commit, git.start_commit, Path(workspace.delta))
    return made


def _hidden(plan: SandboxPlan, repo: Repo) -> list[str]:
    """The start commit's files that filesystem.hide hides (none when planning found none)."""
    if not plan.workspace.hidden_paths or plan.git.start_commit is None:
        return []
    with hide_rules(plan.workspace.hide) as rules:
        return rules.tracked(repo, plan.git.start_commit)


def _make_mount_points(plan: SandboxPlan, repo: Repo) -> None:
    """Where podman mounts the shared ignored directories: made in the agent's layer (overlay)
    or, as the owner, in the worktree, so podman never creates them through an idmapped bind."""
    workspace = plan.workspace
    for shared in workspace.shared:
        if workspace.mode == "overlay":
            (Path(workspace.upper) / shared.path).mkdir(parents=True, exist_ok=True)
        elif workspace.worktree is not None:
            point = Path(workspace.worktree) / shared.path
            if repo.owner is None:
                point.mkdir(parents=True, exist_ok=True)
            else:
                repo.owner.run(["mkdir", "-p", "--", str(point)])


def _checkout_index(plan: SandboxPlan, repo: Repo) -> Path | None:
    """The index of the files the agent will see, if one exists that can describe them."""
    workspace = plan.workspace
    if workspace.mode == "worktree" and workspace.worktree is not None:
        own = Repo.discover(Path(workspace.worktree))
        return own.git_dir / "index" if own is not None else None
    # Overlay: the base's own index, when the view is the base alone.
    if workspace.base is None or workspace.needs_delta:
        return None
    return index_path(workspace.base)


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
    release_disk(plan.workspace)
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
