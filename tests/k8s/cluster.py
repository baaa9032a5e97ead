"""Test clusters for the Kubernetes backend: the kmock API emulator, or a real cluster.

``EmulatedCluster`` runs kmock's ``KubernetesEmulator`` in a background thread with its own
event loop, listening on 127.0.0.1 only, and writes a kubeconfig pointing at it, so that the
code under test connects the way it does in real use (``KUBECONFIG`` / ``--kubeconfig``).
``RealCluster`` does the same for the cluster named by ``KAPSIS_TEST_KUBECONFIG``, in a test
namespace of its own that is deleted afterwards.

The emulator is kept close enough to an API server for the operator: it assigns uid,
resourceVersion, creationTimestamp and ``generateName`` names (kopf posts its events with
``generateName``), and honours equality label selectors on lists. It has no garbage collector
and no kubelet: a test plays the kubelet by patching Pod status (``set_pod_status``).

``OperatorThread`` runs a kopf operator in-process (standalone, namespaced or cluster-wide) in a
thread with its own event loop and stops it cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import kmock._internal.parsing as _kmock_parsing
import yaml

from kapsis.k8s import resource as ar

REAL_CLUSTER_ENV = "KAPSIS_TEST_KUBECONFIG"
NO_REAL_CLUSTER = f"no real cluster: set {REAL_CLUSTER_ENV} to run this against one"
EMULATOR_ONLY = "simulates the kubelet by patching Pod status: emulator only"

AR_RESOURCE = f"{ar.GROUP}/{ar.VERSION}/{ar.PLURAL}"

# Kinds the operator and the CLI use, with what discovery must say about them.
CORE_KINDS: dict[str, dict[str, Any]] = {
    "v1/namespaces": {"kind": "Namespace", "namespaced": False, "subresources": {"status"}},
    "v1/pods": {"kind": "Pod", "namespaced": True, "subresources": {"status", "log"}},
    "v1/configmaps": {"kind": "ConfigMap", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "namespaced": True},
    "v1/events": {"kind": "Event", "namespaced": True},
    "networking.k8s.io/v1/networkpolicies": {"kind": "NetworkPolicy", "namespaced": True},
    "events.k8s.io/v1/events": {"kind": "Event", "namespaced": True},
}
VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")


def now_iso() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def agent_request_crd() -> dict[str, Any]:
    """The AgentRequest CRD, generated from the models (the one deploy/crd.yaml holds)."""
    from kapsis.k8s import crd

    return dict(crd.crd())


def _parse_path(path: str) -> Any:
    """kmock 0.8's path parser, plus the cluster-scoped ``/api/v1/namespaces[/NAME[/status]]``.

    kmock reads ``namespaces/NAME`` as "inside namespace NAME" even when nothing follows, so
    Namespace objects themselves could not be created or read; the operator reads their labels.
    """
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
        len(parts) <= 4 or (len(parts) == 5 and parts[4] in ("status", "finalize"))
    ):
        return _kmock_parsing.ParsedPath(
            group="",
            version="v1",
            plural="namespaces",
            namespace=None,
            name=parts[3] if len(parts) > 3 else None,
            subresource=parts[4] if len(parts) > 4 else None,
        )
    return _original_parse_path(path)


_original_parse_path = _kmock_parsing.parse_path
_kmock_parsing.parse_path = _parse_path


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (``a=b,c!=d,e``): what the Kapsis code uses."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.strip()) != value.strip().lstrip("="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class KapsisEmulator(kmock.KubernetesEmulator):  # type: ignore[misc]
    """kmock's emulator plus the object metadata an API server fills in, and label selectors."""

    _versions = itertools.count(1)

    async def _handle(self, request: kmock.Request) -> Any:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            if request.action == kmock.action.CREATE:
                meta = data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + secrets.token_hex(3)
                if request.namespace and request.resource.plural != "namespaces":
                    meta.setdefault("namespace", request.namespace)
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", now_iso())
                meta["resourceVersion"] = str(next(self._versions))
            elif request.action == kmock.action.UPDATE:
                data.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
        try:
            response = await super()._handle(request)
        finally:
            # kmock keeps every request for assertions and matches each new one against that
            # whole history, so serving slows down linearly; Kapsis's tests read objects, not
            # the request log, so only the requests in flight are kept.
            for log in (self._requests, *(payload._requests for payload in self._payloads)):
                with contextlib.suppress(ValueError):
                    log.remove(request)
        # An API server answers a create with 201 Created; the kubernetes client's typed
        # create calls deserialize only that (a 200 would read as None).
        if (
            request.action == kmock.action.CREATE
            and response.status == 200
            and not response.prepared
        ):
            response.set_status(201)
        return response

    async def _serve_list(self, request: kmock.Request) -> Any:
        result = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            result["items"] = [
                item
                for item in result["items"]
                if _selector_matches(selector, item.get("metadata", {}).get("labels") or {})
            ]
        return result


class EmulatedCluster:
    """kmock on 127.0.0.1 in a thread of its own, with a kubeconfig file pointing at it."""

    is_real = False

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.kubeconfig = workdir / "kubeconfig"
        self.emulator: KapsisEmulator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.url = ""

    def start(self) -> EmulatedCluster:
        self._thread = threading.Thread(target=self._run, name="kmock", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Kubernetes emulator did not start within 10s")
        if self._error is not None:
            raise RuntimeError("the Kubernetes emulator failed to start") from self._error
        write_kubeconfig(self.kubeconfig, self.url)
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # surfaced to start() through _error
            self._error = error
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        emulator = KapsisEmulator()
        for name, info in CORE_KINDS.items():
            emulator.resources[name] = kmock.ResourceInfo(verbs=set(VERBS), **info)
        crd = agent_request_crd()
        names = crd["spec"]["names"]
        emulator.resources[AR_RESOURCE] = kmock.ResourceInfo(
            kind=names["kind"],
            singular=names["singular"],
            shortnames=set(names.get("shortNames", ())),
            namespaced=True,
            verbs=set(VERBS),
            subresources={"status"},
        )
        emulator.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = (
            kmock.ResourceInfo(kind="CustomResourceDefinition", namespaced=False, verbs=set(VERBS))
        )
        emulator.objects[
            "apiextensions.k8s.io/v1/customresourcedefinitions", None, crd["metadata"]["name"]
        ] = crd
        async with emulator, kmock.Server(emulator, host="127.0.0.1") as server:
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def history(self, resource: str, namespace: str | None, name: str) -> list[dict[str, Any]]:
        """Every stored version of an object, oldest first (emulator only: for ordering checks)."""
        assert self.emulator is not None
        obj = self.emulator.objects[resource, namespace, name]
        return [version.raw for version in obj.history if version is not None]


class RealCluster:
    """The cluster of ``KAPSIS_TEST_KUBECONFIG``."""

    is_real = True

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.url = ""

    def start(self) -> RealCluster:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        api = new_api_client(self.kubeconfig)
        self.url = api.configuration.host
        crd = agent_request_crd()
        extensions = client.ApiextensionsV1Api(api)
        try:
            extensions.create_custom_resource_definition(crd)
        except ApiException as error:
            if error.status != 409:  # already installed: keep the cluster's own
                raise
        return self

    def stop(self) -> None:
        return None

    def history(self, resource: str, namespace: str | None, name: str) -> list[dict[str, Any]]:
        raise NotImplementedError("object history is only kept by the emulator")


Cluster = EmulatedCluster | RealCluster


def write_kubeconfig(path: Path, server: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "kmock", "user": {"token": "kmock-does-not-check"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def new_api_client(kubeconfig: Path) -> Any:
    """A ``kubernetes.client.ApiClient`` configured from ``kubeconfig`` (as real use does)."""
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


def start_cluster(workdir: Path) -> Cluster:
    """The real cluster of ``KAPSIS_TEST_KUBECONFIG`` if set, else a fresh emulator."""
    real = os.environ.get(REAL_CLUSTER_ENV)
    if real:
        return RealCluster(Path(real)).start()
    return EmulatedCluster(workdir).start()


def create_namespace(api: Any, name: str, labels: dict[str, str] | None = None) -> None:
    from kubernetes import client

    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    if labels:
        body["metadata"]["labels"] = labels  # type: ignore[index]
    client.CoreV1Api(api).create_namespace(body)


def delete_namespace(api: Any, name: str) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with contextlib.suppress(ApiException):
        client.CoreV1Api(api).delete_namespace(name)


def set_pod_status(api: Any, namespace: str, name: str, status: dict[str, Any]) -> None:
    """Play the kubelet: replace the Pod's status (a merge patch of the status subresource)."""
    from kubernetes import client

    client.CoreV1Api(api).patch_namespaced_pod_status(name, namespace, {"status": status})


def wait_for(
    what: str, probe: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class OperatorThread:
    """A kopf operator in a background thread with its own event loop.

    ``registry`` holds the handlers (its login handler included); ``namespaces`` (exact names
    or kopf patterns) or ``clusterwide``. ``stop()`` sets kopf's stop flag and joins the thread.
    """

    def __init__(
        self,
        registry: Any,
        *,
        namespaces: tuple[str, ...] = (),
        clusterwide: bool = False,
        settings: Any = None,
        memo: Any = None,
    ) -> None:
        self.registry = registry
        self.namespaces = namespaces
        self.clusterwide = clusterwide
        self.settings = settings
        self.memo = memo
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, timeout: float = 15.0) -> OperatorThread:
        self._thread = threading.Thread(target=self._run, name="kopf", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.error is not None or not self._thread.is_alive():
                raise RuntimeError("the operator stopped while starting") from self.error
            if time.monotonic() > deadline:
                raise RuntimeError(f"the operator was not ready within {timeout}s")
        return self

    def _run(self) -> None:
        import kopf

        try:
            asyncio.run(
                kopf.operator(
                    registry=self.registry,
                    settings=self.settings,
                    standalone=True,
                    namespaces=self.namespaces,
                    clusterwide=self.clusterwide,
                    memo=self.memo,
                    stop_flag=self._stop,
                    ready_flag=self._ready,
                )
            )
        except BaseException as error:  # reported by start() and stop()
            self.error = error

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the operator did not stop within {timeout}s")


@contextlib.contextmanager
def running_operator(registry: Any, **kwargs: Any) -> Iterator[OperatorThread]:
    thread = OperatorThread(registry, **kwargs).start()
    try:
        yield thread
    finally:
        thread.stop()


def kubeconfig_login(kubeconfig: Path) -> Callable[..., Any]:
    """A kopf login handler reading ``kubeconfig`` (not the process-wide client default)."""

    def login(**_: Any) -> Any:
        import kopf

        api = new_api_client(kubeconfig)
        cfg = api.configuration
        header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix(
            "authorization"
        )
        scheme, _, token = (header or "").partition(" ")
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            scheme=scheme or None,
            token=token or None,
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
        )

    return login
