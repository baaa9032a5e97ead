"""The test harness itself: the emulator behaves like an API server where Kapsis relies on it,
and an in-process kopf operator starts, reacts and stops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kapsis.k8s import resource as ar
from tests.k8s.cluster import kubeconfig_login, wait_for


def _pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "localhost/x"}]},
    }


def test_kubeconfig_points_at_loopback_or_the_real_cluster(k8s_cluster: Any, kubeconfig: Path):
    text = kubeconfig.read_text()
    if not k8s_cluster.is_real:
        assert "server: http://127.0.0.1:" in text


def test_objects_get_metadata_and_label_selectors_filter(api_client: Any, namespace: str):
    core = client.CoreV1Api(api_client)
    made = core.create_namespaced_pod(namespace, _pod("a", {"role": "x"}))
    core.create_namespaced_pod(namespace, _pod("b", {"role": "y"}))
    assert made.metadata.uid and made.metadata.creation_timestamp
    listed = core.list_namespaced_pod(namespace, label_selector="role=x").items
    names = [p.metadata.name for p in listed]
    assert names == ["a"]
    with pytest.raises(ApiException) as error:
        core.create_namespaced_pod(namespace, _pod("a", {}))
    assert error.value.status == 409
    core.delete_namespaced_pod("a", namespace)
    with pytest.raises(ApiException) as error:
        core.read_namespaced_pod("a", namespace)
    assert error.value.status == 404


def test_an_in_process_operator_sees_a_request_and_stops(
    api_client: Any, kubeconfig: Path, namespace: str, run_operator: Any
):
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kubeconfig_login(kubeconfig))

    @kopf.on.create(ar.GROUP, ar.VERSION, ar.PLURAL, registry=registry)
    def created(patch: kopf.Patch, **_: Any) -> None:
        patch.status["phase"] = "Running"

    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kapsis.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kapsis.dev")
    settings.posting.enabled = False
    operator = run_operator(registry, namespaces=(namespace,), settings=settings)
    custom = client.CustomObjectsApi(api_client)
    body = {
        "apiVersion": f"{ar.GROUP}/{ar.VERSION}",
        "kind": ar.KIND,
        "metadata": {"name": "one"},
        "spec": {"task": {"inline": "true"}, "workspace": {"git": {"url": "https://x/y"}}},
    }
    custom.create_namespaced_custom_object(ar.GROUP, ar.VERSION, namespace, ar.PLURAL, body)

    def phase() -> Any:
        obj = custom.get_namespaced_custom_object(ar.GROUP, ar.VERSION, namespace, ar.PLURAL, "one")
        return obj.get("status", {}).get("phase")

    assert wait_for("the handler's status", phase) == "Running"
    operator.stop()
    assert operator.error is None
