"""The real Claude Code CLI in a filtered sandbox, against a scripted Anthropic API endpoint.

The session builds the claude agent image first (the ``claude_image`` fixture in conftest.py, the
same code as ``kapsis setup --build --agents claude``; its build time is printed). The endpoint
(:mod:`.model_endpoint_fixture`) runs in the test internet's network namespace on an address of
its own, and the test DNS answers ``api.anthropic.com`` with it, so the agent reaches it by that
name, through the gateway's allowlist (the claude profile's API host), on port 80. The model's
script: write ``/workspace/hello.txt`` with the Write tool, then say it is done.

Checked: the endpoint got the API key passed by name; the file became a commit on the agent's
branch; the agent's tool use reached the audit trail through the image's managed hooks (which
the project's own settings cannot switch off, while they do switch off the project's own hook)
and the status's agent-reported activity.

A run takes about 20 s, most of it Claude Code retrying its first-party fetches of
``https://api.anthropic.com/api/claude_code/settings`` and ``.../policy_limits`` (nothing
listens on 443 here; a 404 would end them at once) before it starts the session.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kapsis.host.agent_images import LABEL_VERSION

from .internet import Internet
from .kapsis_runner import Kapsis
from .model_endpoint_fixture import CONTENT, FILE_PATH, ModelEndpoint
from .repos import git, one_commit_repository
from .secret_service import SecretService
from .test_secrets import files_holding

pytestmark = pytest.mark.integration

API_HOST = "api.anthropic.com"
API_KEY = "sk-ant-kapsis-test-0123456789"
MARKER_HOOK = '{"hook_event_name": "ProjectHook", "tool_name": "marker"}'


def make_project(root: Path, *, disable_hooks: bool) -> Path:
    """A repository whose own Claude settings add a hook and may try to turn all hooks off."""
    hook = f"echo '{MARKER_HOOK}' | python3 /usr/local/lib/kapsis/report-hook.py"
    settings: dict[str, Any] = {
        "hooks": {"PreToolUse": [{"matcher": "*", "hooks": [{"type": "command", "command": hook}]}]}
    }
    if disable_hooks:
        settings["disableAllHooks"] = True
    return one_commit_repository(root, {".claude/settings.json": json.dumps(settings, indent=2)})


def run_claude(
    kapsis: Kapsis,
    project: Path,
    internet: Internet,
    tmp_path: Path,
    agent_id: str,
    keychain: SecretService | None = None,
) -> dict[str, Any]:
    """Run the claude profile; its API key from the keychain if given, else the environment."""
    config = tmp_path / "claude.yaml"
    key_source = "  passthrough: [ANTHROPIC_API_KEY]\n"
    env = {"ANTHROPIC_API_KEY": API_KEY}
    if keychain is not None:
        keychain.store_with_secret_tool(API_KEY, service="anthropic", account="kapsis-test")
        key_source = (
            "  keychain:\n"
            "    ANTHROPIC_API_KEY: {service: anthropic, account: [nobody, kapsis-test]}\n"
        )
        env = keychain.env
    config.write_text(
        "network:\n"
        f"  dns_servers: [{internet.dns_server}]\n"
        "  podman_network: podman\n"
        "environment:\n"
        f"  set: {{ANTHROPIC_BASE_URL: 'http://{API_HOST}'}}\n" + key_source
    )
    result = kapsis(
        "run", str(project), "--agent", "claude", "--agent-id", agent_id,
        "--task", "Write hello.txt", "--config", str(config), "--json",
        env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def audit(kapsis: Kapsis, agent_id: str) -> list[dict[str, Any]]:
    shown = kapsis("audit", "show", agent_id, "--json")
    assert shown.returncode == 0, shown.stderr
    return list(json.loads(shown.stdout))


def test_claude_code_edits_through_the_allowlist_and_reports_its_tool_use(
    kapsis: Kapsis,
    claude_image: str,
    model_endpoint: ModelEndpoint,
    internet: Internet,
    tmp_path: Path,
    secret_service: SecretService,
) -> None:
    project = make_project(tmp_path / "project", disable_hooks=True)
    before = model_endpoint.mark()
    outcome = run_claude(kapsis, project, internet, tmp_path, "claude1", secret_service)

    # The model's turns went to the endpoint, by name, with the key from the keychain.
    seen = model_endpoint.requests(before)
    answered = [r["answer"] for r in seen if r["method"] == "POST" and "answer" in r]
    assert "tool_use" in answered and "final" in answered, seen
    assert {r["headers"].get("x-api-key") for r in seen if r["method"] == "POST"} == {API_KEY}
    assert all(r["headers"].get("host") == API_HOST for r in seen)

    # The Write became a commit on the agent's branch, made by the host.
    assert outcome["branch"] and outcome["commit_sha"]
    assert git(project, "show", f"{outcome['branch']}:hello.txt") + "\n" == CONTENT
    assert git(project, "rev-parse", outcome["branch"]) == outcome["commit_sha"]
    assert not (project / "hello.txt").exists()  # the user's checkout is untouched

    # The managed hooks reported the tool use; the project's disableAllHooks did not stop them.
    trail = audit(kapsis, "claude1")
    tool_uses = [r for r in trail if r["event_type"] == "tool_use"]
    assert [(r["detail"]["hook"], r["detail"]["tool"]) for r in tool_uses] == [
        ("PreToolUse", "Write"),
        ("PostToolUse", "Write"),
    ]
    assert all(r["source"] == "agent" for r in tool_uses)
    reported = tool_uses[0]["detail"]["reported"]
    assert reported["tool_input"] == {"file_path": FILE_PATH, "content": CONTENT}
    events = [
        r["detail"]["reported"].get("hook_event_name") for r in trail if r["source"] == "agent"
    ]
    assert {"SessionStart", "UserPromptSubmit", "Stop", "SessionEnd"} <= set(events)
    assert "ProjectHook" not in events  # disableAllHooks silenced the project's own hook
    assert API_KEY not in json.dumps(trail)
    # The key is on no disk file: not in Kapsis's state, the project, or podman's containers.
    storage = Path("/var/lib/containers/storage/overlay-containers")
    assert files_holding(API_KEY, kapsis.home, tmp_path / "project", storage) == []
    injected = [r["detail"] for r in trail if r["event_type"] == "secret_injected"]
    assert injected == [
        {"name": "ANTHROPIC_API_KEY", "secret_source": "keychain", "into": "environment"}
    ]

    # The status: host-written, with what the agent reported about itself.
    status = kapsis.status("claude1")
    assert status["phase"] == "complete" and status["progress"] == 100
    assert status["agent_reported"]["last_tool"] == "Write"
    assert status["agent_reported"]["tool_uses"] == 1
    assert status["agent_reported"]["state"] == "ended"

    # The image says which CLI it holds.
    listing = json.loads(kapsis("agents", "list", "--json").stdout)
    claude = next(p for p in listing if p["name"] == "claude")
    assert claude["image_present"] and claude["cli_version"]
    labels = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{json .Config.Labels}}", claude_image],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(labels.stdout)[LABEL_VERSION] == claude["cli_version"]


def test_control_the_projects_own_hook_runs_when_hooks_are_not_disabled(
    kapsis: Kapsis,
    claude_image: str,
    model_endpoint: ModelEndpoint,
    internet: Internet,
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path / "project", disable_hooks=False)
    run_claude(kapsis, project, internet, tmp_path, "claude2")
    events = [
        r["detail"]["reported"].get("hook_event_name")
        for r in audit(kapsis, "claude2")
        if r["source"] == "agent"
    ]
    assert "ProjectHook" in events and "PreToolUse" in events


def test_without_the_audit_socket_the_hook_neither_blocks_nor_fails(claude_image: str) -> None:
    """The same image run by hand, with no socket: Claude Code's hook must exit 0 at once."""
    started = time.monotonic()
    result = subprocess.run(
        ["podman", "run", "--rm", "-i", "--network=none", "--user=1000:1000", claude_image,
         "python3", "/usr/local/lib/kapsis/report-hook.py"],
        input='{"hook_event_name": "PreToolUse", "tool_name": "Write"}',
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout) == (0, "")
    assert time.monotonic() - started < 10


def test_the_agent_cannot_rewrite_the_managed_settings_and_root_can(claude_image: str) -> None:
    """What keeps the hooks on: the settings file belongs to root, the agent runs as uid 1000."""
    attack = (
        "echo '{}' > /etc/claude-code/managed-settings.json; echo write=$?; "
        "rm -f /etc/claude-code/managed-settings.json; echo rm=$?; "
        "mv /etc/claude-code /tmp/cc; echo mv=$?; "
        "python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))[\"hooks\"]))' "
        "/etc/claude-code/managed-settings.json"
    )

    def attempt(user: str) -> list[str]:
        result = subprocess.run(
            ["podman", "run", "--rm", "--network=none", f"--user={user}", claude_image,
             "sh", "-c", attack],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return result.stdout.split()

    agent = attempt("1000:1000")
    assert agent[:3] == ["write=2", "rm=1", "mv=1"] and int(agent[3]) >= 5
    root = attempt("0:0")  # control: the same steps as root succeed
    assert root[:3] == ["write=0", "rm=0", "mv=0"]
