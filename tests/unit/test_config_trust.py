"""A project's own config files: untrusted until `kapsis trust`, judged by each field's marker.

Each attack writes a project file (what an agent can do) that widens the sandbox or runs
something on the host, and must be refused; its control gives the same value from a trusted
source (--config, the user's config, or the file once trusted) and must pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kapsis.cli.app import app
from kapsis.config.base import TRUST_KEY
from kapsis.config.loader import load_config
from kapsis.config.models import DEFAULT_HIDE, KapsisConfig
from kapsis.config.trust import leaf_fields, marker, trust_problems
from kapsis.config.trust_store import trust_file
from kapsis.errors import ExitCode, UntrustedConfigError
from kapsis.sandbox.run_config import load_trusted_config, trust_project

KNOWN_MARKERS = {"free", "trust", "at_most", "at_most_time", "profile", "subset", "superset"}
ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def refused(project: Path, config_file: Path | None = None) -> str:
    with pytest.raises(UntrustedConfigError) as caught:
        load_trusted_config(project, config_file, {})
    return str(caught.value)


def accepted(project: Path, config_file: Path | None = None) -> KapsisConfig:
    loaded, _ = load_trusted_config(project, config_file, {})
    return loaded.config


# ---------------------------------------------------------------------------------------------
# markers: one per field, shown in the schema and the reference


def test_every_config_field_has_a_known_trust_marker() -> None:
    for path, info in leaf_fields(KapsisConfig):
        rule = marker(info)
        if isinstance(rule, dict):
            assert rule.get("order"), path
        else:
            assert rule in KNOWN_MARKERS, path


def test_the_json_schema_and_the_reference_show_every_marker() -> None:
    schema = json.dumps(KapsisConfig.model_json_schema())
    reference = (ROOT / "docs" / "config-reference.md").read_text()
    for path, _ in leaf_fields(KapsisConfig):
        dotted = ".".join(map(str, path))
        row = next(line for line in reference.splitlines() if line.startswith(f"| `{dotted}` |"))
        assert (
            any(
                text in row
                for text in (
                    "any value",
                    "needs trust",
                    "no higher",
                    "no longer",
                    "no profile that gets more",
                    "no additions",
                    "no removals",
                )
            )
            or "no wider (" in row
        ), dotted
    assert schema.count(TRUST_KEY) >= len(list(leaf_fields(KapsisConfig)))


# ---------------------------------------------------------------------------------------------
# refusal, with a trusted control for each


HOOK = "git:\n  post_push_hook: touch /tmp/kapsis-pwned\n"


def test_an_untrusted_host_hook_is_refused_naming_file_line_key_and_fix(project: Path) -> None:
    write(project / "agent-sandbox.yaml", "# the agent wrote this\n" + HOOK)
    message = refused(project)
    assert message.startswith(f"{project / 'agent-sandbox.yaml'}:3: git.post_push_hook: ")
    assert f"kapsis trust {project}" in message and "\n" not in message


def test_control_the_same_hook_from_config_flag_or_user_config_is_accepted(
    project: Path, tmp_path: Path, config_dir: Path
) -> None:
    explicit = write(tmp_path / "mine.yaml", HOOK)
    assert accepted(project, explicit).git.post_push_hook == "touch /tmp/kapsis-pwned"
    write(config_dir / "config.yaml", HOOK)
    assert accepted(project).git.post_push_hook == "touch /tmp/kapsis-pwned"


def test_the_project_dot_kapsis_file_and_the_current_folder_file_are_untrusted(
    project: Path,
) -> None:
    write(project / ".kapsis" / "config.yaml", "network:\n  mode: open\n")
    assert f"trust {project}`" in refused(project)
    (project / ".kapsis" / "config.yaml").unlink()
    write(Path.cwd() / "agent-sandbox.yaml", "network:\n  mode: open\n")
    assert "network.mode: 'open' is wider than your default 'filtered'" in refused(project)


WIDENING = [
    ("network:\n  mode: open\n", "network.mode"),
    ("network:\n  allowlist:\n    hosts: [evil.example]\n", "network.allowlist.hosts"),
    ("network:\n  allowlist:\n    categories: [ai-apis]\n", "network.allowlist.categories"),
    ("network:\n  allowlist:\n    addresses: [10.0.0.0/8]\n", "network.allowlist.addresses"),
    ("network:\n  dns_servers: [192.0.2.9]\n", "network.dns_servers"),
    ("network:\n  dns:\n    query_types: [TXT]\n", "network.dns.query_types"),
    ("network:\n  dns:\n    max_label_length: 63\n", "network.dns.max_label_length"),
    ("network:\n  podman_network: host\n", "network.podman_network"),
    ("filesystem:\n  mounts: [{source: /etc, target: /host-etc}]\n", "filesystem.mounts"),
    ("filesystem:\n  share_ignored: [node_modules]\n", "filesystem.share_ignored"),
    ("filesystem:\n  hide: []\n", "filesystem.hide"),
    ("security:\n  profile: minimal\n", "security.profile"),
    ("security:\n  overrides:\n    seccomp: false\n", "security.overrides.seccomp"),
    ("security:\n  overrides:\n    cap_add: [NET_RAW]\n", "security.overrides.cap_add"),
    ("security:\n  overrides:\n    no_new_privileges: false\n", "no_new_privileges"),
    ("environment:\n  passthrough: [AWS_SECRET_ACCESS_KEY]\n", "environment.passthrough"),
    ("environment:\n  keychain:\n    T: {service: s, account: a}\n", "environment.keychain"),
    ("resources:\n  memory: 64g\n", "resources.memory"),
    ("resources:\n  disk: null\n", "resources.disk"),
    ("resources:\n  timeout: null\n", "resources.timeout"),
    ("git:\n  auto_push: true\n", "git.auto_push"),
    ("git:\n  remote: upstream\n", "git.remote"),
    ("git:\n  commit_exclude: []\n", "git.commit_exclude"),
    ("git:\n  max_file_size: 10g\n", "git.max_file_size"),
    ("audit:\n  enabled: false\n", "audit.enabled"),
    ("ssh:\n  verify_hosts: false\n", "ssh.verify_hosts"),
    ("kubernetes:\n  context: prod\n", "kubernetes.context"),
    ("kubernetes:\n  secrets:\n    K: {name: s, key: k}\n", "kubernetes.secrets"),
    ("kubernetes:\n  namespace: other-team\n", "kubernetes.namespace"),
    # A profile that gets the user's API key from the host environment, and its API hosts.
    ("agent:\n  name: claude\n", "agent.name"),
    # The host commits to (and with --push pushes) an existing branch such as main.
    ("git:\n  branch: main\n", "git.branch"),
    ("git:\n  committer: Someone Else <boss@example.test>\n", "git.committer"),
    ("image:\n  name: localhost/the-users-own-image:1\n", "image.name"),
    # A build-tool URL's host joins the allowlist.
    ("build_tools:\n  pip:\n    index_url: http://169.254.169.254/simple\n", "index_url"),
    ("build_tools:\n  npm:\n    registry: https://exfil.example/\n", "npm.registry"),
    ("build_tools:\n  maven:\n    mirror_url: http://10.0.0.1:22/\n", "maven.mirror_url"),
    ("filesystem:\n  mode: worktree\n", "filesystem.mode"),
    # pids: null is the security profile's limit, and 4096 is above standard's 1024.
    ("resources:\n  pids: 4096\n", "resources.pids"),
    # "72h" is longer than 1h, whatever "m" means for a size.
    ("resources:\n  timeout: 72h\n", "resources.timeout"),
    ("git:\n  push_timeout: 2h\n", "git.push_timeout"),
    # A negation un-hides: all the defaults kept, "!*" added.
    ("filesystem:\n  hide: " + json.dumps([*DEFAULT_HIDE, "!*"]) + "\n", "filesystem.hide"),
]


@pytest.mark.parametrize(("text", "key"), WIDENING, ids=[key for _, key in WIDENING])
def test_each_widening_key_from_a_project_file_is_refused(
    project: Path, config_dir: Path, text: str, key: str
) -> None:
    write(config_dir / "config.yaml", "resources:\n  timeout: 1h\n")  # a limit to lift
    write(project / "agent-sandbox.yaml", text)
    assert key in refused(project)
    # Control: the same value, trusted as the user's own, runs.
    write(config_dir / "config.yaml", text)
    (project / "agent-sandbox.yaml").unlink()
    accepted(project)


NARROWING = [
    "network:\n  mode: none\n",
    "security:\n  profile: paranoid\n",
    "security:\n  overrides:\n    seccomp: true\n    read_only_root: true\n",
    "resources:\n  memory: 512m\n  cpus: 0.5\n  pids: 64\n  disk: 1g\n  timeout: 10m\n",
    "git:\n  commit_exclude: ['.env', '*.pem', '*.key', 'id_rsa*', 'id_dsa*', 'id_ecdsa*',"
    " 'id_ed25519*', '.netrc', '.git-credentials', '.env.*', '*.p12', '*.pfx', 'secrets/*']\n",
    "agent:\n  command: make test\n  workdir: /workspace/sub\n",
    "git:\n  base_branch: main\n  commit_message: 'fix: {task}'\n  auto_commit: false\n",
    "resources:\n  pids: 100\n",
    "environment:\n  set:\n    DEBUG: '1'\n",
    "resources:\n  idle_timeout: 5m\n  idle_action: stop\n",
]


@pytest.mark.parametrize("text", NARROWING)
def test_keys_that_narrow_or_describe_the_run_need_no_trust(project: Path, text: str) -> None:
    write(project / "agent-sandbox.yaml", text)
    accepted(project)


def test_a_profile_or_host_the_users_own_profile_has_needs_no_trust(
    project: Path, config_dir: Path
) -> None:
    write(config_dir / "config.yaml", "agent:\n  name: claude\n")
    # The claude profile's own API host; the shell profile gets no secret at all.
    write(
        project / "agent-sandbox.yaml", "network:\n  allowlist:\n    hosts: [api.anthropic.com]\n"
    )
    accepted(project)
    write(project / "agent-sandbox.yaml", "agent:\n  name: shell\n")
    assert accepted(project).agent.name == "shell"


def test_a_duration_in_minutes_is_compared_as_time(project: Path, config_dir: Path) -> None:
    write(config_dir / "config.yaml", "resources:\n  timeout: 30m\n")
    write(project / "agent-sandbox.yaml", "resources:\n  timeout: 100000s\n")
    assert "resources.timeout: '100000s' is above your default '30m'" in refused(project)
    write(project / "agent-sandbox.yaml", "resources:\n  timeout: 10m\n")
    accepted(project)


def test_adding_hide_patterns_needs_no_trust_but_removing_one_does(project: Path) -> None:
    defaults = KapsisConfig().filesystem.hide
    write(project / "agent-sandbox.yaml", f"filesystem:\n  hide: {[*defaults, 'secrets/']}\n")
    assert accepted(project).filesystem.hide[-1] == "secrets/"
    write(project / "agent-sandbox.yaml", f"filesystem:\n  hide: {defaults[1:]}\n")
    assert "filesystem.hide: drops '.env'" in refused(project)


def test_a_mapping_key_merged_from_a_project_file_is_judged(
    project: Path, config_dir: Path
) -> None:
    """The user's keychain entry and the project's merge key by key: the project's addition
    is caught although the mapping itself came from the user's config."""
    write(
        config_dir / "config.yaml", "environment:\n  keychain:\n    A: {service: s, account: a}\n"
    )
    write(
        project / "agent-sandbox.yaml",
        "environment:\n  keychain:\n    B: {service: s, account: b}\n",
    )
    message = refused(project)
    assert message.startswith(f"{project / 'agent-sandbox.yaml'}:3: environment.keychain")
    # Control: the project repeating the user's own entry adds nothing.
    write(
        project / "agent-sandbox.yaml",
        "environment:\n  keychain:\n    A: {service: s, account: a}\n",
    )
    accepted(project)


def test_a_flag_beats_an_untrusted_value_so_nothing_needs_trust(project: Path) -> None:
    write(project / "agent-sandbox.yaml", "network:\n  mode: open\n")
    loaded, _ = load_trusted_config(project, None, {"network.mode": ("--network-mode", "none")})
    assert loaded.config.network.mode == "none"


# ---------------------------------------------------------------------------------------------
# the record of trust


def test_trusting_records_the_hash_outside_the_project_and_one_byte_untrusts(
    project: Path, config_dir: Path
) -> None:
    config = write(project / "agent-sandbox.yaml", HOOK + "network:\n  mode: open\n")
    reports = trust_project(project)
    assert [r.path for r in reports] == [config]
    assert [line.split(": ")[1] for line in reports[0].needs_trust] == [
        "git.post_push_hook",
        "network.mode",
    ]
    assert accepted(project).network.mode == "open"
    record = trust_file()
    assert record.is_relative_to(config_dir) and not record.is_relative_to(project)
    assert oct(record.stat().st_mode & 0o777) == "0o600"
    config.write_text(config.read_text() + " ")
    assert "git.post_push_hook" in refused(project)


def test_trust_is_bound_to_the_place_a_symlink_borrows_none(tmp_path: Path, project: Path) -> None:
    other = tmp_path / "other"
    write(other / "agent-sandbox.yaml", HOOK)
    trust_project(other)
    accepted(other)
    os.symlink(other / "agent-sandbox.yaml", project / "agent-sandbox.yaml")
    assert "git.post_push_hook" in refused(project)


def test_config_show_marks_each_value_trusted_or_not(project: Path) -> None:
    write(project / "agent-sandbox.yaml", "network:\n  mode: open\nresources:\n  memory: 1g\n")
    result = CliRunner().invoke(app, ["config", "show", str(project), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["trusted"]["network.mode"] is False
    assert shown["trusted"]["resources.memory"] is False
    assert shown["trusted"]["resources.cpus"] is True
    assert [line.split(": ")[1] for line in shown["needs_trust"]] == ["network.mode"]
    assert trust_problems(load_config(project)) != []


def test_run_refuses_with_exit_2_and_creates_nothing(project: Path, kapsis_home: Path) -> None:
    write(project / "agent-sandbox.yaml", HOOK)
    result = CliRunner().invoke(app, ["run", str(project), "--task", "x"])
    assert result.exit_code == ExitCode.USAGE == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("kapsis: error: ") and "git.post_push_hook" in line
    assert list(kapsis_home.iterdir()) == []


def test_trust_list_and_revoke(project: Path) -> None:
    write(project / "agent-sandbox.yaml", HOOK)
    runner = CliRunner()
    trusted = runner.invoke(app, ["trust", str(project)])
    assert trusted.exit_code == 0, trusted.output
    assert "needs trust" in trusted.stdout and "git.post_push_hook" in trusted.stdout
    listed = json.loads(runner.invoke(app, ["trust", "--list", "--json"]).stdout)
    assert [entry["path"] for entry in listed] == [str(project / "agent-sandbox.yaml")]
    accepted(project)
    revoked = runner.invoke(app, ["trust", "--revoke", str(project)])
    assert revoked.exit_code == 0 and "no longer trusted" in revoked.stdout
    refused(project)


def test_a_linked_dot_kapsis_folder_borrows_no_trust(tmp_path: Path, project: Path) -> None:
    other = tmp_path / "other"
    write(other / ".kapsis" / "config.yaml", HOOK)
    trust_project(other)
    accepted(other)
    os.symlink(other / ".kapsis", project / ".kapsis")
    assert "git.post_push_hook" in refused(project)


def test_trust_of_a_project_leaves_the_current_folders_file_untrusted(
    tmp_path: Path, project: Path
) -> None:
    write(project / "agent-sandbox.yaml", "resources:\n  memory: 1g\n")
    write(Path.cwd() / "agent-sandbox.yaml", HOOK)  # the current folder is not the project
    assert [r.path for r in trust_project(project)] == [project / "agent-sandbox.yaml"]
    assert "git.post_push_hook" in refused(project)


def test_revoke_through_a_linked_project_path(tmp_path: Path, project: Path) -> None:
    write(project / "agent-sandbox.yaml", HOOK)
    link = tmp_path / "link"
    os.symlink(project, link)
    trust_project(link)
    accepted(project)
    result = CliRunner().invoke(app, ["trust", "--revoke", str(link)])
    assert "no longer trusted" in result.stdout, result.output
    refused(project)


@pytest.mark.parametrize(
    "text",
    [
        "a: &x {post_push_hook: x}\ngit: {<<: *x}\n",  # a merge key: its keys have no line
        "l0: &l0 [x, x, x]\nl1: &l1 [*l0, *l0, *l0]\nl2: [*l1, *l1, *l1]\n",  # an alias bomb
        "agent: " + "[" * 3000 + "]" * 3000 + "\n",  # nesting
        "git:\n  commit_message: '{task:>3000000000}'\n",  # a field of gigabytes
    ],
    ids=["merge-key", "aliases", "nesting", "format-spec"],
)
def test_a_hostile_config_file_is_one_config_error(project: Path, text: str) -> None:
    write(project / "agent-sandbox.yaml", text)
    result = CliRunner().invoke(app, ["run", str(project), "--task", "x"])
    assert result.exit_code == ExitCode.USAGE, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"kapsis: error: {project / 'agent-sandbox.yaml'}")


def test_switching_to_a_profile_with_a_login_the_users_own_profile_lacks_needs_trust(
    project: Path, config_dir: Path
) -> None:
    """A user's own profile with codex's secret and host but no subscription login: a project
    that switches to codex would hand over CODEX_AUTH (and allow chatgpt.com)."""
    agents = config_dir / "agents"
    agents.mkdir(parents=True, exist_ok=True)
    write(
        agents / "mycodex.yaml",
        "command: [codex, exec, '{task}']\nsecrets: [CODEX_API_KEY]\n"
        "secret_sources:\n  CODEX_API_KEY: [CODEX_API_KEY, OPENAI_API_KEY]\n"
        "network:\n  hosts: [api.openai.com]\n",
    )
    write(config_dir / "config.yaml", "agent:\n  name: mycodex\n")
    write(project / "agent-sandbox.yaml", "agent:\n  name: codex\n")
    assert "agent.name" in refused(project)
    # Control: with the same login in the user's own profile, the switch gives nothing more.
    write(
        agents / "mycodex.yaml",
        (agents / "mycodex.yaml").read_text()
        + "login: {secret: CODEX_AUTH, file: /home/agent/.codex/auth.json, hosts: [chatgpt.com]}\n",
    )
    assert accepted(project).agent.name == "codex"
