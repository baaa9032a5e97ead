"""The sandbox's network: the effective policy, and the gateway sidecar that enforces it."""
