#!/bin/bash
# The Kapsis network gateway (runs in the gateway container, which owns the sandbox's network
# namespace). The firewall goes in first: if it cannot be loaded the gateway exits, the sandbox
# is never started and nothing else ever reaches the network (fail closed). Then its daemons
# start, each as its own uid: the resolver (dnsmasq), the DNS front the agent asks (dnsdist) and,
# when names are allowlisted, the name proxy (HAProxy). The self-test runs as an unprivileged
# user and its verdict is written for the host (which starts the agent only on "ok"). The gateway
# lives as long as all of its daemons: when one ends, the container exits and the sandbox's
# namespace loses its network.
set -eu
CONFIG=/etc/kapsis-gateway
LOGS=/var/log/kapsis
VERDICT=$LOGS/selftest
# The host polls for the verdict: it must never see the file created but not yet written.
verdict() {
    echo "$1" > "$VERDICT.partial"
    mv "$VERDICT.partial" "$VERDICT"
}
if ! nft -f "$CONFIG/rules.nft" > "$VERDICT.out" 2>&1; then
    verdict failed
    exit 1
fi
daemons=()
dnsmasq --keep-in-foreground --conf-file="$CONFIG/dnsmasq.conf" &
daemons+=($!)
# The DNS front starts as its own uid (the firewall knows its sockets by it, and dnsdist opens
# its resolver's sockets before it would drop root), keeping only the right to bind port 53.
# Its files are made here, owned by the gateway's root (the user's own uid when rootless) and
# writable by the front; the gateway cannot give them away (no CAP_CHOWN). Only gateway
# processes ever see this directory.
for file in dns-refused.tsv dns-refused.counts; do
    install -m 622 /dev/null "$LOGS/$file"
done
chmod 711 "$LOGS"
setpriv --reuid=kapsis-dnsfront --regid=nogroup --clear-groups \
        --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service \
    dnsdist --supervised --disable-syslog -C "$CONFIG/dnsdist.conf" > "$LOGS/dnsdist.out" 2>&1 &
daemons+=($!)
if [ -f "$CONFIG/haproxy.cfg" ]; then
    # Its decisions go to stdout (one line each), which the host reads as the proxy's log.
    haproxy -db -f "$CONFIG/haproxy.cfg" > "$LOGS/proxy.log" 2> "$LOGS/proxy.err" &
    daemons+=($!)
fi
# Stopped (Kubernetes stops this sidecar once the agent and the finisher are done): leave what
# was blocked as the container's termination message, for the operator's status.
stopped() {
    if [ -w /dev/termination-log ]; then
        python3 "$CONFIG/report.py" > /dev/termination-log 2>/dev/null || true
    fi
    kill "${daemons[@]}" 2>/dev/null || true
    exit 0
}
trap stopped TERM INT
if setpriv --reuid=65534 --regid=65534 --clear-groups \
        python3 "$CONFIG/selftest.py" "$(cat "$CONFIG/probe-address")" \
        $(cat "$CONFIG/proxy-ports") > "$VERDICT.out" 2>&1; then
    verdict ok
else
    verdict failed
fi
# The first daemon to end ends the gateway (and so the sandbox's network).
wait -n "${daemons[@]}" || true
kill "${daemons[@]}" 2>/dev/null || true
exit 1
