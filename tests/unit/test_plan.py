"""build_plan: security profiles, host facts, task handling, environment, agent profiles."""

from __future__ import annotations

import pytest

from kapsis.agents import find_profile
from kapsis.backends.podman import agent_run_args, pod_create_args
from kapsis.errors import AgentNotFoundError, ConfigError, ExitCode, HostUnsupportedError
from kapsis.host.facts import HostFacts
from kapsis.sandbox.plan import SPEC_TARGET

DNS = ("192.0.2.53",)  # a resolver the sandbox's gateway could use

EVIL_TASK = "$(touch /x); rm -rf ~ `id` && echo 'pwned' | tee \"/etc/passwd\""
SECRET = "s3cr3t-token-value-8d1f"
API_KEYS = {"ANTHROPIC_API_KEY": "sk-unit", "OPENAI_API_KEY": "sk-unit"}

# ---------------------------------------------------------------------------------------------
# security profiles


def test_minimal_profile_adds_no_hardening(make_plan):
    security = make_plan(security_profile="minimal").security

    assert security.drop_all_capabilities is False
    assert security.no_new_privileges is False
    assert security.seccomp is False
    assert security.read_only_root is False
    assert security.noexec_tmp is False
    assert security.apparmor_profile is None


def test_minimal_profile_leaves_pids_to_podman(make_plan):
    assert make_plan(security_profile="minimal").resources.pids_limit is None


def test_standard_profile_is_the_default(make_plan):
    assert make_plan().security.profile == "standard"


def test_standard_profile_drops_caps_sets_nnp_and_seccomp(make_plan):
    plan = make_plan(security_profile="standard")

    assert plan.security.drop_all_capabilities is True
    assert plan.security.no_new_privileges is True
    assert plan.security.seccomp is True
    assert plan.security.read_only_root is False
    assert plan.security.noexec_tmp is False
    assert plan.resources.pids_limit == 1024


def test_strict_profile_adds_read_only_root_and_noexec_tmp(make_plan):
    plan = make_plan(security_profile="strict")

    assert plan.security.drop_all_capabilities is True
    assert plan.security.no_new_privileges is True
    assert plan.security.seccomp is True
    assert plan.security.read_only_root is True
    assert plan.security.noexec_tmp is True
    assert plan.resources.pids_limit == 256
    tmp = next(t for t in plan.tmpfs if t.target == "/tmp")
    assert "noexec" in tmp.options


def test_standard_profile_tmp_is_not_noexec(make_plan):
    tmp = next(t for t in make_plan().tmpfs if t.target == "/tmp")

    assert "noexec" not in tmp.options
    assert "nosuid" in tmp.options


def test_overrides_change_profile_settings(make_plan):
    config = (
        "security:\n  profile: standard\n  overrides:\n"
        "    read_only_root: true\n    seccomp: false\n    noexec_tmp: true\n"
        "    no_new_privileges: false\n    cap_add: [chown]\n"
    )

    security = make_plan(config=config).security

    assert security.read_only_root is True
    assert security.seccomp is False
    assert security.noexec_tmp is True
    assert security.no_new_privileges is False
    assert security.cap_add == ("CAP_CHOWN",)
    assert security.drop_all_capabilities is True


def test_override_can_relax_strict(make_plan):
    config = "security:\n  profile: strict\n  overrides:\n    read_only_root: false\n"

    plan = make_plan(config=config)

    assert plan.security.read_only_root is False
    assert plan.security.noexec_tmp is True


def test_explicit_pids_beats_the_profile_default(make_plan):
    plan = make_plan(config="resources:\n  pids: 64\n", security_profile="strict")

    assert plan.resources.pids_limit == 64


def test_paranoid_without_apparmor_is_refused(make_plan):
    with pytest.raises(HostUnsupportedError) as caught:
        make_plan(security_profile="paranoid", host=HostFacts(False, 2, False, DNS))

    assert caught.value.exit_code == ExitCode.HOST_UNSUPPORTED == 4
    assert "AppArmor" in str(caught.value)
    assert "flag --security-profile" in str(caught.value)


def test_paranoid_with_apparmor_sets_the_profile(make_plan):
    plan = make_plan(security_profile="paranoid", host=HostFacts(False, 2, True, DNS))

    assert plan.security.apparmor_profile == "kapsis-paranoid"
    assert plan.security.read_only_root is True
    assert plan.security.noexec_tmp is True


# ---------------------------------------------------------------------------------------------
# network


def test_network_is_filtered_by_default_with_a_gateway(make_plan):
    plan = make_plan()
    assert plan.network.mode == "filtered"
    assert plan.network.gateway is not None
    assert plan.network.gateway.container_name == "kapsis-unit1-gateway"
    assert plan.network.gateway.upstreams == ("192.0.2.53",)  # the host's resolver


def test_filtered_without_any_resolver_fails_closed(make_plan):
    host = HostFacts(rootless=False, cgroup_version=1, apparmor=False, dns_servers=())
    with pytest.raises(ConfigError) as caught:
        make_plan(host=host)
    assert caught.value.exit_code == 2
    assert "network.dns_servers" in str(caught.value)
    # The config can name one instead.
    plan = make_plan(host=host, config="network:\n  dns_servers: [198.51.100.53]\n")
    assert plan.network.gateway is not None
    assert plan.network.gateway.upstreams == ("198.51.100.53",)


def test_none_and_open_have_no_gateway(make_plan):
    assert make_plan(network_mode="none").network.gateway is None
    assert make_plan(network_mode="open").network.gateway is None


def test_allowlist_combines_config_profile_category_and_flag_with_sources(make_plan):
    plan = make_plan(
        config="agent:\n  name: claude\nnetwork:\n  allowlist:\n"
        "    hosts:\n      - pypi.org\n      - github.com:22\n"
        "    categories: [git-hosts]\n"
        "    addresses: ['198.51.100.0/24:5432']\n",
        allow=("example.org", "203.0.113.9"),
        environ=API_KEYS,
    )
    rules = {rule.pattern: rule for rule in plan.network.policy.rules}
    assert rules["pypi.org"].sources[0].endswith(":6")
    assert rules["pypi.org"].ports == (80, 443)
    assert rules["api.anthropic.com"].sources == ("agent profile claude",)
    # github.com is listed twice (with :22 in the config, plain in the category): ports merge.
    assert rules["github.com"].ports == (22, 80, 443)
    assert any(s.startswith("category git-hosts") for s in rules["github.com"].sources)
    assert rules["198.51.100.0/24"].kind == "address"
    assert rules["198.51.100.0/24"].ports == (5432,)
    assert rules["example.org"].sources == ("flag --allow",)
    assert rules["203.0.113.9/32"].kind == "address"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [("bad host!", "is not a host name"), ("10.0.0.0/33", "is not an address")],
)
def test_a_bad_allow_flag_is_a_usage_error(make_plan, entry, expected):
    with pytest.raises(ConfigError) as caught:
        make_plan(allow=(entry,))
    assert str(caught.value).startswith("flag --allow: ")
    assert expected in str(caught.value)


# ---------------------------------------------------------------------------------------------
# host facts -> limits and user namespace


@pytest.mark.parametrize(
    ("host", "enforced"),
    [
        (HostFacts(rootless=True, cgroup_version=1, apparmor=False, dns_servers=DNS), False),
        (HostFacts(rootless=True, cgroup_version=2, apparmor=False, dns_servers=DNS), True),
        (HostFacts(rootless=False, cgroup_version=1, apparmor=False, dns_servers=DNS), True),
        (HostFacts(rootless=False, cgroup_version=2, apparmor=False, dns_servers=DNS), True),
    ],
)
def test_limits_enforced_depends_on_rootless_and_cgroup_version(make_plan, host, enforced):
    assert make_plan(host=host).resources.limits_enforced is enforced


def test_rootful_gets_a_mapped_user_namespace(make_plan):
    userns = make_plan(host=HostFacts(False, 2, False, DNS)).userns

    assert userns.kind == "mapped"
    assert userns.size == 65536
    assert userns.agent_uid == 1000


def test_rootless_keeps_the_user_id(make_plan):
    assert make_plan(host=HostFacts(True, 2, False, DNS)).userns.kind == "keep-id"


def test_resources_come_from_flags(make_plan):
    resources = make_plan(memory="512m", cpus=0.5, timeout="2m").resources

    assert resources.memory == "512m"
    assert resources.memory_bytes == 512 * 1024**2
    assert resources.cpus == 0.5
    assert resources.timeout_seconds == 120


# ---------------------------------------------------------------------------------------------
# task and spec


def test_task_and_spec_together_are_refused(make_plan, tmp_path):
    spec = tmp_path / "spec.md"
    spec.write_text("# do it\n")

    with pytest.raises(ConfigError, match="--task and --spec"):
        make_plan(task="x", spec=spec)


@pytest.mark.parametrize("task", [None, "", "   \n"])
def test_no_task_is_refused(make_plan, task):
    with pytest.raises(ConfigError, match="no task") as caught:
        make_plan(task=task)

    assert caught.value.exit_code == 2


def test_unreadable_spec_is_a_config_error(make_plan, tmp_path):
    with pytest.raises(ConfigError, match="--spec"):
        make_plan(task=None, spec=tmp_path / "missing.md")


def test_spec_content_becomes_the_task(make_plan, tmp_path):
    spec = tmp_path / "spec.md"
    spec.write_text("# Fix the bug\n\nSee issue 12.\n")

    plan = make_plan(
        task=None, spec=spec, config="agent:\n  command: [agent-cli, --prompt, '{task}']\n"
    )

    assert plan.command == ("agent-cli", "--prompt", "# Fix the bug\n\nSee issue 12.\n")
    assert plan.spec_source == str(spec.resolve())
    assert plan.task_summary == f"spec {spec.resolve()}: # Fix the bug"


def test_spec_is_mounted_read_only_and_named_in_env(make_plan, tmp_path, kapsis_home):
    spec = tmp_path / "spec.md"
    spec.write_text("do the thing\n")

    plan = make_plan(task=None, spec=spec)

    assert plan.env["KAPSIS_TASK_SPEC"] == SPEC_TARGET == "/task-spec.md"
    assert "KAPSIS_TASK" not in plan.env
    (mount,) = [m for m in plan.mounts if m.target == SPEC_TARGET]
    assert mount.read_only is True
    assert mount.source == str(kapsis_home / "sandboxes" / plan.agent_id / "task-spec.md")


def test_list_command_substitutes_task_into_one_argv_element(make_plan):
    plan = make_plan(task=EVIL_TASK, config="agent:\n  command: [printf, '%s', '{task}']\n")

    assert plan.command == ("printf", "%s", EVIL_TASK)


def test_builtin_agent_puts_the_task_in_its_own_argument(make_plan):
    plan = make_plan(task=EVIL_TASK, agent="claude", environ=API_KEYS)

    assert plan.command == ("claude", "-p", EVIL_TASK, "--dangerously-skip-permissions")


def test_string_command_runs_via_sh_without_interpolating_the_task(make_plan):
    plan = make_plan(task=EVIL_TASK, config="agent:\n  command: 'echo \"$KAPSIS_TASK\" {task}'\n")

    assert plan.command == ("sh", "-c", 'echo "$KAPSIS_TASK" {task}')
    assert EVIL_TASK not in plan.command[2]
    assert "touch /x" not in plan.command[2]
    assert plan.env["KAPSIS_TASK"] == EVIL_TASK


def test_string_command_in_argv_is_not_interpolated(make_plan):
    plan = make_plan(task=EVIL_TASK, config="agent:\n  command: 'run-agent'\n")

    argv = agent_run_args(plan, detach=True, uid_base=0)

    assert argv[-3:] == ["sh", "-c", "run-agent"]
    assert [a for a in argv if "touch /x" in a] == [f"KAPSIS_TASK={EVIL_TASK}"]


def test_task_is_in_kapsis_task_env(make_plan):
    plan = make_plan(task="make test")

    assert plan.env["KAPSIS_TASK"] == "make test"
    assert plan.env["KAPSIS_AGENT_ID"] == plan.agent_id
    assert plan.env["HOME"] == "/home/agent"


def test_task_too_long_for_an_argument_is_refused(make_plan):
    with pytest.raises(ConfigError, match="longer than"):
        make_plan(task="x" * (128 * 1024))


def test_non_ascii_spec_too_long_for_an_argument_is_refused(make_plan, tmp_path):
    spec = tmp_path / "spec.md"
    spec.write_text("é" * 70_000, encoding="utf-8")

    with pytest.raises(ConfigError, match="longer than"):
        make_plan(task=None, spec=spec, config="agent:\n  command: [agent, '{task}']\n")


def test_task_whose_env_string_exceeds_the_kernel_limit_is_refused(make_plan):
    with pytest.raises(ConfigError, match="--spec"):
        make_plan(task="x" * 131_065, config="agent:\n  command: run-agent\n")


def test_task_too_long_for_the_environment_is_refused_even_for_string_commands(make_plan):
    with pytest.raises(ConfigError, match="--spec"):
        make_plan(task="é" * (64 * 1024), config="agent:\n  command: run-agent\n")


def test_long_spec_is_fine(make_plan, tmp_path):
    spec = tmp_path / "big.md"
    spec.write_text("y" * (256 * 1024))

    plan = make_plan(task=None, spec=spec, config="agent:\n  command: run-agent\n")

    assert plan.env["KAPSIS_TASK_SPEC"] == "/task-spec.md"


def test_long_task_summary_is_truncated_to_80_chars(make_plan):
    plan = make_plan(task="x" * 200 + "\nsecond line")

    assert plan.task_summary == "x" * 77 + "..."


# ---------------------------------------------------------------------------------------------
# environment


def test_set_env_values_reach_the_plan(make_plan):
    plan = make_plan(config="environment:\n  set:\n    LANG: C.UTF-8\n")

    assert plan.env["LANG"] == "C.UTF-8"


def test_missing_passthrough_variable_names_it(make_plan):
    config = "environment:\n  passthrough: [PRESENT_VAR, MISSING_TOKEN]\n"

    with pytest.raises(ConfigError) as caught:
        make_plan(config=config, environ={"PRESENT_VAR": "1"})

    assert "MISSING_TOKEN" in str(caught.value)
    assert "PRESENT_VAR" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_passthrough_value_never_enters_the_plan(make_plan):
    plan = make_plan(
        config="environment:\n  passthrough: [API_TOKEN]\n", environ={"API_TOKEN": SECRET}
    )

    assert [(s.name, s.source) for s in plan.secrets] == [("API_TOKEN", "passthrough")]
    assert "API_TOKEN" not in plan.env
    assert SECRET not in plan.model_dump_json()


def test_passthrough_value_never_enters_podman_argv(make_plan):
    plan = make_plan(
        config="environment:\n  passthrough: [API_TOKEN]\n", environ={"API_TOKEN": SECRET}
    )

    argv = agent_run_args(plan, detach=False, uid_base=1_500_000_000) + pod_create_args(plan)

    assert not [arg for arg in argv if SECRET in arg]
    # Not even by name as --env: podman would copy the value into the container's config file.
    assert "API_TOKEN" not in argv
    assert not [arg for arg in argv if arg.startswith("API_TOKEN")]


# ---------------------------------------------------------------------------------------------
# agent id, project, agent profiles


@pytest.mark.parametrize("agent_id", ["Upper", "-lead", "has_underscore", "a" * 33, "a b", "a/b"])
def test_invalid_agent_id_is_refused(make_plan, agent_id):
    with pytest.raises(ConfigError, match="--agent-id"):
        make_plan(agent_id=agent_id)


@pytest.mark.parametrize("agent_id", ["a", "0abc", "fix-issue-12", "a" * 32])
def test_valid_agent_id_names_pod_and_container(make_plan, agent_id):
    plan = make_plan(agent_id=agent_id)

    assert plan.agent_id == agent_id
    assert plan.pod_name == f"kapsis-{agent_id}"
    assert plan.container_name == f"kapsis-{agent_id}-agent"


def test_random_agent_id_is_valid_and_differs(make_plan):
    first, second = make_plan(agent_id=None), make_plan(agent_id=None)

    assert first.agent_id != second.agent_id
    for plan in (first, second):
        assert plan.agent_id.isalnum() and plan.agent_id == plan.agent_id.lower()


def test_missing_project_is_refused(make_plan, project):
    import shutil

    shutil.rmtree(project)

    with pytest.raises(ConfigError, match="no such directory"):
        make_plan()


def test_missing_read_only_mount_source_is_refused(make_plan, tmp_path):
    config = f"filesystem:\n  mounts:\n    - source: {tmp_path / 'nope'}\n      target: /data\n"

    with pytest.raises(ConfigError, match="does not exist"):
        make_plan(config=config)


def test_extra_mounts_are_read_only(make_plan, tmp_path):
    data = tmp_path / "data"
    data.mkdir()

    plan = make_plan(config=f"filesystem:\n  mounts:\n    - source: {data}\n      target: /data\n")

    assert [(m.source, m.target, m.read_only) for m in plan.mounts if m.target == "/data"] == [
        (str(data.resolve()), "/data", True)
    ]
    assert all(mount.read_only for mount in plan.mounts)  # the SSH files are read-only too


def test_unknown_agent_lists_the_known_ones():
    with pytest.raises(AgentNotFoundError) as caught:
        find_profile("nonexistent")

    message = str(caught.value)
    for name in ("shell", "claude", "codex", "aider", "gemini"):
        assert name in message
    assert caught.value.exit_code == 2


def test_unknown_agent_via_plan_is_config_error(make_plan):
    with pytest.raises(AgentNotFoundError, match="--agent nonexistent"):
        make_plan(agent="nonexistent")


def test_user_profile_overrides_a_builtin(make_plan, config_dir):
    agents = config_dir / "agents"
    agents.mkdir()
    (agents / "claude.yaml").write_text("command: [my-claude, '{task}']\nworkdir: /workspace/app\n")

    plan = make_plan(agent="claude", task="hello", environ=API_KEYS)

    assert plan.command == ("my-claude", "hello")
    assert plan.workdir == "/workspace/app"
    assert find_profile("claude").source == str(agents / "claude.yaml")


def test_user_profile_adds_a_new_agent(config_dir):
    agents = config_dir / "agents"
    agents.mkdir()
    (agents / "mine.yaml").write_text("description: mine\ncommand: run-it\n")

    profile = find_profile("mine")

    assert profile.name == "mine"
    assert profile.command == "run-it"


def test_bad_user_profile_gives_a_file_line_error(config_dir):
    agents = config_dir / "agents"
    agents.mkdir()
    path = agents / "claude.yaml"
    path.write_text("command: [x]\nworkdir: relative/dir\n")

    with pytest.raises(ConfigError) as caught:
        find_profile("claude")

    assert str(caught.value).startswith(f"{path}:2: workdir: ")
    assert "\n" not in str(caught.value)


def test_user_profile_with_unknown_key_gives_a_file_line_error(config_dir):
    agents = config_dir / "agents"
    agents.mkdir()
    path = agents / "mine.yaml"
    path.write_text("command: [x]\ncomand: [y]\n")

    with pytest.raises(ConfigError) as caught:
        find_profile("mine")

    assert str(caught.value).startswith(f"{path}:2: comand: unknown key 'comand'")


def test_user_profile_missing_command_names_the_file(config_dir):
    agents = config_dir / "agents"
    agents.mkdir()
    path = agents / "mine.yaml"
    path.write_text("description: no command here\n")

    with pytest.raises(ConfigError) as caught:
        find_profile("mine")

    assert str(caught.value).startswith(f"{path}: command: ")
    assert "required" in str(caught.value)


def test_user_profile_name_must_match_its_file_name(config_dir):
    agents = config_dir / "agents"
    agents.mkdir()
    path = agents / "mine.yaml"
    path.write_text("command: [x]\nname: other\n")

    with pytest.raises(ConfigError) as caught:
        find_profile("mine")

    assert str(caught.value).startswith(f"{path}:2: name: ")


def test_config_command_overrides_profile_command(make_plan):
    plan = make_plan(
        agent="codex", config="agent:\n  command: [codex, '{task}']\n", task="t", environ=API_KEYS
    )

    assert plan.command == ("codex", "t")
    assert plan.requires == ("codex",)
    assert plan.agent == "codex"
