"""What a run trusts over SSH: the plan, the files written for the sandbox, the host's ssh command,
and the ``kapsis ssh`` commands. ssh's own parser (``ssh -G``) checks the settings take effect."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kapsis.backends.podman import agent_run_args
from kapsis.cli.app import app
from kapsis.errors import ConfigError
from kapsis.git.push import push_branch
from kapsis.git.runner import Repo
from kapsis.ssh import hosts
from kapsis.ssh.keys import HostKey, parse_known_hosts
from kapsis.ssh.trust import (
    CLIENT_CONFIG_TARGET,
    KNOWN_HOSTS_TARGET,
    SshPlan,
    client_config_text,
    host_ssh_command,
    known_hosts_text,
    write_files,
)

from .test_ssh_keys import GITHUB_ED25519

needs_ssh = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")
CORP_LINE = f"[git.corp.example]:2222 ssh-ed25519 {GITHUB_ED25519}"


def ssh_settings(*args: str) -> dict[str, str]:
    """What ssh would use to connect to git.test, by ssh's own parser."""
    result = subprocess.run(
        ["ssh", "-G", *args, "git.test"], capture_output=True, text=True, check=True
    )
    return dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)


def test_a_run_trusts_the_providers_keys_by_default_and_mounts_the_files(make_plan, kapsis_home):
    plan = make_plan()

    assert plan.ssh is not None
    hosts_seen = {key.host for key in plan.ssh.keys}
    assert hosts_seen == {"github.com", "gitlab.com", "bitbucket.org"}
    assert len(plan.ssh.keys) == 9
    root = kapsis_home / "sandboxes" / "unit1" / "ssh"
    mounts = {m.target: (m.source, m.read_only) for m in plan.mounts}
    assert mounts[KNOWN_HOSTS_TARGET] == (str(root / "known_hosts"), True)
    assert mounts[CLIENT_CONFIG_TARGET] == (str(root / "ssh_config"), True)
    args = agent_run_args(plan, detach=False, uid_base=100000)
    assert f"{root / 'known_hosts'}:{KNOWN_HOSTS_TARGET}:ro" in args
    assert f"{root / 'ssh_config'}:{CLIENT_CONFIG_TARGET}:ro" in args


def test_providers_config_key_and_added_hosts_decide_the_keys(make_plan, tmp_path):
    hosts.save(
        hosts.keys_from_text(
            "git.added.example", 22, [f"ssh-ed25519 {GITHUB_ED25519}"], hosts.PINNED
        ),
        hosts.PINNED,
    )
    config = f"ssh:\n  providers: [gitlab.com]\n  known_hosts:\n    - '{CORP_LINE}'\n"

    plan = make_plan(config=config)

    assert plan.ssh is not None
    by_host: dict[str, list[HostKey]] = {}
    for key in plan.ssh.keys:
        by_host.setdefault(key.host, []).append(key)
    assert sorted(by_host) == ["[git.corp.example]:2222", "git.added.example", "gitlab.com"]
    assert by_host["git.added.example"][0].source.startswith(
        "kapsis ssh add-host git.added.example: pinned with --key"
    )
    assert by_host["[git.corp.example]:2222"][0].source.startswith("ssh.known_hosts (")
    assert "run-config-0.yaml:4" in by_host["[git.corp.example]:2222"][0].source


def test_verify_hosts_false_mounts_nothing(make_plan):
    plan = make_plan(config="ssh:\n  verify_hosts: false\n")
    assert plan.ssh is None
    assert not [m for m in plan.mounts if m.target.startswith("/etc/ssh")]


def test_a_bad_known_hosts_entry_in_the_config_is_a_config_error(make_plan):
    with pytest.raises(ConfigError, match=r"ssh\.known_hosts.*hashed"):
        make_plan(config=f"ssh:\n  known_hosts: ['|1|x=|y= ssh-ed25519 {GITHUB_ED25519}']\n")


def test_written_files_say_what_the_plan_says(make_plan):
    plan = make_plan(config=f"ssh:\n  providers: []\n  known_hosts: ['{CORP_LINE}']\n")
    assert plan.ssh is not None
    write_files(plan.ssh)

    known_hosts = Path(plan.ssh.known_hosts)
    assert known_hosts.stat().st_mode & 0o777 == 0o644
    keys = parse_known_hosts(known_hosts.read_text(), "file")
    assert [(k.host, k.key) for k in keys] == [("[git.corp.example]:2222", GITHUB_ED25519)]
    assert Path(plan.ssh.client_config).read_text() == client_config_text()


@needs_ssh
def test_the_sandbox_config_makes_ssh_check_strictly(tmp_path):
    config = tmp_path / "ssh_config"
    config.write_text(client_config_text())

    settings = ssh_settings("-F", str(config))

    assert settings["stricthostkeychecking"] == "true"
    assert settings["userknownhostsfile"] == KNOWN_HOSTS_TARGET
    assert settings["globalknownhostsfile"] == KNOWN_HOSTS_TARGET
    assert settings["updatehostkeys"] == "false"
    assert settings["checkhostip"] == "no"
    assert settings["verifyhostkeydns"] == "false"


@needs_ssh
def test_the_host_command_beats_a_config_that_turns_checking_off(tmp_path):
    # A user's (or anyone's) ssh config asking for no checking and another known_hosts file.
    lax = tmp_path / "lax_config"
    lax.write_text(
        "Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /tmp/other\n"
        "  KnownHostsCommand /bin/echo\n  UpdateHostKeys yes\n"
    )
    folder = tmp_path / "a dir with % and spaces"
    plan = SshPlan(
        known_hosts=str(folder / "known_hosts"), client_config=str(folder / "c"), keys=()
    )
    argv = shlex.split(host_ssh_command(plan))
    assert argv[0] == "ssh"

    settings = ssh_settings("-F", str(lax), *argv[1:])

    assert settings["stricthostkeychecking"] == "true"
    assert settings["userknownhostsfile"] == str(folder / "known_hosts")
    assert settings["globalknownhostsfile"] == "/dev/null"
    assert settings["updatehostkeys"] == "false"
    assert "knownhostscommand" not in settings or settings["knownhostscommand"] == "none"


def test_known_hosts_text_groups_keys_under_their_source():
    keys = (
        HostKey(host="a.example", key_type="ssh-ed25519", key=GITHUB_ED25519, source="one"),
        HostKey(host="b.example", key_type="ssh-ed25519", key=GITHUB_ED25519, source="two"),
    )
    text = known_hosts_text(SshPlan(known_hosts="k", client_config="c", keys=keys))
    assert "# one\na.example ssh-ed25519" in text and "# two\nb.example ssh-ed25519" in text


def test_the_host_push_uses_the_ssh_command_and_names_a_host_key_failure(tmp_path):
    repo_dir = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo_dir)], check=True)
    subprocess.run(
        ["git", "-C", str(repo_dir), "remote", "add", "origin", "ssh://git@git.invalid/x.git"],
        check=True,
    )
    repo = Repo.discover(repo_dir)
    assert repo is not None
    # Stands in for ssh meeting a changed key: git runs it instead of contacting anybody.
    fake_ssh = (
        'sh -c \'echo "@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @" >&2; '
        'echo "Host key verification failed." >&2; exit 255\''
    )

    outcome = push_branch(repo, "origin", "b", "0" * 40, timeout=30, ssh_command=fake_ssh)

    assert outcome.status == "failed"
    assert "refused" in outcome.message and "Host key verification failed" in outcome.message
    assert "other than the trusted one" in outcome.message
    assert "kapsis ssh add-host" in outcome.message


# ---------------------------------------------------------------------------------------------
# kapsis ssh add-host / remove-host / list


def test_add_host_pins_a_key_and_list_shows_it(kapsis_home):
    runner = CliRunner()
    added = runner.invoke(
        app, ["ssh", "add-host", "git.corp.example:2222", "--key", f"ssh-ed25519 {GITHUB_ED25519}"]
    )
    assert added.exit_code == 0, added.output
    assert "[git.corp.example]:2222: pinned with --key" in added.stdout

    listed = json.loads(runner.invoke(app, ["ssh", "list", "--json"]).stdout)
    corp = [k for k in listed["keys"] if k["host"] == "[git.corp.example]:2222"]
    assert corp and corp[0]["key"] == GITHUB_ED25519
    assert corp[0]["fingerprint"].startswith("SHA256:")

    removed = runner.invoke(app, ["ssh", "remove-host", "[git.corp.example]:2222"])
    assert removed.exit_code == 0
    assert "git.corp.example" not in runner.invoke(app, ["ssh", "list"]).stdout
    again = runner.invoke(app, ["ssh", "remove-host", "git.corp.example:2222"])
    assert again.exit_code == 2 and "was not added" in again.stderr


def test_scanned_keys_need_a_confirmation(monkeypatch, kapsis_home):
    scanned = [
        HostKey(
            host="git.corp.example",
            key_type="ssh-ed25519",
            key=GITHUB_ED25519,
            source=hosts.SCANNED,
        )
    ]
    monkeypatch.setattr(hosts, "scan", lambda host, port: scanned)
    runner = CliRunner()

    refused = runner.invoke(app, ["ssh", "add-host", "git.corp.example"])  # stdin: not a tty
    assert refused.exit_code == 2
    assert "pass --yes" in refused.stderr and "--key" in refused.stderr
    assert "SHA256:+DiY3wvvV6TuJJhbpZisF/zLDA0zPMSvHdkr4UvCOqU" in refused.stdout
    assert not hosts.added_keys()

    accepted = runner.invoke(app, ["ssh", "add-host", "git.corp.example", "--yes"])
    assert accepted.exit_code == 0, accepted.output
    assert [k.host for k in hosts.added_keys()] == ["git.corp.example"]
    assert "trust on first use" in hosts.added_keys()[0].source


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["ssh", "add-host", "--key", f"ssh-ed25519 {GITHUB_ED25519}", "--", "-oProxyCommand=x"],
            "not a host",
        ),
        (["ssh", "add-host", "git.corp", "--key", "ssh-ed25519 AAAA"], "--key"),
        (["ssh", "add-host", "git.corp", "--key", f"ssh-dss {GITHUB_ED25519}"], "DSA"),
    ],
)
def test_add_host_refuses_bad_input_in_one_line(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_a_damaged_added_host_file_is_named(kapsis_home, make_plan):
    folder = hosts.hosts_dir()
    folder.mkdir(parents=True)
    (folder / "bad.known_hosts").write_text("# x\nnot a line\n")
    with pytest.raises(ConfigError, match=r"bad\.known_hosts"):
        make_plan()
