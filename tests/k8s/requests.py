"""Helpers of the operator tests: make AgentRequests, read them and their children back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from kapsis.k8s import resource as ar
from kapsis.k8s.render import pod_name
from kapsis.k8s.resource import AgentRequestStatus
from tests.k8s.cluster import set_pod_status, wait_for


def request_body(name: str, **spec_changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "task": {"inline": "make test"},
        "workspace": {"git": {"url": "https://git.example/app.git", "credentialsSecret": "git"}},
        "resources": {"memory": "1g", "cpus": 1, "workspaceSize": "2g"},
    }
    spec.update(spec_changes)
    return {
        "apiVersion": f"{ar.GROUP}/{ar.VERSION}",
        "kind": ar.KIND,
        "metadata": {"name": name},
        "spec": spec,
    }


@dataclass
class Requests:
    """AgentRequests in one namespace, through the API client the tests were given."""

    api: Any
    namespace: str
    audit_dir: Path | None = None

    @property
    def custom(self) -> Any:
        return client.CustomObjectsApi(self.api)

    @property
    def core(self) -> Any:
        return client.CoreV1Api(self.api)

    def create(self, name: str, **spec_changes: Any) -> dict[str, Any]:
        body = request_body(name, **spec_changes)
        made: dict[str, Any] = self.custom.create_namespaced_custom_object(
            ar.GROUP, ar.VERSION, self.namespace, ar.PLURAL, body
        )
        return made

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(
                ar.GROUP, ar.VERSION, self.namespace, ar.PLURAL, name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def status(self, name: str) -> dict[str, Any]:
        found = self.get(name) or {}
        status = dict(found.get("status") or {})
        # Whatever the operator writes must be a status the CRD's schema keeps.
        AgentRequestStatus.model_validate(status)
        return status

    def wait_phase(self, name: str, phase: str, timeout: float = 10.0) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.status(name)
            return status if status.get("phase") == phase else None

        try:
            result: dict[str, Any] = wait_for(f"{name} to be {phase}", probe, timeout)
        except AssertionError as error:
            raise AssertionError(f"{error}; status now: {self.status(name)}") from None
        return result

    def wait_accepted(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """The status once the operator accepted the request and named its Pod: Pending on the
        emulator; on a real cluster the kubelet may already have moved it on."""

        def probe() -> dict[str, Any] | None:
            status = self.status(name)
            accepted = status.get("podName") and status.get("phase") not in (None, "Failed")
            return status if accepted else None

        result: dict[str, Any] = wait_for(f"{name} to be accepted", probe, timeout)
        return result

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            ar.GROUP, ar.VERSION, self.namespace, ar.PLURAL, name, {"spec": spec}
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            ar.GROUP, ar.VERSION, self.namespace, ar.PLURAL, name
        )

    def pod(self, name: str) -> Any:
        try:
            return self.core.read_namespaced_pod(pod_name(name), self.namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def pod_dict(self, name: str) -> dict[str, Any]:
        """The Pod as the API returns it (camelCase JSON), not the client's model."""
        response = self.core.read_namespaced_pod(
            pod_name(name), self.namespace, _preload_content=False
        )
        data: dict[str, Any] = json.loads(response.data)
        return data

    def wait_pod(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        wait_for(f"the Pod of {name}", lambda: self.pod(name), timeout)
        return self.pod_dict(name)

    def kubelet(self, name: str, status: dict[str, Any]) -> None:
        set_pod_status(self.api, self.namespace, pod_name(name), status)

    def events(self, name: str) -> list[Any]:
        items = self.core.list_namespaced_event(self.namespace).items
        return [e for e in items if e.involved_object and e.involved_object.name == name]

    def wait_event(self, name: str, reason: str, timeout: float = 10.0) -> Any:
        def probe() -> Any:
            return next((e for e in self.events(name) if e.reason == reason), None)

        return wait_for(f"a {reason} event about {name}", probe, timeout)

    def children(self, name: str) -> list[str]:
        selector = f"kapsis.dev/request={name}"
        found = []
        for kind, lister in (
            ("Pod", self.core.list_namespaced_pod),
            ("ConfigMap", self.core.list_namespaced_config_map),
            ("NetworkPolicy", client.NetworkingV1Api(self.api).list_namespaced_network_policy),
        ):
            found += [
                f"{kind}/{i.metadata.name}"
                for i in lister(self.namespace, label_selector=selector).items
            ]
        return sorted(found)
