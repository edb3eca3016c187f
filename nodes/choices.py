from django.db import models


class NodeType(models.TextChoices):
    BACKEND = "backend", "Backend"
    AGENT = "agent", "Agent"


class NodeStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    HEALTHY = "healthy", "Healthy"
    UNHEALTHY = "unhealthy", "Unhealthy"
    DRAINING = "draining", "Draining"
    OFFLINE = "offline", "Offline"


class ReplicaState(models.TextChoices):
    DOWNLOADING = "downloading", "Downloading"
    LOADING = "loading", "Loading"
    LOADED = "loaded", "Loaded"
    UNLOADING = "unloading", "Unloading"
    FAILED = "failed", "Failed"


class LabelSource(models.TextChoices):
    """Who set a label: an admin's label wins over the worker's label of the same key."""

    ADMIN = "admin", "Admin"
    WORKER = "worker", "Worker"
    AUTO = "auto", "Control plane"


# Labels the control plane writes itself; workers and admins do not own them.
LABEL_REPLICA_SLOTS = "node.replica-slots"
LABEL_NODE_NAME = "node.name"
LABEL_GPU_VENDOR = "gpu.vendor"
LABEL_GPU_VRAM = "gpu.vram"
AUTO_LABELS = frozenset({LABEL_REPLICA_SLOTS, LABEL_NODE_NAME, LABEL_GPU_VENDOR, LABEL_GPU_VRAM})
