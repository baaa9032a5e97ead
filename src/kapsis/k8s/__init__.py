"""Kubernetes: the ``AgentRequest`` resource, its CRD and the objects rendered from it."""
