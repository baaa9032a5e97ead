"""Where things are inside an agent's Pod: mount paths, uids, the steps' shared configuration.

Shared by the renderer (which mounts them) and the in-pod steps (which read and write them), so
the two cannot disagree about a path.
"""

from __future__ import annotations

import json
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict

from kapsis.config import base as config_base

# uids. The agent's is the local one (the base image's `agent` user). The finisher gets a uid of
# its own because the gateway lets exactly that uid reach the git remote's port; the agent can
# never take it (no capabilities, no privilege escalation, runAsNonRoot).
AGENT_UID: Final = 1000
# Not one of the gateway's own uids (990-992, kapsis.network.gateway_layout): the firewall tells
# every one of them apart.
FINISHER_UID: Final = 993

WORKSPACE: Final = "/workspace"
# The finisher's own clone: the trusted repository it commits into and pushes from (what the
# host's project is for the Podman backend). Only the clone and finishing steps mount it.
TRUSTED_VOLUME: Final = "/kapsis"
TRUSTED_REPO: Final = "/kapsis/repo"
STATE_FILE: Final = "/kapsis/state.json"  # written by clone, read by finish
CREDENTIALS: Final = "/etc/kapsis-credentials"  # the credentials Secret (clone, finisher)
POD_INFO: Final = "/etc/kapsis-pod"  # downward API: the Pod's annotations (finisher only)
ANNOTATIONS_FILE: Final = "/etc/kapsis-pod/annotations"
TASK_SPEC: Final = "/task-spec.md"
AGENT_HOME: Final = config_base.AGENT_HOME
TERMINATION_LOG: Final = "/dev/termination-log"

# Keys of the credentials Secret (documented in the CRD's credentialsSecret field).
TOKEN_KEY: Final = "token"
SSH_KEY: Final = "ssh-privatekey"
KNOWN_HOSTS_KEY: Final = "known_hosts"
USERNAME_KEY: Final = "username"  # optional, for https (default x-access-token)

STEP_CONFIG_ENV: Final = "KAPSIS_STEP_CONFIG"


class StepConfig(BaseModel):
    """What the clone and finishing steps need to know, passed as JSON in one env variable.

    It holds no secret: the credentials stay in the Secret's files.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    request: str
    url: str
    branch: str
    base_branch: str | None = None
    push: bool = True
    credentials: Literal["token", "ssh", "none"] = "none"
    message: str
    committer: str = "Kapsis <kapsis@localhost>"
    exclude: tuple[str, ...] = ()
    push_timeout_seconds: int = 120
    wait_timeout_seconds: int = 24 * 3600

    def to_env(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    @classmethod
    def from_env_value(cls, text: str) -> StepConfig:
        return cls.model_validate_json(text)
