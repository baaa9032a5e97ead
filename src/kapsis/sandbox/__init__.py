"""The launch pipeline: request + config -> plan -> sandbox -> result."""
