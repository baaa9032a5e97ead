"""Backends run a :class:`~kapsis.sandbox.plan.SandboxPlan`. Podman is the local one."""

from kapsis.backends.base import Backend, ExitInfo, RunningSandbox, SandboxInfo

__all__ = ["Backend", "ExitInfo", "RunningSandbox", "SandboxInfo", "get_backend"]


def get_backend(name: str = "podman") -> Backend:
    if name == "podman":
        from kapsis.backends.podman import PodmanBackend

        return PodmanBackend()
    from kapsis.errors import ConfigError

    raise ConfigError(f"--backend {name}: unknown backend; available: podman")
