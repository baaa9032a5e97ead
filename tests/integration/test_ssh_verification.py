"""SSH host verification with real OpenSSH: the sandbox's ssh and git, and the host's push.

A real sshd (see sshd.py) runs in the test internet under the name git.test, port 2222. The
attack is a man in the middle: the same address answering with another host key. In the sandbox
the default ssh and git must refuse it (and the agent can neither edit the trusted keys nor add
its own); the host's push, which holds the credentials, must refuse it too. The control is the
same connection to the server with the pinned key, which gets as far as authentication.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kapsis.ssh.keys import fingerprint

from .internet import DEFAULT_NAMES, REMOTE_V4, Internet
from .kapsis_runner import Kapsis
from .rootless_user import RootlessUser
from .sshd import SSH_PORT, SshServer, has_ssh_client, ssh_agent, ssh_server

pytestmark = pytest.mark.integration

HOST_KEY_FAILED = "Host key verification failed"
AUTH_REACHED = "Permission denied (publickey)"

SANDBOX_TASK = f"""
ssh -o BatchMode=yes -o ConnectTimeout=10 -p {SSH_PORT} git@git.test true; echo "ssh-exit=$?"
git ls-remote ssh://git@git.test:{SSH_PORT}/srv/none.git; echo "git-exit=$?"
(echo '[git.test]:{SSH_PORT} ssh-ed25519 AAAA' >> /etc/ssh/ssh_known_hosts) 2>/dev/null
echo "write-known-hosts=$?"
(echo 'StrictHostKeyChecking no' >> /etc/ssh/ssh_config) 2>/dev/null; echo "write-config=$?"
mkdir -p ~/.ssh && ssh-keyscan -p {SSH_PORT} git.test >> ~/.ssh/known_hosts 2>/dev/null
ssh -o BatchMode=yes -o ConnectTimeout=10 -p {SSH_PORT} git@git.test true; echo "rescan-exit=$?"
"""


@pytest.fixture(scope="module")
def sandbox_image(base_image: str, ssh_image: str) -> str:
    """The base image when it has the ssh client (it does from this version on), else the same
    base with it added (a base image built before)."""
    return base_image if has_ssh_client(base_image) else ssh_image


@pytest.fixture
def server(internet: Internet, ssh_image: str, tmp_path: Path) -> Iterator[SshServer]:
    internet.set_names({**DEFAULT_NAMES, "git.test": (REMOTE_V4,)})
    try:
        with ssh_server(internet.netns, internet.v4, ssh_image, tmp_path / "sshd") as running:
            yield running
    finally:
        internet.set_names(DEFAULT_NAMES)


@pytest.fixture
def kapsis_ssh(tmp_path: Path, sandbox_image: str) -> Kapsis:
    return Kapsis(
        home=tmp_path / "kapsis-home", config_dir=tmp_path / "kapsis-config", image=sandbox_image
    )


def git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return result.stdout.strip()


def test_sandbox_ssh_and_git_refuse_a_man_in_the_middle(
    kapsis_ssh: Kapsis, server: SshServer, internet: Internet, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    config = tmp_path / "network.yaml"
    config.write_text(f"network:\n  dns_servers: [{internet.dns_server}]\n")
    pinned = kapsis_ssh("ssh", "add-host", f"git.test:{SSH_PORT}", "--key", server.legit_key)
    assert pinned.returncode == 0, pinned.stderr
    # SSH carries no name the gateway's proxy could check, so it takes an address rule; the
    # name is listed only so that the sandbox can resolve it.
    flags = ("--config", str(config), "--allow", "git.test", "--allow", f"{REMOTE_V4}:{SSH_PORT}")

    server.serve("legit")
    control = kapsis_ssh.run(project, SANDBOX_TASK, *flags)
    server.serve("mitm")
    attack = kapsis_ssh.run(project, SANDBOX_TASK, *flags)

    seen = control.stdout + control.stderr
    # Control: the pinned key is accepted; ssh and git get as far as authentication.
    assert HOST_KEY_FAILED not in seen, seen
    assert seen.count(AUTH_REACHED) == 3, seen
    # Attack: every connection stops at the host key, before anything is sent.
    seen = attack.stdout + attack.stderr
    assert seen.count(HOST_KEY_FAILED) == 3, seen
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in seen
    assert AUTH_REACHED not in seen
    # The agent can change neither the trusted keys nor the client config, and the key it
    # scanned into its own ~/.ssh/known_hosts is not consulted.
    for run in (control, attack):
        assert "write-known-hosts=0" not in run.stdout and "write-known-hosts=" in run.stdout
        assert "write-config=0" not in run.stdout and "write-config=" in run.stdout
        assert "rescan-exit=255" in run.stdout


def test_host_push_refuses_a_man_in_the_middle(
    kapsis_ssh: Kapsis, server: SshServer, tmp_path: Path
) -> None:
    remote = server.srv / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    project = tmp_path / "project"
    subprocess.run(["git", "init", "-q", "-b", "main", str(project)], check=True)
    git(project, "config", "user.name", "Ada Tester")
    git(project, "config", "user.email", "ada@example.test")
    (project / "README.md").write_text("# sample\n")
    git(project, "add", ".")
    git(project, "commit", "-q", "-m", "initial")
    url = f"ssh://root@{REMOTE_V4}:{SSH_PORT}/srv/remote.git"
    git(project, "remote", "add", "origin", url)

    server.serve("legit")
    # A real ssh-keyscan of the real server (trust on first use, confirmed with --yes).
    scanned = kapsis_ssh("ssh", "add-host", f"{REMOTE_V4}:{SSH_PORT}", "--yes")
    assert scanned.returncode == 0, scanned.stderr
    assert fingerprint(server.legit_key.split()[1]) in scanned.stdout
    listed = json.loads(kapsis_ssh("ssh", "list", str(project), "--json").stdout)
    assert {key["host"] for key in listed["keys"]} >= {f"[{REMOTE_V4}]:{SSH_PORT}"}

    with ssh_agent(server.client_key, tmp_path) as agent_socket:
        env = {"SSH_AUTH_SOCK": agent_socket}
        flags = ("--json", "--push", "--network-mode", "none")
        pushed = kapsis_ssh.run(project, "echo one > one.txt", *flags, "--branch", "one", env=env)
        server.serve("mitm")
        refused = kapsis_ssh.run(project, "echo two > two.txt", *flags, "--branch", "two", env=env)
        # Control for the attack: the impostor would take the push from a client that does not
        # check its key (so the refusal above is the host-key check, not a broken server).
        lax = {
            "SSH_AUTH_SOCK": agent_socket,
            "GIT_SSH_COMMAND": "ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
        }
        git(project, "push", "-q", url, "main:refs/heads/lax", env=lax)

    first = json.loads(pushed.stdout)
    assert first["push_status"] == "pushed", pushed.stderr
    second = json.loads(refused.stdout)
    assert refused.returncode == 7 and second["push_status"] == "failed", refused.stderr
    assert HOST_KEY_FAILED in second["message"] and "refused" in second["message"]
    heads = git(remote, "for-each-ref", "--format=%(refname)", "refs/heads/")
    assert heads.split() == ["refs/heads/lax", "refs/heads/one"]
    # The refused work is not lost: the commit is on the local branch, ready to push again.
    assert git(project, "rev-parse", "--verify", "refs/heads/two")


def test_root_pushing_a_users_repository_checks_the_host_key_as_the_user(
    kapsis_ssh: Kapsis, server: SshServer, user: RootlessUser, tmp_path: Path
) -> None:
    """sudo on a user's repository: git and ssh run as the owner, with the owner's ssh-agent,
    and still only against the run's trusted keys (handed to them outside root's dirs)."""
    remote = server.srv / "owner.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    project = user.make_repository(user.home / f"ssh-{tmp_path.name}")
    url = f"ssh://root@{REMOTE_V4}:{SSH_PORT}/srv/owner.git"
    assert user.run(["git", "-C", str(project), "remote", "add", "origin", url]).returncode == 0
    keys = user.home / f"ssh-keys-{tmp_path.name}"
    keys.mkdir(mode=0o700)
    key = keys / "client_key"
    shutil.copyfile(server.client_key, key)
    key.chmod(0o600)
    subprocess.run(["chown", "-R", f"{user.name}:{user.name}", str(keys)], check=True)

    server.serve("legit")
    scanned = kapsis_ssh("ssh", "add-host", f"{REMOTE_V4}:{SSH_PORT}", "--yes")
    assert scanned.returncode == 0, scanned.stderr
    with ssh_agent(key, keys, user=user.name) as agent_socket:
        env = {"SSH_AUTH_SOCK": agent_socket}
        flags = ("--json", "--push", "--network-mode", "none")
        pushed = kapsis_ssh.run(project, "echo one > one.txt", *flags, "--branch", "one", env=env)
        server.serve("mitm")
        refused = kapsis_ssh.run(project, "echo two > two.txt", *flags, "--branch", "two", env=env)

    assert json.loads(pushed.stdout)["push_status"] == "pushed", pushed.stderr
    second = json.loads(refused.stdout)
    assert refused.returncode == 7 and HOST_KEY_FAILED in second["message"], refused.stderr
    heads = git(remote, "for-each-ref", "--format=%(refname)", "refs/heads/")
    assert heads.split() == ["refs/heads/one"]
    assert user.not_owned(project) == []
