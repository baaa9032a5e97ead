"""The gateway's name proxy: HAProxy's configuration, its name lists, and what it does.

Structure: ports, name lists and the configuration as rendered. Syntax: ``haproxy -c`` with the
lists in place. Behaviour, as root: the rendered configuration runs in a throwaway network
namespace where a resolver and an "upstream" (an address on its loopback) stand in for the
internet; connections go straight to the proxy's ports (the firewall's redirect is tested in
test_network_firewall.py), and its log is read by the host's parser.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from kapsis.network.gateway_layout import PROXY_PORT_BASE, PROXY_UID, RESOLVER_PORT
from kapsis.network.observe import PROXY_REASONS, ProxyDecision, parse_proxy_log
from kapsis.network.policy import NetworkPolicy
from kapsis.network.proxy import (
    VERDICTS,
    allowed_names,
    name_list_files,
    proxy_config,
    proxy_ports,
)

from .netgw import DNSMASQ, HAPROXY, REPRESENTATIVE, make_policy, netns

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


def test_the_proxy_runs_as_its_uid_and_resolves_through_the_gateways_resolver():
    config = proxy_config(REPRESENTATIVE, "/etc/kapsis-gateway")
    assert config is not None

    assert f"uid {PROXY_UID}" in _section(config, "global")
    assert (
        _section(config, "resolvers gateway")[0] == f"nameserver resolver 127.0.0.1:{RESOLVER_PORT}"
    )


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
            f"acl allowed var(sess.name) -m str -f /etc/kapsis-gateway/proxy-{port}.names"
            in frontend
        )
        assert (
            f"acl allowed var(sess.name) -m end -f /etc/kapsis-gateway/proxy-{port}.domains"
            in frontend
        )
        # The proxy connects to what it resolved, on the port the agent asked for.
        assert f"tcp-request content set-dst-port int({port}) if tls" in frontend
        assert f"http-request set-dst-port int({port})" in frontend
        (log_format,) = [line for line in frontend if line.startswith("log-format ")]
        # The agent's own destination, kept before set-dst replaces it with the resolved one.
        assert log_format.startswith(f'log-format "kapsis-proxy %[var(sess.dst)] {port} ')
        assert frontend.index("tcp-request content set-var(sess.dst) dst") < min(
            i for i, line in enumerate(frontend) if "set-dst" in line and "sess.dst)" not in line
        )


def _index(lines: list[str], text: str) -> int:
    (found,) = [i for i, line in enumerate(lines) if line == text]
    return found


def test_a_connection_is_judged_by_its_name_before_anything_is_resolved_or_connected():
    config = proxy_config(REPRESENTATIVE, "/c")
    assert config is not None
    frontend = _section(config, "frontend port443")

    tls = [
        "tcp-request content reject if tls !named",
        "tcp-request content reject if tls !allowed",
        "tcp-request content do-resolve(sess.ip,gateway,ipv4) var(sess.name) if tls !v6",
        "tcp-request content reject if tls !resolved",
        "tcp-request content set-dst var(sess.ip) if tls",
        "tcp-request content accept if tls",
    ]
    assert [_index(frontend, line) for line in tls] == sorted(
        _index(frontend, line) for line in tls
    )
    # Neither TLS nor HTTP: refused.
    assert frontend[_index(frontend, "tcp-request content switch-mode http if http") + 2] == (
        "tcp-request content reject"
    )
    http = [
        "http-request unset-var(sess.name)",  # each request alone, pipelined ones too
        "http-request deny deny_status 403 if METH_CONNECT",
        "http-request do-resolve(txn.ip,gateway,ipv4) var(sess.name) if !v6",
        "http-request set-dst var(txn.ip)",
    ]
    assert [_index(frontend, line) for line in http] == sorted(
        _index(frontend, line) for line in http
    )
    not_allowed = [i for i, line in enumerate(frontend) if line.endswith(" if !allowed")]
    assert max(not_allowed) < _index(frontend, http[2])


def test_the_backends_connect_only_to_a_resolved_destination():
    config = proxy_config(REPRESENTATIVE, "/c")
    assert config is not None

    assert _section(config, "backend tls_out") == [
        "mode tcp",
        "tcp-request content reject unless { var(sess.ip) -m found }",
        "server upstream 0.0.0.0:0",
    ]
    assert "http-request deny unless { var(txn.ip) -m found }" in _section(
        config, "backend http_out"
    )


def test_every_verdict_the_proxy_logs_is_one_the_host_explains():
    config = proxy_config(REPRESENTATIVE, "/c")
    assert config is not None

    logged = set(re.findall(r"set-var\(sess\.verdict\) str\(([a-z-]+)\)", config))
    assert logged == set(VERDICTS)
    assert set(VERDICTS) - {"allowed"} == set(PROXY_REASONS)


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
BEHAVIOUR_POLICY = make_policy(hosts=("allowed.test", "missing.test", "*.wild.test:8443"))
LISTEN = proxy_ports(BEHAVIOUR_POLICY)

# The upstream: every name resolves to UPSTREAM, which logs what it receives and answers each
# HTTP request it reads with "ok".
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
        sock.sendall(data.encode())
        try:
            return sock.recv(65536).decode() or "closed"
        except OSError as error:
            return str(error)
out = []
for step in json.loads(sys.argv[1]):
    kind, args = step[0], step[1:]
    out.append({"tls": tls, "http": http, "raw": raw}[kind](*args))
print(json.dumps(out))
"""


def _get(host: str, path: str = "/") -> str:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"


STEPS: list[tuple[Any, ...]] = [
    ("tls", LISTEN[443], "allowed.test"),
    ("tls", LISTEN[443], "other.test"),
    ("tls", LISTEN[443], None),
    ("tls", LISTEN[8443], "x.wild.test"),
    ("tls", LISTEN[8443], "wild.test"),  # a wildcard is for subdomains only
    ("tls", LISTEN[8443], "allowed.test"),  # listed, but not for 8443
    ("tls", LISTEN[8443], "x.wild.test.other.test"),  # the suffix is matched at the end only
    ("tls", LISTEN[443], "missing.test"),  # listed, the resolver has no answer
    ("http", LISTEN[80], _get("allowed.test"), 1),
    ("http", LISTEN[80], _get("ALLOWED.TEST:80"), 1),
    ("http", LISTEN[80], _get("other.test"), 1),
    ("http", LISTEN[80], "GET / HTTP/1.0\r\n\r\n", 1),
    ("http", LISTEN[80], "CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n", 1),
    ("http", LISTEN[80], _get("missing.test"), 1),
    ("http", LISTEN[80], _get("allowed.test", "/1") + _get("other.test", "/2"), 2),  # pipelined
    ("http", LISTEN[80], _get("Evil%20Name.test"), 1),
    ("raw", LISTEN[443], "SSH-2.0-OpenSSH_9.2\r\n"),
]
TLS_STEPS = sum(1 for step in STEPS if step[0] == "tls")


@pytest.fixture(scope="module")
def proxied(tmp_path_factory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("proxy")
    with netns(HAPROXY, DNSMASQ) as namespace:
        namespace.ip("addr", "add", f"{UPSTREAM}/32", "dev", "lo")
        namespace.start(
            [
                str(DNSMASQ),
                "--keep-in-foreground",
                "--pid-file=",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                f"--port={RESOLVER_PORT}",
                f"--log-facility={folder / 'dns.log'}",
                *(f"--address=/{name}/{UPSTREAM}" for name in ("allowed.test", "wild.test")),
                f"--address=/other.test/{UPSTREAM}",
                "--address=/missing.test/",
            ]
        )
        upstream = namespace.serve(UPSTREAM_SERVER, UPSTREAM, *map(str, LISTEN))
        log = folder / "proxy.log"
        with log.open("wb") as stdout, (folder / "proxy.err").open("wb") as stderr:
            proxy = namespace.start(
                [str(HAPROXY), "-db", "-f", str(_write(BEHAVIOUR_POLICY, folder))],
                stdout=stdout,
                stderr=stderr,
            )
        result = namespace.python(CLIENT, json.dumps(STEPS), timeout=60)
        assert result.returncode == 0, result.stderr + (folder / "proxy.err").read_text()
        time.sleep(0.3)
        proxy.terminate()
        proxy.wait(timeout=5)
    return {
        "outcomes": dict(enumerate(json.loads(result.stdout))),
        "upstream": [(item["port"], item["data"]) for item in upstream],
        "log": log.read_text(),
    }


def _upstream_data(proxied: dict[str, Any], port: int) -> str:
    return "".join(data for got, data in proxied["upstream"] if got == port)


def test_in_a_namespace_tls_passes_with_a_listed_name_only(proxied):
    outcomes, on_443 = proxied["outcomes"], _upstream_data(proxied, 443)

    # The upstream is no TLS server: each connection ends at its ClientHello, allowed or not.
    assert [outcomes[i] for i in range(TLS_STEPS)] == ["closed"] * TLS_STEPS
    assert "allowed.test" in on_443  # the ClientHello went through, untouched
    assert "other.test" not in on_443 and "missing.test" not in on_443
    assert on_443.count("\x16\x03") == 1  # one ClientHello on 443: the listed name's
    on_8443 = _upstream_data(proxied, 8443)
    assert "x.wild.test" in on_8443 and "other.test" not in on_8443
    assert on_8443.count("\x16\x03") == 1


def test_in_a_namespace_http_passes_with_a_listed_host_only(proxied):
    outcomes, on_80 = proxied["outcomes"], _upstream_data(proxied, 80)

    assert outcomes[8] == [[200, "ok"]]
    assert outcomes[9] == [[200, "ok"]]  # the name is compared in lower case, without its port
    assert outcomes[10] == [
        [403, "kapsis gateway: the host other.test is not on the allowlist for port 80\n"]
    ]
    assert outcomes[11] == [[403, "kapsis gateway: the request names no host\n"]]
    assert outcomes[12][0][0] == 403  # CONNECT
    assert outcomes[13] == [[502, "kapsis gateway: the upstream could not resolve missing.test\n"]]
    # Pipelined: the second request is judged on its own Host.
    assert outcomes[14] == [
        [200, "ok"],
        [403, "kapsis gateway: the host other.test is not on the allowlist for port 80\n"],
    ]
    assert outcomes[15] == [
        [403, "kapsis gateway: the host evil_20name.test is not on the allowlist for port 80\n"]
    ]
    assert re.findall(r"^GET (\S+) ", on_80, re.MULTILINE) == ["/", "/", "/1"]
    assert "other.test" not in on_80 and "CONNECT" not in on_80


def test_in_a_namespace_another_protocol_is_refused(proxied):
    assert proxied["outcomes"][16] == "closed"
    assert "SSH" not in _upstream_data(proxied, 443)


def test_in_a_namespace_the_host_reads_every_decision_from_the_proxys_log(proxied):
    decisions = parse_proxy_log(proxied["log"])

    # The address logged is the one the agent chose, never the one the proxy resolved: here the
    # client connects to the proxy's loopback port itself, so there is none to tell.
    def refused(name: str, port: int, protocol: str, verdict: str) -> ProxyDecision:
        return ProxyDecision(name, port, protocol, "", False, PROXY_REASONS[verdict])

    def allowed(name: str, port: int, protocol: str) -> ProxyDecision:
        return ProxyDecision(name, port, protocol, "", True)

    assert decisions == [
        allowed("allowed.test", 443, "tls"),
        refused("other.test", 443, "tls", "not-allowed"),
        refused("", 443, "tls", "no-name"),
        allowed("x.wild.test", 8443, "tls"),
        refused("wild.test", 8443, "tls", "not-allowed"),
        refused("allowed.test", 8443, "tls", "not-allowed"),
        refused("x.wild.test.other.test", 8443, "tls", "not-allowed"),
        refused("missing.test", 443, "tls", "unresolved"),
        allowed("allowed.test", 80, "http"),
        allowed("allowed.test", 80, "http"),
        refused("other.test", 80, "http", "not-allowed"),
        refused("", 80, "http", "no-name"),
        refused("allowed.test", 80, "http", "connect-method"),
        refused("missing.test", 80, "http", "unresolved"),
        allowed("allowed.test", 80, "http"),
        refused("other.test", 80, "http", "not-allowed"),
        refused("evil_20name.test", 80, "http", "not-allowed"),
        refused("", 443, "", "no-name"),
    ]
    assert len(proxied["log"].splitlines()) == len(decisions)
