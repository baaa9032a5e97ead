"""Build the Kapsis base image on the host, without any container registry.

``kapsis setup --build`` calls :func:`build_base_image`, which

1. makes a Debian minbase root filesystem with ``debootstrap`` from the host's own apt mirror and
   keeps it as a tarball under ``$KAPSIS_HOME/cache/`` (so a rebuild skips the ~45 s step),
2. ``podman import``\\ s that tarball as ``localhost/kapsis-rootfs:<key>``, and
3. ``podman build``\\ s the packaged ``Containerfile`` on top of it, which adds the ``agent`` user
   (uid/gid 1000) and the ``io.kapsis.*`` labels.

As root it builds into rootful podman's storage; as another user, debootstrap runs inside that
user's podman user namespace (``podman unshare``) and the image lands in their rootless storage.
Failures raise :class:`~kapsis.errors.HostUnsupportedError` (a tool is missing) or
:class:`~kapsis.errors.SandboxError` (a step failed), each with a one-line message saying how to
fix it; the full output of a failed step is kept next to the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.resources
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from kapsis import paths
from kapsis.config.models import DEFAULT_IMAGE
from kapsis.errors import HostUnsupportedError, SandboxError

Progress = Callable[[str], None]

SUITE = "bookworm"
VARIANT = "minbase"
# openssh-client: git over SSH in the sandbox (checked strictly, see kapsis.ssh).
INCLUDE = ("git", "bash", "coreutils", "python3", "ca-certificates", "openssh-client")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ROOTFS_REPOSITORY = "localhost/kapsis-rootfs"
SOURCES_LIST = Path("/etc/apt/sources.list")
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
MIRROR_ENV = "KAPSIS_DEBIAN_MIRROR"
# Searched after $PATH: a non-root user's PATH often lacks them, and debootstrap lives there.
_SBIN_DIRS = ("/usr/sbin", "/sbin")

# Left out of the rootfs tarball: the runtime provides /dev, /proc and /sys; apt's package lists
# and caches (~55 MB, stale anyway: derived images run apt-get update) and message catalogues
# (~40 MB) are dead weight in a sandbox.
_TAR_EXCLUDES = (
    "./dev/*",
    "./proc/*",
    "./sys/*",
    "./var/lib/apt/lists/*",
    "./var/cache/apt/*.bin",
    "./var/cache/apt/archives/*.deb",
    "./usr/share/locale/*",
)

# Known failures of `podman build` on these hosts, and the fix for each.
_BUILD_HINTS = (
    (
        "RLIMIT_NOFILE",
        'add [containers] default_ulimits = ["nofile=H:H"] (H = `ulimit -Hn`) to '
        "/etc/containers/containers.conf.d/kapsis.conf; scripts/install.sh does it",
    ),
    (
        "cgroups in hybrid mode",
        "mount the hugetlb cgroup: mkdir -p /sys/fs/cgroup/hugetlb && "
        "mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb",
    ),
)


def build_base_image(name: str = DEFAULT_IMAGE, *, progress: Progress | None = None) -> None:
    """Build the base image ``name`` from scratch (debootstrap + import + build)."""
    say: Progress = progress or (lambda _line: None)
    podman = require_podman()
    rootfs_image, tarball = rootfs_cache()
    cache = tarball.parent
    cache.mkdir(parents=True, exist_ok=True)

    with _locked(cache / ".build.lock"):
        if not image_present(rootfs_image):
            if tarball.is_file():
                say(f"using cached root filesystem {tarball}")
            else:
                _debootstrap_tarball(podman, tarball, say)
            say(f"importing the root filesystem as {rootfs_image}")
            _run(
                [podman, "import", str(tarball), rootfs_image],
                "podman import",
                f"check that {tarball} is a valid tar (delete it to redo debootstrap)",
            )
        else:
            say(f"using the imported root filesystem {rootfs_image}")
        previous = image_id(podman, name)
        podman_build(
            podman,
            name,
            recipe="Containerfile",
            base=rootfs_image,
            log=cache / "podman-build.log",
            say=say,
        )
        replaced = previous if previous and previous != image_id(podman, name) else None
        _remove_leftovers(podman, replaced, rootfs_image)
    say(f"built {name}")


def image_present(name: str) -> bool:
    """Whether podman has an image called ``name`` (False when podman itself is missing)."""
    podman = shutil.which("podman")
    if podman is None:
        return False
    try:
        result = subprocess.run(
            [podman, "image", "exists", name], capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def kapsis_version() -> str:
    try:
        return importlib.metadata.version("kapsis")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def rootfs_cache() -> tuple[str, Path]:
    """Where a base image build finds the debootstrap result: the imported rootfs image, else
    the tarball in the cache directory (either may be absent; the build makes what is missing)."""
    key = rootfs_key()
    return (
        f"{ROOTFS_REPOSITORY}:{SUITE}-{key}",
        paths.kapsis_home() / "cache" / f"rootfs-{SUITE}-{key}.tar",
    )


def rootfs_key() -> str:
    """Names the cached rootfs: it changes when what debootstrap would produce changes."""
    recipe = "|".join(
        [SUITE, VARIANT, ",".join(INCLUDE), ",".join(_TAR_EXCLUDES), platform.machine()]
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


# --- apt mirror -------------------------------------------------------------------------------


def debian_mirror(sources_list: Path = SOURCES_LIST, deb822_sources: Path = DEBIAN_SOURCES) -> str:
    """The Debian mirror to debootstrap from: $KAPSIS_DEBIAN_MIRROR, else the host's, else the
    default one."""
    explicit = os.environ.get(MIRROR_ENV)
    if explicit:
        return explicit
    entries: list[tuple[str, list[str]]] = []
    with contextlib.suppress(OSError):
        entries += parse_one_line_sources(sources_list.read_text())
    with contextlib.suppress(OSError):
        entries += parse_deb822_sources(deb822_sources.read_text())
    return pick_mirror(entries)


def parse_one_line_sources(text: str) -> list[tuple[str, list[str]]]:
    """``deb [options] URI SUITE COMPONENTS...`` lines as (uri, [suite])."""
    entries: list[tuple[str, list[str]]] = []
    for raw in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", " ", raw.split("#", 1)[0]).split()
        if len(line) >= 3 and line[0] == "deb":
            entries.append((line[1], [line[2]]))
    return entries


def parse_deb822_sources(text: str) -> list[tuple[str, list[str]]]:
    """Stanzas of a ``.sources`` file as (uri, suites), one entry per URI."""
    entries: list[tuple[str, list[str]]] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        current = ""
        for line in stanza.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and current:
                fields[current] += " " + line.strip()
            elif ":" in line:
                current, value = line.split(":", 1)
                current = current.strip().lower()
                fields[current] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        suites = fields.get("suites", "").split()
        entries += [(uri, suites) for uri in fields.get("uris", "").split()]
    return entries


def pick_mirror(entries: Sequence[tuple[str, list[str]]]) -> str:
    """Prefer a mirror that carries SUITE itself, then any plain Debian mirror, then the default.

    Security mirrors and schemes debootstrap cannot use are skipped, and so is any non-Debian
    mirror (an Ubuntu host's archive has no bookworm).
    """
    usable = [
        (uri.rstrip("/"), suites)
        for uri, suites in entries
        if uri.startswith(("http://", "https://", "file:/")) and "security" not in uri
    ]
    for uri, suites in usable:
        if SUITE in suites:
            return uri
    for uri, _suites in usable:
        if uri.endswith("/debian"):
            return uri
    return DEFAULT_MIRROR


# --- steps ------------------------------------------------------------------------------------


def _debootstrap_tarball(podman: str, tarball: Path, say: Progress) -> None:
    """debootstrap into a work dir and pack it as ``tarball``.

    As root this runs directly. Rootless, it runs as root of the user's own podman user namespace
    (``podman unshare``), where files get the owners the image needs; ``container=lxc`` makes
    debootstrap bind-mount /dev nodes it may not mknod there.
    """
    debootstrap = require_program(
        "debootstrap", "install it with `apt-get install debootstrap` (or run scripts/install.sh)"
    )
    rootless = os.geteuid() != 0
    inside: list[str] = [podman, "unshare"] if rootless else []
    mirror = debian_mirror()
    workdir = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=tarball.parent))
    target = workdir / "rootfs"
    partial = tarball.with_suffix(".tar.partial")
    try:
        say(f"debootstrap {VARIANT} {SUITE} from {mirror} (about 45 s)")
        started = time.monotonic()
        _run(
            [
                *inside,
                *(["env", "container=lxc"] if rootless else []),
                debootstrap,
                f"--variant={VARIANT}",
                f"--include={','.join(INCLUDE)}",
                SUITE,
                str(target),
                mirror,
            ],
            "debootstrap",
            f"check that {mirror} is reachable, or set {MIRROR_ENV} to a Debian mirror",
            env={**os.environ, "PATH": _with_sbin(os.environ.get("PATH", ""))},
            log=tarball.parent / "debootstrap.log",
        )
        say(f"debootstrap done in {time.monotonic() - started:.0f} s; packing {tarball.name}")
        excludes = [f"--exclude={pattern}" for pattern in _TAR_EXCLUDES]
        _run(
            [
                *inside,
                "tar",
                "--numeric-owner",
                *excludes,
                "-C",
                str(target),
                "-cf",
                str(partial),
                ".",
            ],
            "tar of the root filesystem",
            f"check free space under {tarball.parent}",
        )
        partial.replace(tarball)
        for stale in tarball.parent.glob("rootfs-*.tar"):
            if stale != tarball:
                stale.unlink(missing_ok=True)
    finally:
        partial.unlink(missing_ok=True)
        if rootless:  # its files belong to subordinate ids only the namespace's root can delete
            subprocess.run(
                [*inside, "rm", "-rf", "--one-file-system", str(workdir)],
                capture_output=True,
                check=False,
            )
        else:
            _remove_tree(workdir)


def podman_build(
    podman: str,
    name: str,
    *,
    recipe: str,
    base: str,
    log: Path,
    say: Progress,
    network: bool = False,
    fix: str | None = None,
    target: str | None = None,
    files: Sequence[str] = (),
    volumes: Sequence[str] = (),
    build_args: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    fresh: bool = False,
) -> None:
    """Build ``name`` from the Containerfile ``recipe`` shipped in this package, on ``base``.

    Without ``network`` the build has none (the base image needs nothing from outside).
    ``target`` picks a stage of a multi-stage recipe, ``files`` are other files of this package
    put in the build context, ``volumes`` are ``podman build -v`` mounts (seen by RUN steps
    only), ``labels`` are set on the result. ``fresh`` takes nothing from the layer cache and
    keeps no intermediate image, so a rebuild fetches afresh what a RUN step downloads. On
    failure the whole output goes to ``log`` and the error names its last line and a fix.
    """
    package = importlib.resources.files("kapsis.host")
    version = kapsis_version()
    say(f"building {name} from {base} (kapsis {version})")
    args = [podman, "build", "--pull=never"]
    args += ["--layers=false", "--no-cache"] if fresh else []
    args += [] if network else ["--network=none"]
    args += [f"--target={target}"] if target else []
    for volume in volumes:
        args += ["-v", volume]
    arguments = {"BASE": base, "KAPSIS_VERSION": version, **(build_args or {})}
    for key, value in arguments.items():
        args += ["--build-arg", f"{key}={value}"]
    for key, value in (labels or {}).items():
        args += ["--label", f"{key}={value}"]
    with tempfile.TemporaryDirectory(prefix="kapsis-build-") as context:
        for file in (recipe, *files):
            (Path(context) / file).write_text(package.joinpath(file).read_text())
            (Path(context) / file).chmod(0o644)  # COPY keeps the mode: no umask surprises
        args += ["-t", name, "-f", str(Path(context) / recipe), context]
        result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = result.stderr + result.stdout
        with contextlib.suppress(OSError):
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(output)
        hint = fix or next((hint for needle, hint in _BUILD_HINTS if needle in output), None)
        raise SandboxError(
            f"podman build of {name} failed: {_last_line(output)} (full output in {log}); "
            + (hint or "fix the error above and run `kapsis setup --build` again")
        )


def image_id(podman: str, name: str) -> str | None:
    result = subprocess.run(
        [podman, "image", "inspect", "--format", "{{.Id}}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _remove_leftovers(podman: str, replaced: str | None, rootfs_image: str) -> None:
    """Best effort: drop the image the new build replaced, and rootfs images of older recipes.
    podman refuses while a container or a child image uses one, and that refusal is fine."""
    stale = [replaced] if replaced else []
    listing = subprocess.run(
        [podman, "images", "--format", "{{.Repository}}:{{.Tag}}", ROOTFS_REPOSITORY],
        capture_output=True,
        text=True,
        check=False,
    )
    stale += [tag for tag in listing.stdout.split() if tag != rootfs_image]
    for image in stale:
        subprocess.run([podman, "rmi", image], capture_output=True, check=False)


# --- helpers ----------------------------------------------------------------------------------


def require_podman() -> str:
    return require_program(
        "podman", "install podman (`apt-get install podman`, or scripts/install.sh)"
    )


def remove_replaced(podman: str, previous: str | None, name: str) -> None:
    """Remove the image ``name`` was before a rebuild, once the rebuild has moved the name."""
    if previous and previous != image_id(podman, name):
        subprocess.run([podman, "rmi", previous], capture_output=True, check=False)


def require_program(program: str, fix: str) -> str:
    found = shutil.which(program) or next(
        (str(p) for d in _SBIN_DIRS if (p := Path(d) / program).is_file()), None
    )
    if found is None:
        raise HostUnsupportedError(f"{program} is not installed; {fix}")
    return found


def _run(
    args: list[str],
    what: str,
    fix: str,
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> None:
    """Run a build step; on failure keep its whole output in ``log`` and raise one line."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
    except OSError as error:
        raise SandboxError(f"{what} could not start ({error}); {fix}") from None
    if result.returncode != 0:
        output = result.stderr + result.stdout
        where = ""
        if log is not None:
            with contextlib.suppress(OSError):
                log.write_text(output)
                where = f" (full output in {log})"
        raise SandboxError(
            f"{what} failed (exit {result.returncode}): {_last_line(output)}{where}; {fix}"
        )


def _with_sbin(path: str) -> str:
    """debootstrap calls chroot, which lives in /usr/sbin: often not on a user's PATH."""
    parts = [part for part in path.split(os.pathsep) if part]
    return os.pathsep.join(parts + [d for d in _SBIN_DIRS if d not in parts])


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise builds: two `kapsis setup --build` at once would race on the cache."""
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _remove_tree(directory: Path) -> None:
    """Delete a debootstrap work dir, first lazily unmounting anything a failed run left in it
    (deleting through a mounted /proc or /sys must never happen)."""
    prefix = str(directory) + "/"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        mounts = []
    points = [_unescape(line.split()[1]) for line in mounts if len(line.split()) > 1]
    inside = sorted((p for p in points if p.startswith(prefix)), reverse=True)
    for point in inside:
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    if inside and _mounted_under(prefix):
        return  # leave it rather than delete through a mount
    shutil.rmtree(directory, ignore_errors=True)


def _mounted_under(prefix: str) -> bool:
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return True
    return any(
        _unescape(line.split()[1]).startswith(prefix) for line in mounts if len(line.split()) > 1
    )


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
