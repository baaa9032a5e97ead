"""The Kubernetes operator (kopf + the official kubernetes client) for ``AgentRequest``.

``validation`` (admission rules), ``bridge`` (Pod state -> request status, pure), ``audit``
(the operator's sealed audit logs), ``kube`` (its API calls), ``handlers`` (the reconcile
logic), ``runner`` (kopf configuration and entry point: ``python -m kapsis.operator``).
Nothing here is imported by a local ``kapsis run``.
"""
