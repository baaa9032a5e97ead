"""PodmanBackend.launch with podman replaced by a recorder: what runs, in which order."""

from __future__ import annotations

from typing import Any

import pytest

from kapsis.backends import podman
from kapsis.backends.podman import PodmanBackend
from kapsis.errors import SandboxError
from kapsis.host.facts import HostFacts
from kapsis.secrets import Redactor

DNS = ("192.0.2.53",)  # a resolver the sandbox's gateway could use

ROOTLESS = HostFacts(rootless=True, cgroup_version=2, apparmor=False, dns_servers=DNS)


class FakePodman:
    """Stands in for subprocess.Popen in the podman backend; records starts and waits."""

    def __init__(self, events: list[str], failing: str | None = None) -> None:
        self.events = events
        self.failing = failing

    def __call__(self, args: list[str], **kwargs: Any) -> FakePodman.Process:
        what = " ".join(args[1:3])
        self.events.append(f"start {what}")
        return self.Process(self, args, what)

    class Process:
        def __init__(self, fake: FakePodman, args: list[str], what: str) -> None:
            self.fake, self.args, self.what = fake, args, what
            self.returncode = 125 if what == fake.failing else 0

        def communicate(self, timeout: float | None = None) -> tuple[str, str]:
            self.fake.events.append(f"wait {self.what}")
            return "", "Error: something went wrong\n" if self.returncode else ""

        def wait(self) -> int:
            return self.returncode


@pytest.fixture
def events(monkeypatch) -> list[str]:
    """Records podman commands and host preparation; podman is faked from the first launch on.

    (Building a plan runs git, so the fake replaces subprocess.Popen only once launch starts.)
    """
    recorded: list[str] = []
    launch = PodmanBackend.launch

    def faked_launch(self: PodmanBackend, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(podman.subprocess.Popen, FakePodman):
            monkeypatch.setattr(podman.subprocess, "Popen", FakePodman(recorded))
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(PodmanBackend, "launch", faked_launch)
    prepare = PodmanBackend._prepare_host

    def recording_prepare(self: PodmanBackend, *args: Any) -> int | str:
        recorded.append("prepare host")
        return prepare(self, *args)

    monkeypatch.setattr(PodmanBackend, "_prepare_host", recording_prepare)
    return recorded


def test_pod_is_created_while_the_host_side_is_prepared(make_plan, events):
    plan = make_plan(host=ROOTLESS, network_mode="none")

    PodmanBackend().launch(plan, attach=True, redactor=Redactor(()))

    assert events == ["start pod create", "prepare host", "wait pod create", "start run --pod"]


def test_a_failed_pod_create_stops_the_launch(make_plan, events, monkeypatch):
    plan = make_plan(host=ROOTLESS, network_mode="none")
    monkeypatch.setattr(podman.subprocess, "Popen", FakePodman(events, failing="pod create"))

    with pytest.raises(SandboxError, match="podman pod create failed: Error: something"):
        PodmanBackend().launch(plan, attach=True, redactor=Redactor(()))

    assert "start run --pod" not in events


def test_a_failed_preparation_still_waits_for_the_pod(make_plan, events, monkeypatch):
    def broken(self: PodmanBackend, *args: Any) -> int | str:
        events.append("prepare host")
        raise SandboxError("cannot set up the workspace")

    monkeypatch.setattr(PodmanBackend, "_prepare_host", broken)
    plan = make_plan(host=ROOTLESS, network_mode="none")

    with pytest.raises(SandboxError, match="cannot set up the workspace"):
        PodmanBackend().launch(plan, attach=True, redactor=Redactor(()))

    # The pod exists by the time the error reaches the launcher, whose remove() takes it away.
    assert events == ["start pod create", "prepare host", "wait pod create"]
