"""Helpers for the gateway's unit tests: policies, the real tools, DNS on loopback, namespaces.

The tools (nft, dnsmasq, dnsdist, haproxy) are the ones the gateway image ships; a test that needs
one it cannot find skips. Everything sent here goes to 127.0.0.0/8 or into a throwaway network
namespace made for the test.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

from kapsis.network.gateway_layout import RESOLVER_PORT
from kapsis.network.policy import DnsLimits, NetworkPolicy, PolicyBuilder
from kapsis.network.resolver import dns_front_config, dnsmasq_config

UPSTREAMS = ("192.0.2.53", "2001:db8::53")
NOERROR, NXDOMAIN, REFUSED = 0, 3, 5
A, NULL, MX, TXT, AAAA = 1, 10, 15, 16, 28


def tool(name: str) -> str | None:
    """A program of the gateway image, or None (``/usr/sbin`` is not on every PATH)."""
    found = shutil.which(name)
    if found is None and Path(f"/usr/sbin/{name}").exists():
        found = f"/usr/sbin/{name}"
    return found


NFT = tool("nft")
DNSMASQ = tool("dnsmasq")
DNSDIST = tool("dnsdist")
HAPROXY = tool("haproxy")
# The system's Python: what the gateway's scripts run on, and one any uid can execute.
SYSTEM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else None


def make_policy(
    hosts: Iterable[str] = (),
    addresses: Iterable[str] = (),
    upstreams: Iterable[str] = UPSTREAMS,
    dns: DnsLimits | None = None,
) -> NetworkPolicy:
    builder = PolicyBuilder("filtered")
    builder.add_hosts(hosts, "test")
    for address in addresses:
        builder.add_address(address, "test")
    return builder.build(upstreams, dns)


REPRESENTATIVE_HOSTS = (
    "github.com",
    "github.com:22",
    "*.github.com",
    "pypi.org",
    "registry.example:8443",
)
REPRESENTATIVE = make_policy(
    hosts=REPRESENTATIVE_HOSTS,
    addresses=("10.0.0.0/8", "[2001:db8::1]:8443", "192.0.2.10:5432"),
)


def chain(ruleset: str, name: str) -> list[str]:
    """The rules of one chain of a rendered ruleset, stripped."""
    lines = ruleset.splitlines()
    start = lines.index(f"  chain {name} {{")
    end = lines.index("  }", start)
    return [line.strip() for line in lines[start + 1 : end]]


def nft_check(ruleset: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``nft -c -f``: the kernel's own parser and set checks, without loading anything."""
    if NFT is None:
        pytest.skip("nft is not installed")
    path = tmp_path / "rules.nft"
    path.write_text(ruleset)
    result = subprocess.run(
        [NFT, "-c", "-f", str(path)], capture_output=True, text=True, check=False, timeout=10
    )
    if result.returncode != 0 and (
        "Operation not permitted" in result.stderr or "Permission denied" in result.stderr
    ):
        pytest.skip(f"nft -c needs privileges here: {result.stderr.strip()}")
    return result


def dns_packet(
    name: str | Sequence[bytes], qtype: int = A, options: Sequence[tuple[int, bytes]] | None = None
) -> tuple[int, bytes]:
    """(id, query): ``name`` as text or as raw labels; ``options``: EDNS options (code, data)."""
    ident = random.randrange(65536)
    labels = [part.encode() for part in name.split(".")] if isinstance(name, str) else name
    question = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    packet = struct.pack(">HHHHHH", ident, 0x0100, 1, 0, 0, 0 if options is None else 1)
    packet += question + struct.pack(">HH", qtype, 1)
    if options is not None:
        data = b"".join(struct.pack(">HH", code, len(value)) + value for code, value in options)
        packet += b"\0" + struct.pack(">HHIH", 41, 1232, 0, len(data)) + data
    return ident, packet


def dns_query(
    port: int,
    name: str | Sequence[bytes],
    qtype: int = A,
    timeout: float = 1.0,
    server: str = "127.0.0.1",
    options: Sequence[tuple[int, bytes]] | None = None,
) -> tuple[int, list[str]]:
    """(response code, A/AAAA answers) of one UDP query to ``server``:``port``."""
    ident, packet = dns_packet(name, qtype, options)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, port))
        while True:
            reply = sock.recv(4096)
            if len(reply) >= 12 and struct.unpack(">H", reply[:2])[0] == ident:
                break

    def skip_name(offset: int) -> int:
        while reply[offset] != 0:
            if reply[offset] & 0xC0 == 0xC0:  # a compression pointer ends the name
                return offset + 2
            offset += 1 + reply[offset]
        return offset + 1

    questions, answers = struct.unpack(">HH", reply[4:8])
    offset = 12
    for _ in range(questions):
        offset = skip_name(offset) + 4
    found = []
    for _ in range(answers):
        offset = skip_name(offset)
        rtype, _class, _ttl, length = struct.unpack(">HHIH", reply[offset : offset + 10])
        data = reply[offset + 10 : offset + 10 + length]
        offset += 10 + length
        if rtype in (A, AAAA):
            family = socket.AF_INET if rtype == A else socket.AF_INET6
            found.append(socket.inet_ntop(family, data))
    return reply[3] & 0x0F, found


def free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (dnsmasq binds both)."""
    for _ in range(50):
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        ):
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port on 127.0.0.1")


def needs_root_and(*tools: str | None) -> None:
    """Skip unless running as root with ``ip``, the system's Python and every tool given."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    if None in (*tools, shutil.which("ip"), shutil.which("setpriv"), SYSTEM_PYTHON):
        pytest.skip("a tool of the gateway image is not installed")


# The DNS helpers above, for scripts that run in a namespace on the system's Python.
DNS_SOURCE = "\n".join(
    [
        "from __future__ import annotations",
        "import random, socket, struct",
        "from collections.abc import Sequence",
        f"A, AAAA = {A}, {AAAA}",
        inspect.getsource(dns_packet),
        inspect.getsource(dns_query),
    ]
)


class NetNs:
    """A throwaway network namespace (loopback up, nothing else unless a test adds it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen[bytes]] = []

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)

    def run(self, args: Sequence[str]) -> str:
        """``args`` run inside the namespace as root; their output."""
        return subprocess.run(self.command(args), check=True, capture_output=True, text=True).stdout

    def command(self, args: Sequence[str], uid: int | None = None) -> list[str]:
        """``args`` run inside the namespace, as ``uid`` (group nogroup) when given."""
        prefix = ["ip", "netns", "exec", self.name]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", "--regid=65534", "--clear-groups"]
        return [*prefix, *args]

    def start(self, args: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(self.command(args), **popen)
        self.processes.append(process)
        return process

    def serve(self, script: str, *args: str) -> list[dict[str, Any]]:
        """Start a stdlib-only server script as root; it prints {"ready": true}, then one JSON
        object per event, collected (by a thread) into the list returned."""
        process = self.start(
            [str(SYSTEM_PYTHON), "-S", "-I", "-c", script, *args], stdout=subprocess.PIPE
        )
        assert process.stdout is not None
        assert json.loads(process.stdout.readline()) == {"ready": True}
        seen: list[dict[str, Any]] = []

        def read(stream: IO[bytes]) -> None:
            for line in stream:
                seen.append(json.loads(line))

        threading.Thread(target=read, args=(process.stdout,), daemon=True).start()
        return seen

    def python(
        self, code: str, *args: str, uid: int | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """A stdlib-only script on the system's Python, inside the namespace."""
        command = self.command([str(SYSTEM_PYTHON), "-S", "-I", "-c", code, *args], uid)
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)

    def close(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)


@contextlib.contextmanager
def netns(*tools: str | None) -> Iterator[NetNs]:
    """A new namespace with loopback up; skips unless root with ``ip`` and ``tools``."""
    needs_root_and(*tools)
    name = f"kapsis-test-{os.getpid()}-{random.randrange(1 << 32):08x}"
    result = subprocess.run(
        ["ip", "netns", "add", name], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"no network namespace: {result.stderr.strip()}")
    namespace = NetNs(name)
    try:
        namespace.ip("link", "set", "lo", "up")
        yield namespace
    finally:
        namespace.close()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# the gateway's DNS for real: the rendered front and resolver in a namespace

# The port of the dnsmasq that plays the upstream resolver in a namespace.
UPSTREAM_DNS_PORT = 5300


def runnable_resolver_config(policy: NetworkPolicy, port: int, log: Path) -> str:
    """The rendered config without its root-only lines, on ``port`` instead of its own."""
    lines = dnsmasq_config(policy, policy.dns_servers, str(log)).splitlines()
    assert f"port={RESOLVER_PORT}" in lines
    kept = [line for line in lines if not line.startswith(("user=", "group=", "nftset="))]
    return "\n".join(f"port={port}" if line.startswith("port=") else line for line in kept) + "\n"


# Inside the namespace: asks the front for argv[1] until it is NOERROR (the chain is up).
_FRONT_READY = f"""
{DNS_SOURCE}
import sys, time
deadline = time.monotonic() + 10
while True:
    try:
        if dns_query(53, sys.argv[1], timeout=0.2)[0] == 0:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        raise SystemExit("the DNS front did not answer " + sys.argv[1])
    time.sleep(0.05)
"""


DNSMASQ_COMMON = [str(DNSMASQ), "--keep-in-foreground", "--pid-file="]


def upstream_dnsmasq(port: int, log: Path, options: Sequence[str]) -> list[str]:
    """A dnsmasq playing the upstream resolver on 127.0.0.1:``port``: only what ``options``
    (``--address=/NAME/ADDRESS`` ...) say, NXDOMAIN for the rest, every query logged."""
    return [
        *DNSMASQ_COMMON,
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        f"--port={port}",
        f"--log-facility={log}",
        *options,
    ]


class DnsChain:
    """The gateway's DNS as rendered for ``policy``, running in ``namespace`` as root: the front
    (dnsdist) on 127.0.0.1:53, the resolver (dnsmasq, without its root-only lines) on its own
    port behind it, and a dnsmasq playing the upstream on UPSTREAM_DNS_PORT, answering as
    ``upstream_options`` (dnsmasq options) say. ``policy``'s upstream must be that one;
    ``edit_front``: a change to the front's configuration (a control)."""

    def __init__(
        self,
        namespace: NetNs,
        policy: NetworkPolicy,
        folder: Path,
        upstream_options: Sequence[str],
        ready_name: str,
        edit_front: Callable[[str], str] | None = None,
    ) -> None:
        assert policy.dns_servers == (f"127.0.0.1#{UPSTREAM_DNS_PORT}",)
        self.namespace, self.folder = namespace, folder
        self.refused, self.counts, self.log = (
            folder / "dns-refused.tsv",
            folder / "dns-refused.counts",
            folder / "dns.log",
        )
        front = dns_front_config(policy, str(self.refused), str(self.counts))
        (folder / "dnsdist.conf").write_text(front if edit_front is None else edit_front(front))
        (folder / "dnsmasq.conf").write_text(
            runnable_resolver_config(policy, RESOLVER_PORT, self.log)
        )
        namespace.start(
            upstream_dnsmasq(UPSTREAM_DNS_PORT, folder / "upstream.log", upstream_options)
        )
        self.resolver = namespace.start([*DNSMASQ_COMMON, f"--conf-file={folder / 'dnsmasq.conf'}"])
        with (folder / "dnsdist.out").open("wb") as out:
            self.front = namespace.start(
                [
                    str(DNSDIST),
                    "--supervised",
                    "--disable-syslog",
                    "-C",
                    str(folder / "dnsdist.conf"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        ready = namespace.python(_FRONT_READY, ready_name)
        assert ready.returncode == 0, ready.stderr + (folder / "dnsdist.out").read_text()

    def stop(self) -> tuple[str, str, str]:
        """(refusals, counts, resolver's log), once the front has written its counts."""
        time.sleep(1.3)  # the front rewrites its counts every second
        for process in (self.front, self.resolver):
            process.terminate()
            process.wait(timeout=5)
        return self.refused.read_text(), self.counts.read_text(), self.log.read_text()


# A script for a namespace: one TCP connection that sends DATA; prints {error, reply}.
TCP_SEND = """
import json, socket, sys
address, port, data = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {"error": None, "reply": None}
try:
    with socket.create_connection((address, port), timeout=2) as sock:
        sock.sendall(data.encode())
        out["reply"] = sock.recv(512).decode()
except OSError as error:
    out["error"] = error.errno or str(error)
print(json.dumps(out))
"""
