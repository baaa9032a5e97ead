"""Push the agent's branch with the host's credentials, refusing to overwrite diverged work.

The sequence: look up the remote branch, fetch it when it has commits the host lacks, refuse
when the local branch does not contain it (someone else pushed to it), push with a lease on the
SHA just seen (so a push racing ours is not overwritten either), then read the remote back and
require it to equal the local SHA. Every network step has a time limit. On any failure the local
commit stays where it is and the outcome carries a command the user can paste to retry.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from kapsis.git.runner import GitCommandError, Repo, run_as_group

PushStatus = Literal["pushed", "up_to_date", "diverged", "failed"]
_URL_RE = re.compile(r"https?://[^\s<>\"']+")
HOST_KEY_FAILURE = "Host key verification failed"


@dataclass
class PushOutcome:
    status: PushStatus
    message: str
    remote_url: str | None = None
    retry_command: str | None = None
    pr_url: str | None = None


def retry_command(repo: Repo, remote: str, branch: str) -> str:
    return shlex.join(
        ["git", "-C", str(repo.root), "push", remote, f"refs/heads/{branch}:refs/heads/{branch}"]
    )


def _remote_sha(
    repo: Repo, remote: str, branch: str, timeout: float, env: Mapping[str, str]
) -> str | None:
    listing = repo.text_timeout(
        ("ls-remote", "--refs", remote, f"refs/heads/{branch}"), timeout=timeout, env=env
    )
    for line in listing.splitlines():
        sha, _, ref = line.partition("\t")
        if ref == f"refs/heads/{branch}":
            return sha
    return None


def push_branch(
    repo: Repo,
    remote: str,
    branch: str,
    local_sha: str,
    *,
    timeout: float,
    ssh_command: str | None = None,
) -> PushOutcome:
    """Push ``local_sha`` to ``remote``'s ``branch``; ``ssh_command`` is ssh for SSH remotes
    (GIT_SSH_COMMAND, which beats core.sshCommand and the user's environment)."""
    retry = retry_command(repo, remote, branch)
    env = {"GIT_SSH_COMMAND": ssh_command} if ssh_command else {}
    url_result = repo.run("remote", "get-url", "--push", remote, check=False)
    if url_result.returncode != 0:
        return PushOutcome(
            "failed",
            f"the project has no remote named {remote!r}; add it or set git.remote",
            retry_command=retry,
        )
    url = url_result.stdout.decode().strip()
    try:
        remote_sha = _remote_sha(repo, remote, branch, timeout, env)
        if remote_sha == local_sha:
            return PushOutcome("up_to_date", f"{remote} already has {local_sha[:12]}", url)
        if remote_sha is not None:
            if repo.rev(f"{remote_sha}^{{commit}}") is None:
                repo.run_timeout(
                    (
                        "fetch",
                        "--no-tags",
                        "--no-write-fetch-head",
                        remote,
                        f"+refs/heads/{branch}:refs/remotes/{remote}/{branch}",
                    ),
                    timeout=timeout,
                    env=env,
                )
            if not repo.is_ancestor(remote_sha, local_sha):
                return PushOutcome(
                    "diverged",
                    f"{remote}/{branch} has commits that the agent's branch lacks "
                    f"(remote {remote_sha[:12]}, local {local_sha[:12]}); nothing was pushed. "
                    "Merge or rebase, then push",
                    url,
                    retry,
                )
        lease = f"--force-with-lease=refs/heads/{branch}:{remote_sha or ''}"
        repo.run_timeout(
            (
                "push",
                "--porcelain",
                "--no-verify",
                lease,
                remote,
                f"{local_sha}:refs/heads/{branch}",
            ),
            timeout=timeout,
            env=env,
        )
        after = _remote_sha(repo, remote, branch, timeout, env)
    except subprocess.TimeoutExpired:
        return PushOutcome(
            "failed", f"pushing to {remote} took longer than {timeout:g}s", url, retry
        )
    except GitCommandError as error:
        if HOST_KEY_FAILURE in error.stderr:
            return PushOutcome("failed", _host_key_message(remote, url, error.stderr), url, retry)
        return PushOutcome("failed", f"push to {remote} failed: {error}", url, retry)
    if after != local_sha:
        return PushOutcome(
            "failed",
            f"after the push {remote}/{branch} is {after or 'missing'}, not {local_sha[:12]}",
            url,
            retry,
        )
    repo.run("update-ref", f"refs/remotes/{remote}/{branch}", local_sha, check=False)
    return PushOutcome("pushed", f"pushed {local_sha[:12]} to {remote}/{branch}", url)


def _host_key_message(remote: str, url: str, stderr: str) -> str:
    changed = "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr
    what = (
        "presented a host key other than the trusted one"
        if changed
        else ("presented a host key Kapsis does not trust")
    )
    return (
        f"push to {remote} refused: {url} {what} ({HOST_KEY_FAILURE}; a man in the middle, "
        "or a key that really changed). Nothing was pushed. Compare the fingerprint with the "
        "host's published one; `kapsis ssh add-host HOST[:PORT]` trusts an enterprise host, "
        "`kapsis ssh refresh` updates GitHub's, GitLab's and Bitbucket's keys"
    )


def run_post_push_hook(
    command: str,
    repo: Repo,
    *,
    branch: str,
    commit: str,
    remote: str,
    remote_url: str,
    base: str,
    agent_id: str,
    timeout: float,
) -> tuple[int, str | None, str]:
    """Run the user's hook on the host; return its exit code, the first URL it printed, output."""
    env = {
        **os.environ,
        "KAPSIS_BRANCH": branch,
        "KAPSIS_COMMIT": commit,
        "KAPSIS_REMOTE": remote,
        "KAPSIS_REMOTE_URL": remote_url,
        "KAPSIS_BASE_BRANCH": base,
        "KAPSIS_AGENT_ID": agent_id,
        "KAPSIS_PROJECT": str(repo.root),
    }
    try:
        result = run_as_group(
            ["sh", "-c", command],
            timeout=timeout,
            env=repo.owner.environment(env) if repo.owner else env,
            cwd=repo.root,
            owner=repo.owner,
        )
    except subprocess.TimeoutExpired:
        return 124, None, f"the post-push hook took longer than {timeout:g}s"
    stdout = result.stdout.decode(errors="replace")
    stderr = result.stderr.decode(errors="replace")
    match = _URL_RE.search(stdout)
    url = match.group(0).rstrip(".,;:!?)]}'\"") if match else None
    return result.returncode, url, stdout + stderr
