"""Fixtures for the integration tests, which run real podman containers.

``base_image`` is the Kapsis base image every sandbox test runs in. It is built once per session
with :func:`kapsis.host.image.build_base_image` (about a minute on a fresh host, seconds when the
debootstrap cache in ~/.kapsis/cache is warm) only when podman does not have it yet.
``claude_image`` (the Claude Code agent image) is built at the start of every session that has a
test using it (about 30 s).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import pytest

from kapsis.config.models import DEFAULT_IMAGE
from kapsis.host.agent_images import agent_image, build_agent_image
from kapsis.host.gateway_image import build_gateway_image
from kapsis.host.image import build_base_image, image_present
from kapsis.sandbox.network_plan import DEFAULT_GATEWAY_IMAGE

from .internet import internet, podman_v6_network  # noqa: F401  (fixtures for the network tests)
from .kapsis_runner import Kapsis
from .secret_service import secret_service  # noqa: F401  (fixture for the secrets tests)


@pytest.fixture(scope="session")
def base_image() -> str:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (run scripts/install.sh)")
    if not image_present(DEFAULT_IMAGE):
        started = time.monotonic()
        build_base_image(DEFAULT_IMAGE, progress=lambda line: print(f"[base image] {line}"))
        print(f"[base image] built in {time.monotonic() - started:.0f} s")
    if not image_present(DEFAULT_GATEWAY_IMAGE):
        # Filtered network mode, the default, needs the gateway image as well.
        build_gateway_image(progress=lambda line: print(f"[gateway image] {line}"))
    return DEFAULT_IMAGE


# The outcome of the one claude image build of this session: its name, or why it failed.
_CLAUDE_IMAGE: dict[str, str | BaseException] = {}


def _build_claude_image(base: str) -> str:
    if "outcome" not in _CLAUDE_IMAGE:
        started = time.monotonic()
        try:
            version = build_agent_image(
                "claude", base=base, progress=lambda line: print(f"[claude image] {line}")
            )
        except Exception as error:  # kept: only the tests that need the image fail with it
            _CLAUDE_IMAGE["outcome"] = error
        else:
            seconds = time.monotonic() - started
            print(f"[claude image] Claude Code {version}, built in {seconds:.0f} s")
            _CLAUDE_IMAGE["outcome"] = agent_image("claude")
    outcome = _CLAUDE_IMAGE["outcome"]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


@pytest.fixture(scope="session")
def claude_image(base_image: str) -> str:
    """The claude agent image, built once per session, always: the build is under test too."""
    return _build_claude_image(base_image)


@pytest.fixture(scope="session", autouse=True)
def _agent_images_before_the_test_internet(request: pytest.FixtureRequest) -> None:
    """Build the agent images a session needs before any test runs.

    The build fetches from the package registries, and the test internet, once up, routes all
    of 203.0.113.0/24 into its namespace: where a registry (or the proxy in front of it) has
    an address in that range, as on the machines Kapsis is tested on, a build then fails with
    "No route to host". A failed build fails the tests that use the image, no others.
    """
    if any("claude_image" in item.fixturenames for item in request.session.items):
        base = request.getfixturevalue("base_image")
        with contextlib.suppress(Exception):
            _build_claude_image(base)


@pytest.fixture
def kapsis(tmp_path: Path, base_image: str) -> Kapsis:
    """The real ``kapsis`` command, in this test's own KAPSIS_HOME and config dir."""
    return Kapsis(
        home=tmp_path / "kapsis-home", config_dir=tmp_path / "kapsis-config", image=base_image
    )
