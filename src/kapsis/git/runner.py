"""Host-side git, run so that nothing an agent could have written is ever executed.

Every host git command goes through :class:`Repo`. It always passes settings that switch off the
places where git runs programs named by repository content or config: hooks, the fsmonitor, the
``ext::`` transport. File contents are hashed with ``--no-filters`` elsewhere, so
``.gitattributes`` filter drivers never run either. The caller's ``GIT_*`` environment is
dropped so a stray ``GIT_DIR`` cannot redirect a command, and pathspecs are literal, so a file
name chosen by the agent is never read as a glob or pathspec magic.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kapsis.errors import GitWorkflowError
from kapsis.git.owner import RepoOwner

GIT = "git"
ZERO_SHA = "0" * 40
HARDENING = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "protocol.ext.allow=never",
    "credential.interactive=never",
)


def git_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    env.update(
        {
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_LITERAL_PATHSPECS": "1",
            "GIT_OPTIONAL_LOCKS": "0",
            "LC_ALL": "C",
        }
    )
    env.update(extra or {})
    return env


class GitCommandError(GitWorkflowError):
    """A git command failed; the message holds the command and git's last line of output."""

    def __init__(self, args: Sequence[str], returncode: int, stderr: str) -> None:
        last = (stderr.strip().splitlines() or ["no error output"])[-1]
        super().__init__(f"git {' '.join(args[:2])} failed (exit {returncode}): {last}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class Repo:
    """A repository on the host: its top-level work tree and its (common) git directory."""

    root: Path
    git_dir: Path
    common_dir: Path

    @functools.cached_property
    def owner(self) -> RepoOwner | None:
        """Who git runs as here: the repository's owner when root runs Kapsis on a user's
        repository; None means this process itself."""
        return RepoOwner.of(self.common_dir)

    def subprocess_options(self, *, as_owner: bool = True) -> dict[str, Any]:
        """Arguments for ``subprocess`` running git on this repository (see :attr:`owner`)."""
        if not as_owner or self.owner is None:
            return {}
        return self.owner.subprocess_options()

    @classmethod
    def discover(cls, path: Path) -> Repo | None:
        """The repository whose top level is ``path``'s, or None when ``path`` is not in one."""
        try:
            result = subprocess.run(
                [
                    GIT,
                    *_config_args(path),
                    "-C",
                    str(path),
                    "rev-parse",
                    "--path-format=absolute",
                    "--show-toplevel",
                    "--git-dir",
                    "--git-common-dir",
                ],
                capture_output=True,
                text=True,
                env=git_environment(),
                check=False,
            )
        except FileNotFoundError:
            return None
        lines = result.stdout.splitlines()
        if result.returncode != 0 or len(lines) != 3:
            return None
        return cls(Path(lines[0]), Path(lines[1]), Path(lines[2]))

    def run(
        self,
        *args: str,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        work_tree: Path | None = None,
        timeout: float | None = None,
        check: bool = True,
        extra_config: Sequence[str] = (),
        as_owner: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a hardened git command; ``as_owner=False`` only for a command that writes
        nothing into the repository and must reach Kapsis's own (root-only) files."""
        if not as_owner and self.owner is not None:
            # Root in someone's repository: a partial clone's missing object would make git
            # fetch it, through the owner's configured ssh command or credential helper.
            extra_config = (*extra_config, "protocol.allow=never")
            env = {**(env or {}), "GIT_NO_LAZY_FETCH": "1"}
        try:
            result = subprocess.run(
                self.command(*args, work_tree=work_tree, extra_config=extra_config),
                input=input,
                capture_output=True,
                env=self.environment(env, as_owner=as_owner),
                timeout=timeout,
                check=False,
                cwd=work_tree or self.root,
                **self.subprocess_options(as_owner=as_owner),
            )
        except PermissionError as error:
            if not as_owner or self.owner is None:
                raise
            raise GitWorkflowError(
                f"git cannot run in {work_tree or self.root} as {self.owner.name}, who owns "
                f"the repository ({error.strerror}): its folder must be theirs to enter"
            ) from None
        if check and result.returncode != 0:
            raise GitCommandError(args, result.returncode, result.stderr.decode(errors="replace"))
        return result

    def command(
        self, *args: str, work_tree: Path | None = None, extra_config: Sequence[str] = ()
    ) -> list[str]:
        """The argv of a hardened git command on this repository."""
        command = [GIT, *_config_args(self.root)]
        for item in extra_config:
            command += ["-c", item]
        command += [f"--git-dir={self.git_dir}", f"--work-tree={work_tree or self.root}"]
        return command + list(args)

    def popen(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        stdin: Any,
        stdout: Any,
        stderr: Any = subprocess.PIPE,
    ) -> subprocess.Popen[bytes]:
        """Start a hardened git command that streams (as the owner, like :meth:`run`); by
        default its stderr is a pipe, for the caller to read once the streams are done."""
        return subprocess.Popen(
            self.command(*args),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=self.environment(env),
            cwd=self.root,
            **self.subprocess_options(),
        )

    def environment(
        self, extra: Mapping[str, str] | None = None, *, as_owner: bool = True
    ) -> dict[str, str]:
        env = git_environment(extra)
        if as_owner and self.owner is not None:
            return self.owner.environment(env)
        return env

    def text(self, *args: str, input: bytes | None = None) -> str:
        return self.run(*args, input=input).stdout.decode().strip()

    def run_timeout(
        self, args: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """A network command (fetch, push, ls-remote) with a time limit.

        Git hands the transport to helpers (ssh, git-remote-https) that inherit its pipes; on a
        timeout the whole process group is killed, or waiting for those pipes would hang.
        Raises :class:`subprocess.TimeoutExpired` or :class:`GitCommandError`.
        """
        result = run_as_group(
            self.command(*args),
            timeout=timeout,
            env=self.environment(env),
            cwd=self.root,
            owner=self.owner,
        )
        if result.returncode != 0:
            raise GitCommandError(args, result.returncode, result.stderr.decode(errors="replace"))
        return result

    def text_timeout(
        self, args: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None
    ) -> str:
        return self.run_timeout(args, timeout=timeout, env=env).stdout.decode().strip()

    def rev(self, name: str) -> str | None:
        """The object name ``name`` resolves to, or None."""
        result = self.run("rev-parse", "--verify", "--quiet", "--end-of-options", name, check=False)
        if result.returncode != 0:
            return None
        return result.stdout.decode().strip() or None

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        result = self.run("merge-base", "--is-ancestor", ancestor, descendant, check=False)
        return result.returncode == 0

    def tree_of(self, commit: str) -> str:
        return self.text("rev-parse", "--verify", f"{commit}^{{tree}}")


def run_as_group(
    command: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str],
    cwd: Path,
    owner: RepoOwner | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``command`` in a process group of its own, and end the whole group with it.

    Whatever the command starts (git's transport helpers, a hook's programs) inherits its pipes
    and would keep a plain time-out waiting; here a time-out kills the group, and so does the
    end of the command, so nothing it started outlives it. ``owner``: run it as that account.
    Raises TimeoutExpired.
    """
    process = subprocess.Popen(
        list(command),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
        **(owner.subprocess_options() if owner is not None else {}),
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _config_args(root: Path) -> list[str]:
    # safe.directory: the user named this project, so git may work in it even when it belongs
    # to another user (e.g. kapsis run as root on a user's checkout).
    args: list[str] = []
    for item in (*HARDENING, f"safe.directory={root}"):
        args += ["-c", item]
    return args


_FILTER_KEY_RE = re.compile(r"^filter\.(.+)\.(clean|smudge|process|required)$")


def filter_drivers(repo: Repo) -> list[str]:
    """Names of the filter drivers configured for ``repo`` (system, global or local)."""
    result = repo.run("config", "--name-only", "--get-regexp", r"^filter\.", check=False)
    names: list[str] = []
    for key in result.stdout.decode(errors="replace").splitlines():
        match = _FILTER_KEY_RE.match(key.strip())
        if match and match.group(1) not in names:
            names.append(match.group(1))
    return names


def without_filters(repo: Repo) -> list[str]:
    settings: list[str] = []
    for name in filter_drivers(repo):
        settings += [f"filter.{name}.{key}=" for key in ("clean", "smudge", "process")]
        settings.append(f"filter.{name}.required=false")
    return settings
