"""Backends the agent can launch as `<command...> --addr host:port` (LocalAI's backend protocol)."""
