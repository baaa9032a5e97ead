"""The few Kubernetes API calls the operator makes, over the official client.

Each is idempotent where the reconcile loop needs it to be: creating an object that already
exists is fine (a retry or a resume), deleting one that is gone is fine. Objects are plain
dicts (what ``kapsis.k8s.render`` produces), so nothing here depends on the client's models.
"""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Mapping
from typing import Any, Final

from kapsis.k8s import resource as ar
from kapsis.k8s.names import AGENT_CONTAINER, MANAGED_BY_LABEL, MANAGED_BY_VALUE, REQUEST_LABEL
from kapsis.k8s.render import request_label_value

COMPONENT: Final = "kapsis-operator"
# What the operator's calls (and kopf's watches and patches) need, per (API group, resource):
# deploy/operator.yaml's ClusterRole must grant these (a unit test holds it to that).
API_VERBS: Final = {
    (ar.GROUP, ar.PLURAL): frozenset({"get", "list", "watch", "patch"}),
    (ar.GROUP, f"{ar.PLURAL}/status"): frozenset({"patch"}),
    ("", "pods"): frozenset({"get", "list", "watch", "create", "patch", "delete"}),
    ("", "pods/log"): frozenset({"get"}),
    ("", "configmaps"): frozenset({"list", "create", "delete"}),
    ("networking.k8s.io", "networkpolicies"): frozenset({"list", "create", "delete"}),
    ("", "events"): frozenset({"create"}),
    ("", "namespaces"): frozenset({"get"}),
}
_CONFLICT: Final = 409
_NOT_FOUND: Final = 404
_RETRY_DELAYS: Final = (0.2, 1.0, 3.0)
# Reading the end of an agent's log: how long, and how much at most (its last lines, whole).
LOG_READ_TIMEOUT: Final = 20.0
MAX_LOG_READ: Final = 4 * 1024 * 1024


def utc_now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status_of(error: BaseException) -> int | None:
    status = getattr(error, "status", None)
    return status if isinstance(status, int) else None


class Kube:
    """The operator's API calls, over one ``kubernetes.client.ApiClient``."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        # Any: the operator sends and reads plain dicts, not the client's model classes.
        self.api_client = api_client
        self.core: Any = client.CoreV1Api(api_client)
        self.networking: Any = client.NetworkingV1Api(api_client)
        self.custom: Any = client.CustomObjectsApi(api_client)
        self._exception: type[Exception] = client.ApiException

    # -- AgentRequests ---------------------------------------------------------------------

    def read_request(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(
                ar.GROUP, ar.VERSION, namespace, ar.PLURAL, name
            )
        except self._exception as error:
            if _status_of(error) == _NOT_FOUND:
                return None
            raise
        return found

    def patch_request_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge ``status`` into the request's status (a no-op if the request is gone)."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                ar.GROUP,
                ar.VERSION,
                namespace,
                ar.PLURAL,
                name,
                {"status": dict(status)},
                _preload_content=False,
            )
        except self._exception as error:
            if _status_of(error) != _NOT_FOUND:
                raise

    # -- children --------------------------------------------------------------------------

    def create(self, obj: Mapping[str, Any]) -> bool:
        """Create ``obj`` in its namespace; False when it already existed (kept as it is)."""
        kind = obj.get("kind")
        namespace = obj["metadata"]["namespace"]
        body = dict(obj)
        try:
            # _preload_content=False: the answer is not needed, so the client does not build
            # its model of it (a Pod's is large; parsing it costs more than the call).
            if kind == "Pod":
                self.core.create_namespaced_pod(namespace, body, _preload_content=False)
            elif kind == "ConfigMap":
                self.core.create_namespaced_config_map(namespace, body, _preload_content=False)
            elif kind == "NetworkPolicy":
                self.networking.create_namespaced_network_policy(
                    namespace, body, _preload_content=False
                )
            else:
                raise ValueError(f"the operator does not create {kind} objects")
        except self._exception as error:
            if _status_of(error) == _CONFLICT:
                return False
            raise
        return True

    def children(self, namespace: str, request: str, uid: str | None) -> list[tuple[str, str]]:
        """(kind, name) of the objects made for a request: labelled with it and, where they
        have owner references, owned by it (another object that merely copies the label is
        left alone)."""
        selector = (
            f"{REQUEST_LABEL}={request_label_value(request)},{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"
        )
        found: list[tuple[str, str]] = []
        listings = (
            ("Pod", self.core.list_namespaced_pod),
            ("ConfigMap", self.core.list_namespaced_config_map),
            ("NetworkPolicy", self.networking.list_namespaced_network_policy),
        )
        for kind, lister in listings:
            for item in lister(namespace, label_selector=selector).items:
                owners = item.metadata.owner_references or []
                if uid and owners and not any(owner.uid == uid for owner in owners):
                    continue
                found.append((kind, item.metadata.name))
        return found

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete one child; False when it was already gone."""
        deleters = {
            "Pod": self.core.delete_namespaced_pod,
            "ConfigMap": self.core.delete_namespaced_config_map,
            "NetworkPolicy": self.networking.delete_namespaced_network_policy,
        }
        try:
            deleters[kind](name, namespace)
        except self._exception as error:
            if _status_of(error) == _NOT_FOUND:
                return False
            raise
        return True

    def pod_exists(self, namespace: str, name: str) -> bool:
        try:
            self.core.read_namespaced_pod(name, namespace, _preload_content=False)
        except self._exception as error:
            if _status_of(error) == _NOT_FOUND:
                return False
            raise
        return True

    def agent_log_tail(self, namespace: str, pod: str, lines: int, keep: int) -> str | None:
        """The end (at most ``keep`` bytes) of the last ``lines`` lines of the agent
        container's log; None when it cannot be read whole: refused, unreachable, slow, or
        past :data:`MAX_LOG_READ` (the agent's lines can be as long as it likes)."""
        try:
            response = self.core.read_namespaced_pod_log(
                pod,
                namespace,
                container=AGENT_CONTAINER,
                tail_lines=lines,
                _preload_content=False,
                _request_timeout=LOG_READ_TIMEOUT,
            )
            try:
                data = response.read(MAX_LOG_READ + 1)
            finally:
                response.release_conn()
        except Exception:  # the API's refusal, or the connection's failure
            return None
        if len(data) > MAX_LOG_READ:
            return None
        return bytes(data[-keep:]).decode("utf-8", "replace")

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        """Set annotations on a Pod, retrying a few times: this is what releases the finisher,
        and a Pod whose finisher waits changes no more, so no later event would retry it."""
        for delay in (*_RETRY_DELAYS, None):
            try:
                self.core.patch_namespaced_pod(
                    name,
                    namespace,
                    {"metadata": {"annotations": dict(annotations)}},
                    _preload_content=False,
                )
                return
            except Exception as error:  # the API's refusal, or the connection's failure
                if delay is None or _status_of(error) == _NOT_FOUND:
                    raise
            time.sleep(delay)

    # -- namespaces and events -------------------------------------------------------------

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        """The namespace's labels; none when it cannot be read (the strict reading)."""
        try:
            found = self.core.read_namespace(namespace)
        except self._exception as error:
            if _status_of(error) == _NOT_FOUND:
                return {}
            raise
        return dict(found.metadata.labels or {})

    def post_event(
        self, involved: Mapping[str, Any], event_type: str, reason: str, message: str
    ) -> None:
        """A core/v1 Event about ``involved`` (an object's apiVersion, kind and metadata)."""
        meta = involved.get("metadata") or {}
        namespace = meta.get("namespace")
        now = utc_now()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": COMPONENT},
            "reportingComponent": f"{ar.GROUP}/operator",
            "reportingInstance": socket.gethostname(),
        }
        self.core.create_namespaced_event(namespace, body, _preload_content=False)
