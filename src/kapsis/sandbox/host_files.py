"""Settings files the host renders into the sandbox dir before start, from the plan alone.

The plan holds what they say (the trusted SSH host keys, the build tools' settings) and the
read-only mounts that put them in the sandbox; a backend calls :func:`write_host_files` while it
prepares the host side, so ``--dry-run`` shows exactly what a run would write.
"""

from __future__ import annotations

from kapsis import buildtools
from kapsis.sandbox.plan import SandboxPlan
from kapsis.ssh import trust


def write_host_files(plan: SandboxPlan) -> None:
    if plan.ssh is not None:
        trust.write_files(plan.ssh)
    if plan.build_tools is not None:
        buildtools.write_files(plan.build_tools)
