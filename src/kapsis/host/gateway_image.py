"""Build the network gateway image: the base image plus nftables and dnsmasq, from the apt mirror.

The image carries no configuration: each filtered sandbox mounts its own rules, resolver
settings and entrypoint (see :mod:`kapsis.network.gateway_files`), so a change of policy never
needs a rebuild.
"""

from __future__ import annotations

from kapsis import paths
from kapsis.config.models import DEFAULT_IMAGE
from kapsis.host.image import Progress, image_id, podman_build, remove_replaced, require_podman
from kapsis.sandbox.network_plan import DEFAULT_GATEWAY_IMAGE


def build_gateway_image(
    name: str = DEFAULT_GATEWAY_IMAGE,
    *,
    base: str = DEFAULT_IMAGE,
    progress: Progress | None = None,
) -> None:
    say: Progress = progress or (lambda _line: None)
    podman = require_podman()
    previous = image_id(podman, name)
    podman_build(
        podman,
        name,
        recipe="Containerfile.gateway",
        base=base,
        log=paths.kapsis_home() / "cache" / "podman-build-gateway.log",
        say=say,
        network=True,  # apt-get install dnsmasq-base nftables
        fix="the build installs dnsmasq-base and nftables from the Debian mirror, so it needs "
        "the mirror to be reachable",
    )
    remove_replaced(podman, previous, name)
    say(f"built {name}")
