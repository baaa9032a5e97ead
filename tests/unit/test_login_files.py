"""A subscription login instead of an API key: the profile's ``login:`` secret, from any
source, goes to the file its CLI reads (on the sandbox's tmpfs), stands in for the API key, and
allows the hosts the CLI then talks to; without it, the key is still required."""

from __future__ import annotations

import pytest

from kapsis.errors import ConfigError

CREDENTIALS = '{"claudeAiOauth": {"accessToken": "sk-ant-oat01-x"}}'


def secrets_of(plan) -> dict[str, tuple[str, str | None]]:
    return {s.name: (s.source, s.target_file) for s in plan.secrets}


def test_claudes_login_file_stands_in_for_the_api_key(make_plan) -> None:
    plan = make_plan(agent="claude", environ={"CLAUDE_CREDENTIALS": CREDENTIALS})
    assert secrets_of(plan) == {
        "CLAUDE_CREDENTIALS": ("host-environment", "/home/agent/.claude/.credentials.json")
    }
    assert "CLAUDE_CREDENTIALS" not in plan.env  # a file, never a variable


def test_control_without_key_or_login_the_run_is_refused_and_says_both(make_plan) -> None:
    with pytest.raises(ConfigError, match=r"ANTHROPIC_API_KEY.*CLAUDE_CREDENTIALS"):
        make_plan(agent="claude", environ={})


def test_a_login_from_the_keychain_goes_to_the_profiles_file(make_plan) -> None:
    keychain = "environment:\n  keychain:\n    CODEX_AUTH: {service: codex, account: me}\n"
    plan = make_plan(agent="codex", config=keychain, environ={})
    assert secrets_of(plan) == {"CODEX_AUTH": ("keychain", "/home/agent/.codex/auth.json")}


def test_the_logins_hosts_are_allowed_only_when_the_login_is_given(make_plan) -> None:
    def hosts(environ: dict[str, str]) -> dict[str, tuple[str, ...]]:
        plan = make_plan(agent="codex", environ=environ)
        return {rule.pattern: rule.sources for rule in plan.network.policy.rules}

    logged_in = hosts({"CODEX_AUTH": '{"tokens": {}}'})
    assert logged_in["chatgpt.com"] == ("agent profile codex (its login)",)
    with_key = hosts({"OPENAI_API_KEY": "sk-x"})
    assert "chatgpt.com" not in with_key and "api.openai.com" in with_key
