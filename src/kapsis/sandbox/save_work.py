"""After the agent: the host commits its work to its branch, pushes it, runs the post-push hook.

Runs on the host, after the agent's container has stopped, so nothing in the sandbox can race
or interfere. The work is committed even when the agent failed (nothing is lost; its branch is
its own) but only pushed after a successful run. Failures never discard anything: the upper dir
or worktree stays, a commit the branch could not take is kept under ``refs/kapsis/saved/``, and
the outcome says where and how to retry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kapsis.errors import GitWorkflowError, KapsisError, PushError
from kapsis.sandbox.plan import SandboxPlan

if TYPE_CHECKING:
    from kapsis.git.runner import Repo

PushState = Literal["not_requested", "skipped", "pushed", "up_to_date", "diverged", "failed"]
HOOK_TIMEOUT_SECONDS = 120


@dataclass
class WorkOutcome:
    """What became of the agent's work; mirrored into the status record."""

    branch: str | None = None
    commit_sha: str | None = None
    created_commit: bool = False
    agent_commits: int = 0
    excluded_paths: list[str] = field(default_factory=list)
    push_status: PushState = "not_requested"
    push_message: str | None = None
    push_command: str | None = None
    pr_url: str | None = None
    work_location: str | None = None
    # Paths of the agent's work that no commit holds (excluded, too large, ignored, not files):
    # while there are any, its workspace is kept until cleanup.
    left_out: int = 0
    notes: list[str] = field(default_factory=list)
    error: KapsisError | None = None

    def status_fields(self) -> dict[str, object]:
        return {
            "commit_sha": self.commit_sha,
            "agent_commits": self.agent_commits,
            "excluded_paths": self.excluded_paths,
            "push_status": self.push_status,
            "push_message": self.push_message,
            "push_command": self.push_command,
            "pr_url": self.pr_url,
            "work_location": self.work_location,
        }


def commit_message(plan: SandboxPlan) -> str:
    git = plan.git
    text = git.commit_message.format(
        task=plan.task_summary,
        agent=plan.agent,
        agent_id=plan.agent_id,
        branch=git.branch or "",
        base=git.base or "",
        project=Path(plan.project).name,
    )
    trailers = [f"Co-authored-by: {identity}" for identity in git.co_authors]
    if trailers:
        text = text.rstrip("\n") + "\n\n" + "\n".join(trailers) + "\n"
    return text if text.endswith("\n") else text + "\n"


def work_location(plan: SandboxPlan) -> str:
    workspace = plan.workspace
    return (
        workspace.worktree
        if workspace.mode == "worktree" and workspace.worktree
        else (workspace.upper)
    )


def save_work(plan: SandboxPlan, *, agent_succeeded: bool) -> WorkOutcome:
    outcome = WorkOutcome(branch=plan.git.branch, work_location=work_location(plan))
    clear_agent_special_bits(plan)
    if not plan.git.repository:
        outcome.notes.append(
            f"{plan.project} is not a git repository; the agent's changes are in "
            f"{plan.workspace.upper}"
        )
        return outcome
    if plan.git.carried_commit:
        outcome.notes.append(
            f"your uncommitted changes at launch ({plan.git.carried_paths} path(s)) are commit "
            f"{plan.git.carried_commit[:12]} on the branch, before the agent's work "
            "(filesystem.uncommitted: include)"
        )
    if not plan.git.auto_commit:
        outcome.notes.append("git.auto_commit is off; the agent's work was not committed")
        return outcome
    # The git machinery is loaded only for runs on a repository (start-up time counts).
    from kapsis.workspace.prepare import plan_repo

    repo = plan_repo(plan)
    assert repo is not None
    try:
        _commit(plan, repo, outcome)
    except GitWorkflowError as error:
        outcome.error = error
        return outcome
    if plan.git.auto_push:
        _push(plan, repo, outcome, agent_succeeded=agent_succeeded)
    return outcome


def clear_agent_special_bits(plan: SandboxPlan) -> None:
    """No set-uid or set-gid file of the agent's stays on the host (git keeps neither bit)."""
    from kapsis.git.owner import RepoOwner, clear_special_bits

    workspace = plan.workspace
    if workspace.mode == "worktree" and workspace.worktree:
        owner = RepoOwner.for_uid(workspace.git_uid)
        clear_special_bits(Path(workspace.worktree), owner)
    elif Path(workspace.upper).is_dir():
        clear_special_bits(Path(workspace.upper), None)


def _commit(plan: SandboxPlan, repo: Repo, outcome: WorkOutcome) -> None:
    from kapsis.git.changes import from_upper, from_worktree
    from kapsis.git.commit import (
        MAX_COMMIT_BYTES,
        CommitRequest,
        commit_workspace,
        is_excluded,
        split_identity,
        tree_listing,
    )

    git, workspace = plan.git, plan.workspace
    assert git.branch and git.start_commit and git.committer
    if workspace.mode == "worktree":
        assert workspace.worktree is not None
        changes = from_worktree(
            Path(workspace.worktree),
            tree_listing(repo, git.start_commit),
            owner=workspace.git_uid,
        )
        view = Path(workspace.worktree)
    else:
        changes = from_upper(Path(workspace.upper))
        merged = Path(workspace.merged)
        view = merged if (merged / ".git").exists() else Path(plan.project)
    name, email = split_identity(git.committer)
    result = commit_workspace(
        CommitRequest(
            repo=repo,
            branch=git.branch,
            start_commit=git.start_commit,
            message=commit_message(plan),
            committer_name=name,
            committer_email=email,
            exclude=(*git.commit_exclude, *git.state_files),
            max_file_size=git.max_file_size,
            scratch_name=plan.agent_id,
            agent_git=Path(workspace.agent_git) if workspace.agent_git else None,
            ignore_view=view,
            hide=workspace.hide,
        ),
        changes,
    )
    outcome.commit_sha = result.commit_sha
    outcome.created_commit = result.created_commit
    outcome.agent_commits = result.agent_commits
    # Left out by a pattern: git.commit_exclude's, or filesystem.hide's.
    outcome.excluded_paths = sorted({*result.excluded, *result.hidden})
    outcome.left_out = len(outcome.excluded_paths) + len(result.ignored) + len(result.unsupported)
    large = {path for path, _ in (*result.too_large, *result.sparse, *result.over_total)}
    patterned = [path for path in result.excluded if path not in large]
    state = [path for path in patterned if is_excluded(path, git.state_files)]
    patterned = [path for path in patterned if path not in state]
    if patterned:
        outcome.notes.append("not committed (git.commit_exclude): " + _some_paths(patterned))
    if state:
        outcome.notes.append(
            f"not committed (the {plan.agent} CLI's own state; git.commit_agent_state: true "
            "keeps it): " + _some_paths(state)
        )
    if result.too_large:
        limit = f"{git.max_file_size / 1024**2:g} MiB"
        sized = [f"{path} ({size / 1024**2:.1f} MiB)" for path, size in result.too_large]
        outcome.notes.append(
            f"not committed (over git.max_file_size, {limit}): " + _some_paths(sized)
        )
    if result.sparse:
        sized = [f"{path} ({size / 1024**2:.1f} MiB)" for path, size in result.sparse]
        outcome.notes.append("not committed (sparse: mostly holes): " + _some_paths(sized))
    if result.over_total:
        sized = [f"{path} ({size / 1024**2:.1f} MiB)" for path, size in result.over_total]
        outcome.notes.append(
            f"not committed (the commit would pass {MAX_COMMIT_BYTES >> 30} GiB): "
            + _some_paths(sized)
        )
    if result.hidden:
        outcome.notes.append("not committed (filesystem.hide): " + _some_paths(result.hidden))
    if result.squashed_agent_commits:
        outcome.notes.append(
            f"the agent's {result.agent_commits} commit(s) touched excluded paths and were "
            "squashed into the host's commit"
        )
    if result.unsupported:
        outcome.notes.append(
            "not committed (not a file or symlink, a nested .git, or too deep to read): "
            + _some_paths(result.unsupported)
        )
    if result.commit_sha is None:
        outcome.notes.append("the agent changed nothing; no commit")
    else:
        for changed in _changed_config_files(repo, git.start_commit, result.commit_sha):
            # Never trusted by being committed: the next run from this branch refuses what
            # needs trust in it until the user has read it.
            outcome.notes.append(f"the agent changed {changed}: review it before trusting it")
    if workspace.mode == "worktree" and result.commit_sha and workspace.worktree:
        _sync_worktree_index(Path(workspace.worktree), result.commit_sha, workspace.hide)


def _changed_config_files(repo: Repo, start: str, commit: str) -> list[str]:
    """The project config files the commit changed: agent-sandbox.yaml, and anything at or
    below .kapsis (its config.yaml, or .kapsis itself made a link to another project's)."""
    from kapsis.config.loader import CONFIG_FILE_NAME

    listing = repo.run(
        "diff-tree", "-r", "-z", "--name-only", "--no-renames", start, commit, "--",
        CONFIG_FILE_NAME, ".kapsis",
        env={"GIT_LITERAL_PATHSPECS": "1"},
    ).stdout  # fmt: skip
    return [os.fsdecode(path) for path in listing.split(b"\0") if path]


def _sync_worktree_index(worktree: Path, commit: str, hide: tuple[str, ...]) -> None:
    """Point the worktree's index at the new commit, so it shows clean in the user's IDE (the
    hidden files, absent from it, marked skip-worktree again)."""
    from kapsis.git.hidden import hide_rules, mark_skip_worktree
    from kapsis.git.runner import GitCommandError, Repo

    own = Repo.discover(worktree)
    if own is None:
        return
    own.run("read-tree", commit, check=False)
    # Only how the user's git shows the worktree: a failure here loses nothing.
    with contextlib.suppress(GitCommandError), hide_rules(hide) as rules:
        mark_skip_worktree(own, rules.tracked(own, commit))


@contextlib.contextmanager
def _ssh_command(plan: SandboxPlan, repo: Repo) -> Iterator[str | None]:
    """Strict host-key checking for the push, against the run's trusted keys (rewritten here:
    the file must say what the plan says, whatever happened to the sandbox dir meanwhile).

    When git runs as the repository's owner (root on a user's repository), ssh runs as them
    too and cannot reach root's sandbox dir: it gets a copy of the file for the push's length.
    """
    if plan.ssh is None:
        yield None
        return
    from kapsis.ssh.trust import host_ssh_command, write_files

    write_files(plan.ssh)
    if repo.owner is None:
        yield host_ssh_command(plan.ssh)
        return
    from kapsis.git.owner import SHARED_TMP

    with tempfile.TemporaryDirectory(prefix="kapsis-ssh-", dir=SHARED_TMP) as scratch:
        known_hosts = Path(scratch) / "known_hosts"
        shutil.copyfile(plan.ssh.known_hosts, known_hosts)
        repo.owner.give(Path(scratch))
        yield host_ssh_command(plan.ssh.model_copy(update={"known_hosts": str(known_hosts)}))


def _push(plan: SandboxPlan, repo: Repo, outcome: WorkOutcome, *, agent_succeeded: bool) -> None:
    from kapsis.git.push import push_branch, run_post_push_hook

    git = plan.git
    assert git.branch is not None
    if not agent_succeeded:
        outcome.push_status = "skipped"
        outcome.push_message = "the agent did not succeed, so its branch was not pushed"
        return
    local = repo.rev(f"refs/heads/{git.branch}")
    if outcome.commit_sha is None or local is None:
        outcome.push_status = "skipped"
        outcome.push_message = "nothing new to push"
        return
    with _ssh_command(plan, repo) as ssh_command:
        pushed = push_branch(
            repo,
            git.remote,
            git.branch,
            local,
            timeout=float(git.push_timeout_seconds),
            ssh_command=ssh_command,
        )
    outcome.push_status = pushed.status
    outcome.push_message = pushed.message
    if pushed.status in ("failed", "diverged"):
        outcome.push_command = pushed.retry_command
        error_type = "push_diverged" if pushed.status == "diverged" else "push_failed"
        message = f"{pushed.message}; retry with: {pushed.retry_command}"
        outcome.error = PushError(message, error_type)
        return
    if git.post_push_hook:
        try:
            code, url, output = run_post_push_hook(
                git.post_push_hook,
                repo,
                branch=git.branch,
                commit=local,
                remote=git.remote,
                remote_url=pushed.remote_url or "",
                base=git.base or "",
                agent_id=plan.agent_id,
                timeout=HOOK_TIMEOUT_SECONDS,
            )
        except (OSError, subprocess.SubprocessError) as error:
            code, url, output = 127, None, str(error)
        outcome.pr_url = url
        if code != 0:
            last = (output.strip().splitlines() or ["no output"])[-1]
            outcome.notes.append(f"git.post_push_hook exited {code}: {last}")


def _some_paths(paths: list[str], count: int = 10, width: int = 200) -> str:
    """A few of ``paths`` for a note: the agent chooses how many there are and how long."""
    shown = [path if len(path) <= width else path[: width - 3] + "..." for path in paths[:count]]
    more = f" and {len(paths) - count} more" if len(paths) > count else ""
    return ", ".join(shown) + more
