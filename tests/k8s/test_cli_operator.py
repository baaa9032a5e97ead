"""End to end on the emulator: `kapsis run --backend k8s` with the real operator running.

The CLI creates the request, the operator (``kapsis.operator``, in-process) renders the Pod and
bridges its status, and the test plays only the kubelet (Pod container states). The exit code
`kapsis run` returns is the one the operator derived from the kubelet's report.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kapsis.k8s.settings import OperatorSettings
from kapsis.operator.connect import client_configuration
from kapsis.operator.runner import build_operator
from kapsis.status import StatusStore
from tests.k8s import kubelet
from tests.k8s.cluster import wait_for
from tests.k8s.test_cli import get_request, kapsis, project  # noqa: F401  (fixture)


def set_pod_status(api_client: Any, namespace: str, pod: str, status: dict[str, Any]) -> None:
    # Raw: the client's models insist on fields (image, imageID) the tests' kubelet leaves out.
    client.CoreV1Api(api_client).patch_namespaced_pod_status(
        pod, namespace, {"status": status}, _preload_content=False
    )


def pods(api_client: Any, namespace: str) -> list[dict[str, Any]]:
    response = client.CoreV1Api(api_client).list_namespaced_pod(namespace, _preload_content=False)
    return list(json.loads(response.data)["items"])


def _phase(api_client: Any, namespace: str, name: str) -> str | None:
    obj = get_request(api_client, namespace, name) or {}
    return (obj.get("status") or {}).get("phase")


def play_kubelet(
    api_client: Any, namespace: str, name: str, steps: list[tuple[dict[str, Any], str]]
) -> Callable[[], None]:
    """Set each Pod status once the operator showed the previous one; returns a join."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pod = wait_for(
                "the operator's Pod",
                lambda: ((get_request(api_client, namespace, name) or {}).get("status") or {}).get(
                    "podName"
                ),
            )
            wait_for("the Pod", lambda: pods(api_client, namespace))
            for status, phase in steps:
                set_pod_status(api_client, namespace, pod, status)
                wait_for(f"phase {phase}", lambda p=phase: _phase(api_client, namespace, name) == p)
        except BaseException as error:  # reported by join()
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(20)
        assert not errors, errors

    return join


@pytest.fixture
def operator(
    kubeconfig: Path, namespace: str, run_operator: Any, tmp_path: Path, emulator_only: None
) -> None:
    settings = OperatorSettings(data_dir=tmp_path / "operator", dns_servers=("10.96.0.10",))
    built = build_operator(settings, client_configuration(kubeconfig))
    run_operator(built.registry, namespaces=(namespace,), settings=built.kopf_settings)


@pytest.mark.parametrize(
    ("final", "code", "error_type"),
    [
        (kubelet.finished(), 0, None),
        (kubelet.finished(agent_code=3), 1, "agent_failed"),
        (kubelet.finished(agent_code=124), 6, "timeout"),
        (
            kubelet.finished(
                finisher_code=7, finisher_message=kubelet.result_message(push="failed")
            ),
            7,
            "push_failed",
        ),
    ],
)
def test_run_exits_with_the_code_the_operator_bridged(
    project: Path,  # noqa: F811
    api_client: Any,
    namespace: str,
    operator: None,
    final: dict[str, Any],
    code: int,
    error_type: str | None,
) -> None:
    agent_code = final["containerStatuses"][0]["state"]["terminated"]["exitCode"]
    join = play_kubelet(
        api_client,
        namespace,
        "e2e1",
        [
            (kubelet.cloning(), "Preparing"),
            (kubelet.agent_running(), "Running"),
            (kubelet.agent_done(agent_code), "Finishing"),
            (final, "Complete" if code == 0 else "Failed"),
        ],
    )
    result = kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "e2e1",
        "-t", "make test", "--push",
    )  # fmt: skip
    join()
    assert result.exit_code == code, result.output
    assert "e2e1: Running" in result.stderr
    record = StatusStore().read("e2e1")
    assert record is not None
    assert (record.exit_code, record.error_type) == (code, error_type)
    if code == 0:
        assert record.commit_sha == "0123456789abcdef0123456789abcdef01234567"
        assert record.push_status == "pushed"
    # What the operator made from the CLI's request: its Pod, owned by the request.
    (pod,) = pods(api_client, namespace)
    owner = get_request(api_client, namespace, "e2e1")
    assert owner is not None
    assert [r["uid"] for r in pod["metadata"]["ownerReferences"]] == [owner["metadata"]["uid"]]


def test_stop_deletes_the_pod_and_the_operator_fails_the_request(
    project: Path,  # noqa: F811
    api_client: Any,
    namespace: str,
    operator: None,
) -> None:
    result = kapsis(
        "run", str(project), "--backend", "k8s", "-n", namespace, "--agent-id", "e2e2",
        "-t", "sleep 1000", "--detach",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    pod = wait_for(
        "the Pod",
        lambda: ((get_request(api_client, namespace, "e2e2") or {}).get("status") or {}).get(
            "podName"
        ),
    )
    wait_for("the Pod object", lambda: pods(api_client, namespace))
    set_pod_status(api_client, namespace, pod, kubelet.agent_running())
    wait_for("Running", lambda: _phase(api_client, namespace, "e2e2") == "Running")
    result = kapsis("stop", "e2e2")
    assert result.exit_code == 0, result.output
    record = StatusStore().read("e2e2")
    assert record is not None and record.phase == "failed" and record.exit_code == 5
    assert record.error_type == "stopped"  # as a local `kapsis stop`
    assert pods(api_client, namespace) == []
