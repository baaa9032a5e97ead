"""The gateway's name proxy: HAProxy's configuration, rendered from a :class:`NetworkPolicy`.

The firewall redirects the agent's TCP connections to addresses resolved from allowlisted names
(:mod:`kapsis.network.firewall`) to this proxy, one listening port per destination port. The
proxy reads the name the connection carries before any byte goes further: the TLS server name of
the ClientHello, or the ``Host`` of each HTTP/1 request. It checks that name against the names
allowlisted for that port, resolves it itself (through the gateway's resolver, which refuses
non-public answers) and connects to what it resolved, never to the address the agent chose. A
connection with no name (TLS without SNI, any other protocol), a name not on the list, or a name
the upstream cannot resolve is refused, and every decision is logged for the host. Certificates
are never intercepted: TLS passes through untouched, so the sandbox needs no CA.

Why HAProxy: it reads SNI and HTTP/1 in one TCP frontend (``req.ssl_sni``, ``switch-mode
http``), resolves and sets the destination per connection or per request (``do-resolve``,
``set-dst``), splices data in the kernel, and Debian ships it. nginx's stream module reads SNI
but not ``Host``; Squid's peek-and-splice needs a certificate configured even when it never
bumps.
"""

from __future__ import annotations

from kapsis.network.gateway_layout import PROXY_PORT_BASE, PROXY_UID
from kapsis.network.policy import NetworkPolicy

# The name as logged: the agent's bytes reduced to hostname characters (one log line is one
# decision, whatever the name held); a name too long to be one is logged as none.
_LOGGED = "var(txn.name),regsub([^a-z0-9._-],_,g)"

# Headers some servers and frameworks take as the request's host instead of Host: removed, so the
# checked Host is the only host a request names.
HOST_OVERRIDES = (
    "forwarded",
    "x-forwarded-host",
    "x-forwarded-server",
    "x-host",
    "x-original-host",
    "x-original-url",
    "x-rewrite-url",
    "x-http-host-override",
)
# How long a connection may take to send its first bytes (ClientHello or request line).
INSPECT_DELAY = "10s"
# Reasons of refusal, as logged (kapsis.network.observe reads them).
VERDICTS = (
    "allowed",
    "no-name",
    "bad-name",
    "not-allowed",
    "unresolved",
    "connect-method",
    "upgrade",
)


def proxy_ports(policy: NetworkPolicy) -> dict[int, int]:
    """Each destination port that allowlisted names may reach -> the proxy's port for it."""
    ports = sorted({port for rule in policy.names() for port in rule.ports})
    return {port: PROXY_PORT_BASE + index for index, port in enumerate(ports)}


def allowed_names(policy: NetworkPolicy, port: int) -> tuple[list[str], list[str]]:
    """(exact names, ``.domain`` suffixes of wildcards) allowlisted on ``port``."""
    rules = [rule for rule in policy.names() if port in rule.ports]
    exact = sorted(rule.pattern for rule in rules if rule.kind == "name")
    suffixes = sorted(rule.pattern.removeprefix("*") for rule in rules if rule.kind == "wildcard")
    return exact, suffixes


def name_list_files(policy: NetworkPolicy) -> dict[str, str]:
    """The per-port lists of names the proxy matches against, by file name."""
    files = {}
    for port in proxy_ports(policy):
        exact, suffixes = allowed_names(policy, port)
        files[f"proxy-{port}.names"] = "".join(f"{name}\n" for name in exact)
        files[f"proxy-{port}.domains"] = "".join(f"{suffix}\n" for suffix in suffixes)
    return files


def _frontend(port: int, listen: int, config_dir: str, max_label: int) -> list[str]:
    names, domains = f"{config_dir}/proxy-{port}.names", f"{config_dir}/proxy-{port}.domains"
    log_format = (
        f"kapsis-proxy %[var(sess.dst)] {port} %[var(sess.proto)] %[var(txn.logged)]"
        " %[var(txn.verdict)] %ts %ST %U %B"
    )
    label = f"[a-z0-9_-]{{1,{max_label}}}"
    lines = [
        f"frontend port{port}",
        "  mode tcp",
        f"  bind 127.0.0.1:{listen} name v4",
        f"  bind [::1]:{listen} name v6 transparent",
        f'  log-format "{log_format}"',
        f"  tcp-request inspect-delay {INSPECT_DELAY}",
        # The address the agent chose (for IPv4; an IPv6 redirect does not keep it), logged
        # before set-dst replaces it with the resolved one.
        "  tcp-request content set-var(sess.dst) dst",
        "  acl tls req.ssl_hello_type 1",
        "  acl http req.proto_http",
        "  acl v6 so_name v6",
        # Names are judged per stream (txn): a connection's requests never share a verdict.
        "  acl named var(txn.name) -m found",
        # Hostname characters, labels no longer than the DNS front allows: a name is refused as
        # it came, never cleaned into another one.
        f"  acl well_formed var(txn.name) -m reg ^({label}[.])*{label}$",
        "  acl odd var(txn.name) -m reg [^a-z0-9._-]",  # a newline before $ passes the one above
        "  acl too_long var(txn.name) -m len 254:",
        f"  acl allowed var(txn.name) -m str -f {names}",
        f"  acl allowed var(txn.name) -m end -f {domains}",
        "  acl resolved var(txn.ip) -m found",
        # TLS: the ClientHello's server name, checked, resolved, connected to.
        "  tcp-request content set-var(sess.proto) str(tls) if tls",
        "  tcp-request content set-var(txn.name) req.ssl_sni,lower if tls",
        f"  tcp-request content set-var(txn.logged) {_LOGGED} if tls named !too_long",
        "  tcp-request content set-var(txn.verdict) str(no-name) if tls !named",
        "  tcp-request content reject if tls !named",
        "  tcp-request content set-var(txn.verdict) str(bad-name)"
        " if tls !well_formed || tls odd || tls too_long",
        "  tcp-request content reject if tls !well_formed || tls odd || tls too_long",
        "  tcp-request content set-var(txn.verdict) str(not-allowed) if tls !allowed",
        "  tcp-request content reject if tls !allowed",
        "  tcp-request content do-resolve(txn.ip,gateway,ipv6) var(txn.name) if tls v6",
        "  tcp-request content do-resolve(txn.ip,gateway,ipv4) var(txn.name) if tls !v6",
        "  tcp-request content set-var(txn.verdict) str(unresolved) if tls !resolved",
        "  tcp-request content reject if tls !resolved",
        "  tcp-request content set-dst var(txn.ip) if tls",
        f"  tcp-request content set-dst-port int({port}) if tls",
        "  tcp-request content set-var(txn.verdict) str(allowed) if tls",
        "  tcp-request content accept if tls",
        # HTTP/1 only (HTTP/2 in clear text is refused): every request's Host, checked,
        # resolved, connected to.
        "  tcp-request content set-var(sess.proto) str(http) if http",
        "  tcp-request content switch-mode http proto h1 if http",
        # Anything else carries no name.
        "  tcp-request content set-var(txn.verdict) str(no-name)",
        "  tcp-request content reject",
        # Exactly one Host header, exactly host[:port]; a comma, a second header or any other
        # character would let the server read another name than the one checked here.
        "  acl one_host req.fhdr_cnt(host) eq 1",
        "  acl host_form req.fhdr(host) -m reg -i ^[a-z0-9._-]+(:[0-9]{1,5})?$",
        "  http-request set-var(txn.name) req.fhdr(host),lower,regsub(:[0-9]+$,) if one_host",
        f"  http-request set-var(txn.logged) {_LOGGED} if named !too_long",
        "  http-request set-var(txn.verdict) str(connect-method) if METH_CONNECT",
        "  http-request deny deny_status 403 if METH_CONNECT",
        "  http-request set-var(txn.verdict) str(no-name) if !named",
        "  http-request return status 403 content-type text/plain string"
        ' "kapsis gateway: the request names no host (one Host header)\\n" if !named',
        "  http-request set-var(txn.verdict) str(bad-name)"
        " if !host_form || !well_formed || odd || too_long",
        "  http-request return status 403 content-type text/plain string"
        ' "kapsis gateway: the Host header is not a plain host name\\n"'
        " if !host_form || !well_formed || odd || too_long",
        "  http-request set-var(txn.verdict) str(not-allowed) if !allowed",
        "  http-request return status 403 content-type text/plain lf-string"
        ' "kapsis gateway: the host %[var(txn.name)] is not on the allowlist for port'
        f' {port}\\n" if !allowed',
        # An upgrade hands the connection over unread: WebSocket only, to the checked host.
        # (whole header values: req.hdr would split "h2c, websocket" at the comma).
        "  acl upgrade req.fhdr_cnt(upgrade) gt 0",
        "  acl websocket req.fhdr_cnt(upgrade) eq 1",
        "  acl websocket_only req.fhdr(upgrade) -m str -i websocket",
        "  http-request set-var(txn.verdict) str(upgrade)"
        " if upgrade !websocket || upgrade !websocket_only",
        "  http-request return status 403 content-type text/plain string"
        ' "kapsis gateway: no protocol upgrade but WebSocket\\n"'
        " if upgrade !websocket || upgrade !websocket_only",
        # Headers that servers and their frameworks take as the host in place of Host.
        *(f"  http-request del-header {header}" for header in HOST_OVERRIDES),
        "  http-request do-resolve(txn.ip,gateway,ipv6) var(txn.name) if v6",
        "  http-request do-resolve(txn.ip,gateway,ipv4) var(txn.name) if !v6",
        "  http-request set-var(txn.verdict) str(unresolved) if !resolved",
        "  http-request return status 502 content-type text/plain lf-string"
        ' "kapsis gateway: the upstream could not resolve %[var(txn.name)]\\n" if !resolved',
        "  http-request set-dst var(txn.ip)",
        f"  http-request set-dst-port int({port})",
        "  http-request set-var(txn.verdict) str(allowed)",
        "  use_backend http_out if { var(sess.proto) -m str http }",
        "  default_backend tls_out",
        "",
    ]
    # A refused request ends its connection: one refusal, one log line, however many requests
    # the agent pipelines behind it.
    return [
        line.replace(" if ", " hdr Connection close if ", 1)
        if line.startswith(("  http-request return ", "  http-request deny deny_status"))
        else line
        for line in lines
    ]


def proxy_config(policy: NetworkPolicy, config_dir: str) -> str | None:
    """HAProxy's configuration, or None when no name is allowlisted (no proxy runs)."""
    listen = proxy_ports(policy)
    if not listen:
        return None
    lines = [
        "global",
        f"  uid {PROXY_UID}",
        "  gid 65534",
        "  log stdout format raw local0",
        "  maxconn 4096",
        "  nbthread 1",
        # No socket sharing: nothing else may bind the proxy's ports.
        "  noreuseport",
        "  tune.pipesize 524288",
        "  tune.bufsize 65536",
        "",
        "defaults",
        "  log global",
        "  option splice-auto",
        "  option splice-response",
        "  timeout connect 10s",
        "  timeout client 1h",
        "  timeout server 1h",
        "  timeout tunnel 1h",
        "  timeout http-request 30s",
        "  timeout http-keep-alive 30s",
        "",
        # The proxy asks through the DNS front, like the agent: a name the agent sends it is
        # held to the same query rate (label lengths are checked above, too).
        "resolvers gateway",
        "  nameserver front 127.0.0.1:53",
        "  accepted_payload_size 1232",
        "  resolve_retries 2",
        "  timeout resolve 1s",
        "  timeout retry 1s",
        "  hold valid 10s",
        "  hold nx 1s",
        "  hold other 1s",
        "  hold refused 1s",
        "  hold timeout 1s",
        "",
    ]
    for port, listen_port in listen.items():
        lines += _frontend(port, listen_port, config_dir, policy.dns.max_label_length)
    lines += [
        # Reached only with a destination the frontend resolved (never the agent's own): the
        # guards repeat that, so no path can ever connect to 0.0.0.0:0's "original destination".
        "backend tls_out",
        "  mode tcp",
        "  tcp-request content reject unless { var(txn.ip) -m found }",
        "  server upstream 0.0.0.0:0",
        "",
        "backend http_out",
        "  mode http",
        "  http-reuse never",
        "  http-request deny unless { var(txn.ip) -m found }",
        "  server upstream 0.0.0.0:0",
        "",
    ]
    return "\n".join(lines)
