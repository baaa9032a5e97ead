"""Secrets from a real keychain and the host environment: in the agent, and nowhere else."""

from __future__ import annotations

import hashlib
import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from .kapsis_runner import Kapsis
from .secret_service import SecretService

pytestmark = pytest.mark.integration

API_KEY = "sk-kapsis-test-5f0c2a9e71d4b8"
FILE_TOKEN = "tok-kapsis-file-93be17c0aa42"
PLAIN = "plain-kapsis-value-40c6d1e2f3"


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    (root / "README.md").write_text("secrets\n")
    return root


def files_holding(value: str, *places: Path) -> list[str]:
    """Every regular file under ``places`` whose bytes contain ``value``."""
    existing = [str(p) for p in places if p.exists()]
    if not existing:
        return []
    found = subprocess.run(
        ["grep", "-r", "-l", "-F", "--devices=skip", value, *existing],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return found.stdout.split()


def container_dirs(name: str) -> list[Path]:
    """The agent container's config dir (podman's config.json) and its writable layer."""
    result = subprocess.run(
        ["podman", "inspect", "--format", "{{.StaticDir}}\n{{.GraphDriver.Data.UpperDir}}", name],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [Path(line) for line in result.stdout.split()]


def test_keychain_secrets_reach_the_agent_by_env_and_file_and_no_disk(
    kapsis: Kapsis, project: Path, secret_service: SecretService, tmp_path: Path
) -> None:
    secret_service.store_with_keyring("kapsis-test-api", "me", API_KEY)
    secret_service.store_with_secret_tool(FILE_TOKEN, service="kapsis-test-file", account="second")
    config = tmp_path / "secrets.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            environment:
              set:
                PLAIN_VALUE: {PLAIN}
              keychain:
                API_KEY: {{service: kapsis-test-api, account: me}}
                FILE_TOKEN:
                  service: kapsis-test-file
                  account: [first, second]
                  inject_to_file: /home/agent/.config/tool/token.json
                  template: '{{"token": "{{value}}"}}'
            """
        )
    )
    token_file = "/home/agent/.config/tool/token.json"
    task = (
        'printf %s "$API_KEY" | sha256sum; '
        f"sha256sum {token_file}; stat -c '%a %u' {token_file}; stat -f -c %T {token_file}; "
        'echo "file token in env: ${FILE_TOKEN:-no}"; '
        'echo "leaked: $API_KEY"; '
        "touch /workspace/.started; sleep 4"
    )
    started = kapsis.run(project, task, "--config", str(config), "--agent-id", "sec1",
                         "--network-mode", "none", "--detach", env=secret_service.env)  # fmt: skip
    assert started.returncode == 0, started.stderr
    places = [kapsis.home, tmp_path / "project", Path("/tmp/kapsis-run")]
    # While the agent runs: podman's config of the container and its writable layer.
    places += container_dirs("kapsis-sec1-agent")
    holding_api = files_holding(API_KEY, *places)
    holding_file = files_holding(FILE_TOKEN, *places)
    holding_plain = files_holding(PLAIN, *places)
    status = kapsis.wait_finished("sec1")
    assert status["phase"] == "complete", status

    # Control: a plain value given with environment.set IS in podman's config.json.
    assert any(path.endswith("config.json") for path in holding_plain), holding_plain
    assert holding_api == [] and holding_file == []
    lines = kapsis("logs", "sec1").stdout.splitlines()
    assert lines[0].split()[0] == sha(API_KEY)
    assert lines[1].split()[0] == sha(f'{{"token": "{FILE_TOKEN}"}}')
    assert lines[2:5] == ["600 1000", "tmpfs", "file token in env: no"]
    assert "leaked: [REDACTED]" in lines
    after = files_holding(API_KEY, kapsis.home, tmp_path) + files_holding(FILE_TOKEN, kapsis.home)
    assert after == []
    trail = [json.loads(line) for line in (kapsis.home / "audit" / "sec1.jsonl").open()]
    injected = {
        r["detail"]["name"]: r["detail"] for r in trail if r["event_type"] == "secret_injected"
    }
    assert injected["API_KEY"]["into"] == "environment"
    assert injected["FILE_TOKEN"]["into"] == token_file
    assert {d["secret_source"] for d in injected.values()} == {"keychain"}


def test_a_missing_keychain_secret_is_one_line_naming_where_it_was_looked_for(
    kapsis: Kapsis, project: Path, secret_service: SecretService, tmp_path: Path
) -> None:
    config = tmp_path / "missing.yaml"
    config.write_text(
        "environment:\n  keychain:\n    DEPLOY_KEY:\n      service: kapsis-none\n"
        "      account: [alice, bob]\n"
    )
    result = kapsis.run(project, "true", "--config", str(config), "--agent-id", "sec2",
                        "--network-mode", "none", env=secret_service.env)  # fmt: skip
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if "DEPLOY_KEY" in line]
    assert len(error) == 1
    assert f"{config}:3: environment.keychain.DEPLOY_KEY: no secret" in error[0]
    assert "'kapsis-none'" in error[0] and "'alice' or 'bob'" in error[0]
    assert "secret-tool" in error[0]
    pods = subprocess.run(["podman", "pod", "exists", "kapsis-sec2"], check=False)
    assert pods.returncode != 0  # nothing was started


def test_a_profile_secret_comes_from_the_host_environment_and_is_redacted(
    kapsis: Kapsis, project: Path
) -> None:
    agents = kapsis.config_dir / "agents"
    agents.mkdir(parents=True)
    (agents / "needy.yaml").write_text(
        'command: \'printf %s "$NEEDY_KEY" | sha256sum; echo "key=$NEEDY_KEY"\'\n'
        "secrets: [NEEDY_KEY]\n"
    )
    missing = kapsis.run(project, "x", "--agent", "needy", "--network-mode", "none")
    assert missing.returncode == 2
    assert "agent 'needy' needs the secret NEEDY_KEY" in missing.stderr
    assert "export NEEDY_KEY" in missing.stderr

    given = kapsis.run(project, "x", "--agent", "needy", "--agent-id", "sec3",
                       "--network-mode", "none", env={"NEEDY_KEY": API_KEY})  # fmt: skip
    assert given.returncode == 0, given.stderr
    # The terminal, the transcript and the status show the agent's output, redacted.
    assert sha(API_KEY) in given.stdout
    assert "key=[REDACTED]" in given.stdout and API_KEY not in given.stdout + given.stderr
    assert "key=[REDACTED]" in kapsis("logs", "sec3").stdout
    assert files_holding(API_KEY, kapsis.home) == []
