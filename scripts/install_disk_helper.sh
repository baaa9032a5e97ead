#!/usr/bin/env bash
# The disk helper for rootless runs (resources.disk), installed as root:
#   /usr/local/libexec/kapsis/kapsis-disk   root-owned copy of src/kapsis/workspace/disk_helper.py
#   group kapsis                            its members may run it through sudo, no password
#   /etc/sudoers.d/kapsis                   that one rule, checked by visudo before it is used
# A user without root cannot mount a filesystem; the helper makes, mounts and removes the disk of
# each of their agents (a sparse ext4 file of root's under /var/lib/kapsis-disks) for them.
# Usage: sudo bash scripts/install_disk_helper.sh [USER...]   (each USER joins the group)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELPER=/usr/local/libexec/kapsis/kapsis-disk
GROUP=kapsis
RULE=/etc/sudoers.d/kapsis

[ "$(id -u)" -eq 0 ] || { echo "install_disk_helper.sh: run it as root" >&2; exit 1; }
for tool in sudo visudo mkfs.ext4 debugfs; do
    command -v "$tool" >/dev/null || { echo "install_disk_helper.sh: $tool is missing" >&2; exit 1; }
done

if ! cmp -s "$ROOT/src/kapsis/workspace/disk_helper.py" "$HELPER"; then
    install -D -o root -g root -m 0755 "$ROOT/src/kapsis/workspace/disk_helper.py" "$HELPER"
    chmod 0755 "$(dirname "$HELPER")"
fi
getent group "$GROUP" >/dev/null || groupadd --system "$GROUP"
rule="%$GROUP ALL=(root) NOPASSWD: $HELPER"
if [ "$(cat "$RULE" 2>/dev/null)" != "$rule" ]; then
    staged="$(mktemp)"
    printf '%s\n' "$rule" > "$staged"
    visudo -qcf "$staged"
    install -o root -g root -m 0440 "$staged" "$RULE"
    rm -f "$staged"
fi
for user in "$@"; do
    if [ "$user" != root ] && ! id -nG "$user" | tr ' ' '\n' | grep -qx "$GROUP"; then
        usermod -aG "$GROUP" "$user"
        echo "==> $user joined the group $GROUP (it applies from their next login)"
    fi
done
