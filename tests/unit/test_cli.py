"""The typer CLI, driven in-process; nothing here may start podman."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kapsis.cli.app import app

SECTIONS = ["agent", "resources", "security", "network", "filesystem", "git", "environment"]
SECTIONS += ["image", "audit", "ssh", "build_tools", "kubernetes"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True)
def no_real_runs(monkeypatch):
    """Fail loudly instead of launching anything if a test reaches the real run path."""

    def refuse(*args, **kwargs):
        raise AssertionError("a unit test reached kapsis.api.run")

    monkeypatch.setattr("kapsis.api.run", refuse)
    monkeypatch.setattr("kapsis.sandbox.launcher.launch", refuse)


def _one_error_line(result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kapsis: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------------------
# config


def test_config_schema_is_json_schema_with_every_section(runner):
    result = runner.invoke(app, ["config", "schema"])

    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert sorted(schema["properties"]) == sorted(SECTIONS)
    assert schema["additionalProperties"] is False


def test_config_schema_describes_fields(runner):
    schema = json.loads(runner.invoke(app, ["config", "schema"]).stdout)

    network = schema["$defs"]["NetworkSection"]["properties"]["mode"]
    assert network["enum"] == ["none", "open", "filtered"]
    assert network["description"]


def test_config_show_json_gives_file_line_and_default_origins(runner, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("# my settings\nresources:\n  memory: 2g\n")

    result = runner.invoke(app, ["config", "show", "--config", str(config), "--json"])

    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["config"]["resources"]["memory"] == "2g"
    assert shown["origins"]["resources.memory"] == f"{config}:3"
    assert shown["origins"]["network.mode"] == "default"
    assert shown["origins"]["git.branch"] == "default"
    assert shown["files"] == [str(config)]


def test_config_show_default_next_to_a_file_value_says_default(runner, tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("resources:\n  memory: 2g\n")

    result = runner.invoke(app, ["config", "show", "--config", str(config), "--json"])

    assert json.loads(result.stdout)["origins"]["resources.cpus"] == "default"


def test_config_show_picks_up_project_file(runner, project):
    (project / "agent-sandbox.yaml").write_text("network:\n  mode: open\n")

    result = runner.invoke(app, ["config", "show", str(project), "--json"])

    shown = json.loads(result.stdout)
    assert shown["config"]["network"]["mode"] == "open"
    assert shown["origins"]["network.mode"] == f"{project / 'agent-sandbox.yaml'}:2"


def test_config_show_with_bad_file_is_a_one_line_error(runner, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("network:\n  mdoe: open\n")

    result = runner.invoke(app, ["config", "show", "--config", str(config)])

    assert result.exit_code == 2
    assert _one_error_line(result).startswith(f"kapsis: error: {config}:2: network.mdoe: ")


# ---------------------------------------------------------------------------------------------
# run


def test_run_with_bad_config_exits_2_with_one_line(runner, project, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("resources:\n  memory: 2g\n  cpu: 4\n")

    result = runner.invoke(app, ["run", str(project), "--task", "x", "--config", str(config)])

    assert result.exit_code == 2
    line = _one_error_line(result)
    assert line.startswith(f"kapsis: error: {config}:3: resources.cpu: unknown key 'cpu'")
    assert result.stdout == ""


def test_run_with_missing_config_file_exits_2(runner, project, tmp_path):
    missing = tmp_path / "missing.yaml"

    result = runner.invoke(app, ["run", str(project), "-t", "x", "--config", str(missing)])

    assert result.exit_code == 2
    assert str(missing) in _one_error_line(result)


def test_run_without_task_or_spec_exits_2(runner, project):
    result = runner.invoke(app, ["run", str(project), "--dry-run"])

    assert result.exit_code == 2
    assert "--task" in _one_error_line(result)


def test_run_with_a_bad_network_mode_exits_2(runner, project):
    result = runner.invoke(
        app, ["run", str(project), "-t", "x", "--network-mode", "closed", "--dry-run"]
    )

    assert result.exit_code == 2
    assert "network.mode" in _one_error_line(result)


def test_run_with_unknown_agent_exits_2(runner, project):
    result = runner.invoke(app, ["run", str(project), "-t", "x", "--agent", "nope", "--dry-run"])

    assert result.exit_code == 2
    assert "known: " in _one_error_line(result)


def test_run_with_bad_agent_id_exits_2(runner, project):
    result = runner.invoke(app, ["run", str(project), "-t", "x", "--agent-id", "BAD", "--dry-run"])

    assert result.exit_code == 2
    assert "--agent-id" in _one_error_line(result)


def test_run_dry_run_prints_plan_and_commands(runner, project):
    result = runner.invoke(
        app,
        ["run", str(project), "--task", "make test", "--agent-id", "dry1", "--dry-run",
         "--memory", "1g", "--security-profile", "strict"],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    plan = payload["plan"]
    assert plan["agent_id"] == "dry1"
    assert plan["project"] == str(project.resolve())
    assert plan["security"]["profile"] == "strict"
    assert plan["resources"]["memory_bytes"] == 1024**3
    assert plan["env"]["KAPSIS_TASK"] == "make test"
    pod, gateway, run = payload["commands"]  # filtered (the default) adds the gateway
    assert pod[:3] == ["podman", "pod", "create"]
    assert gateway[:2] == ["podman", "run"] and "NET_ADMIN" in gateway
    assert run[:2] == ["podman", "run"]
    # The shell agent: its launcher snippet, then the task as the snippet's $0.
    assert run[-5:-2] == ["localhost/kapsis-base:latest", "sh", "-c"]
    assert run[-1] == "make test"


def test_run_dry_run_creates_no_state(runner, project, kapsis_home):
    result = runner.invoke(app, ["run", str(project), "-t", "x", "--agent-id", "dry2", "--dry-run"])

    assert result.exit_code == 0, result.output
    assert not (kapsis_home / "status" / "dry2.json").exists()
    assert list(kapsis_home.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# agents, status


def test_agents_list_json_includes_the_builtins(runner):
    result = runner.invoke(app, ["agents", "list", "--json"])

    assert result.exit_code == 0, result.output
    profiles = {p["name"]: p for p in json.loads(result.stdout)}
    assert {"shell", "claude", "codex", "aider", "gemini"} <= set(profiles)
    assert profiles["claude"]["source"] == "builtin"
    assert profiles["claude"]["requires"] == ["claude"]


def test_agents_list_shows_user_profiles(runner, config_dir):
    (config_dir / "agents").mkdir()
    (config_dir / "agents" / "mine.yaml").write_text("description: my agent\ncommand: go\n")

    profiles = {
        p["name"]: p for p in json.loads(runner.invoke(app, ["agents", "list", "--json"]).stdout)
    }

    assert profiles["mine"]["source"] == str(config_dir / "agents" / "mine.yaml")


def test_status_of_unknown_agent_exits_2(runner):
    result = runner.invoke(app, ["status", "nosuchagent"])

    assert result.exit_code == 2
    assert "nosuchagent" in _one_error_line(result)


def test_status_json_of_a_known_agent(runner, kapsis_home):
    from kapsis.status import AgentStatus, StatusStore

    StatusStore().write(
        AgentStatus(
            agent_id="known1",
            project="/p",
            backend="podman",
            agent="shell",
            phase="running",
            started_at="2024-01-01T00:00:00.000000Z",
            updated_at="2024-01-01T00:00:00.000000Z",
            limits_enforced=True,
            network_mode="none",
            security_profile="standard",
        )
    )

    result = runner.invoke(app, ["status", "known1", "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["phase"] == "running"


def test_status_json_with_no_agents_is_an_empty_list(runner):
    result = runner.invoke(app, ["status", "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
