"""The base image, observed with real podman: the agent user, the tools, the labels."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from kapsis.host import image

pytestmark = pytest.mark.integration


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run_in(image_name: str, *command: str, user: str | None = None) -> str:
    user_args = ["--user", user] if user else []
    result = podman("run", "--rm", "--network=none", *user_args, image_name, *command)
    assert result.returncode == 0, result.stderr
    return result.stdout


def inspect(image_name: str) -> dict[str, object]:
    result = podman("image", "inspect", image_name)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)[0]
    assert isinstance(data, dict)
    return data


def test_agent_user_is_uid_1000(base_image: str) -> None:
    assert run_in(base_image, "id", "agent").strip() == (
        "uid=1000(agent) gid=1000(agent) groups=1000(agent)"
    )
    passwd = run_in(base_image, "getent", "passwd", "agent").strip()
    assert passwd == "agent:x:1000:1000::/home/agent:/bin/bash"


def test_runs_as_the_agent_with_its_home_when_kapsis_passes_user(base_image: str) -> None:
    output = run_in(
        base_image,
        "sh",
        "-c",
        'id -u; echo "$HOME"; test -w "$HOME" && echo writable',
        user="1000:1000",
    )
    assert output.split() == ["1000", "/home/agent", "writable"]


def test_git_python_and_bash_are_present(base_image: str) -> None:
    output = run_in(base_image, "sh", "-c", "git --version && python3 --version && bash --version")
    assert output.startswith("git version 2.")
    assert "Python 3." in output
    assert "GNU bash" in output


def test_git_works_in_a_workspace_owned_by_someone_else(base_image: str) -> None:
    script = (
        "mkdir /tmp/w && cd /tmp/w && git init -q && chown -R 0:0 /tmp/w && "
        "su agent -s /bin/sh -c 'git -C /tmp/w status --short && echo ok'"
    )
    assert run_in(base_image, "sh", "-c", script).strip().endswith("ok")


def test_labels_and_no_user(base_image: str) -> None:
    data = inspect(base_image)
    config = data["Config"]
    assert isinstance(config, dict)
    labels = config.get("Labels") or {}
    assert labels["io.kapsis.image"] == "base"
    assert labels["io.kapsis.version"] == image.kapsis_version()
    assert not config.get("User"), "Kapsis passes --user; the image must not pick one"


def test_image_present(base_image: str) -> None:
    assert image.image_present(base_image)
    assert not image.image_present("localhost/kapsis-no-such-image:never")


def test_rebuild_from_the_cache_skips_debootstrap(rootfs_cache: str) -> None:
    """A second build reuses the imported rootfs (or the cached tarball) and takes seconds.

    Built under its own tag, so the image the other tests use is never replaced mid-session.
    """
    name = "localhost/kapsis-base-rebuild-test:latest"
    lines: list[str] = []
    started = time.monotonic()
    try:
        image.build_base_image(name, progress=lines.append)
        elapsed = time.monotonic() - started
        assert not any(line.startswith("debootstrap") for line in lines), lines
        assert elapsed < 30, f"cached rebuild took {elapsed:.0f} s"
        assert run_in(name, "id", "-u", "agent").strip() == "1000"
    finally:
        podman("rmi", "--force", name)
