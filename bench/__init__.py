"""The harness: CLI, suites, training loop, results store."""
