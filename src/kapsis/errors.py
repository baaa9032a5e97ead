"""The one hierarchy of Kapsis errors, and the process exit code each one maps to.

Every error a user can meet derives from :class:`KapsisError`. The CLI prints ``str(error)``
as a single line and exits with ``error.exit_code``; SDK callers catch the class they care
about. The exit codes are part of the public contract and are documented in the README.

    KapsisError                       1  (generic; not raised directly)
    ├── ConfigError                   2  bad flag, bad config file, unknown agent
    ├── AgentNotFoundError            2
    ├── SandboxError                  3  the sandbox could not be prepared or started
    │   ├── ImageError                3  image missing, or lacks a tool the agent needs
    │   └── HostUnsupportedError      4  the host cannot provide what was asked for
    ├── AgentFailedError              1  the agent ran and exited non-zero
    ├── AgentKilledError              5  killed: out of memory, stopped, signalled
    ├── AgentTimeoutError             6  the run exceeded its time limit
    ├── GitWorkflowError              8  the host could not commit the agent's work
    │   └── PushError                 7  the host could not push (or the remote diverged)
    └── AuditDamagedError             9  `kapsis audit verify` found the log damaged
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of ``kapsis run`` (and of every other command, where they apply)."""

    SUCCESS = 0
    AGENT_FAILED = 1
    USAGE = 2
    SANDBOX_FAILED = 3
    HOST_UNSUPPORTED = 4
    KILLED = 5
    TIMEOUT = 6
    PUSH_FAILED = 7
    COMMIT_FAILED = 8
    AUDIT_DAMAGED = 9
    INTERRUPTED = 130


class KapsisError(Exception):
    """Base class of every error Kapsis raises on purpose."""

    exit_code: ExitCode = ExitCode.AGENT_FAILED
    error_type: str = "error"


class ConfigError(KapsisError):
    """Bad input: a config file, a flag or a profile. The message names where and how to fix."""

    exit_code = ExitCode.USAGE
    error_type = "config"


class UntrustedConfigError(ConfigError):
    """A project's own config file (which the agent can edit) sets a key that needs trust; the
    message names the file, line and key, and how to trust it (`kapsis trust PROJECT`)."""

    error_type = "untrusted_config"


class AgentNotFoundError(ConfigError):
    """No agent profile has the requested name."""


class SandboxError(KapsisError):
    """The sandbox could not be prepared or started; the agent never ran."""

    exit_code = ExitCode.SANDBOX_FAILED
    error_type = "sandbox"


class GatewayStoppedError(SandboxError):
    """The network gateway stopped while the agent ran: its network was cut off (never opened).
    What the agent did is committed; the run fails."""

    error_type = "gateway"


class ImageError(SandboxError):
    """The image is missing, or lacks a program the agent profile needs."""

    error_type = "image"


class SandboxStartError(SandboxError):
    """The sandbox's container could not be started: the agent never ran."""


class MalformedTreeError(SandboxError):
    """A commit's tree that no checkout could hold (an agent can craft one on its branch)."""


class HostUnsupportedError(SandboxError):
    """The host lacks something the run asked for (a tool, an LSM, a kernel feature)."""

    exit_code = ExitCode.HOST_UNSUPPORTED
    error_type = "host"


class AgentFailedError(KapsisError):
    """The agent ran and exited with a non-zero code of its own."""

    exit_code = ExitCode.AGENT_FAILED
    error_type = "agent_failed"

    def __init__(self, message: str, agent_exit_code: int) -> None:
        super().__init__(message)
        self.agent_exit_code = agent_exit_code


class AgentReportedFailure(KapsisError):
    """The agent's own output says it failed, whatever its exit code (its profile's
    ``failure:`` signs): it could not reach its model, say."""

    exit_code = ExitCode.AGENT_FAILED
    error_type = "agent_error"

    def __init__(self, message: str, agent_exit_code: int) -> None:
        super().__init__(message)
        self.agent_exit_code = agent_exit_code


class AgentKilledError(KapsisError):
    """The agent was killed: out of memory, by ``kapsis stop``, or by a signal."""

    exit_code = ExitCode.KILLED
    error_type = "killed"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.error_type = reason


class AgentTimeoutError(KapsisError):
    """The run went past its time limit and was stopped."""

    exit_code = ExitCode.TIMEOUT
    error_type = "timeout"


class GitWorkflowError(KapsisError):
    """The host could not turn the agent's work into a commit; the work is kept where it was."""

    exit_code = ExitCode.COMMIT_FAILED
    error_type = "commit_failed"


class FileChangedError(GitWorkflowError):
    """A file of the agent's work changed between listing and reading: nothing is committed."""


class PushError(GitWorkflowError):
    """The push failed or was refused (a diverged remote); the local commit is kept."""

    exit_code = ExitCode.PUSH_FAILED
    error_type = "push_failed"

    def __init__(self, message: str, error_type: str = "push_failed") -> None:
        super().__init__(message)
        self.error_type = error_type


class AuditDamagedError(KapsisError):
    """``kapsis audit verify`` found a record modified, inserted, deleted, reordered or missing."""

    exit_code = ExitCode.AUDIT_DAMAGED
    error_type = "audit_damaged"
