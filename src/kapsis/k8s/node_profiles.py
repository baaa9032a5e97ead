"""Print the node-side profiles an agent's Pod may refer to: the Kapsis seccomp filter and the
AppArmor profile of ``paranoid`` requests.

Kubernetes only names these profiles (``seccompProfile: Localhost``, ``appArmorProfile:
Localhost``); every node that may run an agent must have them installed. Generated from
:mod:`kapsis.sandbox.security`, the same source as the local sandbox's::

    python -m kapsis.k8s.node_profiles seccomp > /var/lib/kubelet/seccomp/kapsis/agent.json
    python -m kapsis.k8s.node_profiles apparmor | apparmor_parser --replace

Run on the node (the seccomp filter starts from the node's own container default when it has
one, ``/usr/share/containers/seccomp.json``, as locally).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from kapsis.k8s.settings import DEFAULT_APPARMOR_PROFILE
from kapsis.sandbox.security import apparmor_profile_text, seccomp_profile


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kapsis.k8s.node_profiles")
    parser.add_argument("kind", choices=["seccomp", "apparmor"])
    parser.add_argument("--name", default=DEFAULT_APPARMOR_PROFILE, help="AppArmor profile name")
    args = parser.parse_args(argv)
    if args.kind == "seccomp":
        print(json.dumps(seccomp_profile(), indent=2))
    else:
        print(apparmor_profile_text(args.name), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
