#!/usr/bin/env bash
# One-command install of Kapsis on a fresh Debian 12 / Ubuntu machine:
#   host packages (podman and friends), the host fixes podman needs here, a .venv with Kapsis in
#   it, the base image (built locally; no registry), then the demo.
# Safe to run again: every step is skipped when already done.
#
# Usage: bash scripts/install.sh [--no-demo]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

IMAGE="localhost/kapsis-base:latest"
GATEWAY_IMAGE="localhost/kapsis-gateway:latest"
PACKAGES=(podman crun runc fuse-overlayfs slirp4netns uidmap netavark aardvark-dns catatonit
          debootstrap dnsmasq-base nftables iproute2 iptables git ca-certificates python3
          libsecret-tools gnome-keyring dbus openssh-client haproxy dnsdist sudo e2fsprogs)
DEMO=1

for arg in "$@"; do
    case "$arg" in
        --no-demo) DEMO=0 ;;
        -h|--help) sed -n '2,7s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "install.sh: unknown option '$arg' (use --no-demo or --help)" >&2; exit 2 ;;
    esac
done

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
else
    command -v sudo >/dev/null || die "not root and sudo is missing; run this script as root"
    SUDO=(sudo)
fi
as_root() { "${SUDO[@]}" "$@"; }

# --- host packages ----------------------------------------------------------------------------
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian and Ubuntu"
missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$pkg")
done
# debootstrap of Debian bookworm on an Ubuntu host needs Debian's archive keys.
if [ ! -e /usr/share/keyrings/debian-archive-keyring.gpg ]; then
    missing+=(debian-archive-keyring)
fi
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    # haproxy and dnsdist are here only for their configuration checks (the gateway image has
    # its own): their packages must not start a service on the host.
    no_services=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod 755 /usr/sbin/policy-rc.d
        no_services=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    if [ -n "$no_services" ]; then
        as_root rm -f /usr/sbin/policy-rc.d
    fi
else
    say "host packages already installed"
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "Kapsis needs Python >= 3.11; this host has $(python3 --version 2>&1)"

# --- host fixes -------------------------------------------------------------------------------
# (1) Rootful podman raises a container's nofile limit to 1048576; without CAP_SYS_RESOURCE and
#     with a lower hard limit every run fails: "crun: setrlimit RLIMIT_NOFILE: Operation not
#     permitted". Cap podman's default at the hard limit we have.
hard_nofile="$(ulimit -Hn)"
if [ "$hard_nofile" != unlimited ] && [ "$hard_nofile" -lt 1048576 ]; then
    shopt -s nullglob
    confs=(/etc/containers/containers.conf /etc/containers/containers.conf.d/*.conf)
    shopt -u nullglob
    if [ "${#confs[@]}" -gt 0 ] && grep -Eqs '^[^#]*nofile=' "${confs[@]}"; then
        say "containers.conf already sets default_ulimits"
    else
        say "hard nofile limit is $hard_nofile: setting podman's default_ulimits to match"
        as_root mkdir -p /etc/containers/containers.conf.d
        printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=32768:32768"]\n' \
            "$hard_nofile" "$hard_nofile" \
            | as_root tee /etc/containers/containers.conf.d/kapsis.conf >/dev/null
    fi
fi

# (2) cgroup v1 "hybrid" hosts: crun refuses to run while a controller (hugetlb, in practice) is
#     left on the v2 hierarchy: "cgroups in hybrid mode not supported, drop all controllers from
#     cgroupv2". Mount each such controller as v1. Not persistent: re-run after a reboot.
if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = tmpfs ] \
        && grep -qE '^[^ ]+ /sys/fs/cgroup/[^ ]+ cgroup ' /proc/self/mounts; then
    if [ -r /sys/fs/cgroup/unified/cgroup.controllers ]; then
        read -r -a on_v2 < /sys/fs/cgroup/unified/cgroup.controllers || true
    elif awk '$1 == "hugetlb" && $4 == "1"' /proc/cgroups | grep -q . \
            && ! grep -qE ' cgroup [^ ]*\bhugetlb\b' /proc/self/mounts; then
        on_v2=(hugetlb)
    else
        on_v2=()
    fi
    for controller in "${on_v2[@]}"; do
        if grep -qE "^[^ ]+ [^ ]+ cgroup [^ ]*\\b${controller}\\b" /proc/self/mounts; then
            continue  # already on v1
        fi
        say "cgroup hybrid mode: mounting the $controller controller as cgroup v1"
        as_root mkdir -p "/sys/fs/cgroup/$controller"
        as_root mount -t cgroup -o "$controller" cgroup "/sys/fs/cgroup/$controller"
    done
fi

# (3) A host id range for rootful sandboxes (`--userns=auto` takes ranges from it).
for file in /etc/subuid /etc/subgid; do
    if ! grep -qs '^containers:' "$file"; then
        say "adding containers:200000:1000000 to $file"
        echo 'containers:200000:1000000' | as_root tee -a "$file" >/dev/null
    fi
done

# (4) The disk helper (scripts/install_disk_helper.sh): rootless runs get their resources.disk
#     through it. The user who runs this script joins its group.
member=()
if [ "$(id -u)" -ne 0 ]; then
    member=("$(id -un)")
elif [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    member=("$SUDO_USER")
fi
as_root bash "$ROOT/scripts/install_disk_helper.sh" "${member[@]}"

# --- Kapsis itself ----------------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.kapsis-install-stamp
if [ ! -x .venv/bin/kapsis ] || [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing Kapsis into .venv (pip install -e '.[dev,k8s]')"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,k8s]'
    touch "$stamp"
else
    say "Kapsis already installed in .venv"
fi
# An editable install leaves Kapsis' own modules uncompiled, and with PYTHONDONTWRITEBYTECODE set
# (as on these machines) Python compiles them again on every start: 30-60 ms of each `kapsis run`.
# Compile them once here; a module edited later is just compiled in memory again until the next run.
.venv/bin/python -m compileall -q src/kapsis

# --- the images -------------------------------------------------------------------------------
if podman image exists "$IMAGE" && podman image exists "$GATEWAY_IMAGE"; then
    say "images $IMAGE and $GATEWAY_IMAGE present"
else
    say "building what is missing of $IMAGE and $GATEWAY_IMAGE (about a minute)"
    .venv/bin/kapsis setup
fi

say "Kapsis is installed: $ROOT/.venv/bin/kapsis"

if [ "$DEMO" -eq 1 ]; then
    say "running the demo (skip it with --no-demo)"
    bash scripts/demo.sh
fi
