#!/bin/sh
# The Kapsis network gateway (runs in the gateway container, which owns the sandbox's network
# namespace). The firewall goes in first: if it cannot be loaded the gateway exits, the sandbox
# is never started and nothing else ever reaches the network (fail closed). Then the
# allowlisting resolver runs in the foreground for the life of the sandbox.
set -eu
nft -f /etc/kapsis-gateway/rules.nft
exec dnsmasq --keep-in-foreground --conf-file=/etc/kapsis-gateway/dnsmasq.conf
