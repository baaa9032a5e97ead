"""SSH host keys as data: parsing known_hosts lines and public keys, fingerprints, host fields.

A :class:`HostKey` is one trusted (host, key) pair with the place it came from. Keys are checked
when they are read, not when ssh meets them: the type must be one OpenSSH accepts for host keys
(DSA is refused; OpenSSH 9 disables it) and the base64 blob must decode and name the same type,
so a pasted key that was cut short is an error here, with its line, instead of a connection that
fails later for no clear reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import struct

from kapsis.config.models import is_ip_address
from kapsis.sandbox.plan_model import PlanModel

KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
DEFAULT_PORT = 22
_NAME_RE = re.compile(
    r"^([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
)


class HostKey(PlanModel):
    """One key ssh accepts for one host; ``host`` is a known_hosts host field."""

    host: str
    key_type: str
    key: str
    source: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def line(self) -> str:
        return f"{self.host} {self.key_type} {self.key}"


def fingerprint(key: str) -> str:
    """The SHA256 fingerprint of a base64 key blob, as ``ssh-keygen -l`` prints it."""
    digest = hashlib.sha256(base64.b64decode(key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def parse_public_key(text: str) -> tuple[str, str]:
    """``TYPE BASE64 [comment]`` -> (type, base64). Raises ValueError saying what is wrong."""
    fields = text.split()
    if len(fields) < 2:
        raise ValueError(
            f"{text.strip()!r} is not a public key; write 'TYPE BASE64', e.g. "
            "'ssh-ed25519 AAAAC3...'"
        )
    key_type, blob = fields[0], fields[1]
    check_key(key_type, blob)
    return key_type, blob


def check_key(key_type: str, blob: str) -> None:
    if key_type == "ssh-dss":
        raise ValueError("DSA (ssh-dss) host keys are refused: OpenSSH no longer accepts them")
    if key_type not in KEY_TYPES:
        raise ValueError(
            f"{key_type!r} is not an SSH host key type; use one of " + ", ".join(KEY_TYPES)
        )
    try:
        raw = base64.b64decode(blob, validate=True)
        (length,) = struct.unpack(">I", raw[:4])
        named = raw[4 : 4 + length].decode("ascii")
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise ValueError(f"the {key_type} key is not valid base64 key data (cut short?)") from None
    if named != key_type or len(raw) < 4 + length + 16:
        raise ValueError(
            f"the key data is not a {key_type} key (it says {named!r} or is too short)"
        )


def host_field(host: str, port: int = DEFAULT_PORT) -> str:
    """How known_hosts names ``host`` on ``port``: ``host`` for 22, else ``[host]:port``."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


def parse_host(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[HOST]:PORT`` (IPv6) or a known_hosts field -> (host, port).

    Host names are lower-cased; an IPv6 address needs brackets when a port is given. Raises
    ValueError for anything ssh would not read as one host (wildcards, options, user@).
    """
    value = text.strip()
    host, port_text = value, ""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: write [HOST]:PORT")
        port_text = rest[1:]
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    port = DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: the port must be a number between 1 and 65535")
        port = int(port_text)
    if is_ip_address(host):
        return str(ipaddress.ip_address(host)), port
    if not _NAME_RE.match(host):
        raise ValueError(
            f"{text!r} is not a host; use NAME, NAME:PORT, an address or [ADDRESS]:PORT"
        )
    return host.lower(), port


def parse_known_hosts_line(line: str, source: str) -> list[HostKey]:
    """One known_hosts line (``HOST[,HOST...] TYPE BASE64 [comment]``) -> its keys.

    Markers (@cert-authority, @revoked), hashed host names and patterns are refused: every entry
    must name its hosts, so that ``kapsis ssh list`` can show what is trusted.
    """
    fields = line.split()
    if len(fields) < 3:
        raise ValueError("a known_hosts line is 'HOST[,HOST...] TYPE BASE64'")
    hosts, key_type, blob = fields[0], fields[1], fields[2]
    if hosts.startswith("@"):
        raise ValueError(f"{hosts} lines are not supported; list the hosts' own keys")
    if hosts.startswith("|"):
        raise ValueError("hashed host names are not supported; write the host name")
    check_key(key_type, blob)
    keys = []
    for entry in hosts.split(","):
        if any(char in entry for char in "*?!"):
            raise ValueError(f"{entry!r}: host patterns are not supported; name each host")
        host, port = parse_host(entry)
        keys.append(
            HostKey(host=host_field(host, port), key_type=key_type, key=blob, source=source)
        )
    return keys


def parse_known_hosts(text: str, source: str) -> list[HostKey]:
    """Every key of a known_hosts text; comments and blank lines are skipped."""
    keys: list[HostKey] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            keys += parse_known_hosts_line(line, source)
        except ValueError as error:
            raise ValueError(f"line {number}: {error}") from None
    return keys
