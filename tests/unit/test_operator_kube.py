"""The operator's API calls where they must be robust: the exit annotation is retried."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client import ApiException

from kapsis.operator import kube as kube_module
from kapsis.operator.kube import Kube


class FlakyCore:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls: list[dict[str, Any]] = []

    def patch_namespaced_pod(self, name: str, namespace: str, body: Any, **_: Any) -> None:
        self.calls.append(body)
        if self.failures:
            raise self.failures.pop(0)


def kube_with(core: FlakyCore) -> Kube:
    kube = Kube.__new__(Kube)
    kube.core = core
    kube._exception = ApiException
    return kube


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_module.time, "sleep", lambda _: None)


def test_the_exit_annotation_survives_transient_failures():
    core = FlakyCore([ApiException(status=500), ConnectionResetError()])
    kube_with(core).annotate_pod("ns", "p", {"kapsis.dev/agent-exit-code": "0"})
    assert len(core.calls) == 3
    assert core.calls[-1] == {"metadata": {"annotations": {"kapsis.dev/agent-exit-code": "0"}}}


def test_a_gone_pod_is_not_retried_and_persistent_failures_surface():
    core = FlakyCore([ApiException(status=404)])
    with pytest.raises(ApiException):
        kube_with(core).annotate_pod("ns", "p", {"a": "1"})
    assert len(core.calls) == 1
    core = FlakyCore([ApiException(status=500)] * 10)
    with pytest.raises(ApiException):
        kube_with(core).annotate_pod("ns", "p", {"a": "1"})
    assert len(core.calls) == 4
