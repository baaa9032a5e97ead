"""The backend interface: what every sandbox backend (Podman now, Kubernetes later) provides.

A backend translates a plan into its own terms and runs it. It never decides policy: anything
that could differ between backends belongs in the plan.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kapsis.sandbox.plan import SandboxPlan
from kapsis.secrets.redact import Redactor

if TYPE_CHECKING:
    from kapsis.network.observe import BlockedConnection


@dataclass(frozen=True)
class ExitInfo:
    """How the agent's process ended."""

    exit_code: int
    oom_killed: bool = False
    timed_out: bool = False
    # What the transcript's size cap left out (bytes), if anything.
    transcript_dropped: int = 0


@dataclass(frozen=True)
class SandboxInfo:
    """One sandbox as the backend sees it (for list and cleanup)."""

    agent_id: str
    name: str
    state: str


class RunningSandbox(ABC):
    """A launched sandbox; :meth:`wait` blocks until the agent exits."""

    plan: SandboxPlan

    @abstractmethod
    def wait(self) -> ExitInfo: ...

    def handover(self) -> tuple[int, ...]:
        """File descriptors a detached supervisor must inherit to carry on with this sandbox
        (given back to :meth:`Backend.attach_to`); the caller closes its copies afterwards."""
        return ()


class Backend(ABC):
    name: str

    @abstractmethod
    def describe(self, plan: SandboxPlan) -> list[list[str]]:
        """The backend's rendering of a plan (commands or manifests), for --dry-run."""

    @abstractmethod
    def preflight(self, plan: SandboxPlan) -> None:
        """Check, before anything is created, that the plan can run (image, tools)."""

    @abstractmethod
    def launch(self, plan: SandboxPlan, *, attach: bool, redactor: Redactor) -> RunningSandbox:
        """Create and start the sandbox. With ``attach`` the agent's output also goes to our
        stdout/stderr; the transcript and the terminal only ever see it through ``redactor``."""

    @abstractmethod
    def attach_to(
        self,
        plan: SandboxPlan,
        started_at: float | None = None,
        *,
        handover: tuple[int, ...] = (),
        redactor: Redactor | None = None,
    ) -> RunningSandbox:
        """A handle on a launched sandbox (for a supervisor): ``started_at`` is epoch seconds,
        ``handover`` what :meth:`RunningSandbox.handover` gave the launcher."""

    @abstractmethod
    def stop(self, agent_id: str, grace_seconds: int = 5) -> None: ...

    def stop_unsupervised(self, agent_id: str) -> None:
        """Stop a sandbox whose supervising host process died (nothing reads its output)."""
        self.stop(agent_id, grace_seconds=0)

    @abstractmethod
    def logs(self, agent_id: str, *, follow: bool) -> Iterator[str]:
        """The agent's transcript, line by line."""

    @abstractmethod
    def list(self) -> list[SandboxInfo]: ...

    def blocked_connections(
        self, plan: SandboxPlan
    ) -> tuple[builtins.list[BlockedConnection], bool]:
        """What the gateway refused (destination, protocol, port, packets), and whether the
        gateway was still running; call after the agent exited, before :meth:`remove`."""
        return [], True

    @abstractmethod
    def remove(self, plan: SandboxPlan) -> None:
        """Remove the sandbox and undo host-side set-up; keeps the agent's changes and logs."""
