"""agent.endpoint, agent.model (--model) and agent.args: said once, mapped by each profile to
what its CLI reads, the endpoint's host allowed, the same on both backends; the endpoint and the
arguments are a project file's only once trusted."""

from __future__ import annotations

from pathlib import Path

import pytest

from kapsis.agents import find_profile
from kapsis.config.agent_section import endpoint_allow_entry
from kapsis.config.trust import UntrustedConfigError
from kapsis.errors import ConfigError
from kapsis.k8s.render import command_argv, render_request
from kapsis.k8s.render_network import network_policy_of
from kapsis.k8s.resource import AgentRequestSpec
from kapsis.k8s.settings import OperatorSettings
from kapsis.sandbox.run_config import load_trusted_config
from kapsis.secrets.resolve import resolve_secrets

KEYS = {"ANTHROPIC_API_KEY": "k", "OPENAI_API_KEY": "k", "GEMINI_API_KEY": "k"}


def config(endpoint: str | None = None, model: str | None = None, args: str = "") -> str:
    lines = ["agent:"]
    lines += [f"  endpoint: {endpoint}"] if endpoint else []
    lines += [f"  model: {model}"] if model else []
    lines += [f"  args: {args}"] if args else []
    return "\n".join(lines) + "\n" if len(lines) > 1 else ""


def test_claude_gets_the_endpoint_in_its_variable_and_the_model_as_a_flag(make_plan) -> None:
    plan = make_plan(
        config=config("http://llm.test:8080/anthropic", "claude-x", "[--verbose]"),
        agent="claude",
        environ=KEYS,
    )
    assert plan.env["ANTHROPIC_BASE_URL"] == "http://llm.test:8080/anthropic"
    assert plan.command[-3:] == ("--model", "claude-x", "--verbose")
    assert plan.command[:3] == ("claude", "-p", "echo hello")


def test_the_model_flag_wins_over_the_config(make_plan) -> None:
    plan = make_plan(
        config=config(model="from-file"), agent="aider", model="openai/x", environ=KEYS
    )
    assert plan.command[-2:] == ("--model", "openai/x")


@pytest.mark.parametrize(
    ("agent", "expected"),
    [
        ("aider", ("--openai-api-base", "https://llm.test/v1")),
        ("codex", ("-c", 'model_provider="kapsis"', "-c")),
    ],
)
def test_each_profile_maps_the_endpoint_to_what_its_cli_reads(
    make_plan, agent: str, expected: tuple[str, ...]
) -> None:
    plan = make_plan(config=config("https://llm.test/v1"), agent=agent, environ=KEYS)
    tail = plan.command[plan.command.index("echo hello") + 1 :] if agent == "codex" else None
    assert tail is None or tail[: len(expected)] == expected
    assert "https://llm.test/v1" in " ".join(plan.command)
    if agent == "codex":
        assert 'base_url = "https://llm.test/v1"' in plan.command[-1]
        assert 'env_key = "CODEX_API_KEY"' in plan.command[-1]


def test_the_gemini_endpoint_is_a_variable(make_plan) -> None:
    plan = make_plan(config=config("https://llm.test"), agent="gemini", environ=KEYS)
    assert plan.env["GOOGLE_GEMINI_BASE_URL"] == "https://llm.test"


def test_a_profile_that_cannot_take_an_endpoint_is_a_one_line_error(make_plan) -> None:
    with pytest.raises(ConfigError) as refused:
        make_plan(config=config("https://llm.test"), agent="shell")
    message = str(refused.value)
    assert "agent.endpoint" in message and "shell" in message and "\n" not in message
    assert ".yaml:2:" in message  # where it was set


def test_a_string_command_gets_the_arguments_as_positional_parameters(make_plan) -> None:
    plan = make_plan(config='agent:\n  command: echo "$1"\n  args: [one]\n')
    assert plan.command == ("sh", "-c", 'echo "$1"', "sh", "one")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://llm.test",
        "http://user:pw@llm.test",
        "http://llm.test/?key=1",
        "http://llm.test:99999",
        'http://llm.test/"quote',
        "http://llm.test/ space",
        "llm.test",
        "http://",
    ],
)
def test_an_endpoint_is_a_plain_http_url(make_plan, url: str) -> None:
    with pytest.raises(ConfigError):
        make_plan(config=f"agent:\n  endpoint: '{url}'\n", agent="claude", environ=KEYS)


@pytest.mark.parametrize(
    ("url", "entry"),
    [
        ("https://llm.test/v1", ("llm.test", False)),
        ("http://llm.test:8080", ("llm.test:8080", False)),
        ("http://10.1.2.3:11434/v1", ("10.1.2.3:11434", True)),
        ("http://[fd00::1]:8000", ("[fd00::1]:8000", True)),
        ("http://[fd00::1]/v1", ("fd00::1", True)),
    ],
)
def test_the_endpoint_host_becomes_an_allowlist_entry(url: str, entry: tuple[str, bool]) -> None:
    assert endpoint_allow_entry(url) == entry


def test_the_endpoint_is_allowed_and_says_where_it_came_from(make_plan) -> None:
    plan = make_plan(config=config("http://llm.test:8080/v1"), agent="claude", environ=KEYS)
    rules = {rule.pattern: rule for rule in plan.network.policy.rules}
    assert rules["llm.test"].ports == (8080,)
    assert rules["llm.test"].sources[0].startswith("agent.endpoint (")
    assert "api.anthropic.com" in rules  # the profile's own host stays


def test_without_an_endpoint_nothing_is_added(make_plan) -> None:
    plan = make_plan(agent="claude", environ=KEYS)
    assert {rule.pattern for rule in plan.network.policy.rules} == {"api.anthropic.com"}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("agent:\n  endpoint: https://attacker.test/v1\n", "agent.endpoint"),
        ("agent:\n  args: [--openai-api-base, https://attacker.test]\n", "agent.args"),
    ],
)
def test_a_project_file_may_not_redirect_the_agent_until_trusted(
    project: Path, text: str, key: str
) -> None:
    """The endpoint receives the API key: the agent could send it away by editing the file."""
    (project / "agent-sandbox.yaml").write_text(text)
    with pytest.raises(UntrustedConfigError) as refused:
        load_trusted_config(project, None, {})
    assert key in str(refused.value)


def test_control_a_project_file_may_name_the_model(project: Path) -> None:
    (project / "agent-sandbox.yaml").write_text("agent:\n  model: gpt-5\n")
    loaded, _ = load_trusted_config(project, None, {})
    assert loaded.config.agent.model == "gpt-5"


def test_codex_gets_its_key_under_the_name_its_cli_reads(make_plan) -> None:
    """Codex's built-in provider reads CODEX_API_KEY; an exported OPENAI_API_KEY serves."""
    profile = find_profile("codex")
    plan = make_plan(agent="codex", environ={"OPENAI_API_KEY": "sk-from-openai"})
    (secret,) = plan.secrets
    assert secret.name == "CODEX_API_KEY" and secret.host_variable == "OPENAI_API_KEY"
    assert resolve_secrets(plan.secrets, {"OPENAI_API_KEY": "sk-from-openai"}) == {
        "CODEX_API_KEY": "sk-from-openai"
    }
    both = {"OPENAI_API_KEY": "sk-openai", "CODEX_API_KEY": "sk-codex"}
    loaded = make_plan(agent="codex", environ=both)
    assert loaded.secrets[0].host_variable is None  # its own name first
    assert profile.secret_sources["CODEX_API_KEY"][0] == "CODEX_API_KEY"


def test_no_source_for_codex_names_both_variables(make_plan) -> None:
    with pytest.raises(ConfigError, match="export CODEX_API_KEY or OPENAI_API_KEY"):
        make_plan(agent="codex", environ={})


def test_the_cluster_gets_the_same_command_environment_and_allowlist() -> None:
    spec = AgentRequestSpec.model_validate(
        {
            "agent": {
                "profile": "claude",
                "endpoint": "http://llm.test:8080",
                "model": "claude-x",
                "args": ["--verbose"],
            },
            "task": {"inline": "fix it"},
            "workspace": {"git": {"url": "https://git.example.com/r.git"}},
            "network": {"mode": "filtered"},
        }
    )
    profile = find_profile("claude")
    assert command_argv(spec, profile)[-3:] == ("--model", "claude-x", "--verbose")
    settings = OperatorSettings(dns_servers=("10.96.0.10",))
    rendered = render_request("r", "team", "0000-1111", spec, settings)
    agent = next(c for c in rendered.pod["spec"]["containers"] if c["name"] == "agent")
    assert {"name": "ANTHROPIC_BASE_URL", "value": "http://llm.test:8080"} in agent["env"]
    rules = {rule.pattern: rule for rule in network_policy_of(spec, profile, settings).rules}
    assert rules["llm.test"].ports == (8080,)


def test_plan_secrets_reads_nothing_but_names(make_plan) -> None:
    """The plan holds where a value comes from, never the value."""
    plan = make_plan(agent="codex", environ={"OPENAI_API_KEY": "sk-secret-value"})
    assert "sk-secret-value" not in plan.model_dump_json()
