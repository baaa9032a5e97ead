"""Every built-in agent CLI, end to end, set up with nothing but ``agent.endpoint`` and
``agent.model``: against the scripted model endpoint in the test internet (one for each vendor's
API, :mod:`.model_endpoint`), through the gateway's allowlist, in filtered mode.

The endpoint's name (``models.example.test``) is in no profile: the run reaches it only because
``agent.endpoint`` names it, and Kapsis allows it for that reason (``kapsis policy show`` says so).
The key comes from the host's environment under the name the profile asks for (Codex: the
user's ``OPENAI_API_KEY``, delivered as the ``CODEX_API_KEY`` its CLI reads).

For each agent:

* the model asks for ``/workspace/hello.txt``; the file is committed on the agent's branch, the
  endpoint saw the model named by ``agent.model`` and the key, and the audit trail holds what
  the agent did, as it reported it (Claude Code's and Gemini CLI's hooks, the shell commands
  Codex ran, Aider's edits);
* the negative control: the same run with the endpoint on a port where nothing listens (refused
  at once, as a model API behind a dead server is) ends ``failed`` with ``agent_error``, says
  why, and commits nothing, not even the CLI's own state files. Each CLI retries a refused
  connection (Claude Code about three minutes, Aider a minute); the control shortens that with
  the CLI's own retry setting, passed as the test's own config, so it runs in seconds.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kapsis.errors import ExitCode

from .internet import Internet
from .kapsis_runner import Kapsis
from .model_endpoint_fixture import CONTENT, ENDPOINT_HOST, REFUSED_PORT, ModelEndpoint
from .repos import git, one_commit_repository

pytestmark = pytest.mark.integration

API_KEY = "sk-kapsis-test-9f8e7d6c5b4a"
Trail = list[dict[str, Any]]


def used_tool(name: str) -> Callable[[Trail], bool]:
    """The agent reported a use of its tool ``name`` (hooks, or printed, as its profile says)."""

    def reported(trail: Trail) -> bool:
        return any(r["event_type"] == "tool_use" and r["detail"]["tool"] == name for r in trail)

    return reported


@dataclass(frozen=True)
class Cli:
    agent: str
    api: str  # the model_endpoint module that answers it
    path: str  # of the endpoint's base URL
    model: str
    model_seen: str  # as the request to the endpoint names it
    key_variable: str  # where the user keeps the key
    key_header: tuple[str, str]  # how it reaches the endpoint
    did_it: Callable[[Trail], bool]  # the audit trail shows what the agent did
    fail_fast: str = ""  # config lines that cut the CLI's retries short, for the control


def ran_printf_in_bash(trail: Trail) -> bool:
    """Codex's hooks reported its Bash tool, and its bash traced the command itself."""
    commands = [
        str(r["detail"].get("command")) for r in trail if r["event_type"] == "agent_command"
    ]
    return used_tool("Bash")(trail) and any(command.startswith("printf") for command in commands)


CLIS = {
    "claude": Cli(
        "claude", "anthropic", "", "claude-stub-1", "claude-stub-1", "ANTHROPIC_API_KEY",
        ("x-api-key", API_KEY), used_tool("Write"),
        fail_fast="environment:\n  set: {CLAUDE_CODE_MAX_RETRIES: '1'}\n",
    ),
    # Codex's key is the user's OPENAI_API_KEY, handed over as the CODEX_API_KEY it reads.
    "codex": Cli(
        "codex", "openai_responses", "/v1", "stub-model", "stub-model", "OPENAI_API_KEY",
        ("authorization", API_KEY), ran_printf_in_bash,
    ),
    # Gemini CLI's hooks come from the image's system settings; it retries a refused endpoint
    # (the gateway's 503) ten times, about four minutes: the control waits for it.
    "gemini": Cli(
        "gemini", "gemini", "", "gemini-stub", "gemini-stub", "GEMINI_API_KEY",
        ("x-goog-api-key", API_KEY), used_tool("write_file"),
    ),
    # Aider retries a refused endpoint for about 90 s whatever its options (a constant of its
    # own); the control waits for it.
    "aider": Cli(
        "aider", "openai_chat", "/v1", "openai/stub-model", "stub-model", "OPENAI_API_KEY",
        ("authorization", API_KEY), used_tool("Edit"),
    ),
}  # fmt: skip


# What a hostile project (or an agent, for the next run) writes to switch the CLIs' own hooks
# off: the image's root-owned settings stand above each of them.
HOOKS_OFF = {
    ".claude/settings.json": '{"disableAllHooks": true}\n',
    ".codex/config.toml": "[features]\nhooks = false\n",
    ".gemini/settings.json": json.dumps(
        {"hooksConfig": {"enabled": False, "disabled": ["kapsis-audit"]}, "hooks": {}}
    ),
}


def make_project(root: Path) -> Path:
    return one_commit_repository(root, HOOKS_OFF)


def run_agent(
    kapsis: Kapsis,
    cli: Cli,
    internet: Internet,
    tmp_path: Path,
    *,
    port: int | None = None,
    more_config: str = "",
) -> tuple[Path, dict[str, Any], subprocess.CompletedProcess[str]]:
    project = make_project(tmp_path / "project")
    endpoint = f"http://{ENDPOINT_HOST}{f':{port}' if port else ''}{cli.path}"
    config = tmp_path / "kapsis.yaml"
    config.write_text(
        "network:\n"
        f"  dns_servers: [{internet.dns_server}]\n"
        "  podman_network: podman\n"
        "agent:\n"
        f"  endpoint: {endpoint}\n"
        f"  model: {cli.model}\n" + (cli.fail_fast if port else "") + more_config
    )
    result = kapsis(
        "run", str(project), "--agent", cli.agent, "--agent-id", f"{cli.agent}-e2e",
        "--task", "Write hello.txt", "--config", str(config), "--json",
        env={cli.key_variable: API_KEY}, timeout=420,
    )  # fmt: skip
    return project, json.loads(result.stdout or "{}"), result


def audit(kapsis: Kapsis, agent_id: str) -> Trail:
    shown = kapsis("audit", "show", agent_id, "--json")
    assert shown.returncode == 0, shown.stderr
    return list(json.loads(shown.stdout))


@pytest.fixture(params=list(CLIS))
def cli(
    request: pytest.FixtureRequest,
    claude_image: str,
    agent_images: dict[str, str],
    model_endpoint: ModelEndpoint,
) -> Cli:
    """Each agent in turn, its image built and the endpoint up."""
    return CLIS[request.param]


def test_the_agent_writes_the_file_through_its_endpoint_and_the_audit_shows_it(
    kapsis: Kapsis, cli: Cli, model_endpoint: ModelEndpoint, internet: Internet, tmp_path: Path
) -> None:
    name = cli.agent
    before = model_endpoint.mark()
    project, outcome, result = run_agent(kapsis, cli, internet, tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    seen = [r for r in model_endpoint.requests(before) if r.get("api")]

    # Its API, the model agent.model named, the key under the header its API uses.
    assert {r["api"] for r in seen} == {cli.api}, seen
    assert {r["logged"].get("model") for r in seen} >= {cli.model_seen}
    header, value = cli.key_header
    assert all(r["headers"].get(header, "").removeprefix("Bearer ") == value for r in seen)
    assert all(r["headers"].get("host") == ENDPOINT_HOST for r in seen)

    # The file the model asked for is the agent's work, committed on its branch.
    branch = outcome["branch"]
    assert outcome["commit_sha"] and git(project, "rev-parse", branch) == outcome["commit_sha"]
    assert git(project, "show", f"{branch}:hello.txt") + "\n" == CONTENT
    committed = git(project, "diff", "--name-only", f"main..{branch}").splitlines()
    assert committed == ["hello.txt"]  # not the CLI's own state files

    # What it did is in the audit trail, as the agent's own report.
    trail = audit(kapsis, f"{name}-e2e")
    assert cli.did_it([r for r in trail if r["source"] == "agent"]), trail
    assert API_KEY not in json.dumps(trail)

    # Allowed because agent.endpoint names it, and the policy says so.
    config = tmp_path / "kapsis.yaml"
    policy = kapsis("policy", "show", str(project), "--agent", name, "--config", str(config),
                    "--json", env={cli.key_variable: API_KEY})  # fmt: skip
    assert policy.returncode == 0, policy.stderr
    assert ENDPOINT_HOST in policy.stdout and "agent.endpoint" in policy.stdout


def test_control_with_its_endpoint_refused_the_run_fails_as_an_agent_error_and_commits_nothing(
    kapsis: Kapsis, cli: Cli, internet: Internet, tmp_path: Path
) -> None:
    name = cli.agent
    project, outcome, result = run_agent(kapsis, cli, internet, tmp_path, port=REFUSED_PORT)
    assert result.returncode == ExitCode.AGENT_FAILED, result.stderr + result.stdout
    status = kapsis.status(f"{name}-e2e")
    assert status["phase"] == "failed" and status["error_type"] == "agent_error", status
    assert status["message"].startswith(f"{name} could not "), status["message"]
    assert not outcome.get("commit_sha")
    branches = git(project, "branch", "--list", "--format=%(refname:short)").splitlines()
    for branch in branches:
        assert git(project, "rev-parse", branch) == git(project, "rev-parse", "main")


def test_control_a_trusted_gemini_workspace_may_switch_the_hooks_off(
    kapsis: Kapsis,
    agent_images: dict[str, str],
    model_endpoint: ModelEndpoint,
    internet: Internet,
    tmp_path: Path,
) -> None:
    """What keeps Gemini CLI's hooks on against the project's own settings is that Kapsis never
    marks the workspace trusted: a user who does lets the project's file switch them off."""
    trusted = "environment:\n  set: {GEMINI_CLI_TRUST_WORKSPACE: 'true'}\n"
    _, outcome, result = run_agent(kapsis, CLIS["gemini"], internet, tmp_path, more_config=trusted)
    assert result.returncode == 0, result.stderr + result.stdout
    assert outcome["commit_sha"]  # the run itself went as before
    reports = [r for r in audit(kapsis, "gemini-e2e") if r["source"] == "agent"]
    assert not [r for r in reports if r["event_type"] == "tool_use"]


@pytest.mark.parametrize(
    ("agent", "settings"),
    [("codex", "/etc/codex/managed_config.toml"), ("gemini", "/etc/gemini-cli/settings.json")],
)
def test_the_agent_cannot_rewrite_its_clis_managed_settings_and_root_can(
    agent_images: dict[str, str], agent: str, settings: str
) -> None:
    attack = f"echo x > {settings}; echo write=$?; rm -f {settings}; echo rm=$?; " + (
        f"mv {Path(settings).parent} /tmp/moved; echo mv=$?"
    )

    def attempt(user: str) -> list[str]:
        result = subprocess.run(
            ["podman", "run", "--rm", "--network=none", f"--user={user}", agent_images[agent],
             "sh", "-c", attack],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return result.stdout.split()

    assert attempt("1000:1000") == ["write=2", "rm=1", "mv=1"]
    assert attempt("0:0") == ["write=0", "rm=0", "mv=0"]  # control: root can


def test_while_the_agent_retries_a_name_that_does_not_resolve_its_status_says_so(
    kapsis: Kapsis,
    claude_image: str,
    model_endpoint: ModelEndpoint,
    internet: Internet,
    tmp_path: Path,
) -> None:
    """Claude Code retries for minutes; the status says why within seconds, while it runs."""
    project = make_project(tmp_path / "project")
    config = tmp_path / "kapsis.yaml"
    config.write_text(
        f"network:\n  dns_servers: [{internet.dns_server}]\n  podman_network: podman\n"
        "agent:\n  endpoint: http://nowhere.example.test\n"
    )
    started = kapsis(
        "run", str(project), "--agent", "claude", "--agent-id", "retrying", "--detach",
        "--task", "Write hello.txt", "--config", str(config),
        env={"ANTHROPIC_API_KEY": API_KEY},
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    note = "no answer from nowhere.example.test: it could not be resolved"
    deadline = time.monotonic() + 90
    status = kapsis.status("retrying")
    while time.monotonic() < deadline and note not in status["notes"]:
        time.sleep(1)
        status = kapsis.status("retrying")
    try:
        assert status["phase"] == "running" and note in status["notes"], status
        assert note in status["message"]
    finally:
        kapsis("stop", "retrying")
        kapsis.wait_finished("retrying", timeout=120)
    recorded = [r for r in audit(kapsis, "retrying") if r["event_type"] == "model_api_unreachable"]
    assert [r["detail"]["note"] for r in recorded] == [note]
