"""Fixtures for the integration tests, which run real podman containers.

``base_image`` is the Kapsis base image every sandbox test runs in. It is built once per session
with :func:`kapsis.host.image.build_base_image` (about a minute on a fresh host, seconds when the
debootstrap cache in ~/.kapsis/cache is warm) only when podman does not have it yet.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from kapsis.config.models import DEFAULT_IMAGE
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


@pytest.fixture
def kapsis(tmp_path: Path, base_image: str) -> Kapsis:
    """The real ``kapsis`` command, in this test's own KAPSIS_HOME and config dir."""
    return Kapsis(
        home=tmp_path / "kapsis-home", config_dir=tmp_path / "kapsis-config", image=base_image
    )
