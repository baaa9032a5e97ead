"""Names shared by the operator, the rendered Pod and the CLI: containers, labels, annotations.

One module so that the renderer, the status bridge and the in-pod steps cannot disagree about
what a container or an annotation is called.
"""

from __future__ import annotations

from typing import Final

# Containers of an agent's Pod, in the order they run.
CLONE_CONTAINER: Final = "clone"  # init: clones the repository with the credentials Secret
GATEWAY_CONTAINER: Final = "gateway"  # native sidecar: nftables + allowlisting resolver
AGENT_CONTAINER: Final = "agent"  # the agent; no credentials, no capabilities
FINISHER_CONTAINER: Final = "finisher"  # commits and pushes once the operator says the agent ended

MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE: Final = "kapsis"
REQUEST_LABEL: Final = "kapsis.dev/request"

# Written by the operator (from the kubelet's view of the agent container), read by the
# finisher through a downward-API volume: the agent cannot set Pod annotations.
AGENT_EXIT_ANNOTATION: Final = "kapsis.dev/agent-exit-code"
# Set with it when the agent's output shows it failed (its profile's failure signs): why.
AGENT_FAILURE_ANNOTATION: Final = "kapsis.dev/agent-failure"


def task_config_map_name(agent_id: str) -> str:
    """The ConfigMap `kapsis run --backend k8s --spec` creates for the request's task spec."""
    return f"{agent_id}-task"


# A namespace labelled with this (value "true") may run requests with network.mode open.
ALLOW_OPEN_NETWORK_LABEL: Final = "kapsis.dev/allow-open-network"

# Set on an AgentRequest by `kapsis stop` (which also deletes the Pod): the request was stopped
# on purpose, so an operator may report errorType "stopped" rather than "killed".
STOP_ANNOTATION: Final = "kapsis.dev/stop-requested"
