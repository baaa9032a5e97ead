#!/bin/sh
# The Kapsis network gateway (runs in the gateway container, which owns the sandbox's network
# namespace). The firewall goes in first: if it cannot be loaded the gateway exits, the sandbox
# is never started and nothing else ever reaches the network (fail closed). Then the
# allowlisting resolver starts, the self-test runs as an unprivileged user, and its verdict is
# written for the host (which starts the agent only on "ok"). The gateway lives as long as the
# resolver: if dnsmasq dies, the container exits and the sandbox's namespace loses its network.
set -eu
CONFIG=/etc/kapsis-gateway
VERDICT=/var/log/kapsis/selftest
# The host polls for the verdict: it must never see the file created but not yet written.
verdict() {
    echo "$1" > "$VERDICT.partial"
    mv "$VERDICT.partial" "$VERDICT"
}
if ! nft -f "$CONFIG/rules.nft" > "$VERDICT.out" 2>&1; then
    verdict failed
    exit 1
fi
dnsmasq --keep-in-foreground --conf-file="$CONFIG/dnsmasq.conf" &
resolver=$!
# Stopped (Kubernetes stops this sidecar once the agent and the finisher are done): leave what
# was blocked as the container's termination message, for the operator's status.
stopped() {
    if [ -w /dev/termination-log ]; then
        python3 "$CONFIG/report.py" > /dev/termination-log 2>/dev/null || true
    fi
    kill "$resolver" 2>/dev/null || true
    exit 0
}
trap stopped TERM INT
if setpriv --reuid=65534 --regid=65534 --clear-groups \
        python3 "$CONFIG/selftest.py" "$(cat "$CONFIG/probe-address")" > "$VERDICT.out" 2>&1; then
    verdict ok
else
    verdict failed
fi
wait "$resolver"
