"""Fixtures of the Kubernetes tests: a cluster (emulator or real), an API client, namespaces.

- ``k8s_cluster`` (session): kmock on 127.0.0.1, or the cluster of ``KAPSIS_TEST_KUBECONFIG``.
- ``kubeconfig``: the path of a kubeconfig for it (what ``KUBECONFIG`` would name).
- ``api_client``: a ``kubernetes.client.ApiClient`` made from that kubeconfig.
- ``namespace``: a fresh namespace for one test, deleted afterwards.
- ``make_namespace``: more namespaces (with labels), deleted afterwards.
- ``real_cluster_only`` / ``emulator_only``: skip a test that only makes sense on one of them.
- ``run_operator``: start a kopf registry in-process (see ``cluster.OperatorThread``).
- ``operator``: the Kapsis operator itself, running in-process for the test's namespaces.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.cluster import (
    EMULATOR_ONLY,
    NO_REAL_CLUSTER,
    Cluster,
    OperatorThread,
    create_namespace,
    delete_namespace,
    new_api_client,
    start_cluster,
)
from tests.k8s.requests import Requests


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/k8s/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.k8s)


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("k8s"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kubeconfig(k8s_cluster: Cluster) -> Path:
    return k8s_cluster.kubeconfig


@pytest.fixture(scope="session")
def api_client(kubeconfig: Path) -> Any:
    return new_api_client(kubeconfig)


@pytest.fixture
def make_namespace(api_client: Any) -> Iterator[Callable[..., str]]:
    made: list[str] = []

    def make(prefix: str = "kapsis-test", labels: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{secrets.token_hex(3)}"
        create_namespace(api_client, name, labels)
        made.append(name)
        return name

    yield make
    for name in made:
        delete_namespace(api_client, name)


@pytest.fixture
def namespace(make_namespace: Callable[..., str]) -> str:
    return make_namespace()


@pytest.fixture
def real_cluster_only(k8s_cluster: Cluster) -> None:
    if not k8s_cluster.is_real:
        pytest.skip(NO_REAL_CLUSTER)


@pytest.fixture
def emulator_only(k8s_cluster: Cluster) -> None:
    if k8s_cluster.is_real:
        pytest.skip(EMULATOR_ONLY)


@pytest.fixture
def run_operator() -> Iterator[Callable[..., OperatorThread]]:
    """``run_operator(registry, namespaces=(...), clusterwide=False, ...)``: stopped after."""
    started: list[OperatorThread] = []

    def run(registry: Any, **kwargs: Any) -> OperatorThread:
        thread = OperatorThread(registry, **kwargs).start()
        started.append(thread)
        return thread

    yield run
    for thread in reversed(started):
        thread.stop()


@dataclass
class OperatorUnderTest:
    """The real operator (kapsis.operator) running in-process against the test cluster."""

    built: Any
    thread: OperatorThread
    settings: Any
    requests: Requests  # in the plain test namespace
    open_requests: Requests  # in a namespace labelled to allow network mode open


@pytest.fixture
def operator_settings(tmp_path: Path) -> Any:
    from kapsis.k8s.settings import OperatorSettings

    # dns_servers: configuration data only (TEST-NET address); nothing is sent to it.
    return OperatorSettings(data_dir=tmp_path / "operator", dns_servers=("192.0.2.53",))


@pytest.fixture
def operator(
    kubeconfig: Path,
    api_client: Any,
    namespace: str,
    make_namespace: Callable[..., str],
    operator_settings: Any,
    run_operator: Callable[..., OperatorThread],
) -> OperatorUnderTest:
    from kapsis.k8s.names import ALLOW_OPEN_NETWORK_LABEL
    from kapsis.operator.connect import client_configuration
    from kapsis.operator.runner import build_operator

    open_namespace = make_namespace("kapsis-open", {ALLOW_OPEN_NETWORK_LABEL: "true"})
    built = build_operator(operator_settings, client_configuration(kubeconfig))
    thread = run_operator(
        built.registry, settings=built.kopf_settings, namespaces=(namespace, open_namespace)
    )
    return OperatorUnderTest(
        built,
        thread,
        operator_settings,
        Requests(api_client, namespace),
        Requests(api_client, open_namespace),
    )
