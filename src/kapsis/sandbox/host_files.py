"""Settings files the host renders into the sandbox dir before start, from the plan alone.

The plan holds what they say (the trusted SSH host keys, the build tools' settings) and the
read-only mounts that put them in the sandbox; a backend calls :func:`write_host_files` while it
prepares the host side, so ``--dry-run`` shows exactly what a run would write.
"""

from __future__ import annotations

from kapsis.sandbox.plan import SandboxPlan


def write_host_files(plan: SandboxPlan) -> None:
    if plan.ssh is not None:
        from kapsis.ssh.trust import write_files

        write_files(plan.ssh)
    if plan.build_tools is not None:
        from kapsis.buildtools import write_files as write_tool_files

        write_tool_files(plan.build_tools)
