"""The `echo` backend: a deterministic LocalAI-compatible backend for tests and demos."""
