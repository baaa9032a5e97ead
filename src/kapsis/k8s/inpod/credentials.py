"""Git credentials of the clone and finishing steps, from the mounted Secret's files.

A token is handed to git by a credential helper script that reads the Secret's file each time
git asks, so the token is never in a URL, a config file or the environment. (A helper rather
than ``GIT_ASKPASS``: the hardened git of :mod:`kapsis.git.runner` sets
``credential.interactive=never``, which newer git applies to askpass prompts.) An SSH key is
copied to a private file (ssh refuses a key others can read, and the Secret's files are
world-readable inside the steps' containers) and used with strict host-key checking against
the Secret's ``known_hosts``: an unknown or changed host key fails the step.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from kapsis.errors import SandboxError
from kapsis.k8s.layout import KNOWN_HOSTS_KEY, SSH_KEY, TOKEN_KEY, USERNAME_KEY, StepConfig
from kapsis.ssh.trust import STRICT_OPTIONS

DEFAULT_USERNAME = "x-access-token"


@dataclass(frozen=True)
class GitCredentials:
    """How git reaches the remote: extra environment, an ssh command, a credential helper."""

    env: dict[str, str] = field(default_factory=dict)
    ssh_command: str | None = None
    helper: str | None = None

    def config(self) -> tuple[str, ...]:
        """``-c`` settings for git: only this helper (an empty value drops any other)."""
        return ("credential.helper=", f"credential.helper={self.helper}") if self.helper else ()


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise SandboxError(
            f"the credentials Secret has no key {path.name!r} ({what}); add it to the Secret"
        )
    return path


def prepare(config: StepConfig, secret_dir: Path, scratch: Path) -> GitCredentials:
    """Write the helper files under ``scratch`` (a private tmp dir) and say how to use them."""
    if config.credentials == "none":
        return GitCredentials(env={"GIT_TERMINAL_PROMPT": "0"})
    scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
    if config.credentials == "token":
        token = _require(secret_dir / TOKEN_KEY, "the https token")
        username = secret_dir / USERNAME_KEY
        script = scratch / "credential-helper.sh"
        user_source = (
            f'"$(cat {shlex.quote(str(username))})"' if username.is_file() else DEFAULT_USERNAME
        )
        # git calls it with get / store / erase; only get answers.
        script.write_text(
            "#!/bin/sh\n"
            'test "$1" = get || exit 0\n'
            f"printf 'username=%s\\n' {user_source}\n"
            f"printf 'password=%s\\n' \"$(cat {shlex.quote(str(token))})\"\n"
        )
        script.chmod(0o700)
        return GitCredentials(env={"GIT_TERMINAL_PROMPT": "0"}, helper=str(script))
    key = _require(secret_dir / SSH_KEY, "the ssh private key")
    known_hosts = _require(secret_dir / KNOWN_HOSTS_KEY, "the remote's known_hosts line")
    private = scratch / "id_key"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key.read_bytes())
    # The host push's strict options (kapsis.ssh.trust), with the Secret's key and known_hosts.
    options = [
        *STRICT_OPTIONS,
        ("IdentitiesOnly", "yes"),
        ("UserKnownHostsFile", str(known_hosts)),
        ("GlobalKnownHostsFile", "/dev/null"),
        ("BatchMode", "yes"),
    ]
    argv = ["ssh", "-F", "/dev/null", "-i", str(private)]
    for name, value in options:
        argv += ["-o", f"{name}={value}"]
    command = shlex.join(argv)
    return GitCredentials(env={"GIT_SSH_COMMAND": command}, ssh_command=command)
