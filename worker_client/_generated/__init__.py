"""Stubs generated from worker_client/protos by scripts/gen_protos.sh; do not edit."""
