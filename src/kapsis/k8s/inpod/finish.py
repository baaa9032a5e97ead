"""The finishing step (container ``finisher``): commit the agent's work, push it, verify the push.

1. Waits until the operator has written the agent's exit code into the Pod's
   ``kapsis.dev/agent-exit-code`` annotation (seen through a downward-API file, polled, with a
   deadline): the operator writes it when the kubelet reports the agent container terminated,
   so the agent can neither fake it nor still be running.
2. Commits with the host's own code path (:func:`kapsis.git.commit.commit_workspace`) into the
   trusted repository: the workspace is read as files and the agent's commits are imported as
   untrusted objects, so nothing in the agent's ``.git`` (hooks, config, fsmonitor, credential
   helpers, attributes' filters) ever runs.
3. Pushes (only after a successful agent run, and when the request asks for it) with
   :func:`kapsis.git.push.push_branch`, which reads the remote back and requires it to equal the
   commit.
4. Writes ``{"branch", "commitSha", "pushStatus", "message"}`` (plus ``errorType`` on failure)
   to the termination-message file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kapsis.errors import GitWorkflowError, KapsisError, SandboxError
from kapsis.git.changes import from_worktree
from kapsis.git.commit import CommitRequest, commit_workspace, split_identity, tree_listing
from kapsis.git.push import push_branch
from kapsis.git.runner import Repo
from kapsis.k8s import layout
from kapsis.k8s.inpod.credentials import prepare
from kapsis.k8s.inpod.result import write_result
from kapsis.k8s.layout import StepConfig
from kapsis.k8s.names import AGENT_EXIT_ANNOTATION, AGENT_FAILURE_ANNOTATION

POLL_SECONDS = 0.5


def read_annotations(path: Path) -> dict[str, str]:
    """The downward API's annotations file: one ``key="Go-quoted value"`` per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    annotations: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw.strip('"')
        annotations[key.strip()] = str(value)
    return annotations


def wait_for_exit_code(
    path: Path,
    timeout: float,
    poll: float = POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """The agent's exit code, once the operator has annotated the Pod with it."""
    deadline = clock() + timeout
    while True:
        value = read_annotations(path).get(AGENT_EXIT_ANNOTATION)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise SandboxError(
                    f"annotation {AGENT_EXIT_ANNOTATION} is {value!r}, not an exit code"
                ) from None
        if clock() >= deadline:
            raise SandboxError(
                f"no {AGENT_EXIT_ANNOTATION} annotation within {timeout:g}s; the agent's "
                "work was not committed"
            )
        time.sleep(poll)


def finish(
    config: StepConfig,
    exit_code: int,
    *,
    agent_failure: str | None = None,
    workspace: Path,
    trusted_volume: Path,
    secret_dir: Path,
    scratch: Path,
) -> dict[str, Any]:
    """Commit and push; return the result object (never raises for a git failure)."""
    state = json.loads((trusted_volume / "state.json").read_text(encoding="utf-8"))
    branch, start = state["branch"], state["start"]
    root = trusted_volume / "repo"
    repo = Repo(root=root, git_dir=root / ".git", common_dir=root / ".git")
    result: dict[str, Any] = {"branch": branch, "commitSha": None, "pushStatus": "skipped"}
    name, email = split_identity(config.committer)
    try:
        changes = from_worktree(workspace, tree_listing(repo, start))
        outcome = commit_workspace(
            CommitRequest(
                repo=repo,
                branch=branch,
                start_commit=start,
                message=config.message,
                committer_name=name,
                committer_email=email,
                exclude=config.exclude,
                scratch_name=config.request,
                agent_git=workspace / ".git",
                ignore_view=workspace,
            ),
            changes,
        )
    except GitWorkflowError as error:
        return {**result, "message": f"commit failed: {error}", "errorType": error.error_type}
    notes = []
    if outcome.excluded:
        notes.append("not committed (excluded): " + ", ".join(outcome.excluded))
    if outcome.unsupported:
        notes.append("not committed (not a file or symlink): " + ", ".join(outcome.unsupported))
    result["commitSha"] = outcome.commit_sha
    if outcome.commit_sha is None:
        return {**result, "message": "; ".join(["the agent changed nothing", *notes])}
    summary = f"committed {outcome.commit_sha[:12]} on {branch}"
    if outcome.agent_commits:
        summary += f" ({outcome.agent_commits} commit(s) of the agent's kept)"
    if not config.push:
        return {**result, "message": "; ".join([summary, "push not requested", *notes])}
    if exit_code != 0 or agent_failure:
        why = agent_failure or f"the agent exited {exit_code}"
        reason = f"{why}, so its branch was not pushed"
        return {**result, "message": "; ".join([summary, reason, *notes])}
    credentials = prepare(config, secret_dir, scratch)
    if credentials.helper:
        # The trusted repository is the finisher's own (the agent never mounts it): naming the
        # helper there is safe, and push_branch takes no settings but the ssh command.
        repo.run("config", "credential.helper", credentials.helper)
    pushed = push_branch(
        repo,
        "origin",
        branch,
        outcome.commit_sha,
        timeout=float(config.push_timeout_seconds),
        ssh_command=credentials.ssh_command,
    )
    if pushed.status in ("pushed", "up_to_date"):
        # push_branch has read the remote back: it holds exactly this commit.
        return {
            **result,
            "pushStatus": "verified",
            "message": "; ".join([summary, pushed.message, *notes]),
        }
    error_type = "push_diverged" if pushed.status == "diverged" else "push_failed"
    return {
        **result,
        "pushStatus": "failed",
        "message": "; ".join([summary, pushed.message, *notes]),
        "errorType": error_type,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kapsis.k8s.inpod.finish")
    parser.add_argument("--workspace", type=Path, default=Path(layout.WORKSPACE))
    parser.add_argument("--trusted", type=Path, default=Path(layout.TRUSTED_VOLUME))
    parser.add_argument("--credentials", type=Path, default=Path(layout.CREDENTIALS))
    parser.add_argument("--annotations", type=Path, default=Path(layout.ANNOTATIONS_FILE))
    parser.add_argument("--termination-log", type=Path, default=Path(layout.TERMINATION_LOG))
    parser.add_argument("--poll", type=float, default=POLL_SECONDS)
    args = parser.parse_args(argv)
    result: dict[str, Any]
    try:
        config = StepConfig.from_env_value(os.environ[layout.STEP_CONFIG_ENV])
        exit_code = wait_for_exit_code(args.annotations, config.wait_timeout_seconds, args.poll)
        with tempfile.TemporaryDirectory(prefix="kapsis-finish-") as scratch:
            result = finish(
                config,
                exit_code,
                # Set with the exit code, in the same patch: both are in the file now.
                agent_failure=read_annotations(args.annotations).get(AGENT_FAILURE_ANNOTATION),
                workspace=args.workspace,
                trusted_volume=args.trusted,
                secret_dir=args.credentials,
                scratch=Path(scratch),
            )
    except (KapsisError, KeyError, ValueError, OSError) as error:
        result = {
            "branch": None,
            "commitSha": None,
            "pushStatus": "failed",
            "message": f"finishing failed: {error}",
            "errorType": getattr(error, "error_type", "sandbox"),
        }
    text = write_result(args.termination_log, result)
    print(text)
    return 1 if "errorType" in result else 0


if __name__ == "__main__":
    sys.exit(main())
