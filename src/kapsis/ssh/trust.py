"""What a run trusts over SSH, and how both sides are made to check it.

:func:`plan_ssh` collects the keys (providers' lists, added hosts, ``ssh.known_hosts``) into an
:class:`SshPlan`. At launch the host writes them as a known_hosts file into the sandbox dir,
with an ssh client config, and both are mounted read-only over the image's system-wide ones
(``/etc/ssh/ssh_known_hosts``, ``/etc/ssh/ssh_config``): ssh and git in the sandbox then refuse
any host whose key is not listed. The host's own fetch and push run ssh with the same file and
the same settings given as ``-o`` options, which beat every config file the user or a
repository could hold.

The agent runs its own ssh, so it can ask for less checking (``-o StrictHostKeyChecking=no``,
its own ``~/.ssh/config``); what it cannot do is change the files, and it holds no credentials
a man in the middle could take. The host's push, which does hold them, cannot be talked out of
checking.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from kapsis.config.loader import LoadedConfig
from kapsis.errors import ConfigError
from kapsis.sandbox.plan_model import PlanModel
from kapsis.ssh.keys import HostKey, parse_known_hosts_line

KNOWN_HOSTS_TARGET = "/etc/ssh/ssh_known_hosts"
CLIENT_CONFIG_TARGET = "/etc/ssh/ssh_config"
# ssh reads the first value it meets for each option; these must win.
STRICT_OPTIONS = (
    ("StrictHostKeyChecking", "yes"),
    ("UpdateHostKeys", "no"),
    ("CheckHostIP", "no"),
    ("VerifyHostKeyDNS", "no"),
    ("KnownHostsCommand", "none"),
    ("HashKnownHosts", "no"),
)


class SshPlan(PlanModel):
    """The keys a run trusts and the host files that carry them into the sandbox."""

    known_hosts: str
    client_config: str
    keys: tuple[HostKey, ...]


def trusted_keys(loaded: LoadedConfig) -> list[HostKey]:
    """Providers' keys, then added hosts, then ``ssh.known_hosts``; duplicates dropped."""
    from kapsis.ssh import hosts, providers

    section = loaded.config.ssh
    keys: list[HostKey] = []
    for host in dict.fromkeys(section.providers):
        keys += providers.effective(host).host_keys()
    keys += hosts.added_keys()
    for index, line in enumerate(section.known_hosts):
        origin = loaded.origin_of(("ssh", "known_hosts", index))
        try:
            keys += parse_known_hosts_line(line, f"ssh.known_hosts ({origin})")
        except ValueError as error:  # validated already; kept for a plan built by hand
            raise ConfigError(f"{origin}: ssh.known_hosts: {error}") from None
    seen: set[tuple[str, str, str]] = set()
    unique = []
    for key in keys:
        identity = (key.host, key.key_type, key.key)
        if identity not in seen:
            seen.add(identity)
            unique.append(key)
    return unique


def plan_ssh(loaded: LoadedConfig, sandbox_root: Path) -> SshPlan | None:
    if not loaded.config.ssh.verify_hosts:
        return None
    folder = sandbox_root / "ssh"
    return SshPlan(
        known_hosts=str(folder / "known_hosts"),
        client_config=str(folder / "ssh_config"),
        keys=tuple(trusted_keys(loaded)),
    )


def known_hosts_text(plan: SshPlan) -> str:
    lines = ["# Written by Kapsis: the SSH host keys this sandbox trusts (kapsis ssh list)."]
    current = None
    for key in plan.keys:
        if key.source != current:
            lines.append(f"# {key.source}")
            current = key.source
        lines.append(key.line())
    return "\n".join(lines) + "\n"


def client_config_text() -> str:
    lines = [
        "# Written by Kapsis (read-only): ssh and git check host keys strictly against",
        f"# {KNOWN_HOSTS_TARGET}; an unknown or changed host key fails the connection.",
        "Host *",
    ]
    lines += [f"    {name} {value}" for name, value in STRICT_OPTIONS]
    lines += [
        f"    GlobalKnownHostsFile {KNOWN_HOSTS_TARGET}",
        f"    UserKnownHostsFile {KNOWN_HOSTS_TARGET}",
    ]
    return "\n".join(lines) + "\n"


def write_files(plan: SshPlan) -> None:
    """Write the known_hosts file and client config (readable by the agent's uid, 0644)."""
    for path, text in (
        (Path(plan.known_hosts), known_hosts_text(plan)),
        (Path(plan.client_config), client_config_text()),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        path.chmod(0o644)


def host_ssh_command(plan: SshPlan) -> str:
    """``GIT_SSH_COMMAND`` for the host's fetch and push: strict, against the run's file only.

    The user's ~/.ssh/config still applies (identities, ports, jump hosts), but these options
    come first on the command line and so beat anything it or a repository says.
    """
    options = [*STRICT_OPTIONS, ("GlobalKnownHostsFile", "/dev/null")]
    options.append(("UserKnownHostsFile", plan.known_hosts))
    argv = ["ssh"]
    for name, value in options:
        argv += ["-o", f"{name}={_ssh_value(value)}"]
    return shlex.join(argv)


def _ssh_value(value: str) -> str:
    """ssh expands % tokens in file options and splits them on blanks; keep a path literal."""
    value = value.replace("%", "%%")
    return f'"{value}"' if any(char.isspace() for char in value) else value
