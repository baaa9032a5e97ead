"""Kapsis: run AI coding agents in parallel, each in its own hardened sandbox.

The public Python API; the ``kapsis`` command is a thin layer over it. Names are imported on
first use so that ``import kapsis`` (and so every CLI start) stays cheap.
"""

from __future__ import annotations

from importlib import import_module

# Not ``typing.TYPE_CHECKING``: importing typing costs ~10 ms on every start of the command, and
# the start-up client (kapsis.forkserver.client) imports nothing else. Type checkers treat any
# ``TYPE_CHECKING`` name as true.
TYPE_CHECKING = False

__version__ = "0.1.0"

_EXPORTS = {
    "run": "kapsis.api",
    "launch": "kapsis.api",
    "plan": "kapsis.api",
    "status": "kapsis.api",
    "logs": "kapsis.api",
    "stop": "kapsis.api",
    "cleanup": "kapsis.api",
    "CleanupItem": "kapsis.api",
    "k8s_submission": "kapsis.api",
    "k8s_run": "kapsis.api",
    "RunRequest": "kapsis.sandbox.plan",
    "SandboxPlan": "kapsis.sandbox.plan",
    "RunResult": "kapsis.sandbox.launcher",
    "KapsisConfig": "kapsis.config.models",
    "load_config": "kapsis.config.loader",
    "KapsisError": "kapsis.errors",
    "ConfigError": "kapsis.errors",
    "AgentNotFoundError": "kapsis.errors",
    "SandboxError": "kapsis.errors",
    "ImageError": "kapsis.errors",
    "HostUnsupportedError": "kapsis.errors",
    "AgentFailedError": "kapsis.errors",
    "AgentKilledError": "kapsis.errors",
    "AgentTimeoutError": "kapsis.errors",
    "ExitCode": "kapsis.errors",
}

__all__ = [
    "AgentFailedError",
    "AgentKilledError",
    "AgentNotFoundError",
    "AgentTimeoutError",
    "CleanupItem",
    "ConfigError",
    "ExitCode",
    "HostUnsupportedError",
    "ImageError",
    "KapsisConfig",
    "KapsisError",
    "RunRequest",
    "RunResult",
    "SandboxError",
    "SandboxPlan",
    "cleanup",
    "k8s_run",
    "k8s_submission",
    "launch",
    "load_config",
    "logs",
    "plan",
    "run",
    "status",
    "stop",
]

if TYPE_CHECKING:
    from typing import Any

    from kapsis.api import (
        CleanupItem,
        cleanup,
        k8s_run,
        k8s_submission,
        launch,
        logs,
        plan,
        run,
        status,
        stop,
    )
    from kapsis.config.loader import load_config
    from kapsis.config.models import KapsisConfig
    from kapsis.errors import (
        AgentFailedError,
        AgentKilledError,
        AgentNotFoundError,
        AgentTimeoutError,
        ConfigError,
        ExitCode,
        HostUnsupportedError,
        ImageError,
        KapsisError,
        SandboxError,
    )
    from kapsis.sandbox.launcher import RunResult
    from kapsis.sandbox.plan import RunRequest, SandboxPlan


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kapsis' has no attribute {name!r}")
    return getattr(import_module(module), name)
