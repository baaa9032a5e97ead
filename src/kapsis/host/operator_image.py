"""Build the operator image (``localhost/kapsis-operator:latest``), and tag images for a registry.

The operator image is the base image plus kapsis and its Python dependencies (kopf and the
kubernetes client included); it runs the operator and, as the Pods' tools image, the clone and
finishing steps. The build has no network: the packages are copied on the host from this very
installation - the ``kapsis`` package being run, and the installed distributions it requires
(the ``k8s`` extra included) - into a directory that ``podman build -v`` shows the recipe. Host
and base image are both Debian 12 with Python 3.11, so the same files serve both.

``kapsis setup --build --registry REG`` tags each Kapsis image as ``REG/NAME:TAG`` and prints the
``podman push`` commands; Kapsis never pushes.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from kapsis import paths
from kapsis.config.models import DEFAULT_IMAGE
from kapsis.errors import ConfigError, ImageError
from kapsis.host.image import (
    Progress,
    image_id,
    image_present,
    kapsis_version,
    podman_build,
    remove_replaced,
    require_podman,
)
from kapsis.k8s.settings import DEFAULT_TOOLS_IMAGE

DEFAULT_OPERATOR_IMAGE = DEFAULT_TOOLS_IMAGE  # what the operator runs its steps in
SITE_TARGET = "/kapsis-site"  # where the recipe sees the prepared packages
EXTRAS = ("k8s",)
_REGISTRY_RE = re.compile(r"^[A-Za-z0-9.-]+(:\d+)?(/[a-z0-9._/-]+)?$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(distribution: importlib.metadata.Distribution, extras: Iterable[str]) -> set[str]:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it; every venv with pip has one or the other
        from pip._vendor.packaging.requirements import (  # type: ignore[assignment]
            Requirement,
        )

    names: set[str] = set()
    for line in distribution.requires or []:
        requirement = Requirement(line)
        marker = requirement.marker
        wanted = marker is None or any(marker.evaluate({"extra": extra}) for extra in (*extras, ""))
        if wanted:
            names.add(_canonical(requirement.name))
    return names


def dependency_closure(root: str = "kapsis", extras: Iterable[str] = EXTRAS) -> list[str]:
    """The installed distributions ``root`` needs (with ``extras``), by canonical name."""
    installed = {_canonical(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    todo = sorted(_requirements(installed[_canonical(root)], extras))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in installed:
            raise ImageError(
                f"{name} (needed by {root}) is not installed here; install kapsis[k8s] "
                "(`pip install -e .[k8s]`) before building the operator image"
            )
        seen.add(name)
        todo += sorted(_requirements(installed[name], ()) - seen)
    return sorted(seen)


def prepare_site(destination: Path, root: str = "kapsis") -> list[str]:
    """Copy kapsis and its dependency closure into ``destination``; return what was copied."""
    import kapsis

    installed = {_canonical(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    copied = []
    for name in dependency_closure(root):
        distribution = installed[name]
        for file in distribution.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # console scripts outside site-packages; bytecode is rebuilt
            source = Path(str(distribution.locate_file(file)))
            if source.is_file():
                target = destination / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        copied.append(f"{name}=={distribution.version}")
    # kapsis itself: the package being run (an editable install has no files to copy).
    package = Path(kapsis.__file__).parent
    shutil.copytree(
        package,
        destination / "kapsis",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        dirs_exist_ok=True,
    )
    info = destination / f"kapsis-{kapsis_version()}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: kapsis\nVersion: {kapsis_version()}\n"
    )
    return [f"kapsis=={kapsis_version()}", *copied]


def build_operator_image(
    name: str = DEFAULT_OPERATOR_IMAGE,
    *,
    base: str = DEFAULT_IMAGE,
    progress: Progress | None = None,
) -> None:
    say: Progress = progress or (lambda _line: None)
    podman = require_podman()
    if sys.version_info[:2] != (3, 11):
        raise ImageError(
            "the operator image reuses this Python's packages and the base image has Python "
            f"3.11; run `kapsis setup --operator` with Python 3.11, not {sys.version.split()[0]}"
        )
    previous = image_id(podman, name)
    with tempfile.TemporaryDirectory(prefix="kapsis-operator-site-") as site:
        packages = prepare_site(Path(site))
        say(f"packaged {len(packages)} distributions for the operator image")
        podman_build(
            podman,
            name,
            recipe="Containerfile.operator",
            base=base,
            log=paths.kapsis_home() / "cache" / "podman-build-operator.log",
            say=say,
            volumes=[f"{site}:{SITE_TARGET}:ro"],
        )
    remove_replaced(podman, previous, name)
    say(f"built {name}")


def registry_name(image: str, registry: str) -> str:
    """``localhost/kapsis-operator:latest`` -> ``REG/kapsis-operator:latest``."""
    if not _REGISTRY_RE.match(registry.rstrip("/")):
        raise ConfigError(f"--registry {registry!r}: give a registry host[:port][/path]")
    short = image.split("/", 1)[1] if image.startswith("localhost/") else image.rsplit("/", 1)[-1]
    return f"{registry.rstrip('/')}/{short}"


def tag_for_registry(images: Iterable[str], registry: str, progress: Progress) -> list[str]:
    """Tag each present image for ``registry``; return the ``podman push`` commands to run."""
    podman = require_podman()
    commands = []
    for image in images:
        if not image_present(image):
            continue
        tagged = registry_name(image, registry)
        result = subprocess.run(
            [podman, "tag", image, tagged], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ImageError(f"podman tag {image} {tagged} failed: {result.stderr.strip()}")
        progress(f"tagged {image} as {tagged}")
        commands.append(f"podman push {tagged}")
    return commands
