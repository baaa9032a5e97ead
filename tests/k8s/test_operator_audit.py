"""The operator's audit log of a request: complete, sealed, verifiable by `kapsis audit verify`,
and tampering is caught."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from kapsis.cli.app import app
from kapsis.errors import ExitCode
from kapsis.operator.audit import PUBLIC_KEY_FILE
from tests.k8s import kubelet as k
from tests.k8s.cluster import wait_for
from tests.k8s.conftest import OperatorUnderTest
from tests.k8s.requests import Requests


def _audit_file(operator: OperatorUnderTest, requests: Requests, name: str) -> Path:
    uid = (requests.get(name) or {})["metadata"]["uid"]
    return operator.built.audit.path(requests.namespace, name, uid)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _sealed_records(path: Path) -> list[dict[str, Any]]:
    """The records once the session ended and was sealed (the operator writes session_end
    right after the final status, so a test can see the status first)."""

    def ended() -> list[dict[str, Any]] | None:
        records = _records(path) if path.exists() else []
        kinds = [r["event_type"] for r in records]
        return records if kinds[-2:] == ["session_end", "seal"] else None

    result: list[dict[str, Any]] = wait_for(f"{path.name} to be sealed", ended)
    return result


def _verify(path: Path, key: Path) -> Any:
    return CliRunner().invoke(app, ["audit", "verify", str(path), "--key", str(key)])


def test_a_finished_requests_audit_log_verifies_and_tampering_is_caught(
    operator: OperatorUnderTest, emulator_only: None
):
    requests = operator.requests
    requests.create("audited")
    requests.wait_pod("audited")
    for state in (k.cloning(), k.agent_running(), k.agent_done(0)):
        requests.kubelet("audited", state)
    requests.wait_phase("audited", "Finishing")
    requests.kubelet("audited", k.finished())
    requests.wait_phase("audited", "Complete")

    path = _audit_file(operator, requests, "audited")
    key = operator.settings.data_dir / "keys" / PUBLIC_KEY_FILE
    # The log sits with the operator (its data_dir), not in anything the Pod mounts.
    assert path.is_relative_to(operator.settings.data_dir)
    records = _sealed_records(path)
    kinds = [r["event_type"] for r in records]
    for expected in (
        "session_start",
        "request_accepted",
        "pod_created",
        "phase_changed",
        "agent_exited",
        "finisher_result",
        "session_end",
        "seal",
    ):
        assert expected in kinds, f"no {expected} record: {kinds}"
    assert {r["source"] for r in records if r["event_type"] != "seal"} == {"operator"}
    exited = next(r for r in records if r["event_type"] == "agent_exited")
    assert exited["detail"] == {"exit_code": 0, "oom_killed": False, "reported_by": "kubelet"}
    result = next(r for r in records if r["event_type"] == "finisher_result")
    assert result["detail"]["commitSha"] == "0123456789abcdef0123456789abcdef01234567"
    phases = [r["detail"]["phase"] for r in records if r["event_type"] == "phase_changed"]
    assert phases[-1] == "Complete"
    end = next(r for r in records if r["event_type"] == "session_end")
    assert end["detail"]["phase"] == "Complete" and end["detail"]["exitCode"] == 0

    verified = _verify(path, key)
    assert verified.exit_code == 0, verified.output

    # Tampering: rewrite the agent's exit code in its record.
    lines = path.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if '"agent_exited"' in line)
    lines[index] = lines[index].replace('"exit_code":0', '"exit_code":1')
    assert '"exit_code":1' in lines[index]
    path.write_text("".join(lines))
    tampered = _verify(path, key)
    assert tampered.exit_code == ExitCode.AUDIT_DAMAGED, tampered.output
    assert "modified" in tampered.output


def test_a_rejected_request_is_audited_with_its_reason(operator: OperatorUnderTest):
    requests = operator.requests
    requests.create("refused", agent={"image": "docker.io/evil:1"})
    requests.wait_phase("refused", "Failed")
    path = _audit_file(operator, requests, "refused")
    records = _sealed_records(path)
    rejected = next(r for r in records if r["event_type"] == "request_rejected")
    assert "docker.io/evil:1" in rejected["detail"]["reason"]
    assert records[-1]["event_type"] == "seal"
    key = operator.settings.data_dir / "keys" / PUBLIC_KEY_FILE
    assert _verify(path, key).exit_code == 0


def test_another_key_does_not_verify_the_operators_log(operator: OperatorUnderTest, tmp_path: Path):
    from kapsis.audit.keys import public_pem, signing_key

    requests = operator.requests
    requests.create("other-key", agent={"image": "docker.io/evil:1"})
    requests.wait_phase("other-key", "Failed")
    stranger = tmp_path / "stranger.pem"
    stranger.write_text(public_pem(signing_key(tmp_path / "stranger-keys").public_key()))
    path = _audit_file(operator, requests, "other-key")
    _sealed_records(path)
    assert _verify(path, operator.settings.data_dir / "keys" / PUBLIC_KEY_FILE).exit_code == 0
    result = _verify(path, stranger)
    assert result.exit_code == ExitCode.AUDIT_DAMAGED
