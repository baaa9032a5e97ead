"""Fixtures for the integration tests, which run real podman containers.

Every image the tests run in is built by the session itself, before its first test, so before
anything changes the host's routing (the test internet adds routes to the host; image builds
fetch from the package mirror and registries). Only the tests of a build itself build in their
body: the operator image (no network), a rebuild from the rootfs cache, and a fresh rootless
user's ``kapsis setup`` (test_rootless.py).

* ``base_image``: ``localhost/kapsis-base`` and, for filtered mode, ``localhost/kapsis-gateway``
  (scripts/install.sh builds both; built here when podman lacks them: about a minute on a fresh
  host, seconds when the debootstrap cache in ~/.kapsis/cache is warm);
* ``claude_image``: the Claude Code agent image, built in every session that has a test using
  it (about 30 s; the build is under test too);
* ``agent_images``: the codex, gemini and aider images, built when podman lacks them or has
  one built from another recipe (about three minutes in all on a fresh host: npm packages and
  aider's PyPI dependencies);
* ``ssh_image``: ``localhost/kapsis-test-ssh``, the base image plus OpenSSH (sshd.py), built
  when podman lacks it or has one built on another base image (about 15 s);
* ``rootfs_cache``: the debootstrap result base image builds start from, for the rebuild test;
  made when missing (a base image that came from elsewhere leaves none): about a minute.

``user`` is a throwaway non-root user with the base and gateway images loaded into its own
podman storage (rootless_user.py), for the rootless tests and root-on-a-user's-repository tests.

``_images_first`` builds those that the collected tests use; ``internet`` depends on it, so
the order holds whichever test comes first. A failed build fails the tests that use the image
(pytest keeps a session fixture's error and raises it again for each), no others.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kapsis.config.models import DEFAULT_IMAGE
from kapsis.host.agent_images import (
    agent_image,
    build_agent_image,
    image_recipe_digest,
    recipe_digest,
)
from kapsis.host.gateway_image import build_gateway_image
from kapsis.host.image import build_base_image, image_present, rootfs_cache as image_rootfs_cache
from kapsis.sandbox.network_plan import DEFAULT_GATEWAY_IMAGE

from .internet import Internet, podman_network, skip_reason, start_internet
from .kapsis_runner import Kapsis
from .model_endpoint_fixture import model_endpoint  # noqa: F401  (the agent CLIs' endpoint)
from .rootless_user import (
    RootlessUser,
    host_settings_for_rootless,
    rootless_user,
    skip_reason as rootless_skip_reason,
)
from .secret_service import secret_service  # noqa: F401  (fixture for the secrets tests)
from .sshd import ensure_ssh_image

IMAGE_FIXTURES = ("base_image", "claude_image", "agent_images", "ssh_image", "rootfs_cache")
OTHER_AGENTS = ("codex", "gemini", "aider")


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


@pytest.fixture(scope="session")
def claude_image(base_image: str) -> str:
    """The claude agent image, built once per session, always: the build is under test too."""
    started = time.monotonic()
    version = build_agent_image(
        "claude", base=base_image, progress=lambda line: print(f"[claude image] {line}")
    )
    print(f"[claude image] Claude Code {version}, built in {time.monotonic() - started:.0f} s")
    return agent_image("claude")


@pytest.fixture(scope="session")
def agent_images(base_image: str) -> dict[str, str]:
    """The other agents' images (claude_image builds Claude Code's): agent name -> image."""
    for agent in OTHER_AGENTS:
        if image_recipe_digest(agent_image(agent)) != recipe_digest():
            started = time.monotonic()
            tag = f"[{agent} image]"
            version = build_agent_image(
                agent, base=base_image, progress=lambda line, tag=tag: print(tag, line)
            )
            print(f"{tag} {agent} {version}, built in {time.monotonic() - started:.0f} s")
    return {agent: agent_image(agent) for agent in OTHER_AGENTS}


@pytest.fixture(scope="session")
def ssh_image(base_image: str) -> str:
    return ensure_ssh_image(base_image)


@pytest.fixture(scope="session")
def rootfs_cache(base_image: str) -> str:
    """The imported rootfs image or its tarball exists (see :func:`rootfs_cache`); its name."""
    rootfs, tarball = image_rootfs_cache()
    if not image_present(rootfs) and not tarball.is_file():
        scratch = "localhost/kapsis-base-cache-test:latest"  # builds the cache on its way
        build_base_image(scratch, progress=lambda line: print(f"[rootfs cache] {line}"))
        subprocess.run(["podman", "rmi", "--force", scratch], capture_output=True, check=False)
    return rootfs


@pytest.fixture(scope="session", autouse=True)
def _images_first(request: pytest.FixtureRequest) -> None:
    """Build the images of :data:`IMAGE_FIXTURES` that this session's tests use, now."""
    used = {name for item in request.session.items for name in item.fixturenames}
    for name in IMAGE_FIXTURES:
        if name in used:
            with contextlib.suppress(Exception, pytest.skip.Exception):
                request.getfixturevalue(name)


@pytest.fixture(scope="session")
def internet(_images_first: None) -> Iterator[Internet]:
    """The session's test internet (internet.py), after the images; skips when it cannot run.

    Shared by every test of the session: call ``internet.reset_logs()`` before the traffic a test
    checks, and restore the name table if a test changes it with ``set_names``."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with start_internet() as running:
        yield running


@pytest.fixture(scope="session")
def podman_v6_network(internet: Internet) -> Iterator[str]:
    """A dual-stack podman network (internet.podman_network); depends on ``internet`` so it is
    removed before the host's forwarding sysctls are restored."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    with podman_network() as name:
        yield name


@pytest.fixture(scope="session")
def user(base_image: str) -> Iterator[RootlessUser]:
    """A throwaway non-root user with rootless podman and the images (rootless_user.py)."""
    reason = rootless_skip_reason()
    if reason:
        pytest.skip(reason)
    with host_settings_for_rootless(), rootless_user([base_image, DEFAULT_GATEWAY_IMAGE]) as made:
        yield made


@pytest.fixture
def kapsis(tmp_path: Path, base_image: str) -> Kapsis:
    """The real ``kapsis`` command, in this test's own KAPSIS_HOME and config dir."""
    home = tmp_path / "kapsis-home"
    return Kapsis(home=home, config_dir=tmp_path / "kapsis-config", image=base_image)


@pytest.fixture(autouse=True)
def _no_mount_outlives_the_test(tmp_path: Path) -> Iterator[None]:
    """After each test, what is still mounted in its tmp dir is unmounted: the workspace disks
    its runs kept (resources.disk: a worktree's, or work that was not committed, stay mounted
    until `kapsis cleanup`), whichever Kapsis home the test used, so that no loop device
    outlives the test and pytest can remove the dir."""
    yield
    for mount_point in _mounts_under(tmp_path):
        subprocess.run(["umount", "--lazy", mount_point], capture_output=True, check=False)


def _mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == str(root) or point.startswith(f"{root}/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)
