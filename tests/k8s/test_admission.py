"""Invalid requests are rejected by the running operator: Failed, exit code 2, an event, no Pod.

Each rejection has its control: the same request made valid (or put in a namespace that
allows it) gets its Pod.
"""

from __future__ import annotations

from typing import Any

import pytest

from kapsis.k8s.render import pod_name
from tests.k8s.cluster import wait_for
from tests.k8s.conftest import OperatorUnderTest
from tests.k8s.requests import Requests

INVALID = {
    "open-network": ({"network": {"mode": "open"}}, "open"),
    "reserved-env": ({"environment": {"set": {"HOME": "/root"}}}, "HOME"),
    "bad-image": ({"agent": {"image": "docker.io/library/python:3"}}, "docker.io/library/python:3"),
    "bad-secret-ref": (
        {"environment": {"secrets": {"TOKEN": {"name": "Not_A_Name", "key": "k"}}}},
        "Not_A_Name",
    ),
}


def _assert_rejected(
    requests: Requests, name: str, words: str, had_pod: bool = False
) -> dict[str, Any]:
    status = requests.wait_phase(name, "Failed")
    assert (status["exitCode"], status["errorType"]) == (2, "config")
    assert words in status["message"]
    event = requests.wait_event(name, "Rejected")
    assert event.type == "Warning" and event.message == status["message"]
    if not had_pod:  # (a real cluster deletes a running Pod gracefully, not at once)
        assert requests.pod(name) is None
        assert requests.children(name) == []
    return status


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_request_is_rejected_with_its_reason(operator: OperatorUnderTest, case: str):
    changes, words = INVALID[case]
    requests = operator.requests
    requests.create(case, **changes)
    _assert_rejected(requests, case, words)


def test_open_network_runs_in_a_namespace_labelled_for_it(operator: OperatorUnderTest):
    # Control of the open-network rejection: the same request in the labelled namespace.
    requests = operator.open_requests
    requests.create("open", network={"mode": "open"})
    pod = requests.wait_pod("open")
    assert pod["metadata"]["name"] == pod_name("open")
    assert requests.wait_accepted("open")["podName"] == pod_name("open")


def test_valid_environment_and_image_get_a_pod(operator: OperatorUnderTest):
    # Control of the other rejections: ordinary names, an allowed image, a good reference.
    requests = operator.requests
    requests.create(
        "valid",
        environment={"set": {"CI": "1"}, "secrets": {"TOKEN": {"name": "tok", "key": "k"}}},
        agent={"image": "localhost/kapsis-base:latest"},
    )
    requests.wait_pod("valid")


def test_a_rejected_request_fixed_before_it_ran_gets_its_pod(operator: OperatorUnderTest):
    requests = operator.requests
    requests.create("fixme", agent={"image": "docker.io/evil:1"})
    _assert_rejected(requests, "fixme", "docker.io/evil:1")
    requests.patch_spec("fixme", {"agent": {"image": "localhost/kapsis-base:latest"}})
    requests.wait_pod("fixme")
    status = requests.wait_accepted("fixme")
    assert "exitCode" not in status and "errorType" not in status


def test_a_namespace_that_loses_the_open_label_stops_its_open_request_on_resume(
    operator: OperatorUnderTest, run_operator: Any, kubeconfig: Any, operator_settings: Any
):
    """Validation runs on every reconcile, not only on create."""
    from kapsis.k8s.names import ALLOW_OPEN_NETWORK_LABEL
    from kapsis.operator.connect import client_configuration
    from kapsis.operator.runner import build_operator

    requests = operator.open_requests
    requests.create("was-open", network={"mode": "open"})
    requests.wait_pod("was-open")
    operator.thread.stop()
    requests.core.patch_namespace(
        requests.namespace, {"metadata": {"labels": {ALLOW_OPEN_NETWORK_LABEL: "false"}}}
    )
    built = build_operator(operator_settings, client_configuration(kubeconfig))
    run_operator(built.registry, settings=built.kopf_settings, namespaces=(requests.namespace,))
    _assert_rejected(requests, "was-open", "open", had_pod=True)
    wait_for("the Pod to go", lambda: requests.pod("was-open") is None, timeout=60)
