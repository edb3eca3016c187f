"""The wire between the control plane and its workers: protos, the typed client, the agent and backends.

Nothing in this package imports Django: the agent and the backends ship to GPU hosts alone.
"""
