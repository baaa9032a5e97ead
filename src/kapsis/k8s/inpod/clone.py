"""The clone step (init container ``clone``): the trusted repository and the agent's workspace.

1. Clones the remote, with the credentials Secret, into the trusted repository (the finisher's,
   on a volume the agent never mounts): what the host's project is for the Podman backend.
2. Picks the start: the agent's branch when the remote has it (a run continues it), else
   ``baseBranch``, else the remote's default branch; records it in the state file.
3. Makes the agent's workspace a clone of the trusted repository on that branch, with the
   remote's URL (never a credential) as its origin, and hands it to the agent's uid.

Every git command runs with the same hardening as the host's (:mod:`kapsis.git.runner`), and
on failure a one-line reason goes to the termination-message file for the operator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from kapsis.errors import KapsisError, SandboxError
from kapsis.git.runner import GIT, HARDENING, git_environment, run_as_group
from kapsis.k8s import layout
from kapsis.k8s.inpod.credentials import GitCredentials, prepare
from kapsis.k8s.inpod.result import write_result
from kapsis.k8s.layout import StepConfig

CLONE_TIMEOUT_SECONDS = 1800


def _git(
    args: Sequence[str],
    credentials: GitCredentials,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> str:
    command = [GIT]
    for item in (*HARDENING, "safe.directory=*", *credentials.config()):
        command += ["-c", item]
    env = git_environment(credentials.env)
    if timeout is not None:
        # The network clone: its transport helpers inherit git's pipes, so a time-out must end
        # the whole process group (as the host's fetch and push do), or it would hang on them.
        result = run_as_group([*command, *args], timeout=timeout, env=env, cwd=cwd or Path.cwd())
    else:
        result = subprocess.run([*command, *args], capture_output=True, env=env, cwd=cwd)
    if result.returncode != 0:
        detail = (result.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise SandboxError(f"git {args[0]} failed: {detail}")
    return result.stdout.decode().strip()


def _rev(repo: Path, ref: str) -> str | None:
    try:
        return _git(
            ["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], GitCredentials(), repo
        )
    except SandboxError:
        return None


def start_point(repo: Path, branch: str, base_branch: str | None) -> tuple[str, str]:
    """(start commit, what it is) for the agent's branch in freshly cloned ``repo``."""
    existing = _rev(repo, f"refs/remotes/origin/{branch}")
    if existing:
        return existing, f"origin/{branch} (continued)"
    if base_branch:
        base = _rev(repo, f"refs/remotes/origin/{base_branch}")
        if base is None:
            raise SandboxError(
                f"spec.workspace.git.baseBranch: the remote has no branch {base_branch!r}"
            )
        return base, f"origin/{base_branch}"
    head = _rev(repo, "refs/remotes/origin/HEAD")
    if head is None:
        raise SandboxError("the remote has no default branch (an empty repository?)")
    return head, "origin/HEAD"


def hand_over(root: Path, uid: int) -> None:
    """Give ``root`` and everything below it to ``uid`` (as root; a no-op otherwise)."""
    if os.geteuid() != 0:
        return
    os.lchown(root, uid, uid)
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(directory, name), uid, uid)


def clone(
    config: StepConfig,
    *,
    workspace: Path,
    trusted_volume: Path,
    secret_dir: Path,
    scratch: Path,
    agent_uid: int = layout.AGENT_UID,
    finisher_uid: int = layout.FINISHER_UID,
) -> dict[str, str]:
    """Run the step; return the state it recorded for the finisher."""
    credentials = prepare(config, secret_dir, scratch)
    repo = trusted_volume / "repo"
    _git(
        ["clone", "--no-checkout", "--origin", "origin", "--", config.url, str(repo)],
        credentials,
        timeout=CLONE_TIMEOUT_SECONDS,
    )
    start, source = start_point(repo, config.branch, config.base_branch)
    _git(["update-ref", f"refs/heads/{config.branch}", start], credentials, repo)
    # The agent's copy: its own objects (no hard links into the trusted repository).
    _git(
        ["clone", "--no-hardlinks", "--branch", config.branch, "--", str(repo), str(workspace)],
        GitCredentials(),
    )
    _git(["remote", "set-url", "origin", config.url], GitCredentials(), workspace)
    state = {"branch": config.branch, "start": start, "source": source}
    state_file = trusted_volume / "state.json"
    state_file.write_text(json.dumps(state, sort_keys=True) + "\n", encoding="utf-8")
    hand_over(workspace, agent_uid)
    hand_over(trusted_volume, finisher_uid)
    return state


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kapsis.k8s.inpod.clone")
    parser.add_argument("--workspace", type=Path, default=Path(layout.WORKSPACE))
    parser.add_argument("--trusted", type=Path, default=Path(layout.TRUSTED_VOLUME))
    parser.add_argument("--credentials", type=Path, default=Path(layout.CREDENTIALS))
    parser.add_argument("--termination-log", type=Path, default=Path(layout.TERMINATION_LOG))
    args = parser.parse_args(argv)
    try:
        config = StepConfig.from_env_value(os.environ[layout.STEP_CONFIG_ENV])
        with tempfile.TemporaryDirectory(prefix="kapsis-clone-") as scratch:
            state = clone(
                config,
                workspace=args.workspace,
                trusted_volume=args.trusted,
                secret_dir=args.credentials,
                scratch=Path(scratch),
            )
    except (KapsisError, KeyError, ValueError, OSError, subprocess.TimeoutExpired) as error:
        message = f"clone failed: {error}"
        print(message, file=sys.stderr)
        write_result(args.termination_log, {"message": message})
        return 1
    text = f"cloned {config.url} at {state['source']} ({state['start'][:12]}) on {state['branch']}"
    print(text)
    write_result(args.termination_log, {"branch": state["branch"], "message": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
