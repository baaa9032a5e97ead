"""`kapsis run --backend k8s`: the same flags and config become an AgentRequest, or a clear refusal.

Pure mapping, no cluster: every key that maps is checked in the resulting spec, every local-only
key is refused with its name and the fix, and every key of the config is one or the other.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from kapsis.agents import find_profile
from kapsis.config.loader import load_config
from kapsis.config.models import KapsisConfig
from kapsis.errors import ConfigError, ExitCode
from kapsis.k8s.resource import AgentRequestSpec
from kapsis.k8s.submission import (
    LOCAL_ONLY,
    MAPPED_KEYS,
    GitFacts,
    Submission,
    build_submission,
    check_clone_url,
    read_git_facts,
)
from kapsis.sandbox.plan import RunRequest

URL = "https://git.example.test/team/app.git"
FACTS = GitFacts(url=URL, current_branch="main", unpushed=0)


def submit(
    project: Path,
    tmp_path: Path,
    config: str | None = None,
    facts: GitFacts = FACTS,
    **fields: Any,
) -> Submission:
    config_file = None
    if config is not None:
        config_file = tmp_path / "run.yaml"
        config_file.write_text(config)
    fields.setdefault("task", "Fix the login bug")
    request = RunRequest(project=project, config_file=config_file, backend="k8s", **fields)
    loaded = load_config(project, config_file, request.flag_values())
    profile = find_profile(loaded.config.agent.name)
    return build_submission(request, loaded, profile, facts, fields.get("agent_id") or "ab12")


def refusal(project: Path, tmp_path: Path, config: str | None = None, **fields: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        submit(project, tmp_path, config, **fields)
    assert caught.value.exit_code == ExitCode.USAGE
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_defaults_give_a_request_like_a_local_run(project: Path, tmp_path: Path) -> None:
    sub = submit(project, tmp_path)
    spec = sub.spec
    assert sub.name == "ab12"
    assert spec.agent.profile == "shell" and spec.agent.image is None and spec.agent.command is None
    assert spec.task.inline == "Fix the login bug" and spec.task.configMapRef is None
    git = spec.workspace.git
    assert (git.url, git.baseBranch, git.push) == (URL, "main", False)
    assert git.branch == "kapsis/fix-the-login-bug-ab12"  # the local default name
    assert git.credentialsSecret is None
    assert spec.network.mode == "filtered" and spec.security.profile == "standard"
    assert (spec.resources.memory, spec.resources.cpus) == ("4g", 2.0)
    assert sub.namespace is None and sub.config_map("ns") is None
    # The manifest is a valid AgentRequest as the CRD's models read it.
    (manifest,) = sub.manifests("team")
    assert manifest["kind"] == "AgentRequest" and manifest["apiVersion"] == "kapsis.dev/v1alpha1"
    assert manifest["metadata"]["namespace"] == "team"
    assert AgentRequestSpec.model_validate(manifest["spec"]) == spec


def test_every_flag_maps(project: Path, tmp_path: Path) -> None:
    sub = submit(
        project,
        tmp_path,
        agent_id="run7",
        network_mode="none",
        security_profile="strict",
        memory="1g",
        cpus=0.5,
        timeout="30m",
        image="registry.example/agent:1",
        branch="fix/login",
        base_branch="release",
        push=True,
        namespace="team-a",
    )
    spec = sub.spec
    assert sub.name == "run7" and sub.namespace == "team-a"
    assert spec.network.mode == "none"
    assert spec.security.profile == "strict"
    assert (spec.resources.memory, spec.resources.cpus, spec.resources.timeout) == (
        "1g",
        0.5,
        "30m",
    )
    assert spec.agent.image == "registry.example/agent:1"
    git = spec.workspace.git
    assert (git.branch, git.baseBranch, git.push) == ("fix/login", "release", True)
    assert submit(project, tmp_path, push=False).spec.workspace.git.push is False


def test_allow_flags_join_the_configs_allowlist(project: Path, tmp_path: Path) -> None:
    config = "network:\n  allowlist:\n    hosts: [pypi.org]\n    categories: [git-hosts]\n"
    sub = submit(project, tmp_path, config, allow=("api.example.com:8443", "10.0.0.0/8"))
    allow = sub.spec.network.allowlist
    assert allow.hosts == ["pypi.org", "api.example.com:8443"]
    assert allow.addresses == ["10.0.0.0/8"]
    assert allow.categories == ["git-hosts"]
    with pytest.raises(ConfigError, match="flag --allow"):
        submit(project, tmp_path, allow=("not a host",))


def test_every_config_key_that_maps_reaches_the_spec(project: Path, tmp_path: Path) -> None:
    config = """
agent: {name: shell, command: [make, "{task}"]}
image: {name: registry.example/base:2}
resources: {memory: 2g, cpus: 3, timeout: 1h}
security:
  profile: minimal
  overrides: {read_only_root: true, no_new_privileges: true, seccomp: true, cap_add: [chown]}
network:
  mode: filtered
  allowlist: {hosts: [example.org], addresses: ["192.0.2.0/24:443"]}
  dns_servers: [192.0.2.53]
git: {branch: agent/work, base_branch: develop, auto_push: true, remote: upstream}
environment: {set: {LOG_LEVEL: debug}}
kubernetes:
  namespace: agents
  context: prod
  credentials_secret: git-creds
  secrets: {API_TOKEN: {name: tokens, key: api}}
"""
    sub = submit(project, tmp_path, config)
    spec = sub.spec
    assert spec.agent.command == ["make", "Fix the login bug"]  # {task} as locally
    assert spec.agent.image == "registry.example/base:2"
    assert spec.resources.pids is None and spec.resources.timeout == "1h"
    assert spec.resources.cpus == 3
    assert spec.security.profile == "minimal"
    assert spec.security.overrides.read_only_root is True
    assert spec.security.overrides.no_new_privileges is True
    assert spec.security.overrides.seccomp is True
    assert spec.security.overrides.cap_add == ["CAP_CHOWN"]
    assert spec.network.allowlist.hosts == ["example.org"]
    assert spec.network.allowlist.addresses == ["192.0.2.0/24:443"]
    assert spec.network.dns_servers == ["192.0.2.53"]
    git = spec.workspace.git
    assert (git.branch, git.baseBranch, git.push) == ("agent/work", "develop", True)
    assert git.credentialsSecret == "git-creds"
    assert spec.environment.set == {"LOG_LEVEL": "debug"}
    assert spec.environment.secrets["API_TOKEN"].model_dump() == {"name": "tokens", "key": "api"}
    assert (sub.namespace, sub.context) == ("agents", "prod")


def test_a_string_command_runs_with_sh_as_locally(project: Path, tmp_path: Path) -> None:
    sub = submit(project, tmp_path, 'agent: {command: "make test"}')
    assert sub.spec.agent.command == ["sh", "-c", "make test"]


def test_a_spec_file_goes_to_a_config_map_the_request_names(project: Path, tmp_path: Path) -> None:
    spec_file = tmp_path / "fix.md"
    spec_file.write_text("# Fix login\n\nDetails.\n")
    sub = submit(project, tmp_path, task=None, spec=spec_file)
    ref = sub.spec.task.configMapRef
    assert sub.spec.task.inline is None and ref is not None
    config_map, request = sub.manifests("team")
    assert config_map["kind"] == "ConfigMap"
    assert config_map["metadata"]["name"] == ref.name == "ab12-task"
    assert config_map["data"][ref.key] == "# Fix login\n\nDetails.\n"
    assert config_map["metadata"]["labels"]["kapsis.dev/request"] == "ab12"
    assert request["spec"]["task"] == {"configMapRef": {"name": "ab12-task", "key": "task.md"}}


def test_task_and_spec_are_checked_as_locally(project: Path, tmp_path: Path) -> None:
    assert "no task" in refusal(project, tmp_path, task=None)
    assert "not both" in refusal(project, tmp_path, spec=tmp_path / "x.md")
    assert "--spec" in refusal(project, tmp_path, task="x" * 200_000)


# One non-default value for every local-only key, and the words the refusal must contain.
LOCAL_ONLY_CASES: dict[str, tuple[str, str]] = {
    "agent.workdir": ("agent: {workdir: /src}", "remove it for --backend k8s"),
    "resources.pids": ("resources: {pids: 100}", "podPidsLimit"),
    "resources.disk": ("resources: {disk: 2g}", "ephemeral-storage"),
    "resources.idle_timeout": ("resources: {idle_timeout: 5m}", "does not support it"),
    "resources.idle_action": ("resources: {idle_action: stop}", "does not support it"),
    "security.overrides.noexec_tmp": ("security: {overrides: {noexec_tmp: true}}", "noexec"),
    "filesystem.mode": ("filesystem: {mode: worktree}", "fresh clone"),
    "filesystem.uncommitted": ("filesystem: {uncommitted: exclude}", "uncommitted changes never"),
    "filesystem.share_ignored": ("filesystem: {share_ignored: [node_modules]}", "no directory"),
    "filesystem.hide": ("filesystem: {hide: [secret.txt]}", "hides no tracked file"),
    "filesystem.mounts": (
        "filesystem: {mounts: [{source: /etc, target: /data}]}",
        "host paths cannot be mounted",
    ),
    "network.podman_network": ("network: {podman_network: dual}", "Podman network"),
    "git.auto_commit": ("git: {auto_commit: false}", "always commits"),
    "git.push_timeout": ("git: {push_timeout: 5m}", "does not support it"),
    "git.commit_message": ('git: {commit_message: "wip {task}"}', "does not support it"),
    "git.co_authors": ("git: {co_authors: ['A B <a@b.c>']}", "does not support it"),
    "git.committer": ("git: {committer: 'A B <a@b.c>'}", "does not support it"),
    "git.commit_exclude": ("git: {commit_exclude: ['*.log']}", "does not support it"),
    "git.commit_agent_state": ("git: {commit_agent_state: true}", "does not support it"),
    "git.max_file_size": ("git: {max_file_size: 10m}", "does not support it"),
    "git.post_push_hook": ("git: {post_push_hook: 'echo hi'}", "after the push"),
    "environment.passthrough": (
        "environment: {passthrough: [GITHUB_TOKEN]}",
        "kubernetes.secrets.GITHUB_TOKEN: {name: SECRET, key: KEY}",
    ),
    "environment.keychain": (
        "environment: {keychain: {NPM_TOKEN: {service: npm, account: me}}}",
        "kubernetes.secrets.NPM_TOKEN: {name: SECRET, key: KEY}",
    ),
    "audit.enabled": ("audit: {enabled: false}", "cannot be turned off"),
    "ssh": ("ssh: {verify_hosts: false}", "does not support it"),
    "build_tools": ("build_tools: {npm: {registry: 'https://npm.example'}}", "does not support"),
}


@pytest.mark.parametrize("key", sorted(LOCAL_ONLY_CASES))
def test_each_local_only_key_is_refused_naming_key_origin_and_fix(
    key: str, project: Path, tmp_path: Path
) -> None:
    config, fix = LOCAL_ONLY_CASES[key]
    message = refusal(project, tmp_path, config)
    assert message.startswith(f"{tmp_path / 'run.yaml'}:")  # where it was set
    assert f": {key}" in message
    assert fix in message


def test_the_mode_flag_is_refused_naming_the_flag(project: Path, tmp_path: Path) -> None:
    message = refusal(project, tmp_path, mode="worktree")
    assert message.startswith("flag --mode: filesystem.mode:")


def test_a_local_only_key_at_its_default_value_is_not_refused(
    project: Path, tmp_path: Path
) -> None:
    config = "filesystem: {mode: overlay, mounts: []}\ngit: {auto_commit: true}\n"
    assert submit(project, tmp_path, config).spec.workspace.git.url == URL


def _leaf_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _leaf_paths(annotation, (*prefix, name))
        else:
            found.append((*prefix, name))
    return found


def test_every_config_key_either_maps_or_is_refused() -> None:
    classified = set(MAPPED_KEYS) | set(LOCAL_ONLY)
    leaves = _leaf_paths(KapsisConfig)
    unclassified = [
        ".".join(leaf)
        for leaf in leaves
        if not any(leaf[: len(prefix)] == prefix for prefix in classified)
    ]
    assert not unclassified, f"keys neither mapped nor refused for --backend k8s: {unclassified}"
    overlap = [p for p in MAPPED_KEYS if any(p[: len(q)] == q for q in LOCAL_ONLY)]
    assert not overlap
    # Every refused key has a test case above.
    assert {".".join(str(part) for part in p) for p in LOCAL_ONLY} == set(LOCAL_ONLY_CASES)


def test_a_profiles_secret_must_come_from_a_kubernetes_secret(
    project: Path, tmp_path: Path
) -> None:
    message = refusal(project, tmp_path, agent="claude")
    assert "kubernetes.secrets.ANTHROPIC_API_KEY" in message
    config = "kubernetes: {secrets: {ANTHROPIC_API_KEY: {name: llm, key: anthropic}}}"
    spec = submit(project, tmp_path, config, agent="claude").spec
    assert spec.agent.profile == "claude"
    assert spec.environment.secrets["ANTHROPIC_API_KEY"].name == "llm"


def test_a_user_profile_is_refused(project: Path, tmp_path: Path, config_dir: Path) -> None:
    agents = config_dir / "agents"
    agents.mkdir()
    (agents / "mine.yaml").write_text("command: [echo, hi]\n")
    assert "the cluster does not have" in refusal(project, tmp_path, agent="mine")


def test_the_base_branch_defaults_to_the_checked_out_one(project: Path, tmp_path: Path) -> None:
    facts = GitFacts(url=URL, current_branch="feature/x", unpushed=2)
    sub = submit(project, tmp_path, facts=facts)
    assert sub.spec.workspace.git.baseBranch == "feature/x"
    assert any("2 commit(s) on feature/x are not on origin/feature/x" in n for n in sub.notes)
    detached = GitFacts(url=URL, current_branch=None)
    with pytest.raises(ConfigError, match="--base-branch"):
        submit(project, tmp_path, facts=detached)
    assert submit(project, tmp_path, facts=detached, base_branch="main").notes == ()


def test_agent_ids_must_be_kubernetes_names(project: Path, tmp_path: Path) -> None:
    assert "end with" in refusal(project, tmp_path, agent_id="abc-")
    assert "--agent-id" in refusal(project, tmp_path, agent_id="Has_Upper")


@pytest.mark.parametrize(
    "url",
    ["https://git.example/a.git", "git@github.com:org/app.git", "ssh://git@host:2222/app.git"],
)
def test_clonable_urls_pass(url: str) -> None:
    assert check_clone_url(url, "origin") == url


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("/srv/git/app.git", "cannot clone"),
        ("file:///srv/git/app.git", "cannot clone"),
        ("https://me:s3cret@git.example/a.git", "holds a password or token"),
    ],
)
def test_unclonable_or_credentialed_urls_are_refused(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as caught:
        check_clone_url(url, "origin")
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://git.example/a.git",
        "git@github.com:org/app.git",
        "github.com:org/repo.git",
        "myhost:repo.git",
        "git://host/r.git",
        "https://h:99999/r",
        "/srv/git/app.git",
    ],
)
def test_the_cli_accepts_exactly_the_remotes_the_operator_renders(url: str) -> None:
    from kapsis.k8s.render_network import git_remote

    def accepted(check: Any) -> bool:
        try:
            check()
        except ConfigError:
            return False
        return True

    assert accepted(lambda: check_clone_url(url, "origin")) == accepted(lambda: git_remote(url))


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    root = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    _git(root, "config", "user.name", "Ada")
    _git(root, "config", "user.email", "ada@example.test")
    (root / "README.md").write_text("# r\n")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "initial")
    return root


def test_git_facts_come_from_the_named_remote(repo: Path) -> None:
    _git(repo, "remote", "add", "upstream", URL)
    facts = read_git_facts(repo, "upstream", "default")
    assert (facts.url, facts.current_branch, facts.unpushed) == (URL, "main", None)
    _git(repo, "update-ref", "refs/remotes/upstream/main", "HEAD")
    (repo / "new.txt").write_text("x")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "local only")
    assert read_git_facts(repo, "upstream", "default").unpushed == 1
    with pytest.raises(ConfigError, match="no remote 'origin'"):
        read_git_facts(repo, "origin", "default")


def test_git_facts_need_a_repositorys_top_level(repo: Path, project: Path) -> None:
    with pytest.raises(ConfigError, match="not the top level of a git repository"):
        read_git_facts(project, "origin", "default")
    (repo / "sub").mkdir()
    with pytest.raises(ConfigError, match="not the top level"):
        read_git_facts(repo / "sub", "origin", "default")


def test_namespace_and_backend_flags_are_checked(project: Path) -> None:
    from typer.testing import CliRunner

    from kapsis.cli.app import app

    result = CliRunner().invoke(app, ["run", str(project), "-t", "x", "--namespace", "team"])
    assert result.exit_code == 2
    assert "--namespace: only a run with --backend k8s has a namespace" in result.stderr
    result = CliRunner().invoke(app, ["run", str(project), "-t", "x", "--backend", "nomad"])
    assert result.exit_code == 2 and "--backend nomad: unknown backend" in result.stderr
