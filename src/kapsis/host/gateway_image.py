"""Build the network gateway image: the base image plus nftables and dnsmasq, from the apt mirror.

The image carries no configuration: each filtered sandbox mounts its own rules, resolver
settings and entrypoint (see :mod:`kapsis.network.gateway_files`), so a change of policy never
needs a rebuild.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import subprocess
import tempfile
from pathlib import Path

from kapsis import paths
from kapsis.config.models import DEFAULT_IMAGE
from kapsis.errors import SandboxError
from kapsis.host.image import Progress, _image_id, _last_line, _require, kapsis_version
from kapsis.sandbox.network_plan import DEFAULT_GATEWAY_IMAGE


def build_gateway_image(
    name: str = DEFAULT_GATEWAY_IMAGE,
    *,
    base: str = DEFAULT_IMAGE,
    progress: Progress | None = None,
) -> None:
    say: Progress = progress or (lambda _line: None)
    podman = _require("podman", "install podman (`apt-get install podman`, or scripts/install.sh)")
    containerfile = (
        importlib.resources.files("kapsis.host").joinpath("Containerfile.gateway").read_text()
    )
    version = kapsis_version()
    previous = _image_id(podman, name)
    say(f"building {name} from {base} (kapsis {version}; apt packages dnsmasq-base, nftables)")
    log = paths.kapsis_home() / "cache" / "podman-build-gateway.log"
    with tempfile.TemporaryDirectory(prefix="kapsis-build-") as context:
        (Path(context) / "Containerfile").write_text(containerfile)
        result = subprocess.run(
            [
                podman,
                "build",
                "--pull=never",
                "--build-arg",
                f"BASE={base}",
                "--build-arg",
                f"KAPSIS_VERSION={version}",
                "-t",
                name,
                "-f",
                str(Path(context) / "Containerfile"),
                context,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        output = result.stderr + result.stdout
        with contextlib.suppress(OSError):
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(output)
        raise SandboxError(
            f"podman build of {name} failed: {_last_line(output)} (full output in {log}); "
            "the build installs dnsmasq-base and nftables from the Debian mirror, so it needs "
            "the mirror to be reachable"
        )
    current = _image_id(podman, name)
    if previous and previous != current:
        subprocess.run([podman, "rmi", previous], capture_output=True, check=False)
    say(f"built {name}")
