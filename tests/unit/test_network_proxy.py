"""The gateway's name proxy: HAProxy's configuration, its name lists, and what it does.

Structure: ports, name lists and the configuration as rendered. Syntax: ``haproxy -c`` with the
lists in place. Behaviour, as root: the rendered configuration runs in a throwaway network
namespace with the gateway's DNS as rendered (the front on 127.0.0.1:53, which the proxy asks,
and the resolver behind it), where a dnsmasq and an "upstream" (an address on its loopback)
stand in for the internet; connections go straight to the proxy's ports (the firewall's redirect
is tested in test_network_firewall.py), and its log is read by the host's parser.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kapsis.network.gateway_layout import (
    DNS_FRONT_SOURCE,
    PROXY_PORT_BASE,
    PROXY_UID,
    RESOLVER_PORT,
)
from kapsis.network.observe import PROXY_REASONS, ProxyDecision, parse_dns_log, parse_proxy_log
from kapsis.network.policy import DnsLimits, NetworkPolicy
from kapsis.network.proxy import (
    HOST_OVERRIDES,
    VERDICTS,
    allowed_names,
    name_list_files,
    proxy_config,
    proxy_ports,
)

from .netgw import (
    DNSDIST,
    DNSMASQ,
    HAPROXY,
    REPRESENTATIVE,
    UPSTREAM_DNS_PORT,
    DnsChain,
    make_policy,
    netns,
)

# ---------------------------------------------------------------------------------------------
# ports and name lists


def test_one_proxy_port_per_destination_port_of_the_names():
    assert proxy_ports(REPRESENTATIVE) == {22: 15100, 80: 15101, 443: 15102, 8443: 15103}
    assert PROXY_PORT_BASE == 15100


def test_addresses_and_an_empty_list_need_no_proxy():
    assert proxy_ports(make_policy()) == {}
    assert proxy_ports(make_policy(addresses=("192.0.2.0/24", "[2001:db8::1]:22"))) == {}
    assert proxy_config(make_policy(addresses=("192.0.2.0/24",)), "/etc/x") is None
    assert proxy_config(make_policy(), "/etc/x") is None
    assert name_list_files(make_policy()) == {}


def test_allowed_names_per_port_exact_and_wildcard_suffixes():
    assert allowed_names(REPRESENTATIVE, 22) == (["github.com"], [])
    assert allowed_names(REPRESENTATIVE, 80) == (["github.com", "pypi.org"], [".github.com"])
    assert allowed_names(REPRESENTATIVE, 443) == (["github.com", "pypi.org"], [".github.com"])
    assert allowed_names(REPRESENTATIVE, 8443) == (["registry.example"], [])
    assert allowed_names(REPRESENTATIVE, 9999) == ([], [])


def test_a_name_is_allowed_on_its_own_ports_only():
    """Unlike the firewall's sets (filed by domain), the proxy's lists keep each rule's ports:
    an exact name and the wildcard of the same domain do not lend each other ports."""
    policy = make_policy(hosts=("both.example:22", "*.both.example", "api.both.example:9090"))

    assert allowed_names(policy, 22) == (["both.example"], [])
    assert allowed_names(policy, 443) == ([], [".both.example"])
    assert allowed_names(policy, 9090) == (["api.both.example"], [])


def test_name_list_files_of_the_representative_policy():
    assert name_list_files(REPRESENTATIVE) == {
        "proxy-22.names": "github.com\n",
        "proxy-22.domains": "",
        "proxy-80.names": "github.com\npypi.org\n",
        "proxy-80.domains": ".github.com\n",
        "proxy-443.names": "github.com\npypi.org\n",
        "proxy-443.domains": ".github.com\n",
        "proxy-8443.names": "registry.example\n",
        "proxy-8443.domains": "",
    }


# ---------------------------------------------------------------------------------------------
# the configuration


def _section(config: str, header: str) -> list[str]:
    lines = config.splitlines()
    start = lines.index(header)
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return [line.strip() for line in lines[start + 1 : end]]


def test_the_proxy_runs_as_its_uid_and_resolves_through_the_dns_front():
    config = proxy_config(REPRESENTATIVE, "/etc/kapsis-gateway")
    assert config is not None

    assert f"uid {PROXY_UID}" in _section(config, "global")
    # Its ports are its own: no SO_REUSEPORT, so no other socket may share them.
    assert "noreuseport" in _section(config, "global")
    # The agent's own resolver, under the same checks and rate; never the resolver behind it.
    assert [line.strip() for line in config.splitlines() if "nameserver" in line] == [
        "nameserver front 127.0.0.1:53"
    ]
    assert _section(config, "resolvers gateway")[0] == "nameserver front 127.0.0.1:53"
    assert f":{RESOLVER_PORT}" not in config


def test_one_frontend_per_port_listening_on_loopback_with_its_lists():
    config = proxy_config(REPRESENTATIVE, "/etc/kapsis-gateway")
    assert config is not None

    frontends = re.findall(r"^frontend (\S+)$", config, re.MULTILINE)
    assert frontends == ["port22", "port80", "port443", "port8443"]
    for port, listen in proxy_ports(REPRESENTATIVE).items():
        frontend = _section(config, f"frontend port{port}")
        assert f"bind 127.0.0.1:{listen} name v4" in frontend
        assert f"bind [::1]:{listen} name v6 transparent" in frontend
        assert (
            f"acl allowed var(txn.name) -m str -f /etc/kapsis-gateway/proxy-{port}.names"
            in frontend
        )
        assert (
            f"acl allowed var(txn.name) -m end -f /etc/kapsis-gateway/proxy-{port}.domains"
            in frontend
        )
        # The proxy connects to what it resolved, on the port the agent asked for.
        assert f"tcp-request content set-dst-port int({port}) if tls" in frontend
        assert f"http-request set-dst-port int({port})" in frontend
        (log_format,) = [line for line in frontend if line.startswith("log-format ")]
        # The agent's own destination, kept before set-dst replaces it with the resolved one;
        # the name (reduced to hostname characters) and verdict of this stream (this
        # connection, or this HTTP request).
        assert log_format == (
            f'log-format "kapsis-proxy %[var(sess.dst)] {port} %[var(sess.proto)]'
            ' %[var(txn.logged)] %[var(txn.verdict)] %ts %ST %U %B"'
        )
        assert frontend.index("tcp-request content set-var(sess.dst) dst") < min(
            i for i, line in enumerate(frontend) if "set-dst" in line and "sess.dst)" not in line
        )


def test_names_verdicts_and_addresses_are_per_stream():
    """Each HTTP request of a connection is a stream of its own: its name, verdict and resolved
    address (txn) die with it, so a pipelined request never inherits the one before's. Only
    what holds for the whole connection is kept per session: its destination and protocol."""
    config = proxy_config(REPRESENTATIVE, "/c")
    assert config is not None

    used = set(re.findall(r"(?:var|do-resolve)\((\w+)\.(\w+)", config))
    assert {name for scope, name in used if scope == "sess"} == {"dst", "proto"}
    assert {name for scope, name in used if scope == "txn"} == {"name", "logged", "verdict", "ip"}
    assert {scope for scope, _ in used} == {"sess", "txn"}
    assert "unset-var" not in config


def _index(lines: list[str], text: str) -> int:
    (found,) = [i for i, line in enumerate(lines) if line == text]
    return found


def _in_order(lines: list[str], wanted: list[str]) -> bool:
    found = [_index(lines, line) for line in wanted]
    return found == sorted(found)


def test_a_connection_is_judged_by_its_name_before_anything_is_resolved_or_connected():
    config = proxy_config(REPRESENTATIVE, "/c")
    assert config is not None
    frontend = _section(config, "frontend port443")

    assert _in_order(
        frontend,
        [
            "tcp-request content set-var(txn.name) req.ssl_sni,lower if tls",
            "tcp-request content reject if tls !named",
            "tcp-request content reject if tls !well_formed || tls odd || tls too_long",
            "tcp-request content reject if tls !allowed",
            "tcp-request content do-resolve(txn.ip,gateway,ipv4) var(txn.name) if tls !v6",
            "tcp-request content reject if tls !resolved",
            "tcp-request content set-dst var(txn.ip) if tls",
            "tcp-request content accept if tls",
        ],
    )
    # Neither TLS nor HTTP/1: refused (HTTP/2 in clear text is not HTTP/1).
    switch = "tcp-request content switch-mode http proto h1 if http"
    assert frontend[_index(frontend, switch) + 2] == "tcp-request content reject"
    assert not any("switch-mode http" in line and "proto h1" not in line for line in frontend)
    closing = " hdr Connection close if "
    http = [
        "http-request set-var(txn.name) req.fhdr(host),lower,regsub(:[0-9]+$,) if one_host",
        f"http-request deny deny_status 403{closing}METH_CONNECT",
        "http-request set-var(txn.verdict) str(bad-name)"
        " if !host_form || !well_formed || odd || too_long",
        "http-request set-var(txn.verdict) str(not-allowed) if !allowed",
        "http-request set-var(txn.verdict) str(upgrade)"
        " if upgrade !websocket || upgrade !websocket_only",
        *(f"http-request del-header {header}" for header in HOST_OVERRIDES),
        "http-request do-resolve(txn.ip,gateway,ipv4) var(txn.name) if !v6",
        "http-request set-dst var(txn.ip)",
    ]
    assert _in_order(frontend, http)
    refusals = [i for i, line in enumerate(frontend) if line.startswith("http-request return ")]
    # Every refusal for the name comes before it is resolved; only "unresolved" after.
    assert len(refusals) == 5 and max(refusals[:-1]) < _index(frontend, http[-2])
    assert "could not resolve" in frontend[refusals[-1]]
    # A refused request ends its connection: nothing pipelined behind it is read.
    assert all(closing in frontend[i] for i in refusals)


def test_names_are_held_to_hostname_characters_and_the_dns_label_limit():
    """A name is refused as it came (never cleaned into another): SNI or Host, lower-cased, of
    hostname characters, no empty label, each label within network.dns.max_label_length (what
    the DNS front allows), at most 253 characters."""
    default = proxy_config(REPRESENTATIVE, "/c")
    longer = proxy_config(
        make_policy(hosts=("a.example",), dns=DnsLimits(max_label_length=63)), "/c"
    )
    assert default is not None and longer is not None

    label = "[a-z0-9_-]{1,%d}"
    for config, limit in ((default, 40), (longer, 63)):
        for frontend in re.findall(r"^frontend \S+$", config, re.MULTILINE):
            lines = _section(config, frontend)
            pattern = f"^({label % limit}[.])*{label % limit}$"
            assert f"acl well_formed var(txn.name) -m reg {pattern}" in lines
            assert "acl too_long var(txn.name) -m len 254:" in lines
    pattern = "^([a-z0-9_-]{1,40}[.])*[a-z0-9_-]{1,40}$"
    for name in ("allowed.test", "a" * 40 + ".test", "_dmarc.x-y.example", "localhost", "1.2"):
        assert re.fullmatch(pattern, name), name
    for name in (
        "a" * 41 + ".test",
        "allowed.test.",  # no trailing dot
        ".allowed.test",
        "a..test",
        "",
        "Allowed.test",  # lower-cased first
        "evil%20name.test",
        "other.test,allowed.test",
        "allowed.test:80",
        "a b.test",
        "café.test",
    ):
        assert not re.fullmatch(pattern, name), name


def test_an_http_request_names_its_host_once_and_plainly():
    config = proxy_config(REPRESENTATIVE, "/c")
    assert config is not None
    frontend = _section(config, "frontend port80")

    # One Host header (a second one, or none, names no host), of host[:port] exactly.
    assert "acl one_host req.fhdr_cnt(host) eq 1" in frontend
    assert "acl host_form req.fhdr(host) -m reg -i ^[a-z0-9._-]+(:[0-9]{1,5})?$" in frontend
    assert re.fullmatch("^[a-z0-9._-]+(:[0-9]{1,5})?$", "allowed.test:8080")
    for host in ("other.test,allowed.test", "a b", "a:1:2", "a:123456", "a/b", "a@b"):
        assert not re.fullmatch("^[a-z0-9._-]+(:[0-9]{1,5})?$", host), host
    # fhdr: the whole header value, never split at its commas.
    assert not any("req.hdr(host)" in line for line in frontend)


def test_no_protocol_upgrade_but_websocket_and_no_host_override_headers():
    config = proxy_config(REPRESENTATIVE, "/c")
    assert config is not None
    frontend = _section(config, "frontend port80")

    # Whole header values (fhdr): req.hdr would split "h2c, websocket" at the comma.
    assert "acl upgrade req.fhdr_cnt(upgrade) gt 0" in frontend
    assert "acl websocket req.fhdr_cnt(upgrade) eq 1" in frontend
    assert "acl websocket_only req.fhdr(upgrade) -m str -i websocket" in frontend
    assert (
        "http-request return status 403 content-type text/plain string"
        ' "kapsis gateway: no protocol upgrade but WebSocket\\n"'
        " hdr Connection close if upgrade !websocket || upgrade !websocket_only"
    ) in frontend
    assert {"forwarded", "x-forwarded-host", "x-original-url"} <= set(HOST_OVERRIDES)
    assert [line for line in frontend if "del-header" in line] == [
        f"http-request del-header {header}" for header in HOST_OVERRIDES
    ]


def test_the_backends_connect_only_to_a_resolved_destination():
    config = proxy_config(REPRESENTATIVE, "/c")
    assert config is not None

    assert _section(config, "backend tls_out") == [
        "mode tcp",
        "tcp-request content reject unless { var(txn.ip) -m found }",
        "server upstream 0.0.0.0:0",
    ]
    assert "http-request deny unless { var(txn.ip) -m found }" in _section(
        config, "backend http_out"
    )


def test_every_verdict_the_proxy_logs_is_one_the_host_explains():
    config = proxy_config(REPRESENTATIVE, "/c")
    assert config is not None

    logged = set(re.findall(r"set-var\(txn\.verdict\) str\(([a-z-]+)\)", config))
    assert logged == set(VERDICTS)
    assert {"bad-name", "upgrade"} <= logged
    assert set(VERDICTS) - {"allowed"} == set(PROXY_REASONS)
    assert "verdict) str(" not in config.replace("set-var(txn.verdict) str(", "")


# ---------------------------------------------------------------------------------------------
# haproxy's own check


def _write(policy: NetworkPolicy, folder: Path) -> Path:
    config = proxy_config(policy, str(folder))
    assert config is not None
    for name, text in name_list_files(policy).items():
        (folder / name).write_text(text)
    (folder / "haproxy.cfg").write_text(config)
    return folder / "haproxy.cfg"


def _haproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    if HAPROXY is None:
        pytest.skip("haproxy is not installed")
    return subprocess.run(
        [HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, check=False, timeout=20
    )


def test_haproxy_check_needs_the_name_lists(tmp_path):
    """Control: the configuration reads its lists, so a missing one is an error."""
    path = _write(REPRESENTATIVE, tmp_path)
    (tmp_path / "proxy-8443.domains").unlink()

    result = _haproxy_check(path)

    assert result.returncode != 0
    assert "proxy-8443.domains" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "policy",
    [
        REPRESENTATIVE,
        make_policy(hosts=("a.example",)),
        make_policy(hosts=("*.a.example:8443",)),
        make_policy(hosts=tuple(f"h{p}.example:{p}" for p in range(1, 30))),
    ],
    ids=["representative", "one-name", "wildcard-only", "many-ports"],
)
def test_haproxy_accepts_the_config(tmp_path, policy):
    result = _haproxy_check(_write(policy, tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Configuration file is valid" in result.stdout + result.stderr
    assert "ALERT" not in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# behaviour: the rendered proxy for real, in a network namespace (as root)

UPSTREAM = "203.0.113.5"
BEHAVIOUR_POLICY = make_policy(
    hosts=("allowed.test", "missing.test", "*.wild.test:8443"),
    upstreams=(f"127.0.0.1#{UPSTREAM_DNS_PORT}",),
)
LISTEN = proxy_ports(BEHAVIOUR_POLICY)
# What the upstream resolver knows (a domain and its subdomains): every name at UPSTREAM, but
# missing.test, which does not exist.
UPSTREAM_RECORDS = [
    *(f"--address=/{name}/{UPSTREAM}" for name in ("allowed.test", "wild.test", "other.test")),
    "--address=/missing.test/",
]


def _name_of_length(length: int) -> str:
    """A name under wild.test of ``length`` characters, of labels within the limit (40)."""
    labels, left = [], length - len(".wild.test")
    while left > 0:
        size = min(39, left - 1) if left > 40 else left
        labels.append("b" * size)
        left -= size + 1
    name = ".".join(labels) + ".wild.test"
    assert len(name) == length and max(map(len, labels)) <= 40
    return name


LABEL_AT_LIMIT, LABEL_OVER_LIMIT = "a" * 40 + ".wild.test", "a" * 41 + ".wild.test"
LONGEST, TOO_LONG = _name_of_length(253), _name_of_length(254)

# The upstream: every name resolves to UPSTREAM, which logs what it receives, answers each HTTP
# request it reads with "ok" and closes a connection that starts with a TLS record (it is no TLS
# server: the ClientHello is what it had to see).
UPSTREAM_SERVER = """
import json, socket, sys, threading
lock = threading.Lock()
def say(**fields):
    with lock:
        print(json.dumps(fields), flush=True)
def handle(conn, port):
    conn.settimeout(3)
    pending = b""
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            say(port=port, data=data.decode("latin-1"))
            if data[:1] == b"\\x16":
                return
            pending += data
            while b"\\r\\n\\r\\n" in pending:
                _, _, pending = pending.partition(b"\\r\\n\\r\\n")
                conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
def serve(sock, port):
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=handle, args=(conn, port), daemon=True).start()
for port in map(int, sys.argv[2:]):
    sock = socket.create_server((sys.argv[1], port))
    threading.Thread(target=serve, args=(sock, port), daemon=True).start()
say(ready=True)
threading.Event().wait()
"""

# The agent's side: each step of argv[1] (JSON) against the proxy, with what came back.
CLIENT = """
import json, socket, ssl, sys, time
def connect(port):
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
def tls(port, name):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with connect(port) as sock:
        try:
            context.wrap_socket(sock, server_hostname=name)
        except (ssl.SSLError, ConnectionError):
            return "closed"
        return "handshake"
def http(port, request, count):
    responses = []
    with connect(port) as sock:
        sock.sendall(request.encode())
        pending = b""
        while len(responses) < count:
            while b"\\r\\n\\r\\n" not in pending:
                data = sock.recv(65536)
                if not data:
                    return responses
                pending += data
            head, _, pending = pending.partition(b"\\r\\n\\r\\n")
            length = 0
            for line in head.split(b"\\r\\n")[1:]:
                key, _, value = line.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value)
            while len(pending) < length:
                pending += sock.recv(65536)
            body, pending = pending[:length], pending[length:]
            responses.append([int(head.split()[1]), body.decode()])
    return responses
def raw(port, data):
    with connect(port) as sock:
        sock.sendall(data.encode("latin-1"))
        try:
            return sock.recv(65536).decode("latin-1") or "closed"
        except OSError as error:
            return str(error)
out = {}
for name, step in json.loads(sys.argv[1]).items():
    kind, args = step[0], step[1:]
    out[name] = {"tls": tls, "http": http, "raw": raw}[kind](*args)
print(json.dumps(out))
"""


def _get(host: str, path: str = "/", headers: str = "") -> str:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n"


TWO_HOSTS = "Host: allowed.test\r\nHost: other.test\r\n"
# HAProxy refuses a WebSocket upgrade without these itself (400).
WEBSOCKET_KEY = "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
# Every header some framework reads as the host, naming another one (in mixed case).
OVERRIDES = "".join(f"{header.title()}: other.test\r\n" for header in HOST_OVERRIDES)

# Run in this order; each connection ends before the next starts.
STEPS: dict[str, tuple[Any, ...]] = {
    "tls allowed": ("tls", LISTEN[443], "allowed.test"),
    "tls unlisted": ("tls", LISTEN[443], "other.test"),
    "tls no name": ("tls", LISTEN[443], None),
    "tls wildcard": ("tls", LISTEN[8443], "x.wild.test"),
    "tls wildcard's domain": ("tls", LISTEN[8443], "wild.test"),  # subdomains only
    "tls listed for another port": ("tls", LISTEN[8443], "allowed.test"),
    "tls suffix inside": ("tls", LISTEN[8443], "x.wild.test.other.test"),  # at the end only
    "tls unresolved": ("tls", LISTEN[443], "missing.test"),  # listed, the upstream has none
    "tls label at the limit": ("tls", LISTEN[8443], LABEL_AT_LIMIT),
    "tls label over the limit": ("tls", LISTEN[8443], LABEL_OVER_LIMIT),  # wildcard-listed
    "tls longest name": ("tls", LISTEN[8443], LONGEST),
    "tls name too long": ("tls", LISTEN[8443], TOO_LONG),
    "http allowed": ("http", LISTEN[80], _get("allowed.test"), 1),
    "http case and port": ("http", LISTEN[80], _get("ALLOWED.TEST:80"), 1),
    "http unlisted": ("http", LISTEN[80], _get("other.test"), 1),
    "http no host": ("http", LISTEN[80], "GET / HTTP/1.0\r\n\r\n", 1),
    "http connect": (
        "http",
        LISTEN[80],
        "CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n",
        1,
    ),
    "http unresolved": ("http", LISTEN[80], _get("missing.test"), 1),
    # Pipelined: each request judged on its own Host; a refusal ends the connection.
    "http allowed, unlisted": (
        "http",
        LISTEN[80],
        _get("allowed.test", "/1") + _get("other.test", "/2"),
        2,
    ),
    "http unlisted, allowed": (
        "http",
        LISTEN[80],
        _get("other.test", "/3") + _get("allowed.test", "/4"),
        2,
    ),
    "http allowed, no host": (
        "http",
        LISTEN[80],
        _get("allowed.test", "/5") + "GET /6 HTTP/1.1\r\n\r\n",
        2,
    ),
    "http allowed, two hosts": (  # HAProxy's own parser refuses two different ones
        "http",
        LISTEN[80],
        _get("allowed.test", "/7") + f"GET /8 HTTP/1.1\r\n{TWO_HOSTS}\r\n",
        2,
    ),
    "http escaped": ("http", LISTEN[80], _get("Evil%20Name.test"), 1),
    "http comma": ("http", LISTEN[80], _get("other.test,allowed.test", "/comma"), 1),
    "http two hosts": ("http", LISTEN[80], f"GET /two HTTP/1.1\r\n{TWO_HOSTS}\r\n", 1),
    "http absolute uri": (
        "http",
        LISTEN[80],
        "GET http://other.test/abs HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        1,
    ),
    "http h2c upgrade": (
        "http",
        LISTEN[80],
        _get(
            "allowed.test",
            "/h2c",
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        ),
        1,
    ),
    "http websocket": (
        "http",
        LISTEN[80],
        _get(
            "allowed.test",
            "/ws",
            "Connection: Upgrade\r\nUpgrade: websocket\r\n" + WEBSOCKET_KEY,
        ),
        1,
    ),
    "http host overrides": ("http", LISTEN[80], _get("allowed.test", "/xfh", OVERRIDES), 1),
    "http longest name": ("http", LISTEN[8443], _get(LONGEST, "/longest"), 1),
    "http name too long": ("http", LISTEN[8443], _get(TOO_LONG, "/too-long"), 1),
    "ssh": ("raw", LISTEN[443], "SSH-2.0-OpenSSH_9.2\r\n"),
    "h2 prior knowledge": ("raw", LISTEN[80], "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
}


def _run(folder: Path, steps: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """The rendered proxy and DNS for BEHAVIOUR_POLICY in a namespace, ``steps`` against it."""
    with netns(HAPROXY, DNSDIST, DNSMASQ) as namespace:
        namespace.ip("addr", "add", f"{UPSTREAM}/32", "dev", "lo")
        # The gateway's DNS as rendered: the proxy asks the front on 127.0.0.1:53.
        dns = DnsChain(namespace, BEHAVIOUR_POLICY, folder, UPSTREAM_RECORDS, "allowed.test")
        upstream = namespace.serve(UPSTREAM_SERVER, UPSTREAM, *map(str, LISTEN))
        log = folder / "proxy.log"
        with log.open("wb") as stdout, (folder / "proxy.err").open("wb") as stderr:
            proxy = namespace.start(
                [str(HAPROXY), "-db", "-f", str(_write(BEHAVIOUR_POLICY, folder))],
                stdout=stdout,
                stderr=stderr,
            )
        result = namespace.python(CLIENT, json.dumps(steps), timeout=90)
        assert result.returncode == 0, result.stderr + (folder / "proxy.err").read_text()
        time.sleep(0.3)
        proxy.terminate()
        proxy.wait(timeout=5)
        refused, _, dns_log = dns.stop()
    return {
        "outcomes": json.loads(result.stdout),
        "upstream": [(item["port"], item["data"]) for item in upstream],
        "log": log.read_bytes().decode("utf-8", errors="replace"),
        "dns_refused": refused,
        "dns_log": dns_log,
    }


@pytest.fixture(scope="module")
def proxied(tmp_path_factory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("proxy"), STEPS)


def _upstream_data(proxied: dict[str, Any], port: int) -> str:
    return "".join(data for got, data in proxied["upstream"] if got == port)


def test_in_a_namespace_tls_passes_with_a_listed_well_formed_name_only(proxied):
    outcomes, on_443 = proxied["outcomes"], _upstream_data(proxied, 443)

    # The upstream is no TLS server: each connection ends at its ClientHello, allowed or not.
    assert {name: outcomes[name] for name in STEPS if name.startswith("tls ")} == {
        name: "closed" for name in STEPS if name.startswith("tls ")
    }
    assert "allowed.test" in on_443  # the ClientHello went through, untouched
    assert "other.test" not in on_443 and "missing.test" not in on_443
    assert on_443.count("\x16\x03") == 1  # one ClientHello on 443: the listed name's
    on_8443 = _upstream_data(proxied, 8443)
    assert "x.wild.test" in on_8443 and "other.test" not in on_8443
    # The wildcard lists all four, but a label over the limit or a name over 253 characters is
    # no name the DNS could carry: refused as it came.
    assert LABEL_AT_LIMIT in on_8443 and LONGEST in on_8443
    assert LABEL_OVER_LIMIT not in on_8443 and TOO_LONG not in on_8443
    assert on_8443.count("\x16\x03") == 3


def test_in_a_namespace_http_passes_with_a_listed_host_only(proxied):
    outcomes, on_80 = proxied["outcomes"], _upstream_data(proxied, 80)

    def not_listed(name: str) -> list[list[Any]]:
        return [[403, f"kapsis gateway: the host {name} is not on the allowlist for port 80\n"]]

    no_host = [[403, "kapsis gateway: the request names no host (one Host header)\n"]]
    assert outcomes["http allowed"] == [[200, "ok"]]
    assert outcomes["http case and port"] == [[200, "ok"]]  # lower case, without its port
    assert outcomes["http unlisted"] == not_listed("other.test")
    assert outcomes["http no host"] == no_host
    assert outcomes["http connect"][0][0] == 403
    assert outcomes["http unresolved"] == [
        [502, "kapsis gateway: the upstream could not resolve missing.test\n"]
    ]
    assert re.findall(r"^GET (\S+) ", on_80, re.MULTILINE)[:2] == ["/", "/"]
    assert "other.test" not in on_80 and "CONNECT" not in on_80


def test_in_a_namespace_each_pipelined_request_is_judged_alone(proxied):
    """Per-stream names and verdicts: a request after an allowed one inherits nothing (without
    a Host of its own it names no host); a refusal ends the connection, the requests behind it
    unread."""
    outcomes, on_80 = proxied["outcomes"], _upstream_data(proxied, 80)
    no_host = [403, "kapsis gateway: the request names no host (one Host header)\n"]

    assert outcomes["http allowed, unlisted"] == [
        [200, "ok"],
        [403, "kapsis gateway: the host other.test is not on the allowlist for port 80\n"],
    ]
    assert outcomes["http unlisted, allowed"] == [
        [403, "kapsis gateway: the host other.test is not on the allowlist for port 80\n"]
    ]
    assert outcomes["http allowed, no host"] == [[200, "ok"], no_host]
    assert outcomes["http allowed, two hosts"][0] == [200, "ok"]
    assert outcomes["http allowed, two hosts"][1][0] == 400
    paths = re.findall(r"^GET (\S+) ", on_80, re.MULTILINE)
    assert {"/1", "/5", "/7"} <= set(paths)
    assert not {"/2", "/3", "/4", "/6", "/8"} & set(paths)


def test_in_a_namespace_a_host_header_names_one_plain_host_or_is_refused(proxied):
    outcomes = proxied["outcomes"]
    bad_name = [[403, "kapsis gateway: the Host header is not a plain host name\n"]]

    assert outcomes["http escaped"] == bad_name
    assert outcomes["http comma"] == bad_name  # a server might read either name
    # Two different Hosts, or another host in the request line: not even HTTP to HAProxy's
    # parser, so the connection is refused as carrying no name.
    assert outcomes["http two hosts"] == []
    assert outcomes["http absolute uri"] == []
    assert outcomes["http longest name"] == [[200, "ok"]]
    assert outcomes["http name too long"] == bad_name
    paths = [
        path for _, data in proxied["upstream"] for path in re.findall(r"^GET (\S+) ", data, re.M)
    ]
    assert "/longest" in paths
    assert not {"/comma", "/two", "/abs", "/too-long"} & set(paths)


def test_in_a_namespace_no_upgrade_but_websocket_and_no_host_overrides_pass(proxied):
    outcomes, on_80 = proxied["outcomes"], _upstream_data(proxied, 80)
    requests = {
        match[1]: match[0] for match in re.finditer(r"^GET (\S+) .*?\r\n\r\n", on_80, re.S | re.M)
    }

    assert outcomes["http h2c upgrade"] == [
        [403, "kapsis gateway: no protocol upgrade but WebSocket\n"]
    ]
    assert "/h2c" not in requests and "h2c" not in on_80
    assert outcomes["http websocket"] == [[200, "ok"]]
    assert re.search(r"^upgrade: websocket\r$", requests["/ws"], re.I | re.M)
    # The request went on, without one of the headers that would name another host.
    assert outcomes["http host overrides"] == [[200, "ok"]]
    assert re.search(r"^host: allowed\.test\r$", requests["/xfh"], re.I | re.M)
    sent = {line.split(":")[0].lower() for line in requests["/xfh"].splitlines()[1:] if line}
    assert not sent & set(HOST_OVERRIDES)
    assert "other.test" not in requests["/xfh"]


def test_in_a_namespace_another_protocol_is_refused(proxied):
    outcomes = proxied["outcomes"]

    assert outcomes["ssh"] == "closed"
    assert "SSH" not in _upstream_data(proxied, 443)
    # HTTP/2 in clear text (prior knowledge): the HTTP/1 parser refuses its preface, where
    # HAProxy left to choose would speak HTTP/2 (a SETTINGS frame); nothing goes on.
    assert outcomes["h2 prior knowledge"].startswith("HTTP/1.1 400 ")
    assert "PRI" not in _upstream_data(proxied, 80)


def test_in_a_namespace_the_proxy_resolves_through_the_dns_front_only(proxied):
    """Every lookup of the proxy went through the front (which refused none: its queries are
    plain ones) and came to the resolver from the front's address; nothing asked the resolver
    directly. No name refused for its form was ever looked up."""
    events = parse_dns_log(proxied["dns_log"], clients=(DNS_FRONT_SOURCE,))
    asked = {event.name for event in events}

    assert proxied["dns_refused"] == ""
    assert parse_dns_log(proxied["dns_log"], clients=("127.0.0.1",)) == []
    assert {"allowed.test", "x.wild.test", "missing.test", LABEL_AT_LIMIT, LONGEST} <= asked
    assert not {"other.test", LABEL_OVER_LIMIT, TOO_LONG} & asked
    assert not any("," in name or "%" in name for name in asked)


def test_in_a_namespace_the_host_reads_every_decision_from_the_proxys_log(proxied):
    decisions = parse_proxy_log(proxied["log"])

    # The address logged is the one the agent chose, never the one the proxy resolved: here the
    # client connects to the proxy's loopback port itself, so there is none to tell.
    def refused(name: str, port: int, protocol: str, verdict: str) -> ProxyDecision:
        return ProxyDecision(name, port, protocol, "", False, PROXY_REASONS[verdict])

    def allowed(name: str, port: int, protocol: str) -> ProxyDecision:
        return ProxyDecision(name, port, protocol, "", True)

    # Refused by HAProxy's HTTP parser before any rule: no name, no verdict ("-").
    unparsed = ProxyDecision("", 80, "http", "", False, "")

    assert decisions == [
        allowed("allowed.test", 443, "tls"),
        refused("other.test", 443, "tls", "not-allowed"),
        refused("", 443, "tls", "no-name"),
        allowed("x.wild.test", 8443, "tls"),
        refused("wild.test", 8443, "tls", "not-allowed"),
        refused("allowed.test", 8443, "tls", "not-allowed"),
        refused("x.wild.test.other.test", 8443, "tls", "not-allowed"),
        refused("missing.test", 443, "tls", "unresolved"),
        allowed(LABEL_AT_LIMIT, 8443, "tls"),
        refused(LABEL_OVER_LIMIT, 8443, "tls", "bad-name"),
        allowed(LONGEST, 8443, "tls"),
        refused("", 8443, "tls", "bad-name"),  # too long to be a name: logged as none
        allowed("allowed.test", 80, "http"),
        allowed("allowed.test", 80, "http"),
        refused("other.test", 80, "http", "not-allowed"),
        refused("", 80, "http", "no-name"),
        refused("allowed.test", 80, "http", "connect-method"),
        refused("missing.test", 80, "http", "unresolved"),
        allowed("allowed.test", 80, "http"),  # pipelined: one verdict per request
        refused("other.test", 80, "http", "not-allowed"),
        refused("other.test", 80, "http", "not-allowed"),  # and nothing after a refusal
        allowed("allowed.test", 80, "http"),
        refused("", 80, "http", "no-name"),  # not the request before's name nor verdict
        allowed("allowed.test", 80, "http"),
        unparsed,
        refused("evil_20name.test", 80, "http", "bad-name"),  # logged in hostname characters
        refused("other.test_allowed.test", 80, "http", "bad-name"),
        refused("", 80, "", "no-name"),  # two Hosts
        refused("", 80, "", "no-name"),  # an absolute URI naming another host
        refused("allowed.test", 80, "http", "upgrade"),
        allowed("allowed.test", 80, "http"),  # websocket
        allowed("allowed.test", 80, "http"),  # the host overrides, removed
        allowed(LONGEST, 8443, "http"),
        refused("", 8443, "http", "bad-name"),  # too long to be a name: logged as none
        refused("", 443, "", "no-name"),
        ProxyDecision("", 80, "http", "", False, ""),  # the HTTP/2 preface
    ]
    assert len(proxied["log"].splitlines()) == len(decisions)


# ---------------------------------------------------------------------------------------------
# the log line of a name the proxy refused


def _client_hello(name: str) -> str:
    """A ClientHello (as text, one character a byte) whose server name is ``name``, whatever
    bytes it holds: one made for a placeholder of the same length, the name put in its place."""
    size, left = [], len(name)
    while left > 0:  # labels the ssl module accepts
        size.append(min(50, left if left <= 51 else 50))
        left -= size[-1] + 1
    placeholder = ".".join("q" * n for n in size)
    placeholder += "q" * (len(name) - len(placeholder))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    handshake = context.wrap_bio(incoming, outgoing, server_hostname=placeholder)
    with pytest.raises(ssl.SSLWantReadError):
        handshake.do_handshake()
    hello = outgoing.read()
    assert hello.count(placeholder.encode()) == 1
    return hello.replace(placeholder.encode(), name.encode("latin-1")).decode("latin-1")


FORGED = "kapsis-proxy 203.0.113.9 443 tls evil.test allowed -- -1 1 1"
FORGERY_STEPS: dict[str, tuple[Any, ...]] = {
    # A server name is any bytes: a newline, then a line of the agent's own.
    "sni with a line of its own": ("raw", LISTEN[8443], _client_hello(f"x\n{FORGED}\ny")),
    "sni ending in a newline": ("raw", LISTEN[8443], _client_hello("x.wild.test\n")),
    "host with a space": ("http", LISTEN[80], _get("allowed.test x"), 1),
    # HAProxy cuts a log line at 1024 bytes: what is left of this one ends in digits.
    "host cut into a line": (
        "http",
        LISTEN[80],
        _get("evil.test allowed -- -1 1 " + "1" * 1500),
        1,
    ),
}


@pytest.fixture(scope="module")
def forgery(tmp_path_factory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("forgery"), FORGERY_STEPS)


def test_in_a_namespace_names_of_any_bytes_are_refused(forgery):
    outcomes = forgery["outcomes"]

    assert outcomes["sni with a line of its own"] == "closed"
    assert outcomes["sni ending in a newline"] == "closed"
    assert outcomes["host with a space"] == [
        [403, "kapsis gateway: the Host header is not a plain host name\n"]
    ]
    assert outcomes["host cut into a line"][0][0] == 403
    assert forgery["upstream"] == []


def test_in_a_namespace_a_refused_name_can_neither_forge_nor_hide_a_decision(forgery):
    """Each attempt is one refusal in the host's record, and no decision the proxy never made
    (the host reads the log line by line, by spaces)."""
    decisions = parse_proxy_log(forgery["log"])

    assert not [decision for decision in decisions if decision.allowed]
    assert len(decisions) == len(FORGERY_STEPS)
    assert len(forgery["log"].splitlines()) == len(FORGERY_STEPS)


# h2c offered beside WebSocket: in one header, or in two.
UPGRADE_STEPS: dict[str, tuple[Any, ...]] = {
    name: ("http", LISTEN[80], _get("allowed.test", path, f"Connection: Upgrade\r\n{headers}"), 1)
    for name, path, headers in [
        ("h2c beside websocket", "/h2c-ws", "Upgrade: h2c, websocket\r\n" + WEBSOCKET_KEY),
        ("two upgrade headers", "/h2c-2", "Upgrade: h2c\r\nUpgrade: websocket\r\n" + WEBSOCKET_KEY),
    ]
}


@pytest.fixture(scope="module")
def upgrades(tmp_path_factory) -> dict[str, Any]:
    return _run(tmp_path_factory.mktemp("upgrades"), UPGRADE_STEPS)


def test_in_a_namespace_h2c_offered_beside_websocket_is_refused(upgrades):
    refusal = [[403, "kapsis gateway: no protocol upgrade but WebSocket\n"]]

    assert upgrades["outcomes"] == dict.fromkeys(UPGRADE_STEPS, refusal)
    assert "h2c" not in "".join(data for _, data in upgrades["upstream"])
