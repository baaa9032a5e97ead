"""network.ca_bundle: the CA certificates the sandbox's HTTPS clients trust.

Many users reach the internet through a TLS-inspecting proxy whose CA the host trusts and the
images do not: from the sandbox, HTTPS to an allowed host then fails certificate checks. The
bundle (the host's, or a PEM file) is mounted read-only and the common clients' variables name
it. :func:`extra_host_cas` tells ``kapsis setup --check`` when the host trusts CAs an image
does not.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from kapsis.config.loader import LoadedConfig
from kapsis.errors import ConfigError

CA_TARGET = "/run/kapsis/ca-bundle.crt"
# Where distributions keep the bundle the host trusts (Debian/Ubuntu, Fedora/RHEL, Alpine/Arch).
HOST_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
)
# The variables by which OpenSSL, Node, requests, pip, git and curl find a bundle.
CA_VARIABLES = (
    "SSL_CERT_FILE",
    "NODE_EXTRA_CA_CERTS",
    "REQUESTS_CA_BUNDLE",
    "PIP_CERT",
    "GIT_SSL_CAINFO",
    "CURL_CA_BUNDLE",
)
MAX_BUNDLE = 16 * 1024**2
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----")


def bundle_file(loaded: LoadedConfig) -> Path | None:
    """The PEM file ``network.ca_bundle`` names (checked to hold certificates), or None."""
    setting = loaded.config.network.ca_bundle
    if setting is None:
        return None
    origin = loaded.origin_of(("network", "ca_bundle"))
    if setting == "host":
        found = next((Path(p) for p in HOST_BUNDLES if Path(p).is_file()), None)
        if found is None:
            raise ConfigError(
                f"{origin}: network.ca_bundle: host, but this host has none of "
                f"{', '.join(HOST_BUNDLES)}; name the PEM file instead"
            )
        source = found
    else:
        source = Path(setting).expanduser()
        if not source.is_file():
            raise ConfigError(
                f"{origin}: network.ca_bundle: {setting} is not a file; name a PEM bundle"
            )
    if not certificates(source.read_bytes()[:MAX_BUNDLE]):
        raise ConfigError(f"{origin}: network.ca_bundle: {source} holds no PEM certificate")
    return source.resolve()


def plan_ca_bundle(loaded: LoadedConfig) -> tuple[str | None, dict[str, str]]:
    """The host file to mount read-only at :data:`CA_TARGET` and the variables that name it
    (none when not set)."""
    source = bundle_file(loaded)
    if source is None:
        return None, {}
    return str(source), ca_variables()


def ca_variables() -> dict[str, str]:
    """Each client's variable, naming the bundle at :data:`CA_TARGET`."""
    return {name: CA_TARGET for name in CA_VARIABLES}


def bundle_text(source: Path, limit: int) -> str:
    """The bundle's certificates alone, as PEM text of at most ``limit`` bytes (for a cluster
    run, which carries it in its request); anything else in the file is left out."""
    pem = source.read_bytes()[:MAX_BUNDLE]
    # One line ending for all: a bundle written on Windows ends its lines with CR LF.
    blocks = [match.group(0).decode().replace("\r", "") for match in _PEM.finditer(pem)]
    text = "\n".join(blocks) + "\n"
    if len(text.encode()) > limit:
        raise ConfigError(
            f"network.ca_bundle: the certificates of {source} take {len(text.encode())} bytes, "
            f"more than a cluster request carries ({limit}); name a smaller PEM file with only "
            "the CAs your network needs"
        )
    return text


def certificates(pem: bytes) -> set[bytes]:
    """The DER certificates of a PEM bundle (what two bundles are compared by)."""
    found = set()
    for match in _PEM.finditer(pem):
        try:
            found.add(base64.b64decode(b"".join(match.group(1).split()), validate=True))
        except ValueError:
            continue
    return found


def extra_host_cas(host_pem: bytes, image_pem: bytes) -> list[str]:
    """The subjects of the CAs the host trusts and an image does not."""
    from cryptography import x509

    extra = certificates(host_pem) - certificates(image_pem)
    subjects = []
    for der in sorted(extra):
        try:
            subjects.append(x509.load_der_x509_certificate(der).subject.rfc4514_string())
        except ValueError:
            subjects.append("(a certificate that does not parse)")
    return sorted(subjects)
