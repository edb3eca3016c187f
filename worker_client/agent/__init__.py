"""The worker agent (`localai-cluster-worker`): runs backend processes for the control plane.

It imports nothing of Django: it ships to GPU hosts with only `worker_client`.
"""
