"""The host: what it can do (facts, checks with fixes) and the base image Kapsis builds on it."""
