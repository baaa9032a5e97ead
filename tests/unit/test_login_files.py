"""A subscription login instead of an API key: the profile's ``login:`` secret, from any
source, goes to the file its CLI reads (on the sandbox's tmpfs), stands in for the API key, and
allows the hosts the CLI then talks to; without it, the key is still required."""

from __future__ import annotations

import pytest

from kapsis.agents import find_profile
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


def test_on_a_cluster_the_login_is_a_secret_copied_where_the_cli_reads_it(
    project, tmp_path
) -> None:
    """The Secret is mounted read-only and copied, before the CLI starts, into the agent's
    memory-backed home; never a variable. The copy step is the Pod's own, run here for real."""
    import subprocess

    from kapsis.k8s.render import render_request
    from kapsis.k8s.render_network import network_policy_of
    from kapsis.k8s.render_pod import LOGIN_DIR
    from kapsis.k8s.settings import OperatorSettings
    from tests.unit.test_k8s_submission import submit

    config = "kubernetes:\n  secrets:\n    CODEX_AUTH: {name: codex-login, key: auth.json}\n"
    spec = submit(project, tmp_path, config, agent="codex").spec
    settings = OperatorSettings(dns_servers=("10.96.0.10",))
    rendered = render_request("r", "team", "0000-1111", spec, settings)
    agent = next(c for c in rendered.pod["spec"]["containers"] if c["name"] == "agent")
    assert "CODEX_AUTH" not in {e["name"] for e in agent["env"]}
    (mount,) = [m for m in agent["volumeMounts"] if m["mountPath"] == LOGIN_DIR]
    assert mount["readOnly"] is True
    (volume,) = [v for v in rendered.pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "codex-login"
    assert volume["secret"]["items"] == [{"key": "auth.json", "path": "login"}]
    hosts = {
        rule.pattern for rule in network_policy_of(spec, find_profile("codex"), settings).rules
    }
    assert "chatgpt.com" in hosts

    # The copy step, as the command runs it, with the Secret's directory moved under tmp_path.
    command = agent["command"]
    assert command[:2] == ["timeout", "--kill-after=30s"]
    shell = command[command.index("sh") :]
    assert shell[3:6] == ["kapsis-login", "/home/agent/.codex/auth.json", "codex"]
    secret_dir, home = tmp_path / "secret", tmp_path / "home"
    secret_dir.mkdir()
    (secret_dir / "login").write_text('{"tokens": {}}')
    script = shell[2].replace(LOGIN_DIR, str(secret_dir))
    target = str(home / ".codex" / "auth.json")
    ran = subprocess.run(["sh", "-c", script, "kapsis-login", target, "cat", target],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert (ran.returncode, ran.stdout) == (0, '{"tokens": {}}')
    assert (home / ".codex" / "auth.json").stat().st_mode & 0o777 == 0o600


def test_control_on_a_cluster_without_the_login_the_key_is_required(project, tmp_path) -> None:
    from tests.unit.test_k8s_submission import submit

    with pytest.raises(ConfigError, match=r"CODEX_API_KEY.*CODEX_AUTH"):
        submit(project, tmp_path, None, agent="codex")


def test_a_token_of_a_login_file_printed_alone_is_redacted_too() -> None:
    from kapsis.secrets.redact import REDACTED, Redactor

    credentials = (
        '{"claudeAiOauth": {"accessToken": "sk-ant-oat01-access", '
        '"refreshToken": "sk-ant-ort01-refresh", "expiresAt": 1, "scopes": ["user:inference"]}}'
    )
    redactor = Redactor([credentials, "plain-api-key"])
    said = redactor.text("token=sk-ant-ort01-refresh and sk-ant-oat01-access, key plain-api-key")
    assert said == f"token={REDACTED} and {REDACTED}, key {REDACTED}"
    assert redactor.text("scopes: user:inference") == f"scopes: {REDACTED}"
    # Control: a secret that is not JSON is redacted whole only.
    assert Redactor(["{not json but long}"]).text("not json but long") == "not json but long"
