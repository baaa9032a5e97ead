"""Security profiles (minimal, standard, strict, paranoid) as data, and the seccomp filter.

The README's security-profile table is generated from :data:`PROFILES`, so what is documented is
what is applied. The seccomp filter starts from the host's container default (when present) and
removes the syscalls an agent never needs but an escape often does: namespaces, mounts, ptrace,
the kernel keyring, eBPF, module loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kapsis.config.models import SecurityOverrides, SecurityProfileName


@dataclass(frozen=True)
class ProfileSettings:
    """What one security profile turns on, before per-setting overrides."""

    summary: str
    drop_all_capabilities: bool
    no_new_privileges: bool
    seccomp: bool
    read_only_root: bool
    noexec_tmp: bool
    pids_limit: int | None
    requires_lsm: bool


PROFILES: dict[SecurityProfileName, ProfileSettings] = {
    "minimal": ProfileSettings(
        "podman's defaults (default capabilities and seccomp); for debugging",
        drop_all_capabilities=False,
        no_new_privileges=False,
        seccomp=False,
        read_only_root=False,
        noexec_tmp=False,
        pids_limit=None,
        requires_lsm=False,
    ),
    "standard": ProfileSettings(
        "the default: no capabilities, no-new-privileges, Kapsis seccomp filter, pids limit",
        drop_all_capabilities=True,
        no_new_privileges=True,
        seccomp=True,
        read_only_root=False,
        noexec_tmp=False,
        pids_limit=1024,
        requires_lsm=False,
    ),
    "strict": ProfileSettings(
        "standard + read-only root filesystem, noexec /tmp, lower pids limit",
        drop_all_capabilities=True,
        no_new_privileges=True,
        seccomp=True,
        read_only_root=True,
        noexec_tmp=True,
        pids_limit=256,
        requires_lsm=False,
    ),
    "paranoid": ProfileSettings(
        "strict + an AppArmor profile; refuses to start on a host without AppArmor",
        drop_all_capabilities=True,
        no_new_privileges=True,
        seccomp=True,
        read_only_root=True,
        noexec_tmp=True,
        pids_limit=256,
        requires_lsm=True,
    ),
}

APPARMOR_PROFILE_NAME = "kapsis-paranoid"

# Syscalls the Kapsis filter refuses (EPERM), whatever the host default allows.
DENIED_SYSCALLS: tuple[str, ...] = (
    # namespaces and mounts: the classic ways out of a container
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    # kernel keyring, eBPF, perf, userfaultfd
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    # kernel modules, kexec, system-wide state
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "quotactl", "lookup_dcookie", "open_by_handle_at", "name_to_handle_at",
    "iopl", "ioperm", "syslog", "vhangup", "nfsservctl",
)  # fmt: skip

# clone() flags that create namespaces; clone is only allowed without them. clone3 passes its
# flags in memory that seccomp cannot read, so it is refused with ENOSYS and libc falls back.
CLONE_NAMESPACE_FLAGS = 0x7E020080
ENOSYS = 38
EPERM = 1
HOST_DEFAULT_SECCOMP = Path("/usr/share/containers/seccomp.json")


def effective_settings(
    profile: SecurityProfileName, overrides: SecurityOverrides
) -> dict[str, Any]:
    """The profile's settings with the user's overrides applied."""
    base = PROFILES[profile]
    return {
        "drop_all_capabilities": base.drop_all_capabilities,
        "no_new_privileges": _pick(overrides.no_new_privileges, base.no_new_privileges),
        "seccomp": _pick(overrides.seccomp, base.seccomp),
        "read_only_root": _pick(overrides.read_only_root, base.read_only_root),
        "noexec_tmp": _pick(overrides.noexec_tmp, base.noexec_tmp),
        "requires_lsm": base.requires_lsm,
    }


def _pick(override: bool | None, default: bool) -> bool:
    return default if override is None else override


def seccomp_profile(host_default: Path = HOST_DEFAULT_SECCOMP) -> dict[str, Any]:
    """Build the Kapsis seccomp profile (OCI/podman JSON format)."""
    denied = set(DENIED_SYSCALLS) | {"clone", "clone3"}
    if host_default.is_file():
        profile: dict[str, Any] = json.loads(host_default.read_text())
        rules = []
        for rule in profile.get("syscalls", []):
            names = [n for n in rule.get("names", []) if n not in denied]
            if names:
                rules.append({**rule, "names": names})
        profile["syscalls"] = rules
    else:
        # No host default to start from: allow by default and rely on the explicit denials.
        profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}
    if profile.get("defaultAction") == "SCMP_ACT_ALLOW":
        # Refuse clone when any namespace flag is set: one rule per flag bit.
        clone_rules = [
            _clone_rule("SCMP_ACT_ERRNO", mask=bit, equals=bit, errno=EPERM)
            for bit in _bits(CLONE_NAMESPACE_FLAGS)
        ]
    else:
        clone_rules = [_clone_rule("SCMP_ACT_ALLOW", mask=CLONE_NAMESPACE_FLAGS, equals=0)]
    profile["syscalls"] += [
        *clone_rules,
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
        {"names": sorted(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
    ]
    return profile


def _clone_rule(action: str, mask: int, equals: int, errno: int | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "names": ["clone"],
        "action": action,
        "args": [{"index": 0, "value": mask, "valueTwo": equals, "op": "SCMP_CMP_MASKED_EQ"}],
    }
    if errno is not None:
        rule["errnoRet"] = errno
    return rule


def _bits(value: int) -> list[int]:
    return [1 << i for i in range(value.bit_length()) if value & (1 << i)]


def apparmor_profile_text(name: str = APPARMOR_PROFILE_NAME) -> str:
    """AppArmor profile for paranoid sandboxes: no mounts, no ptrace, no /proc or /sys writes."""
    return f"""#include <tunables/global>

profile {name} flags=(attach_disconnected,mediate_deleted) {{
  #include <abstractions/base>
  network inet stream,
  network inet6 stream,
  network inet dgram,
  network inet6 dgram,
  network unix,
  file,
  umount,
  signal (receive) peer=unconfined,
  signal (send,receive) peer={name},
  deny mount,
  deny pivot_root,
  deny ptrace,
  deny network raw,
  deny network packet,
  deny @{{PROC}}/* w,
  deny @{{PROC}}/sys/** w,
  deny @{{PROC}}/sysrq-trigger rwklx,
  deny @{{PROC}}/kcore rwklx,
  deny /sys/** w,
}}
"""
