"""The CLI's connection to a cluster: the official kubernetes client, and its errors as Kapsis's.

Imported only by ``--backend k8s`` code paths (and it imports ``kubernetes`` itself only inside
:func:`connect`), so a local ``kapsis run`` never loads the client. Every API failure leaves as
a :class:`~kapsis.errors.KapsisError` with one line that says what to do: an unreachable
cluster, a missing CRD, a namespace that does not exist, missing permissions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kapsis.errors import ConfigError, HostUnsupportedError, SandboxError
from kapsis.k8s import names
from kapsis.k8s.resource import GROUP, PLURAL, VERSION

T = TypeVar("T")
_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# A watch is re-opened this often, so a silently dropped connection cannot stall `kapsis run`.
WATCH_SECONDS = 30
# How much longer the client waits for a quiet watch than the server should keep it open.
WATCH_GRACE_SECONDS = 5
# Every call's (connect, read) limit, so a cluster that does not answer (a VPN that is down)
# costs seconds, not minutes of TCP retries; streams set their own read limit.
CONNECT_SECONDS = 5
REQUEST_TIMEOUT = (CONNECT_SECONDS, 30)


class ClusterUnreachableError(SandboxError):
    """The Kubernetes API server did not answer."""

    error_type = "cluster_unreachable"


class ClusterRefusedError(SandboxError):
    """The API server answered with an error Kapsis cannot fix (permissions, validation)."""

    error_type = "cluster"

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class CrdMissingError(HostUnsupportedError):
    """The cluster has no AgentRequest CRD: the Kubernetes backend is not installed there."""

    error_type = "crd_missing"


def kubeconfig_path() -> str:
    """What the client reads: ``$KUBECONFIG`` (a ':'-separated list) or ``~/.kube/config``."""
    return os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not any(
        Path(p).is_file() for p in kubeconfig_path().split(os.pathsep) if p
    )


def context_namespace(context: str | None) -> str | None:
    """The namespace a kubeconfig context names (no cluster needed); None if it names none."""
    if _in_cluster():
        with contextlib.suppress(OSError):
            return _SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or None
        return None
    from kubernetes import config as kube_config

    config: Any = kube_config  # its loaders are untyped
    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig_path())
    except (config.ConfigException, OSError):
        return None
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    namespace = ((chosen or {}).get("context") or {}).get("namespace")
    return str(namespace) if namespace else None


@dataclass
class Cluster:
    """An API client for one kubeconfig context."""

    api: Any
    context: str | None
    host: str

    def _call(self, what: str, call: Callable[[], T], *, missing: str | None = None) -> T:
        """Run one API call; translate its failure (404 into ``missing``, when given)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return call()
        except ApiException as error:
            if error.status == 404 and missing is not None:
                raise ConfigError(missing) from None
            raise ClusterRefusedError(f"{what}: {_reason(error)}", error.status) from None
        except (HTTPError, OSError) as error:
            raise ClusterUnreachableError(
                f"cannot reach the Kubernetes API at {self.host} ({type(error).__name__}); "
                "check the cluster, KUBECONFIG and kubernetes.context"
            ) from None

    def _custom(self) -> Any:
        from kubernetes import client

        return _Timed(client.CustomObjectsApi(self.api))

    def _core(self) -> Any:
        from kubernetes import client

        return _Timed(client.CoreV1Api(self.api))

    def preflight(self, namespace: str) -> None:
        """The CRD is installed and the namespace exists (a 403 on the namespace is no proof)."""
        crd_missing = CrdMissingError(
            f"the cluster at {self.host} has no AgentRequest CRD ({PLURAL}.{GROUP}/{VERSION}); "
            "install the Kubernetes backend: `kubectl apply -f deploy/`"
        )
        # Raw discovery (no client models): the one thing read is the list of resource names.
        try:
            found = self._call(
                "discovery",
                lambda: self._custom().get_api_resources(GROUP, VERSION, _preload_content=False),
            )
        except ClusterRefusedError:
            raise crd_missing from None
        try:
            listed = json.loads(found.data).get("resources")
        except (ValueError, AttributeError):
            listed = None
        if not any(isinstance(r, dict) and r.get("name") == PLURAL for r in listed or ()):
            raise crd_missing
        try:
            self._call(
                f"namespace {namespace}",
                lambda: self._core().read_namespace(namespace),
                missing=f"namespace {namespace!r} does not exist on the cluster; create it, or "
                "pass --namespace (or set kubernetes.namespace)",
            )
        except ClusterRefusedError as error:
            if error.status != 403:  # a user who may not read namespaces: the create will tell
                raise

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        what = f"create {manifest['kind']} {meta['namespace']}/{meta['name']}"
        if manifest["kind"] == "ConfigMap":
            created = self._call(
                what, lambda: self._core().create_namespaced_config_map(meta["namespace"], manifest)
            )
            return dict(self.api.sanitize_for_serialization(created))
        created = self._call(
            what,
            lambda: self._custom().create_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], PLURAL, manifest
            ),
        )
        # The client only decodes a 201 body; an API answering 200 (an emulator) gives None.
        found = created or self.get_request(meta["namespace"], meta["name"])
        if found is None:
            raise ClusterRefusedError(f"{what}: the request vanished right after its creation")
        return dict(found)

    def own_config_map(self, namespace: str, name: str, owner: dict[str, Any]) -> None:
        """Make the task ConfigMap the request's, so deleting the request deletes it."""
        meta = owner["metadata"]
        reference = {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": meta["name"],
            "uid": meta["uid"],
        }
        patch = {"metadata": {"ownerReferences": [reference]}}
        self._call(
            f"own ConfigMap {name}",
            lambda: self._core().patch_namespaced_config_map(
                name, namespace, patch, _preload_content=False
            ),
        )

    def delete_config_map(self, namespace: str, name: str) -> None:
        with contextlib.suppress(ConfigError):
            self._call(
                f"delete ConfigMap {name}",
                lambda: self._core().delete_namespaced_config_map(
                    name, namespace, _preload_content=False
                ),
                missing="gone",
            )

    def get_request(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(
                self._call(
                    f"get AgentRequest {namespace}/{name}",
                    lambda: self._custom().get_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, name
                    ),
                    missing="gone",
                )
            )
        except ConfigError:
            return None

    def watch_request(self, namespace: str, name: str, resource_version: str) -> Iterator[Any]:
        """The request's versions as they change, for at most WATCH_SECONDS (then it returns).

        Yields its objects, from ``resource_version`` on; filtered by name here as well as by
        field selector, since not every API (the test emulator) honours the selector.
        """
        from kubernetes import watch as kube_watch
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError, ProtocolError, ReadTimeoutError

        watch: Any = kube_watch  # untyped
        watcher = watch.Watch()
        try:
            for event in watcher.stream(
                self._custom().list_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                field_selector=f"metadata.name={name}",
                resource_version=resource_version,
                timeout_seconds=WATCH_SECONDS,
                _request_timeout=(CONNECT_SECONDS, WATCH_SECONDS + WATCH_GRACE_SECONDS),
            ):
                obj = event.get("object") or {}
                if obj.get("metadata", {}).get("name") != name:
                    continue
                yield None if event.get("type") == "DELETED" else obj
        except (ReadTimeoutError, ProtocolError):
            return  # an idle or dropped stream: the caller reads the request and watches again
        except ApiException as error:
            if error.status == 410:  # the version expired: read it again, then watch
                return
            raise ClusterRefusedError(f"watch AgentRequest {name}: {_reason(error)}") from None
        except (HTTPError, OSError) as error:
            raise ClusterUnreachableError(
                f"lost the Kubernetes API at {self.host} ({type(error).__name__}); the request "
                f"keeps running: `kapsis status {name}`"
            ) from None
        finally:
            watcher.stop()

    def mark_stop(self, namespace: str, name: str) -> None:
        patch = {"metadata": {"annotations": {names.STOP_ANNOTATION: "true"}}}
        self._call(
            f"stop AgentRequest {namespace}/{name}",
            lambda: self._custom().patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, patch
            ),
            missing=f"AgentRequest {namespace}/{name} no longer exists",
        )

    def delete_pod(self, namespace: str, pod: str, grace_seconds: int = 5) -> None:
        with contextlib.suppress(ConfigError):
            self._call(
                f"delete Pod {namespace}/{pod}",
                lambda: self._core().delete_namespaced_pod(
                    pod, namespace, grace_period_seconds=grace_seconds, _preload_content=False
                ),
                missing="gone",
            )

    def delete_request(self, namespace: str, name: str) -> None:
        with contextlib.suppress(ConfigError):
            self._call(
                f"delete AgentRequest {namespace}/{name}",
                lambda: self._custom().delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, name
                ),
                missing="gone",
            )

    def pod_log(self, namespace: str, pod: str, *, follow: bool) -> Iterator[str]:
        """The agent container's log, line by line."""
        missing = f"Pod {namespace}/{pod} is gone (its log with it)"
        # Raw bytes either way: the log is text, whatever content type the server declares.
        response = self._call(
            f"log of Pod {pod}",
            lambda: self._core().read_namespaced_pod_log(
                pod,
                namespace,
                container=names.AGENT_CONTAINER,
                follow=follow,
                _preload_content=False,
                # A quiet agent is no reason to stop following its log (the request was just
                # read with the usual limit, so the cluster answers).
                _request_timeout=None if follow else REQUEST_TIMEOUT,
            ),
            missing=missing,
        )
        try:
            pending = b""
            for chunk in response.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace")
            if pending:
                yield pending.decode(errors="replace")
        finally:
            response.release_conn()


class _Timed:
    """An API object whose calls get :data:`REQUEST_TIMEOUT` unless they name their own."""

    def __init__(self, api: Any) -> None:
        self._api = api

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._api, name)
        if not callable(method):
            return method

        # wraps: kubernetes.watch reads the method's name and docstring.
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
            return method(*args, **kwargs)

        return call


def _reason(error: Any) -> str:
    """The API server's message for a failed call, else the HTTP status."""
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        body = json.loads(error.body)
        if body.get("message"):
            return f"{body['message']} (HTTP {error.status})"
    return f"HTTP {error.status} {error.reason}"


def connect(context: str | None) -> Cluster:
    """A client for ``context`` of the kubeconfig, or in-cluster when there is no kubeconfig."""
    from kubernetes import client, config as kube_config

    config: Any = kube_config  # its loaders are untyped
    configuration = client.Configuration()
    # One retry: with REQUEST_TIMEOUT, a silent cluster is reported within seconds.
    configuration.retries = 1
    try:
        if context is None and _in_cluster():
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(
                config_file=kubeconfig_path(), context=context, client_configuration=configuration
            )
    except (config.ConfigException, OSError) as error:
        where = f"context {context!r} of " if context else ""
        raise ConfigError(
            f"cannot load {where}the kubeconfig {kubeconfig_path()}: {error}; set KUBECONFIG, "
            "or kubernetes.context in agent-sandbox.yaml"
        ) from None
    api = client.ApiClient(configuration)
    return Cluster(api=api, context=context, host=str(configuration.host))
